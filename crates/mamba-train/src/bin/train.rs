//! `train --config configs/lora.toml [--set section.key=value]... [--resume] [--device D] [--ops O]`

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use mamba_model::MambaBackend;
use mamba_train::config::RunConfig;
use mamba_train::train::{train, Summary};
use mamba_train::{run_on, select_ops, BackendJob, DeviceSpec, OpsMode};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune (LoRA or full) or train a Mamba/Mamba2 model from a TOML run config")]
struct Args {
    /// The run config (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value: `--set train.lr=1e-3 --set lora.r=16`; `--set model.init=`
    /// removes a key.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from the last complete checkpoint in output.dir.
    #[arg(long)]
    resume: bool,
    /// Overrides `device.name`: auto, cuda, cuda:N, wgpu or cpu.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Overrides `device.ops`: auto, reference or kernels.
    #[arg(long)]
    ops: Option<OpsMode>,
}

struct Job {
    cfg: RunConfig,
    ops: OpsMode,
    resume: bool,
}

impl BackendJob for Job {
    type Output = Summary;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<Summary> {
        select_ops::<B>(self.ops, name).context("`device.ops`")?;
        eprintln!("training on {name} (ops: {})", self.ops);
        train::<B>(&self.cfg, device, self.resume)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = RunConfig::load(&args.config, &args.overrides)?;
    let device = match args.device {
        Some(d) => d,
        None => cfg.device.name.parse().map_err(anyhow::Error::msg)?,
    };
    let ops = match args.ops {
        Some(o) => o,
        None => cfg.device.ops_mode()?,
    };
    let summary = run_on(
        device,
        Job {
            cfg,
            ops,
            resume: args.resume,
        },
    )?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

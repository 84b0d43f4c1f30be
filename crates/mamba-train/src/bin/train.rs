//! `train --config configs/lora.toml [--set section.key=value]... [--resume] [--device D] [--ops O]`

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use mamba_model::MambaBackend;
use mamba_train::config::RunConfig;
use mamba_train::train::{train_on, Summary};
use mamba_train::{run_on_devices, select_ops, DeviceList, DevicesJob, OpsMode};

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
    /// Overrides `train.devices` and `device.name`: auto, cuda, cuda:N, wgpu or cpu; several
    /// for data parallelism: cuda:0,cuda:1 or cuda:all (cpu,cpu runs CPU replicas).
    #[arg(long)]
    device: Option<DeviceList>,
    /// Overrides `device.ops`: auto, reference or kernels.
    #[arg(long)]
    ops: Option<OpsMode>,
}

struct Job {
    cfg: RunConfig,
    ops: OpsMode,
    resume: bool,
}

impl DevicesJob for Job {
    type Output = Summary;
    fn run<B: MambaBackend>(self, devices: Vec<B::Device>, names: Vec<String>) -> Result<Summary> {
        select_ops::<B>(self.ops, &names[0]).context("`device.ops`")?;
        eprintln!("training on {} (ops: {})", names.join(", "), self.ops);
        train_on::<B>(&self.cfg, devices, names, self.resume)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = RunConfig::load(&args.config, &args.overrides)?;
    let devices = match args.device {
        Some(d) => d,
        None => DeviceList::from_config(&cfg.train.devices, &cfg.device.name)
            .map_err(anyhow::Error::msg)?,
    };
    let ops = match args.ops {
        Some(o) => o,
        None => cfg.device.ops_mode()?,
    };
    let summary = run_on_devices(
        &devices,
        Job {
            cfg,
            ops,
            resume: args.resume,
        },
    )?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

//! `train --config configs/lora.toml [--set section.key=value]... [--resume] [--device D]`

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use mamba_model::MambaBackend;
use mamba_train::config::RunConfig;
use mamba_train::train::{train, Summary};
use mamba_train::{run_on, BackendJob, DeviceSpec};

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
}

struct Job {
    cfg: RunConfig,
    resume: bool,
}

impl BackendJob for Job {
    type Output = Summary;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<Summary> {
        eprintln!("training on {name}");
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
    let summary = run_on(
        device,
        Job {
            cfg,
            resume: args.resume,
        },
    )?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

//! `eval --model <dir|hub-id> --token-ids <file.json> [--device D] [--norm grouped|hf] --json`

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use mamba_model::{MambaBackend, NormMode};
use mamba_train::evaluate::{EvalReport, check_ids, evaluate_ids, read_token_ids};
use mamba_train::{BackendJob, DeviceSpec, run_on};

#[derive(Parser, Debug)]
#[command(about = "Loss and perplexity of a Mamba/Mamba2 model on token ids")]
struct Args {
    /// Model directory or Hugging Face hub id (read from the local cache when offline).
    #[arg(long)]
    model: String,
    /// JSON file with a list of equal-length token-id lists.
    #[arg(long)]
    token_ids: PathBuf,
    /// auto, cuda, cuda:N, wgpu or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Gated-norm behaviour of Mamba2: grouped (mamba_ssm) or hf (transformers).
    #[arg(long, default_value = "grouped")]
    norm: NormMode,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

struct Job(Args);

impl BackendJob for Job {
    type Output = EvalReport;
    fn run<B: MambaBackend>(self, device: B::Device, _name: &str) -> Result<EvalReport> {
        let a = self.0;
        let rows = read_token_ids(&a.token_ids)?;
        let model = mamba_hf::load_model::<B>(&a.model, a.norm, &device).with_context(|| format!("loading model {}", a.model))?;
        check_ids(&rows, model.config.vocab_size(), &a.token_ids.display().to_string())?;
        evaluate_ids(&model, &rows, a.batch_size, &device)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let json = args.json;
    let report = run_on(args.device, Job(args))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("loss {:.6}  perplexity {:.4}  tokens {}", report.loss, report.perplexity, report.tokens);
    }
    Ok(())
}

//! `generate --model <dir|hub-id> --prompt-ids 1,2,3 --max-new-tokens N --greedy [--device D] [--ops O] --json`

use anyhow::{bail, Context, Result};
use clap::Parser;
use mamba_model::generate::greedy;
use mamba_model::{MambaBackend, NormMode};
use mamba_train::evaluate::check_ids;
use mamba_train::{run_on, select_ops, BackendJob, DeviceSpec, OpsMode};

#[derive(Parser, Debug)]
#[command(about = "Greedy continuation of token ids with a Mamba/Mamba2 model")]
struct Args {
    /// Model directory or Hugging Face hub id.
    #[arg(long)]
    model: String,
    /// Comma-separated prompt token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Greedy decoding (argmax at each step), the only mode so far.
    #[arg(long)]
    greedy: bool,
    /// Recompute the whole sequence at each step instead of the O(1) recurrent step.
    #[arg(long)]
    no_cache: bool,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// The hot ops: auto (kernels where the backend has them), reference (plain tensor ops) or
    /// kernels (an error on the CPU).
    #[arg(long, default_value = "auto")]
    ops: OpsMode,
    #[arg(long, default_value = "grouped")]
    norm: NormMode,
    /// f32, bf16-mixed or bf16: the weights and the compute in bf16 where the backend has it.
    #[arg(long, default_value = "f32")]
    precision: mamba_model::Precision,
    #[arg(long)]
    json: bool,
}

struct Job(Args);

impl BackendJob for Job {
    type Output = Vec<u32>;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<Vec<u32>> {
        let a = self.0;
        select_ops::<B>(a.ops, name)?;
        let model = mamba_hf::load_model::<B>(&a.model, a.norm, &device)
            .with_context(|| format!("loading model {}", a.model))?
            .with_precision(a.precision, &device);
        B::memory_cleanup(&device);
        check_ids(
            std::slice::from_ref(&a.prompt_ids),
            model.config.vocab_size(),
            "--prompt-ids",
        )?;
        let eos = if a.ignore_eos {
            None
        } else {
            model.config.eos_token_id()
        };
        Ok(greedy(
            &model,
            &a.prompt_ids,
            a.max_new_tokens,
            eos,
            !a.no_cache,
            &device,
        ))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.greedy {
        bail!("only greedy decoding is implemented: pass --greedy");
    }
    let json = args.json;
    let ids = run_on(args.device, Job(args))?;
    if json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        println!(
            "{}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    Ok(())
}

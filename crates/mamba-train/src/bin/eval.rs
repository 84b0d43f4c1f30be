//! `eval --model <dir|hub-id> --token-ids <file.json> [--device D] [--ops O] --json`
//! `eval --model <dir|hub-id> [--adapter <dir>] --data <source> [--split validation] --json`

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mamba_model::{MambaBackend, NormMode};
use mamba_train::config::{DataSection, TokenizerSection};
use mamba_train::evaluate::{check_ids, evaluate_ids, read_token_ids, EvalReport};
use mamba_train::train::evaluate_rows;
use mamba_train::{run_on, select_ops, BackendJob, DeviceSpec, OpsMode};

#[derive(Parser, Debug)]
#[command(
    about = "Loss and perplexity of a Mamba/Mamba2 model (optionally with a LoRA adapter) on token ids or a dataset"
)]
struct Args {
    /// Model directory or Hugging Face hub id (read from the local cache when offline).
    #[arg(long)]
    model: String,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSON file with a list of equal-length token-id lists.
    #[arg(long, conflicts_with = "data")]
    token_ids: Option<PathBuf>,
    /// Dataset: a local file (.jsonl/.json/.csv/text) or a hub dataset id.
    #[arg(long)]
    data: Option<String>,
    /// File inside a hub dataset repository.
    #[arg(long)]
    data_file: Option<String>,
    /// Field holding the text.
    #[arg(long, default_value = "text", conflicts_with = "template")]
    field: String,
    /// Template such as "{quote} — {author}" instead of a field.
    #[arg(long)]
    template: Option<String>,
    /// validation, train or all — the same seeded split as `train` with the same seed/fraction.
    #[arg(long, default_value = "validation")]
    split: String,
    #[arg(long, default_value_t = 0.1)]
    validation_fraction: f64,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// pack or pad.
    #[arg(long, default_value = "pack")]
    layout: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Use only the first N examples (before the split), as `data.max_examples`.
    #[arg(long)]
    max_examples: Option<usize>,
    /// tokenizer.json, a directory holding one, or a hub id (default: the model's directory).
    #[arg(long)]
    tokenizer: Option<String>,
    /// auto, cuda, cuda:N, wgpu or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// The hot ops: auto (kernels where the backend has them), reference (plain tensor ops) or
    /// kernels (an error on the CPU).
    #[arg(long, default_value = "auto")]
    ops: OpsMode,
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
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<EvalReport> {
        let a = self.0;
        select_ops::<B>(a.ops, name)?;
        let dir =
            mamba_hf::resolve_model_dir(&a.model).with_context(|| format!("model {}", a.model))?;
        let mut model = mamba_hf::load_model_dir::<B>(&dir, a.norm, &device)
            .with_context(|| format!("loading model {}", a.model))?;
        if let Some(adapter) = &a.adapter {
            model = mamba_hf::peft::load_adapter(model, adapter, &device)
                .with_context(|| format!("loading adapter {}", adapter.display()))?
                .0;
        }
        if let Some(path) = &a.token_ids {
            let rows = read_token_ids(path)?;
            check_ids(
                &rows,
                model.config.vocab_size(),
                &path.display().to_string(),
            )?;
            return evaluate_ids(&model, &rows, a.batch_size, &device);
        }
        let Some(source) = a.data.clone() else {
            bail!("pass --token-ids <file.json> or --data <dataset>");
        };
        let data = DataSection {
            source,
            file: a.data_file.clone(),
            field: a.template.is_none().then(|| a.field.clone()),
            template: a.template.clone(),
            validation_fraction: a.validation_fraction,
            seq_len: a.seq_len,
            layout: a.layout.clone(),
            max_examples: a.max_examples,
        };
        let tok = TokenizerSection {
            source: a.tokenizer.clone(),
            ..Default::default()
        };
        let prepared = mamba_train::data::prepare(&data, &tok, &model.config, Some(&dir), a.seed)?;
        let rows = match a.split.as_str() {
            "validation" => prepared.validation,
            "train" => prepared.train,
            "all" => prepared
                .train
                .into_iter()
                .chain(prepared.validation)
                .collect(),
            other => bail!("--split: expected validation, train or all, got {other:?}"),
        };
        if rows.is_empty() {
            bail!(
                "the {} split is empty (--validation-fraction {})",
                a.split,
                a.validation_fraction
            );
        }
        let (loss, tokens) = evaluate_rows(&model, &rows, a.batch_size, 0, &device)?;
        Ok(EvalReport {
            loss,
            perplexity: loss.exp(),
            tokens,
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let json = args.json;
    let report = run_on(args.device, Job(args))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "loss {:.6}  perplexity {:.4}  tokens {}",
            report.loss, report.perplexity, report.tokens
        );
    }
    Ok(())
}

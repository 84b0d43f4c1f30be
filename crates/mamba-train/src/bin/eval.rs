//! `eval --model <dir|hub-id> --token-ids <file.json> [--device D] [--ops O] --json`
//! `eval --model <dir|hub-id> [--adapter <dir>] --data <source> [--split validation] --json`
//! `eval --run <train output dir> | --config <run.toml> [flags that override the run's] --json`

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mamba_model::{MambaBackend, NormMode};
use mamba_train::config::{DataSection, RunConfig, TokenizerSection};
use mamba_train::evaluate::{check_ids, evaluate_ids, read_token_ids, EvalReport};
use mamba_train::train::evaluate_rows;
use mamba_train::{run_on, select_ops, BackendJob, DeviceSpec, OpsMode};

#[derive(Parser, Debug)]
#[command(
    about = "Loss and perplexity of a Mamba/Mamba2 model (optionally with a LoRA adapter) on token ids or a dataset"
)]
struct Args {
    /// Model directory or Hugging Face hub id (read from the local cache when offline). With
    /// `--run`, the run's own model (see below) unless given.
    #[arg(long)]
    model: Option<String>,
    /// A `train` output directory: evaluate that run's model on exactly its validation split,
    /// with its data, tokenizer, seed and evaluation settings (its `run_config.toml`). The model
    /// is the run's base + `adapter/` for LoRA (or `merged/` when the base was a random init),
    /// `model/` for a full run. Flags given here override the run's settings.
    #[arg(long, conflicts_with = "config")]
    run: Option<PathBuf>,
    /// A run config (TOML) instead of `--run`: its `output.dir` is the run.
    #[arg(long)]
    config: Option<PathBuf>,
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
    /// Field holding the text [default: text].
    #[arg(long, conflicts_with = "template")]
    field: Option<String>,
    /// Template such as "{quote} — {author}" instead of a field.
    #[arg(long)]
    template: Option<String>,
    /// validation, train or all — the same seeded split as `train` with the same seed/fraction.
    #[arg(long, default_value = "validation")]
    split: String,
    /// [default: 0.1]
    #[arg(long)]
    validation_fraction: Option<f64>,
    /// [default: 128]
    #[arg(long)]
    seq_len: Option<usize>,
    /// pack or pad [default: pack].
    #[arg(long)]
    layout: Option<String>,
    /// [default: 42]
    #[arg(long)]
    seed: Option<u64>,
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
    /// Gated-norm behaviour of Mamba2: grouped (mamba_ssm) or hf (transformers) [default:
    /// grouped].
    #[arg(long)]
    norm: Option<NormMode>,
    /// Sequences per forward pass [default: 8; with --run, the run's batch size].
    #[arg(long)]
    batch_size: Option<usize>,
    /// At most this many batches (0: all) [default: 0; with --run, the run's eval_batches].
    #[arg(long)]
    max_batches: Option<usize>,
    /// f32, bf16-mixed or bf16: bf16 weights and compute on backends with bf16 (the
    /// emulation elsewhere) [default: f32; with --run, the run's train.precision].
    #[arg(long)]
    precision: Option<mamba_model::Precision>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// The run's settings that `--run` / `--config` bring, and its model.
struct RunDefaults {
    cfg: RunConfig,
    model: String,
    adapter: Option<PathBuf>,
}

fn run_defaults(a: &Args) -> Result<Option<RunDefaults>> {
    let cfg = match (&a.run, &a.config) {
        (Some(dir), _) => {
            let path = dir.join("run_config.toml");
            let mut cfg = RunConfig::load(&path, &[]).with_context(|| {
                format!(
                    "--run {}: expected a `train` output directory",
                    dir.display()
                )
            })?;
            cfg.output.dir = dir.clone();
            cfg
        }
        (None, Some(path)) => RunConfig::load(path, &[])?,
        (None, None) => return Ok(None),
    };
    let out = cfg.output.dir.clone();
    let exists = |p: &Path| p.join("config.json").is_file();
    let (model, adapter) = if cfg.lora.enabled {
        match &cfg.model.source {
            Some(base) if out.join("adapter/adapter_config.json").is_file() => {
                (base.clone(), Some(out.join("adapter")))
            }
            _ if exists(&out.join("merged")) => (out.join("merged").display().to_string(), None),
            _ => bail!(
                "{}: no adapter/ over a loadable base and no merged/ model: has the run finished? (a LoRA run from model.init needs output.export_merged = true)",
                out.display()
            ),
        }
    } else if exists(&out.join("model")) {
        (out.join("model").display().to_string(), None)
    } else {
        bail!("{}: no model/ export: has the run finished?", out.display());
    };
    Ok(Some(RunDefaults {
        cfg,
        model,
        adapter,
    }))
}

struct Job(Args);

impl BackendJob for Job {
    type Output = EvalReport;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<EvalReport> {
        let a = self.0;
        select_ops::<B>(a.ops, name)?;
        let run = run_defaults(&a)?;
        let model_spec = match (&a.model, &run) {
            (Some(m), _) => m.clone(),
            (None, Some(r)) => r.model.clone(),
            (None, None) => bail!("pass --model <dir|hub-id>, or --run <train output dir>"),
        };
        let adapter = a
            .adapter
            .clone()
            .or_else(|| run.as_ref().and_then(|r| r.adapter.clone()));
        let norm = a
            .norm
            .or_else(|| run.as_ref().map(|r| mamba_train::train::norm_of(&r.cfg)))
            .unwrap_or_default();
        let dir = mamba_hf::resolve_model_dir(&model_spec)
            .with_context(|| format!("model {model_spec}"))?;
        let mut model = mamba_hf::load_model_dir::<B>(&dir, norm, &device)
            .with_context(|| format!("loading model {model_spec}"))?;
        if let Some(adapter) = &adapter {
            model = mamba_hf::peft::load_adapter(model, adapter, &device)
                .with_context(|| format!("loading adapter {}", adapter.display()))?
                .0;
        }
        let precision = a
            .precision
            .or_else(|| run.as_ref().map(|r| r.cfg.train.precision()))
            .unwrap_or_default();
        let model = model.with_precision(precision, &device);
        B::memory_cleanup(&device);
        let batch_size = a
            .batch_size
            .or_else(|| run.as_ref().map(|r| r.cfg.train.batch_size))
            .unwrap_or(8);
        let max_batches = a
            .max_batches
            .or_else(|| run.as_ref().map(|r| r.cfg.train.eval_batches))
            .unwrap_or(0);
        if let Some(path) = &a.token_ids {
            let rows = read_token_ids(path)?;
            check_ids(
                &rows,
                model.config.vocab_size(),
                &path.display().to_string(),
            )?;
            return evaluate_ids(&model, &rows, batch_size, &device);
        }
        // The data settings: the run's, then these flags over them.
        let (mut data, mut tok, mut seed) = match &run {
            Some(r) => (
                r.cfg.data.clone(),
                r.cfg.tokenizer.clone(),
                r.cfg.train.seed,
            ),
            None => {
                let Some(source) = a.data.clone() else {
                    bail!("pass --token-ids <file.json>, --data <dataset> or --run <train output dir>");
                };
                let data = DataSection {
                    source,
                    file: None,
                    field: Some("text".into()),
                    template: None,
                    validation_fraction: 0.1,
                    seq_len: 128,
                    layout: "pack".into(),
                    max_examples: None,
                };
                (data, TokenizerSection::default(), 42)
            }
        };
        if let Some(source) = &a.data {
            data.source = source.clone();
        }
        if a.data_file.is_some() {
            data.file = a.data_file.clone();
        }
        if let Some(t) = &a.template {
            data.template = Some(t.clone());
            data.field = None;
        }
        if let Some(f) = &a.field {
            data.field = Some(f.clone());
            data.template = None;
        }
        if let Some(v) = a.validation_fraction {
            data.validation_fraction = v;
        }
        if let Some(v) = a.seq_len {
            data.seq_len = v;
        }
        if let Some(v) = &a.layout {
            data.layout = v.clone();
        }
        if a.max_examples.is_some() {
            data.max_examples = a.max_examples;
        }
        if a.tokenizer.is_some() {
            tok.source = a.tokenizer.clone();
        }
        if let Some(s) = a.seed {
            seed = s;
        }
        // A run's tokenizer path is relative to where it ran: when it is not there, the model
        // directory's copy (every export holds the run's tokenizer) stands in.
        if let (Some(_), None, Some(s)) = (&run, &a.tokenizer, &tok.source) {
            let p = Path::new(s);
            if p.extension().is_some() && !p.exists() && dir.join("tokenizer.json").is_file() {
                tok.source = None;
            }
        }
        let prepared = mamba_train::data::prepare(&data, &tok, &model.config, Some(&dir), seed)?;
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
                "the {} split is empty (validation fraction {})",
                a.split,
                data.validation_fraction
            );
        }
        let (loss, tokens) = evaluate_rows(&model, &rows, batch_size, max_batches, &device)?;
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

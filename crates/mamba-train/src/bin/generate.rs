//! `generate --model <dir|hub-id> --prompt "text" [--max-new-tokens N] [--do-sample --temperature T
//! --top-k K --top-p P --seed S] [--min-new-tokens N] [--repetition-penalty R] [--json]`
//!
//! Text in, text out, with transformers' decoding options (`mamba_model::generate`); prompts also
//! as ids (`--prompt-ids`) or a file (`--prompt-file`, batched with left padding).

use anyhow::{bail, Context, Result};
use clap::Parser;
use mamba_data::Tokenizer;
use mamba_model::generate::{Generated, GenerationConfig};
use mamba_model::{MambaBackend, NormMode};
use mamba_train::generation::{find_tokenizer, prepare_prompts, report, PromptSource, TextStream};
use mamba_train::{run_on, select_ops, BackendJob, DeviceSpec, OpsMode};

#[derive(Parser, Debug)]
#[command(
    about = "Continue text (or token ids) with a Mamba/Mamba2 model, as transformers' generate"
)]
struct Args {
    /// Model directory or Hugging Face hub id.
    #[arg(long)]
    model: String,
    /// A text prompt (repeat for several; they run as one left-padded batch).
    #[arg(long, conflicts_with_all = ["prompt_ids", "prompt_file"])]
    prompt: Vec<String>,
    /// Comma-separated prompt token ids (for tools and tests).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt_file")]
    prompt_ids: Vec<u32>,
    /// One prompt a line, or JSONL with the prompt in `--field` (default `text`).
    #[arg(long)]
    prompt_file: Option<std::path::PathBuf>,
    /// The JSONL field of `--prompt-file` that holds the prompt.
    #[arg(long, requires = "prompt_file")]
    field: Option<String>,
    /// Prompts of `--prompt-file` decoded together (left-padded batches of this size).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// tokenizer.json, a directory holding one, or a hub id (default: the model's).
    #[arg(long)]
    tokenizer: Option<String>,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// EOS ids are suppressed until this many new tokens exist.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Sample instead of decoding greedily.
    #[arg(long, conflicts_with = "greedy")]
    do_sample: bool,
    /// Greedy decoding (the default when not sampling).
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// 0 keeps every token (transformers' default: 50).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// The sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// End-of-sequence ids (comma-separated; default: the model config's `eos_token_id`).
    #[arg(long, value_delimiter = ',')]
    eos_token_id: Vec<u32>,
    /// Keep generating past the end-of-sequence ids.
    #[arg(long)]
    ignore_eos: bool,
    /// Recompute the whole sequence at each step instead of the O(1) recurrent step.
    #[arg(long)]
    no_cache: bool,
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
    /// One JSON object per prompt at the end (ids, text, new tokens) instead of streamed text.
    #[arg(long)]
    json: bool,
}

struct Job {
    args: Args,
    source: PromptSource,
    tokenizer: Option<Tokenizer>,
}

impl BackendJob for Job {
    type Output = ();
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<()> {
        let Job {
            args: a,
            source,
            tokenizer,
        } = self;
        select_ops::<B>(a.ops, name)?;
        let prompts = prepare_prompts(source, tokenizer.as_ref())?;
        let model = mamba_hf::load_model::<B>(&a.model, a.norm, &device)
            .with_context(|| format!("loading model {}", a.model))?
            .with_precision(a.precision, &device);
        B::memory_cleanup(&device);
        let eos = if a.ignore_eos {
            Vec::new()
        } else if !a.eos_token_id.is_empty() {
            a.eos_token_id.clone()
        } else {
            model.config.eos_token_id().into_iter().collect()
        };
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            min_new_tokens: a.min_new_tokens,
            do_sample: a.do_sample,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
            pad_token_id: model
                .config
                .pad_token_id()
                .or(eos.first().copied())
                .unwrap_or(0),
            eos_token_ids: eos,
            use_cache: !a.no_cache,
        };
        let stdout = std::io::stdout();
        let batch = a.batch_size.max(1);
        for (b, chunk) in prompts.ids.chunks(batch).enumerate() {
            let texts = &prompts.texts[b * batch..b * batch + chunk.len()];
            // One prompt in text mode: the continuation streams as it is decoded.
            let stream_one = !a.json && chunk.len() == 1 && tokenizer.is_some();
            let rows: Vec<Generated> = if stream_one {
                let tok = tokenizer.as_ref().expect("checked");
                let mut out = stdout.lock();
                use std::io::Write;
                match &texts[0] {
                    Some(t) => write!(out, "{t}")?,
                    None => write!(out, "{}", tok.decode_skip_special(&chunk[0])?)?,
                }
                out.flush()?;
                let mut stream = TextStream::new(tok, out);
                let mut err = None;
                let rows = model.generate(chunk, &cfg, &device, |_, id| {
                    if let Err(e) = stream.push(id) {
                        err.get_or_insert(e);
                    }
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
                stream.finish()?;
                rows
            } else {
                model.generate(chunk, &cfg, &device, |_, _| {})?
            };
            if stream_one {
                continue;
            }
            for (g, text) in rows.iter().zip(texts) {
                if a.json {
                    println!("{}", report(g, text.as_deref(), tokenizer.as_ref())?);
                } else if let Some(tok) = &tokenizer {
                    println!("{}", tok.decode_skip_special(&g.ids)?);
                } else {
                    let ids: Vec<String> = g.ids.iter().map(u32::to_string).collect();
                    println!("{}", ids.join(","));
                }
            }
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let source = if !args.prompt.is_empty() {
        PromptSource::Text(args.prompt.clone())
    } else if let Some(path) = &args.prompt_file {
        PromptSource::File {
            path: path.clone(),
            field: args.field.clone(),
        }
    } else if !args.prompt_ids.is_empty() {
        PromptSource::Ids(vec![args.prompt_ids.clone()])
    } else {
        bail!("give a prompt: --prompt \"text\", --prompt-ids 1,2,3 or --prompt-file FILE");
    };
    let needs_text = !matches!(source, PromptSource::Ids(_));
    let tokenizer = find_tokenizer(&args.model, args.tokenizer.as_deref(), needs_text)?
        .map(|p| Tokenizer::from_file(&p))
        .transpose()?;
    run_on(
        args.device,
        Job {
            args,
            source,
            tokenizer,
        },
    )
}

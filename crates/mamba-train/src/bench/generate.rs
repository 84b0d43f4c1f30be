//! `bench generate`: decoding speed of a randomly initialised model through the public
//! [`MambaLM::generate`] path (greedy, EOS off): the prefill of `batch` random prompts of
//! `prompt_len` tokens and `new_tokens` cached steps, each step's tokens read back as `generate`
//! does. Prefill time is a generation of one new token (the prefill and one argmax); decode time
//! per token is the rest of a full generation over its `new_tokens - 1` steps.

use anyhow::{ensure, Result};
use mamba_model::generate::GenerationConfig;
use mamba_model::MambaBackend;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::model::random_model;
use super::RunInfo;

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// mamba2-130m, mamba1-130m or a model config JSON.
    #[arg(long, default_value = "mamba2-130m")]
    pub config: String,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    pub new_tokens: usize,
    /// Untimed generations before the timed ones (the first compiles the kernels).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32, bf16-mixed or bf16 (inference: the weights stored in the compute dtype).
    #[arg(long, default_value = "f32")]
    pub precision: mamba_model::Precision,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    #[serde(flatten)]
    pub info: RunInfo,
    pub config: String,
    pub model_type: &'static str,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub precision: String,
    pub compute: String,
    /// The first (untimed) generation, kernel compilation included.
    pub first_run_s: f64,
    /// Prefill of the batch and the first token.
    pub prefill_ms: f64,
    /// One cached step of the whole batch (median run).
    pub decode_ms_per_token: f64,
    /// `batch / decode_ms_per_token`: new tokens a second over the batch.
    pub decode_tokens_per_s: f64,
    /// `batch × new_tokens` over the whole generation (prefill included).
    pub end_to_end_tokens_per_s: f64,
}

pub fn run<B: MambaBackend>(device: &B::Device, name: &str, opts: &Options) -> Result<Report> {
    ensure!(opts.new_tokens >= 2, "--new-tokens: at least 2");
    ensure!(
        opts.batch >= 1 && opts.prompt_len >= 1,
        "--batch and --prompt-len: at least 1"
    );
    let (config, model) = random_model::<B>(&opts.config, opts.seed, device)?;
    let model = model.with_precision(opts.precision, device);
    B::memory_cleanup(device);
    let vocab = config.vocab_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let prompts: Vec<Vec<u32>> = (0..opts.batch)
        .map(|_| {
            (0..opts.prompt_len)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect()
        })
        .collect();
    let gen = |n: usize| -> Result<f64> {
        let cfg = GenerationConfig {
            max_new_tokens: n,
            ..Default::default()
        };
        B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        let start = std::time::Instant::now();
        let out = model.generate(&prompts, &cfg, device, |_, _| {})?;
        B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
        ensure!(out.iter().all(|g| g.new_tokens == n), "a row stopped early");
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let first = gen(opts.new_tokens)?;
    for _ in 1..opts.warmup {
        gen(opts.new_tokens)?;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let iters = opts.iters.max(1);
    let prefill = median((0..iters).map(|_| gen(1)).collect::<Result<_>>()?);
    let full = median(
        (0..iters)
            .map(|_| gen(opts.new_tokens))
            .collect::<Result<_>>()?,
    );
    let per_token = (full - prefill).max(0.0) / (opts.new_tokens - 1) as f64;
    Ok(Report {
        bench: "generate",
        info: RunInfo::new::<B>(device, name),
        config: opts.config.clone(),
        model_type: config.model_type(),
        batch: opts.batch,
        prompt_len: opts.prompt_len,
        new_tokens: opts.new_tokens,
        precision: opts.precision.to_string(),
        compute: format!("{:?}", model.compute),
        first_run_s: first / 1e3,
        prefill_ms: prefill,
        decode_ms_per_token: per_token,
        decode_tokens_per_s: opts.batch as f64 / (per_token / 1e3),
        end_to_end_tokens_per_s: (opts.batch * opts.new_tokens) as f64 / (full / 1e3),
    })
}

/// One line for a terminal.
pub fn line(r: &Report) -> String {
    format!(
        "{} batch {} prompt {} new {} {}: prefill {:.1} ms, decode {:.2} ms/token, {:.0} tokens/s decode, {:.0} end to end (first run {:.1} s)",
        r.config,
        r.batch,
        r.prompt_len,
        r.new_tokens,
        r.precision,
        r.prefill_ms,
        r.decode_ms_per_token,
        r.decode_tokens_per_s,
        r.end_to_end_tokens_per_s,
        r.first_run_s
    )
}

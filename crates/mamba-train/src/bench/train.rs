//! `bench train`: whole training steps of a randomly initialised model on random tokens, the
//! way the peer benchmark (`peer_mssm.py`) times mamba_ssm: the same optimizer step the `train`
//! binary runs (`crate::step`: micro-batch forward + backward through the checkpointing driver
//! and the chunked LM head, global-norm clipping, AdamW), LoRA adapters or full fine-tuning,
//! checkpointing on or off. Reports the first step apart (kernel compilation and autotuning), the
//! median of the timed steps, tokens/s from it, and memory: the allocator's high-water marks
//! (bytes in live tensors, bytes reserved from the device) beside the estimate `train` prints.

use anyhow::Result;
use burn::backend::Autodiff;
use mamba_data::Batch;
use mamba_kernels::memory::{peaks, reset_peaks, set_tracking};
use mamba_model::lora::{apply_lora, LoraConfig, LoraTargets};
use mamba_model::{BackpropOptions, MambaBackend};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::model::random_model;
use super::{median, RunInfo};
use crate::memory::{estimate, Estimate};
use crate::step::{no_decay_ids, optimizer_step, Share, StepError, StepSettings};
use crate::train::count_params;

/// What `bench train` runs (also its command-line flags).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// mamba2-130m, mamba1-130m or a model config JSON.
    #[arg(long, default_value = "mamba2-130m")]
    pub config: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// LoRA rank (0: full fine-tuning).
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "in_proj,out_proj,embeddings"
    )]
    pub lora_targets: Vec<String>,
    /// Checkpoint every k-th block (0: no gradient checkpointing).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Tokens per LM-head chunk (0: 2^26 logits per chunk, evened out).
    #[arg(long, default_value_t = 0)]
    pub loss_chunk: usize,
    /// Untimed steps after the first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32, bf16-mixed or bf16 (as `train.precision`).
    #[arg(long, default_value = "f32")]
    pub precision: mamba_model::Precision,
    /// Sample the host's threads over the timed steps: collapsed stacks to this file, a summary
    /// to `<file>.top.txt` (needs the `host-profile` feature).
    #[arg(long)]
    pub host_profile: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    #[serde(flatten)]
    pub info: RunInfo,
    pub config: String,
    pub model_type: &'static str,
    pub params: usize,
    pub trainable_params: usize,
    pub batch: usize,
    pub seq: usize,
    pub lora_r: usize,
    pub lora_targets: Vec<String>,
    pub checkpoint_every: usize,
    /// `f32`, `bf16-mixed` or `bf16`.
    pub precision: String,
    /// What the compute dtype is on this backend.
    pub compute: String,
    pub first_step_s: f64,
    /// Median of the timed steps.
    pub step_ms: f64,
    /// Medians over the timed steps of the host's phases (`crate::step::StepTimes`): issuing
    /// the forward and backward, issuing the update, then waiting for the device at the step's
    /// one read. A wait near zero means the step is bound by the host.
    pub issue_forward_backward_ms: f64,
    pub issue_update_ms: f64,
    pub wait_ms: f64,
    /// `batch × seq / step time`.
    pub tokens_per_s: f64,
    pub steps_timed: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    pub peak_in_use_gib: Option<f64>,
    pub peak_reserved_gib: Option<f64>,
    pub device_total_gib: Option<f64>,
    pub estimate: Estimate,
    /// Set when a step ran out of memory (the runtime's message).
    pub out_of_memory: Option<String>,
}

fn gib(b: u64) -> f64 {
    crate::memory::gib(b)
}

/// Runs the training-step benchmark on backend `B`; `name` is what `--device` selected.
pub fn run<B: MambaBackend>(device: &B::Device, name: &str, opts: &Options) -> Result<Report> {
    type A<B> = Autodiff<B>;
    let (config, model) = random_model::<A<B>>(&opts.config, opts.seed, device)?;
    let model = if opts.lora_r > 0 {
        let l = LoraConfig {
            r: opts.lora_r,
            alpha: 2.0 * opts.lora_r as f64,
            dropout: 0.0,
            use_rslora: false,
            targets: LoraTargets::Names(opts.lora_targets.clone()),
        };
        apply_lora(model, &l, device)?.0
    } else {
        model
    };
    let model = model.with_precision(opts.precision, device);
    // The f32 copies of the weights now stored in bf16 go back to the device.
    B::memory_cleanup(device);
    let (params, trainable) = count_params(&model);
    let compute = model.compute;
    let est = estimate(
        &model,
        opts.batch,
        opts.seq,
        opts.checkpoint_every,
        opts.loss_chunk,
    );
    let vocab = config.vocab_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut next_batch = || -> Result<Batch> {
        let n = opts.batch * opts.seq;
        let ids: Vec<i64> = (0..n).map(|_| rng.random_range(0..vocab as i64)).collect();
        Ok(Batch {
            batch: opts.batch,
            seq_len: opts.seq,
            labels: ids.clone(),
            ids,
            tokens: n - opts.batch,
        })
    };
    let mut optim = crate::optim::AdamW::<A<B>>::new(0.9, 0.999, 1e-5);
    let settings = StepSettings {
        grad_accum: 1,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        backprop: BackpropOptions {
            checkpoint_every: opts.checkpoint_every,
            loss_chunk: opts.loss_chunk,
            seed: opts.seed,
        },
    };
    let skip = no_decay_ids(&model);
    let device_total = B::memory_stats(device).and_then(|m| m.total);
    set_tracking(B::memory_stats(device).is_some());
    reset_peaks();
    let mut model = Some(model);
    let mut times = Vec::new();
    let mut first_step_s = 0.0;
    let mut losses = Vec::new();
    let mut phases: [Vec<f64>; 3] = Default::default();
    let mut oom = None;
    let total_steps = 1 + opts.warmup + opts.steps.max(1);
    let mut sampler = None;
    for step in 0..total_steps {
        if step == opts.warmup + 1 {
            if let Some(path) = &opts.host_profile {
                sampler = Some((super::host_profile::start()?, path));
            }
        }
        let start = std::time::Instant::now();
        let m = model.take().expect("the model is back after each step");
        let shares = [Share::whole(next_batch()?)];
        match optimizer_step(
            m,
            &mut optim,
            &shares,
            step as u64,
            1e-4,
            &settings,
            &skip,
            device,
            None,
        ) {
            Ok((m, report)) => {
                B::sync(device).map_err(|e| anyhow::anyhow!("device sync: {e:?}"))?;
                let s = start.elapsed().as_secs_f64();
                if step == 0 {
                    first_step_s = s;
                } else if step > opts.warmup {
                    times.push(s * 1e3);
                    let t = report.times;
                    phases[0].push(t.forward_backward_s * 1e3);
                    phases[1].push(t.update_s * 1e3);
                    phases[2].push(t.wait_s * 1e3);
                }
                losses.push(report.loss);
                model = Some(m);
            }
            Err(StepError::OutOfMemory(msg)) => {
                oom = Some(msg.lines().next().unwrap_or_default().to_string());
                break;
            }
            Err(StepError::NonFinite(v)) => anyhow::bail!("the loss is {v} at step {}", step + 1),
            Err(StepError::NonFiniteNorm(v)) => {
                anyhow::bail!("the gradient norm is {v} at step {}", step + 1)
            }
            Err(StepError::PeerFailed) => unreachable!("one device"),
            Err(StepError::Other(e)) => return Err(e),
        }
    }
    set_tracking(false);
    if let Some((sampler, path)) = sampler {
        super::host_profile::finish(sampler, path)?;
    }
    let (in_use, reserved) = peaks();
    let steps_timed = times.len();
    let step_ms = median(times);
    let [fb, up, wait] = phases;
    let has_mem = reserved > 0;
    Ok(Report {
        bench: "train",
        info: RunInfo::new::<B>(device, name),
        config: opts.config.clone(),
        model_type: config.model_type(),
        params,
        trainable_params: trainable,
        batch: opts.batch,
        seq: opts.seq,
        lora_r: opts.lora_r,
        lora_targets: opts.lora_targets.clone(),
        checkpoint_every: opts.checkpoint_every,
        precision: opts.precision.to_string(),
        compute: format!("{:?}", compute),
        first_step_s,
        step_ms,
        issue_forward_backward_ms: median(fb),
        issue_update_ms: median(up),
        wait_ms: median(wait),
        tokens_per_s: (opts.batch * opts.seq) as f64 / (step_ms / 1e3),
        steps_timed,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        peak_in_use_gib: has_mem.then(|| gib(in_use)),
        peak_reserved_gib: has_mem.then(|| gib(reserved)),
        device_total_gib: device_total.map(gib),
        estimate: est,
        out_of_memory: oom,
    })
}

/// One line for a terminal.
pub fn line(r: &Report) -> String {
    format!(
        "{} {}x{} lora r{} ckpt {} {}: first step {:.1} s, step {:.1} ms (host issues {:.1} + {:.1} ms, then waits {:.1}), {:.0} tok/s, peak in use {} GiB, reserved {} GiB (estimate {:.2} GiB){}",
        r.config,
        r.batch,
        r.seq,
        r.lora_r,
        r.checkpoint_every,
        r.precision,
        r.first_step_s,
        r.step_ms,
        r.issue_forward_backward_ms,
        r.issue_update_ms,
        r.wait_ms,
        r.tokens_per_s,
        r.peak_in_use_gib.map(|g| format!("{g:.2}")).unwrap_or("-".into()),
        r.peak_reserved_gib.map(|g| format!("{g:.2}")).unwrap_or("-".into()),
        gib(r.estimate.total),
        r.out_of_memory.as_ref().map(|m| format!(" OUT OF MEMORY: {m}")).unwrap_or_default()
    )
}

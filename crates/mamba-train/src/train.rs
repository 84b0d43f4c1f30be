//! The training loop: full or LoRA fine-tuning (or training from scratch) of a causal LM.
//!
//! A plain loop over AdamW (`crate::optim`: burn's arithmetic and record, one launch a
//! parameter), not burn-train's `Learner`: the loop needs things the
//! Learner of burn 0.21 does not express together — gradient accumulation with *global*-norm
//! clipping (burn's `GradientClipping` clips per parameter), weight decay that skips A_log, D,
//! dt_bias, norms and biases (AdamW's decay applies to every parameter), a backward pass driven
//! segment by segment (block checkpointing, the chunked LM head: `mamba_model::backprop`),
//! token-based metrics, exports in Hugging Face / PEFT formats, and resumable checkpoints that
//! also hold the data position. The pieces live beside this file: `step` (one optimizer step),
//! `checkpoint` (save / resume), `metrics` (metrics.jsonl, throughput), `memory` (estimate,
//! out-of-memory message), `export` (PEFT adapter, merged model), `parallel` (data-parallel
//! ranks: the other devices' replicas, on burn-collective).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use mamba_data::{batch_stream, collate, Batch, Row};
use mamba_hf::{load_config, load_model_dir, resolve_model_dir, SaveDtype};
use mamba_kernels::memory::{peaks, reset_peaks, set_tracking};
use mamba_kernels::BackwardWith;
use mamba_model::lora::{apply_lora, LoraConfig, LoraTargets};
use mamba_model::{BackpropOptions, MambaBackend, MambaLM, NormMode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint::{self, list_checkpoints, BaseFingerprint, Rec, TrainState};
use crate::config::RunConfig;
use crate::data::{prepare, Prepared};
use crate::memory::{estimate, gib, OutOfMemory};
use crate::metrics::{Metrics, Progress, Throughput};
use crate::parallel::{Ranks, Replicas, Topology};
use crate::step::{batch_tensors, no_decay_ids, quiet_oom_panics, StepError, StepSettings};

/// What a finished run reports (also written to `<output>/summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_perplexity: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Input tokens (rows × seq_len) per second over the last steps' window.
    pub tokens_per_s: f64,
    /// The same since the first step (its kernel compilation included).
    pub tokens_per_s_cumulative: f64,
    /// Highest bytes in live tensors seen at the step's sample points (`None` on the CPU).
    pub peak_in_use_bytes: Option<u64>,
    /// Highest bytes the allocator held from the device.
    pub peak_reserved_bytes: Option<u64>,
    pub output: PathBuf,
}

pub fn norm_of(cfg: &RunConfig) -> NormMode {
    cfg.model.norm.parse().unwrap_or_default()
}

pub fn save_dtype(cfg: &RunConfig) -> SaveDtype {
    match cfg.output.dtype.as_str() {
        "f16" => SaveDtype::F16,
        "bf16" => SaveDtype::Bf16,
        _ => SaveDtype::F32,
    }
}

pub fn lora_config(cfg: &RunConfig) -> LoraConfig {
    LoraConfig {
        r: cfg.lora.r,
        alpha: cfg.lora.alpha,
        dropout: cfg.lora.dropout,
        use_rslora: cfg.lora.rslora,
        targets: match &cfg.lora.target_regex {
            Some(r) => LoraTargets::Regex(r.clone()),
            None => LoraTargets::Names(cfg.lora.target_modules.clone()),
        },
    }
}

/// The base model the run starts from, and its directory when it came from one.
pub fn base_model<B: Backend>(
    cfg: &RunConfig,
    device: &B::Device,
) -> Result<(MambaLM<B>, Option<PathBuf>)> {
    let norm = norm_of(cfg);
    if let Some(src) = &cfg.model.source {
        let dir = resolve_model_dir(src).with_context(|| format!("`model.source` {src}"))?;
        let model = load_model_dir(&dir, norm, device)
            .with_context(|| format!("loading {}", dir.display()))?;
        Ok((model, Some(dir)))
    } else {
        let path = cfg.model.init.as_ref().expect("validated: source or init");
        let config = load_config(path)
            .with_context(|| format!("`model.init` {}", path.display()))?
            .with_norm(norm);
        B::seed(device, cfg.train.seed);
        Ok((MambaLM::init(&config, device)?, None))
    }
}

struct Counter {
    total: usize,
    trainable: usize,
}

impl<B: Backend> ModuleVisitor<B> for Counter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let n: usize = param.shape().dims::<D>().iter().product();
        self.total += n;
        if param.is_require_grad() {
            self.trainable += n;
        }
    }
}

/// (total, trainable) parameter counts.
pub fn count_params<B: Backend>(model: &MambaLM<B>) -> (usize, usize) {
    let mut c = Counter {
        total: 0,
        trainable: 0,
    };
    model.visit(&mut c);
    (c.total, c.trainable)
}

/// Mean loss over rows (token-weighted), in batches; `max_batches` 0 means all.
pub fn evaluate_rows<B: MambaBackend>(
    model: &MambaLM<B>,
    rows: &[Row],
    batch_size: usize,
    max_batches: usize,
    device: &B::Device,
) -> Result<(f64, usize)> {
    let mut nll = 0.0;
    let mut tokens = 0usize;
    for (i, chunk) in rows.chunks(batch_size.max(1)).enumerate() {
        if max_batches > 0 && i >= max_batches {
            break;
        }
        let refs: Vec<&Row> = chunk.iter().collect();
        let b = collate(&refs);
        if b.tokens == 0 {
            continue;
        }
        let (ids, labels) = batch_tensors::<B>(&b, device);
        let loss: f64 = model.loss(ids, labels).into_scalar().elem();
        ensure!(loss.is_finite(), "validation loss is {loss}");
        nll += loss * b.tokens as f64;
        tokens += b.tokens;
    }
    ensure!(tokens > 0, "no validation tokens");
    Ok((nll / tokens as f64, tokens))
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    mamba_hf::checkpoint::write_atomic(path, bytes)?;
    Ok(())
}

/// The backprop settings of a run (checkpointing, LM-head chunk, dropout seed).
pub fn backprop_options(cfg: &RunConfig) -> BackpropOptions {
    let t = &cfg.train;
    BackpropOptions {
        checkpoint_every: if t.gradient_checkpointing {
            t.checkpoint_every_k_blocks.max(1)
        } else {
            0
        },
        loss_chunk: t.loss_chunk_tokens,
        seed: t.seed,
    }
}

/// Train as `cfg` says on backend `B` (under burn's autodiff; checkpointing is ours, see
/// `mamba_model::backprop`).
pub fn train<B: MambaBackend>(cfg: &RunConfig, device: B::Device, resume: bool) -> Result<Summary> {
    train_on::<B>(cfg, vec![device], vec!["the device".into()], resume)
}

/// [`train`] on several devices of backend `B` (data parallelism: one replica each, the global
/// batch split evenly; see [`crate::parallel`]), `names` naming them in messages. One device is
/// exactly [`train`].
pub fn train_on<B: MambaBackend>(
    cfg: &RunConfig,
    devices: Vec<B::Device>,
    names: Vec<String>,
    resume: bool,
) -> Result<Summary> {
    ensure!(!devices.is_empty(), "no device to train on");
    run::<Autodiff<B>>(cfg, &devices, &names, resume)
}

/// The model, data and sizes a run starts from, before any checkpoint is resumed.
struct Setup<A: AutodiffBackend + MambaBackend> {
    model: MambaLM<A>,
    lora: Option<LoraConfig>,
    data: Prepared,
    precision: mamba_model::Precision,
    /// Rows of each batch one device takes.
    device_batch: usize,
    total_params: usize,
    trainable_params: usize,
    est: crate::memory::Estimate,
    /// The device's memory, where the backend reports it.
    device_total: Option<u64>,
}

/// The output directory made and checked (no checkpoints unless resuming), the run's config
/// written into it by the node that owns it; returns the checkpoints already there.
fn prepare_output(cfg: &RunConfig, io: bool, resume: bool) -> Result<Vec<(u64, PathBuf)>> {
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let existing = list_checkpoints(out);
    if !resume && !existing.is_empty() {
        bail!(
            "{} already holds checkpoints (last: step {}); pass --resume to continue that run, or choose another output.dir",
            out.display(),
            existing.last().map(|c| c.0).unwrap_or(0)
        );
    }
    if io {
        write_file_atomic(
            &out.join("run_config.toml"),
            toml::to_string_pretty(cfg)?.as_bytes(),
        )?;
    }
    Ok(existing)
}

/// Loads the model and the data, applies the adapters and the precision, and estimates the
/// memory a step takes, saying each on stderr as a user follows a run.
fn setup<A>(
    cfg: &RunConfig,
    topology: &Topology,
    names: &[String],
    device: &A::Device,
) -> Result<Setup<A>>
where
    A: AutodiffBackend + MambaBackend,
{
    let t = &cfg.train;
    let world = topology.world;
    // `run` checked that the batch splits evenly.
    let device_batch = t.batch_size / world;

    let (model, model_dir) = base_model::<A>(cfg, device)?;
    let data: Prepared = prepare(
        &cfg.data,
        &cfg.tokenizer,
        &model.config,
        model_dir.as_deref(),
        cfg.train.seed,
    )?;
    eprintln!(
        "data: {} examples from {} → {} train rows, {} validation rows of {} tokens",
        data.examples,
        data.data_file.display(),
        data.train.len(),
        data.validation.len(),
        cfg.data.seq_len
    );

    let lora = cfg.lora.enabled.then(|| lora_config(cfg));
    let model = match &lora {
        Some(l) => with_lora(model, l, cfg, device)?,
        None => model,
    };
    let (total_params, trainable_params) = count_params(&model);
    eprintln!("params: {total_params} total, {trainable_params} trainable");

    let precision = t.precision();
    let model = model.with_precision(precision, device);
    A::memory_cleanup(device);
    if precision.is_bf16() {
        eprintln!(
            "precision: {precision}: compute in {}; trainable weights and AdamW state {}",
            model.compute.describe(),
            if precision == mamba_model::Precision::Bf16 {
                "bf16"
            } else {
                "f32 (masters)"
            }
        );
    }
    let backprop = backprop_options(cfg);
    let est = estimate(
        &model,
        device_batch,
        cfg.data.seq_len,
        backprop.checkpoint_every,
        backprop.loss_chunk,
    );
    let device_total = A::memory_stats(device).and_then(|m| m.total);
    if world > 1 {
        let nodes = match &topology.nodes {
            Some(n) => format!(
                " on {} nodes (this is node {}: ranks {}..{})",
                n.count,
                n.rank,
                topology.first_rank,
                topology.first_rank + topology.local
            ),
            None => String::new(),
        };
        eprintln!(
            "data parallel: {world} devices{nodes} ({}), each taking {device_batch} of the {} rows of every batch",
            names.join(", "),
            t.batch_size
        );
    }
    eprintln!(
        "memory: estimated peak{} {}",
        if world > 1 { " per device" } else { "" },
        est.line()
    );
    if let Some(total) = device_total {
        if est.total > total {
            eprintln!(
                "memory: warning: the estimate exceeds the device's {:.1} GiB; consider train.gradient_checkpointing = true, a smaller train.batch_size with train.grad_accum, or a shorter data.seq_len",
                gib(total)
            );
        }
    }
    Ok(Setup {
        model,
        lora,
        data,
        precision,
        device_batch,
        total_params,
        trainable_params,
        est,
        device_total,
    })
}

/// Where a resumed run picks up: the step reached and the validation loss before training.
struct Resumed {
    start: u64,
    initial_val_loss: Option<f64>,
}

/// Model and optimizer state from the last checkpoint in `existing` (none: from scratch, said
/// on stderr), stored as `precision` says, adapters-only training kept frozen on the base.
#[allow(clippy::too_many_arguments)]
fn resume_from<A, O>(
    existing: &[(u64, PathBuf)],
    out: &Path,
    model: MambaLM<A>,
    optim: O,
    recorder: &Rec,
    lora: bool,
    precision: mamba_model::Precision,
    world: usize,
    device: &A::Device,
) -> Result<(MambaLM<A>, O, Resumed)>
where
    A: AutodiffBackend + MambaBackend,
    O: burn::optim::Optimizer<MambaLM<A>, A>,
{
    let Some((step, dir)) = existing.last() else {
        eprintln!(
            "--resume: no checkpoint in {}, starting from scratch",
            checkpoint::checkpoints_dir(out).display()
        );
        let fresh = Resumed {
            start: 0,
            initial_val_loss: None,
        };
        return Ok((model, optim, fresh));
    };
    let (m, optim, state) = checkpoint::load(dir, model, optim, recorder, device)?;
    let model = if lora {
        mamba_model::lora::freeze_base(m)
    } else {
        m
    };
    // The checkpoint's tensors come back in f32: store them as the precision says.
    let model = model.with_precision(precision, device);
    let wrote = state.devices.unwrap_or(1);
    if wrote != world {
        eprintln!(
            "resume: the checkpoint was written on {wrote} device(s), this run has {world}: the same global batches, split over {world}"
        );
    }
    eprintln!("resumed from {} (step {step})", dir.display());
    let resumed = Resumed {
        start: state.step,
        initial_val_loss: state.initial_val_loss,
    };
    Ok((model, optim, resumed))
}

/// The error a failed step ends the run with: what happened, at which step, on which device,
/// and the last checkpoint (left intact). `oom` builds the out-of-memory message.
fn step_failure(
    err: StepError,
    on: &str,
    step: u64,
    last_checkpoint: &str,
    oom: impl FnOnce(&str) -> String,
) -> anyhow::Error {
    match err {
        StepError::OutOfMemory(msg) => anyhow::anyhow!("{}", oom(&msg)),
        StepError::NonFinite(value) => anyhow::anyhow!(
            "the loss is {value} at step {step}: stopping (last checkpoint: {last_checkpoint}, left intact). Lower train.lr or check the data."
        ),
        StepError::NonFiniteNorm(value) => anyhow::anyhow!(
            "the gradient norm is {value} at step {step} (the loss is finite): stopping (last checkpoint: {last_checkpoint}, left intact). Lower train.lr or check the data."
        ),
        StepError::PeerFailed => anyhow::anyhow!(
            "step {step}: a data-parallel rank failed without saying why (rank 0 on {on} was told so); last checkpoint: {last_checkpoint}"
        ),
        StepError::Other(e) => e.context(format!("step {step} on {on}")),
    }
}

/// The training losses since the last log line.
#[derive(Default)]
struct LossWindow {
    sum: f64,
    n: usize,
}

impl LossWindow {
    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.n += 1;
    }

    /// The window's mean loss; empties it.
    fn take(&mut self) -> f64 {
        let mean = self.sum / self.n.max(1) as f64;
        *self = Self::default();
        mean
    }
}

/// One log line: its record in metrics.jsonl and the line on stderr.
#[allow(clippy::too_many_arguments)]
fn log_step(
    metrics: &mut Metrics,
    progress: &Progress,
    speed: &Throughput,
    done: u64,
    steps: u64,
    mean: f64,
    lr: f64,
    grad_norm: f64,
) -> Result<()> {
    let tps = speed.windowed();
    let eta = speed.step_seconds() * (steps - done) as f64;
    let (in_use, reserved) = peaks();
    let mem = (reserved > 0)
        .then(|| json!({"peak_in_use_bytes": in_use, "peak_reserved_bytes": reserved}));
    let mut rec = json!({"step": done, "loss": mean, "perplexity": mean.exp(), "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "tokens_per_s_cumulative": speed.cumulative(), "step_s": speed.step_seconds(), "elapsed_s": speed.elapsed()});
    if let (Some(m), Some(obj)) = (mem, rec.as_object_mut()) {
        obj.extend(m.as_object().cloned().unwrap_or_default());
    }
    metrics.write(rec)?;
    let mem_text = if reserved > 0 {
        format!(" mem {:.2}/{:.2} GiB", gib(in_use), gib(reserved))
    } else {
        String::new()
    };
    progress.line(&format!(
        "step {done}/{steps}: loss {mean:.4} lr {lr:.2e} |g| {grad_norm:.3} {tps:.0} tok/s{mem_text} ETA {eta:.0}s"
    ));
    Ok(())
}

fn run<A>(cfg: &RunConfig, devices: &[A::Device], names: &[String], resume: bool) -> Result<Summary>
where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
{
    let device = devices[0].clone();
    let topology = Topology::of(cfg, devices.len())?;
    let world = topology.world;
    // Node 0 of several processes (or the only one) owns the output directory.
    let io = topology.writes();
    let t = &cfg.train;
    // Bad input is refused before anything is written.
    ensure!(
        t.batch_size.is_multiple_of(world),
        "`train.batch_size` = {} does not split evenly over {world} devices: use a multiple of {world} (it is the global batch; each device takes batch_size / {world} rows)",
        t.batch_size
    );
    let out = cfg.output.dir.clone();
    let existing = prepare_output(cfg, io, resume)?;
    let Setup {
        mut model,
        lora,
        data,
        precision,
        device_batch,
        total_params,
        trainable_params,
        est,
        device_total,
    } = setup::<A>(cfg, &topology, names, &device)?;

    let mut optim = crate::optim::AdamW::<A>::new(t.beta1 as f32, t.beta2 as f32, t.eps as f32);
    let recorder = Rec::new();
    let mut start = 0u64;
    let mut initial_val_loss = None;
    if resume {
        let (m, o, resumed) = resume_from(
            &existing,
            &out,
            model,
            optim,
            &recorder,
            lora.is_some(),
            precision,
            world,
            &device,
        )?;
        (model, optim) = (m, o);
        start = resumed.start;
        initial_val_loss = resumed.initial_val_loss;
    }
    let mut metrics = if io {
        Metrics::open(&out, start)?
    } else {
        Metrics::discard(&out)
    };
    let skip_decay = no_decay_ids(&model);
    let settings = StepSettings {
        grad_accum: t.grad_accum,
        max_grad_norm: t.max_grad_norm,
        weight_decay: t.weight_decay,
        backprop: backprop_options(cfg),
    };
    // Ranks 1.. start from rank 0's model and optimizer state, resumed or not.
    let replicas = if world > 1 {
        let (r, m) = Replicas::start(
            &topology,
            devices,
            names,
            model,
            &optim,
            settings,
            &skip_decay,
        )?;
        model = m;
        Some(r)
    } else {
        None
    };
    let val_bs = t.batch_size;

    // Validation loss, logged and written to metrics.jsonl.
    let validate = |model: &MambaLM<A>, step: u64, metrics: &mut Metrics| -> Result<f64> {
        let (loss, _) = evaluate_rows(
            &model.valid(),
            &data.validation,
            val_bs,
            t.eval_batches,
            &device,
        )?;
        metrics.write(json!({"step": step, "val_loss": loss, "val_perplexity": loss.exp()}))?;
        Ok(loss)
    };
    let val_line =
        |step: u64, loss: f64| format!("step {step}: val_loss {loss:.4} ppl {:.2}", loss.exp());
    if io && start == 0 && !data.validation.is_empty() {
        let loss = validate(&model, 0, &mut metrics)?;
        eprintln!("{}", val_line(0, loss));
        initial_val_loss = Some(loss);
    }

    let stream = batch_stream(
        data.train.clone(),
        t.batch_size,
        t.seed,
        start * t.grad_accum as u64,
    );
    let next_batch =
        || -> Result<Batch> { Ok(stream.recv().context("the batch thread stopped")?.1) };
    let adapter_only = lora.is_some();
    let base = adapter_only.then(|| BaseFingerprint::of(&model));
    set_tracking(A::memory_stats(&device).is_some());
    reset_peaks();
    quiet_oom_panics();
    let mut speed = Throughput::new(t.log_every.max(1) as usize);
    let progress = Progress::new(t.steps, start);
    if device_total.is_some() && start < t.steps {
        progress.line(&format!(
            "step {}: the first step on a device compiles the kernels (~15 s on a fresh H100 or H200 with cuBLAS, minutes where cubecl autotunes the matrix products; cached under target/ for later runs); matrix products on {}",
            start + 1,
            A::matmul_provider()
        ));
    }
    let mut window = LossWindow::default();
    let mut last_val = None;
    let last_checkpoint = |out: &Path| {
        list_checkpoints(out)
            .last()
            .map(|c| c.1.display().to_string())
            .unwrap_or_else(|| "none written yet".into())
    };
    for step in start..t.steps {
        let lr = cfg.lr_at(step);
        let batches = (0..t.grad_accum.max(1))
            .map(|_| next_batch())
            .collect::<Result<Vec<_>>>()?;
        let ranks = Ranks {
            replicas: replicas.as_ref(),
            name: &names[0],
        };
        let done = step + 1;
        let (m, report) = ranks
            .step(
                model,
                &mut optim,
                batches,
                step,
                lr,
                &settings,
                &skip_decay,
                &device,
            )
            .map_err(|(err, on)| {
                let last = last_checkpoint(&out);
                step_failure(err, &on, done, &last, |msg| {
                    OutOfMemory {
                        step: done,
                        batch: device_batch,
                        seq: cfg.data.seq_len,
                        runtime_message: &if world > 1 {
                            format!("{on}: {msg}")
                        } else {
                            msg.to_string()
                        },
                        total: device_total,
                        estimate: &est,
                        checkpointing: t.gradient_checkpointing,
                        last_checkpoint: &last,
                    }
                    .message()
                })
            })?;
        model = m;
        let step_s = speed.step(report.tokens);
        if step == start {
            progress.line(&format!("step {done}: first step took {step_s:.1} s (on a GPU this includes compiling and autotuning the kernels)"));
        }
        window.add(report.loss);
        progress.step(
            done,
            format!(
                "loss {:.4} {:.0} tok/s ETA {:.0}s",
                report.loss,
                speed.windowed(),
                speed.step_seconds() * (t.steps - done) as f64
            ),
        );

        if done % t.log_every.max(1) == 0 || done == t.steps {
            let mean = window.take();
            log_step(
                &mut metrics,
                &progress,
                &speed,
                done,
                t.steps,
                mean,
                lr,
                report.grad_norm,
            )?;
        }
        let eval_now = (t.eval_every > 0 && done % t.eval_every == 0) || done == t.steps;
        if io && eval_now && !data.validation.is_empty() {
            let loss = validate(&model, done, &mut metrics)?;
            progress.line(&val_line(done, loss));
            last_val = Some(loss);
        }
        if io && t.checkpoint_every > 0 && (done % t.checkpoint_every == 0 || done == t.steps) {
            let state = TrainState {
                step: done,
                initial_val_loss,
                base: base.clone(),
                devices: Some(world),
            };
            checkpoint::save(
                &out,
                &model,
                &optim,
                &recorder,
                &state,
                t.keep_checkpoints,
                adapter_only,
            )?;
        }
    }
    progress.finish();
    if let Some(r) = replicas {
        r.finish()?;
    }
    drop(metrics);
    if io {
        crate::plot::plot_metrics(&out.join("metrics.jsonl"), &out.join("loss.png"))
            .context("drawing loss.png")?;
        crate::export::export_run(cfg, &model.valid(), lora.as_ref(), &data.tokenizer)?;
    }
    let (in_use, reserved) = peaks();
    set_tracking(false);
    let summary = Summary {
        steps: t.steps,
        initial_val_loss,
        final_val_loss: last_val,
        final_val_perplexity: last_val.map(f64::exp),
        trainable_params,
        total_params,
        tokens_per_s: speed.windowed(),
        tokens_per_s_cumulative: speed.cumulative(),
        peak_in_use_bytes: (reserved > 0).then_some(in_use),
        peak_reserved_bytes: (reserved > 0).then_some(reserved),
        output: out.clone(),
    };
    if io {
        write_file_atomic(
            &out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
    }
    Ok(summary)
}

/// Adapters on `model` as `l` says, with the messages a PEFT user expects.
pub fn with_lora<B: MambaBackend>(
    model: MambaLM<B>,
    l: &LoraConfig,
    cfg: &RunConfig,
    device: &B::Device,
) -> Result<MambaLM<B>> {
    let unmatched = mamba_model::lora::unmatched_targets(&model, &l.targets);
    if !unmatched.is_empty() {
        eprintln!(
            "lora: no module of this {} model is named {}; skipped",
            model.config.model_type(),
            unmatched.join(", ")
        );
    }
    // Adapter init draws from the backend RNG: seed it so runs repeat.
    B::seed(device, cfg.train.seed);
    let (m, keys) = apply_lora(model, l, device)?;
    if keys.iter().any(|k| k.ends_with(".out_proj")) {
        eprintln!(
            "lora: note: PEFT 0.21 refuses adapters on Mamba `out_proj` (mamba_ssm's fused kernel would bypass them); the merged export carries them"
        );
    }
    eprintln!(
        "lora: r={} alpha={} on {} modules ({})",
        l.r,
        l.alpha,
        keys.len(),
        summarize_keys(&keys)
    );
    Ok(m)
}

fn summarize_keys(keys: &[String]) -> String {
    let mut names: Vec<&str> = keys.iter().filter_map(|k| k.rsplit('.').next()).collect();
    names.sort();
    names.dedup();
    names.join(", ")
}

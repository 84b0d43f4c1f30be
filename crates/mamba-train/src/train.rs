//! The training loop: full or LoRA fine-tuning (or training from scratch) of a causal LM.
//!
//! A plain loop over burn's `AdamW`, not burn-train's `Learner`: the loop needs things the
//! Learner of burn 0.21 does not express together — gradient accumulation with *global*-norm
//! clipping (burn's `GradientClipping` clips per parameter), weight decay that skips A_log, D,
//! dt_bias, norms and biases (AdamW's decay applies to every parameter), token-based metrics,
//! exports in Hugging Face / PEFT formats, and resumable checkpoints that also hold the data
//! position. Everything it does is ordinary burn: autodiff, `GradientsParams`, optimizer records.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use mamba_data::{batch_stream, collate, Batch, Row};
use mamba_hf::{load_config, load_model_dir, resolve_model_dir, save_model, SaveDtype};
use mamba_model::lora::{apply_lora, merge, LoraConfig, LoraTargets};
use mamba_model::{MambaBackend, MambaLM, Mixer, NormMode};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::RunConfig;
use crate::data::{prepare, Prepared};

type Rec = NamedMpkFileRecorder<FullPrecisionSettings>;

/// What a finished run reports (also written to `<output>/summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_perplexity: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub tokens_per_s: f64,
    pub output: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainState {
    /// Optimizer steps completed.
    step: u64,
    initial_val_loss: Option<f64>,
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

/// Ids of parameters that never get weight decay: A_log, D, dt_bias, norm weights, biases.
fn no_decay_ids<B: Backend>(model: &MambaLM<B>) -> HashSet<ParamId> {
    let mut ids = HashSet::new();
    ids.insert(model.norm_f.weight.id);
    let mut bias = |l: &mamba_model::nn::Linear<B>| {
        if let Some(b) = &l.bias {
            ids.insert(b.id);
        }
    };
    let mut biases = Vec::new();
    for layer in &model.layers {
        match &layer.mixer {
            Mixer::Mamba2(m) => {
                bias(&m.in_proj);
                bias(&m.out_proj);
                biases.extend([m.a_log.id, m.d.id, m.dt_bias.id, m.norm_weight.id]);
                biases.extend(m.conv1d_bias.as_ref().map(|b| b.id));
            }
            Mixer::Mamba1(m) => {
                for l in [&m.in_proj, &m.x_proj, &m.dt_proj, &m.out_proj] {
                    bias(l);
                }
                biases.extend([m.a_log.id, m.d.id]);
                biases.extend(m.conv1d_bias.as_ref().map(|b| b.id));
            }
        }
    }
    ids.extend(biases);
    for layer in &model.layers {
        ids.insert(layer.norm.weight.id);
    }
    ids
}

/// Decoupled weight decay `p ← p (1 − lr·wd)` on trainable parameters not in `skip`.
struct Decay<'a> {
    skip: &'a HashSet<ParamId>,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Decay<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.skip.contains(&param.id) || !param.is_require_grad() {
            return param;
        }
        let factor = self.factor;
        param.map(|t| Tensor::from_inner(t.inner() * factor).require_grad())
    }
}

/// Sum of squared gradients.
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// Multiply every gradient by `factor`.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
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

fn batch_tensors<B: Backend>(
    b: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let ids = Tensor::from_data(TensorData::new(b.ids.clone(), [b.batch, b.seq_len]), device);
    let labels = Tensor::from_data(
        TensorData::new(b.labels.clone(), [b.batch, b.seq_len]),
        device,
    );
    (ids, labels)
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

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Complete checkpoints (`step-NNNNNNNN` directories), oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(out))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    mamba_hf::checkpoint::write_atomic(path, bytes)?;
    Ok(())
}

struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    /// Open `metrics.jsonl`, keeping only the records up to `keep_until` (the resumed step).
    fn open(out: &Path, keep_until: u64) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        if keep_until == 0 {
            write_file_atomic(&path, b"")?;
        } else if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= keep_until)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_file_atomic(&path, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path, file })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Train as `cfg` says on backend `B` (its autodiff wrapper is chosen here: gradient
/// checkpointing recomputes activations in backward).
pub fn train<B: MambaBackend>(cfg: &RunConfig, device: B::Device, resume: bool) -> Result<Summary> {
    if cfg.train.gradient_checkpointing {
        train_with::<B, BalancedCheckpointing>(cfg, device, resume)
    } else {
        train_with::<B, NoCheckpointing>(cfg, device, resume)
    }
}

fn train_with<B: MambaBackend, C: CheckpointStrategy>(
    cfg: &RunConfig,
    device: B::Device,
    resume: bool,
) -> Result<Summary> {
    type_check::<Autodiff<B, C>>();
    run::<Autodiff<B, C>>(cfg, device, resume)
}

fn type_check<A: AutodiffBackend + MambaBackend>()
where
    A::InnerBackend: MambaBackend,
{
}

fn run<A>(cfg: &RunConfig, device: A::Device, resume: bool) -> Result<Summary>
where
    A: AutodiffBackend + MambaBackend,
    A::InnerBackend: MambaBackend,
{
    let out = cfg.output.dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let existing = list_checkpoints(&out);
    if !resume && !existing.is_empty() {
        bail!(
            "{} already holds checkpoints (last: step {}); pass --resume to continue that run, or choose another output.dir",
            out.display(),
            existing.last().map(|c| c.0).unwrap_or(0)
        );
    }
    write_file_atomic(
        &out.join("run_config.toml"),
        toml::to_string_pretty(cfg)?.as_bytes(),
    )?;

    let (model, model_dir) = base_model::<A>(cfg, &device)?;
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
    let mut model = match &lora {
        Some(l) => {
            let unmatched = mamba_model::lora::unmatched_targets(&model, &l.targets);
            if !unmatched.is_empty() {
                eprintln!(
                    "lora: no module of this {} model is named {}; skipped",
                    model.config.model_type(),
                    unmatched.join(", ")
                );
            }
            // Adapter init draws from the backend RNG: seed it so runs repeat.
            A::seed(&device, cfg.train.seed);
            let (m, keys) = apply_lora(model, l, &device)?;
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
            m
        }
        None => model,
    };
    let (total, trainable) = count_params(&model);
    eprintln!("params: {total} total, {trainable} trainable");

    let mut optim = AdamWConfig::new()
        .with_beta_1(cfg.train.beta1 as f32)
        .with_beta_2(cfg.train.beta2 as f32)
        .with_epsilon(cfg.train.eps as f32)
        .with_weight_decay(0.0)
        .init::<A, MambaLM<A>>();
    let recorder = Rec::new();
    let mut start = 0u64;
    let mut initial_val_loss = None;
    if resume {
        if let Some((step, dir)) = existing.last() {
            model = model
                .load_file(dir.join("model"), &recorder, &device)
                .with_context(|| format!("loading checkpoint {}", dir.display()))?;
            if lora.is_some() {
                model = mamba_model::lora::freeze_base(model);
            }
            let rec = recorder
                .load(dir.join("optimizer"), &device)
                .with_context(|| format!("loading optimizer state from {}", dir.display()))?;
            optim = optim.load_record(rec);
            let state: TrainState =
                serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
            start = state.step;
            initial_val_loss = state.initial_val_loss;
            eprintln!("resumed from {} (step {step})", dir.display());
        } else {
            eprintln!(
                "--resume: no checkpoint in {}, starting from scratch",
                checkpoints_dir(&out).display()
            );
        }
    }
    let mut metrics = Metrics::open(&out, start)?;
    let skip_decay = no_decay_ids(&model);
    let t = &cfg.train;
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
        eprintln!("step {step}: val_loss {loss:.4} ppl {:.2}", loss.exp());
        Ok(loss)
    };
    if start == 0 && !data.validation.is_empty() {
        initial_val_loss = Some(validate(&model, 0, &mut metrics)?);
    }

    let stream = batch_stream(
        data.train.clone(),
        t.batch_size,
        t.seed,
        start * t.grad_accum as u64,
    );
    let started = Instant::now();
    let mut tokens_seen = 0usize;
    let mut window_loss = 0.0;
    let mut window_n = 0usize;
    let mut last_val = None;
    for step in start..t.steps {
        A::seed(
            &device,
            t.seed
                .wrapping_add(step)
                .wrapping_mul(0x2545_F491_4F6C_DD1D),
        );
        let mut accum = GradientsAccumulator::<MambaLM<A>>::new();
        let mut step_loss = 0.0;
        for _ in 0..t.grad_accum {
            let (_, batch) = stream.recv().context("the batch thread stopped")?;
            let (ids, labels) = batch_tensors::<A>(&batch, &device);
            let loss = model.loss(ids, labels);
            let value: f64 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                let last = list_checkpoints(&out)
                    .last()
                    .map(|c| c.1.display().to_string())
                    .unwrap_or_else(|| "none written yet".into());
                bail!("the loss is {value} at step {}: stopping (last checkpoint: {last}, left intact). Lower train.lr or check the data.", step + 1);
            }
            step_loss += value / t.grad_accum as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accum.accumulate(&model, grads);
            tokens_seen += batch.tokens;
        }
        let mut grads = accum.grads();
        // Average the micro-batches, then clip by the global norm.
        let mut sq = SquaredNorm::<A> {
            grads: &grads,
            total: None,
        };
        model.visit(&mut sq);
        let norm = sq
            .total
            .map(|t| t.into_scalar().elem::<f64>().sqrt())
            .unwrap_or(0.0)
            / t.grad_accum as f64;
        let clip = if t.max_grad_norm > 0.0 && norm > t.max_grad_norm {
            t.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        let factor = clip / t.grad_accum as f64;
        if factor != 1.0 {
            model.visit(&mut Scale {
                grads: &mut grads,
                factor,
            });
        }
        let lr = cfg.lr_at(step);
        if t.weight_decay > 0.0 {
            model = model.map(&mut Decay {
                skip: &skip_decay,
                factor: 1.0 - lr * t.weight_decay,
            });
        }
        model = optim.step(lr, model, grads);
        let done = step + 1;
        window_loss += step_loss;
        window_n += 1;

        if done % t.log_every.max(1) == 0 || done == t.steps {
            let elapsed = started.elapsed().as_secs_f64();
            let tps = tokens_seen as f64 / elapsed.max(1e-9);
            let eta = elapsed / (done - start) as f64 * (t.steps - done) as f64;
            let mean = window_loss / window_n as f64;
            metrics.write(json!({"step": done, "loss": mean, "perplexity": mean.exp(), "lr": lr, "grad_norm": norm, "tokens_per_s": tps, "elapsed_s": elapsed}))?;
            eprintln!("step {done}/{}: loss {mean:.4} lr {lr:.2e} |g| {norm:.3} {tps:.0} tok/s ETA {eta:.0}s", t.steps);
            window_loss = 0.0;
            window_n = 0;
        }
        let eval_now = (t.eval_every > 0 && done % t.eval_every == 0) || done == t.steps;
        if eval_now && !data.validation.is_empty() {
            last_val = Some(validate(&model, done, &mut metrics)?);
        }
        if t.checkpoint_every > 0 && (done % t.checkpoint_every == 0 || done == t.steps) {
            save_checkpoint(
                &out,
                done,
                &model,
                &optim,
                &recorder,
                initial_val_loss,
                t.keep_checkpoints,
            )?;
        }
    }
    let tokens_per_s = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    drop(metrics);
    crate::plot::plot_metrics(&out.join("metrics.jsonl"), &out.join("loss.png"))
        .context("drawing loss.png")?;

    // Exports.
    let inner = model.valid();
    let dtype = save_dtype(cfg);
    let base_name = cfg
        .model
        .source
        .clone()
        .unwrap_or_else(|| out.join("base").display().to_string());
    let copy_tokenizer = |dir: &Path| -> Result<()> {
        std::fs::copy(&data.tokenizer, dir.join("tokenizer.json"))
            .with_context(|| format!("copying the tokenizer into {}", dir.display()))?;
        Ok(())
    };
    match &lora {
        Some(l) => {
            let dir = out.join("adapter");
            mamba_hf::peft::save_adapter(&inner, l, &base_name, &dir)?;
            eprintln!("wrote {}", dir.display());
            if cfg.output.export_merged {
                let dir = out.join("merged");
                save_model(&merge(inner.clone()), &dir, dtype)?;
                copy_tokenizer(&dir)?;
                eprintln!("wrote {}", dir.display());
            }
        }
        None => {
            let dir = out.join("model");
            save_model(&inner, &dir, dtype)?;
            copy_tokenizer(&dir)?;
            eprintln!("wrote {}", dir.display());
        }
    }
    let summary = Summary {
        steps: t.steps,
        initial_val_loss,
        final_val_loss: last_val,
        final_val_perplexity: last_val.map(f64::exp),
        trainable_params: trainable,
        total_params: total,
        tokens_per_s,
        output: out.clone(),
    };
    write_file_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

fn summarize_keys(keys: &[String]) -> String {
    let mut names: Vec<&str> = keys.iter().filter_map(|k| k.rsplit('.').next()).collect();
    names.sort();
    names.dedup();
    names.join(", ")
}

/// Write `checkpoints/step-N` atomically: into a temporary directory, then renamed. Older
/// checkpoints beyond `keep` are removed only after the new one is complete.
fn save_checkpoint<A: AutodiffBackend + MambaBackend, O: Optimizer<MambaLM<A>, A>>(
    out: &Path,
    step: u64,
    model: &MambaLM<A>,
    optim: &O,
    recorder: &Rec,
    initial_val_loss: Option<f64>,
    keep: usize,
) -> Result<()> {
    let root = checkpoints_dir(out);
    let tmp = root.join(format!(".tmp-step-{step:08}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    model
        .clone()
        .save_file(tmp.join("model"), recorder)
        .context("saving the model record")?;
    recorder
        .record(optim.to_record(), tmp.join("optimizer"))
        .context("saving the optimizer record")?;
    let state = TrainState {
        step,
        initial_val_loss,
    };
    std::fs::write(tmp.join("state.json"), serde_json::to_string(&state)?)?;
    let dst = root.join(format!("step-{step:08}"));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    let all = list_checkpoints(out);
    if all.len() > keep.max(1) {
        for (_, old) in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(())
}

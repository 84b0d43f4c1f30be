//! One optimizer step: micro-batches through [`MambaLM::loss_and_grads`] (checkpointing and the
//! chunked LM head), gradients accumulated and averaged, clipped by their global norm, decoupled
//! weight decay that skips A_log, D, dt_bias, norms and biases, then AdamW.
//!
//! A device allocation failure inside the step (cubecl panics with "can't allocate buffer") is
//! caught here and returned as [`StepError::OutOfMemory`], so the caller can stop with sizes and
//! advice instead of a panic; nothing on disk is touched by a failed step.

use std::collections::HashSet;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use mamba_data::Batch;
use mamba_kernels::BackwardWith;
use mamba_model::{BackpropOptions, MambaBackend, MambaLM, Mixer};

/// Environment variable that makes step N fail as an out-of-memory would (for tests of the
/// error path; 1-based, as the log counts steps).
pub const SIMULATE_OOM_ENV: &str = "MAMBA_SIMULATE_OOM_AT_STEP";

/// The fixed settings of every step of a run.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Checkpointing and LM-head chunking; `seed` is the run's, mixed per step here.
    pub backprop: BackpropOptions,
}

/// What a step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Mean of the micro-batches' losses.
    pub loss: f64,
    /// Global gradient norm before clipping (of the averaged gradient).
    pub grad_norm: f64,
    /// Counted target tokens over the micro-batches.
    pub targets: usize,
    /// Tokens fed (rows × seq_len, padding included), the usual tokens/s numerator.
    pub tokens: usize,
}

#[derive(Debug)]
pub enum StepError {
    /// The device could not allocate; the message is the runtime's.
    OutOfMemory(String),
    /// A non-finite loss.
    NonFinite(f64),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StepError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// Whether a panic message is a device allocation failure (cubecl's `IoError::BufferTooBig` and
/// the CUDA/wgpu out-of-memory errors).
pub fn is_oom_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("can't allocate")
        || m.contains("out of memory")
        || m.contains("outofmemory")
        || m.contains("out_of_memory")
        || m.contains("buffertoobig")
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "(a panic without a message)".into()
    }
}

/// Runs `f`, turning a device allocation panic into [`StepError::OutOfMemory`]; other panics
/// propagate as they are.
pub fn guard_oom<T>(f: impl FnOnce() -> Result<T, StepError>) -> Result<T, StepError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = panic_message(payload.as_ref());
            if is_oom_message(&msg) {
                Err(StepError::OutOfMemory(msg))
            } else {
                resume_unwind(payload)
            }
        }
    }
}

/// Keeps the default panic hook's report out of stderr for device allocation failures, which
/// [`guard_oom`] turns into an error with sizes and advice; every other panic is reported as
/// before. Installed once per process.
pub fn quiet_oom_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = panic_message(info.payload());
            if !is_oom_message(&msg) {
                default(info);
            }
        }));
    });
}

/// Ids of parameters that never get weight decay: A_log, D, dt_bias, norm weights, biases.
pub fn no_decay_ids<B: burn::tensor::backend::Backend>(model: &MambaLM<B>) -> HashSet<ParamId> {
    let mut ids = HashSet::new();
    ids.insert(model.norm_f.weight.id);
    let bias = |ids: &mut HashSet<ParamId>, l: &mamba_model::nn::Linear<B>| {
        if let Some(b) = &l.bias {
            ids.insert(b.id);
        }
    };
    for layer in &model.layers {
        ids.insert(layer.norm.weight.id);
        match &layer.mixer {
            Mixer::Mamba2(m) => {
                bias(&mut ids, &m.in_proj);
                bias(&mut ids, &m.out_proj);
                ids.extend([m.a_log.id, m.d.id, m.dt_bias.id, m.norm_weight.id]);
                ids.extend(m.conv1d_bias.as_ref().map(|b| b.id));
            }
            Mixer::Mamba1(m) => {
                for l in [&m.in_proj, &m.x_proj, &m.dt_proj, &m.out_proj] {
                    bias(&mut ids, l);
                }
                ids.extend([m.a_log.id, m.d.id]);
                ids.extend(m.conv1d_bias.as_ref().map(|b| b.id));
            }
        }
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

pub fn batch_tensors<B: burn::tensor::backend::Backend>(
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

/// One optimizer step `step` (0-based) at learning rate `lr`, taking `settings.grad_accum`
/// micro-batches from `next_batch`.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<A, O>(
    model: MambaLM<A>,
    optim: &mut O,
    next_batch: &mut dyn FnMut() -> anyhow::Result<Batch>,
    step: u64,
    lr: f64,
    settings: &StepSettings,
    skip_decay: &HashSet<ParamId>,
    device: &A::Device,
) -> Result<(MambaLM<A>, StepReport), StepError>
where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
    O: Optimizer<MambaLM<A>, A>,
{
    if std::env::var(SIMULATE_OOM_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(step + 1)
    {
        return Err(StepError::OutOfMemory(format!(
            "can't allocate buffer of size: 1073741824 (simulated by {SIMULATE_OOM_ENV})"
        )));
    }
    // Any device allocation failure in the step, at issue or at a sync, becomes the error.
    guard_oom(|| {
        step_inner(
            model, optim, next_batch, step, lr, settings, skip_decay, device,
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn step_inner<A, O>(
    model: MambaLM<A>,
    optim: &mut O,
    next_batch: &mut dyn FnMut() -> anyhow::Result<Batch>,
    step: u64,
    lr: f64,
    settings: &StepSettings,
    skip_decay: &HashSet<ParamId>,
    device: &A::Device,
) -> Result<(MambaLM<A>, StepReport), StepError>
where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
    O: Optimizer<MambaLM<A>, A>,
{
    // Dropout draws from the backend RNG: seeded per step, so that a resumed run repeats them.
    A::seed(
        device,
        settings
            .backprop
            .seed
            .wrapping_add(step)
            .wrapping_mul(0x2545_F491_4F6C_DD1D),
    );
    let accum_n = settings.grad_accum.max(1);
    let mut accum = GradientsAccumulator::<MambaLM<A>>::new();
    let mut loss_sum = 0.0;
    let mut targets = 0;
    let mut tokens = 0;
    for micro in 0..accum_n {
        let batch = next_batch()?;
        let (ids, labels) = batch_tensors::<A>(&batch, device);
        let opts = BackpropOptions {
            seed: settings
                .backprop
                .seed
                .wrapping_add(step.wrapping_mul(0x2545_F491_4F6C_DD1D))
                .wrapping_add(micro as u64),
            ..settings.backprop
        };
        let out = model.loss_and_grads(ids, labels, opts);
        let value: f64 = out.loss.into_scalar().elem();
        if !value.is_finite() {
            return Err(StepError::NonFinite(value));
        }
        loss_sum += value;
        targets += out.targets;
        tokens += batch.batch * batch.seq_len;
        accum.accumulate(&model, out.grads);
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
        / accum_n as f64;
    let clip = if settings.max_grad_norm > 0.0 && norm > settings.max_grad_norm {
        settings.max_grad_norm / (norm + 1e-6)
    } else {
        1.0
    };
    let factor = clip / accum_n as f64;
    if factor != 1.0 {
        model.visit(&mut Scale {
            grads: &mut grads,
            factor,
        });
    }
    let mut model = model;
    if settings.weight_decay > 0.0 {
        model = model.map(&mut Decay {
            skip: skip_decay,
            factor: 1.0 - lr * settings.weight_decay,
        });
    }
    let model = optim.step(lr, model, grads);
    mamba_kernels::memory::sample::<A>(device);
    Ok((
        model,
        StepReport {
            loss: loss_sum / accum_n as f64,
            grad_norm: norm,
            targets,
            tokens,
        },
    ))
}

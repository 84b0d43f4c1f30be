//! One optimizer step: micro-batches through [`MambaLM::loss_and_grads`] (checkpointing and the
//! chunked LM head), gradients accumulated and averaged (and, data-parallel, summed over the
//! ranks: [`crate::parallel`]), clipped by their global norm, decoupled weight decay that skips
//! A_log, D, dt_bias, norms and biases, then AdamW.
//!
//! A device allocation failure inside the step (cubecl panics with "can't allocate buffer") is
//! caught here and returned as [`StepError::OutOfMemory`], so the caller can stop with sizes and
//! advice instead of a panic; nothing on disk is touched by a failed step.

use std::collections::HashSet;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use mamba_data::Batch;
use mamba_kernels::BackwardWith;
use mamba_model::{BackpropOptions, MambaBackend, MambaLM, Mixer};

use crate::optim::{Scale, ScaledStep, Scaling};
use crate::parallel::Peer;

/// Environment variable that makes step N fail as an out-of-memory would (for tests of the
/// error path; 1-based, as the log counts steps; `N@R` on data-parallel rank R only).
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
    /// Mean of the micro-batches' losses (each over all ranks' parts).
    pub loss: f64,
    /// Global gradient norm before clipping (of the averaged gradient).
    pub grad_norm: f64,
    /// Counted target tokens over the micro-batches.
    pub targets: usize,
    /// Tokens fed (rows × seq_len, padding included), the usual tokens/s numerator.
    pub tokens: usize,
    /// Where the step's time went on the calling thread.
    pub times: StepTimes,
}

/// A step's wall time on the calling thread, by phase. On one device the step issues all its
/// device work before it reads anything back (its loss and gradient norm, in one read at the
/// end), so the two issue phases are the host's share and `wait_s` how long the device ran on
/// after the host was done. The runtime may still make the host wait while it issues (cubecl-cuda
/// lets it run only so many launches ahead of the device), so a `wait_s` near zero alone does
/// not prove a step bound by the host: a CPU profile of the host's threads does
/// (`bench train --host-profile`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// Issuing the micro-batches' forward and backward (data-parallel: and the exchanges).
    pub forward_backward_s: f64,
    /// Issuing the clipping norm and the optimizer update.
    pub update_s: f64,
    /// The one read at the end: waiting for the device to finish the step.
    pub wait_s: f64,
}

#[derive(Debug)]
pub enum StepError {
    /// The device could not allocate; the message is the runtime's.
    OutOfMemory(String),
    /// A non-finite loss.
    NonFinite(f64),
    /// A finite loss with a non-finite gradient norm (an overflow in the backward).
    NonFiniteNorm(f64),
    /// Another data-parallel rank's step failed (that rank's error says how).
    PeerFailed,
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

/// The gradients of the parameters, flattened, in the model's order: what the global norm is
/// taken over ([`MambaBackend::squared_norm`]).
struct FlatGrads<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    flat: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for FlatGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let n = g.shape().num_elements();
            self.flat.push(g.reshape([n]));
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

/// One rank's part of one micro-batch, with the counts of the whole micro-batch (all ranks'
/// parts together), which weight this part's loss and gradient.
#[derive(Debug, Clone)]
pub struct Share {
    pub batch: Batch,
    /// Counted targets in the whole micro-batch.
    pub micro_targets: usize,
    /// Tokens fed (rows × seq_len) in the whole micro-batch.
    pub micro_tokens: usize,
}

impl Share {
    /// A micro-batch that one rank takes whole.
    pub fn whole(batch: Batch) -> Self {
        Self {
            micro_targets: batch.tokens,
            micro_tokens: batch.batch * batch.seq_len,
            batch,
        }
    }

    /// `batch` cut into `world` shares (rank order), or `None` unless `world` divides its rows.
    pub fn split(batch: &Batch, world: usize) -> Option<Vec<Self>> {
        let micro_targets = batch.tokens;
        let micro_tokens = batch.batch * batch.seq_len;
        Some(
            batch
                .split(world)?
                .into_iter()
                .map(|b| Self {
                    batch: b,
                    micro_targets,
                    micro_tokens,
                })
                .collect(),
        )
    }
}

/// One optimizer step `step` (0-based) at learning rate `lr` on this rank's `shares` (one per
/// micro-batch, `settings.grad_accum` of them).
///
/// Each micro-batch's loss is the mean over its counted targets, *all ranks' parts together*: a
/// part's loss and gradient are weighted by its share of the micro-batch's targets, and with
/// `peer` the weighted gradients are summed over the ranks (burn-collective), so the step equals
/// one device's step on the whole micro-batches. Micro-batches count equally (their mean), as
/// before data parallelism. Every rank then clips and steps identically.
///
/// A failure on any rank in the forward/backward (out of memory) is shared before the gradients
/// are: every rank returns an error, none waits forever, and the failing rank's is the one that
/// says what happened (the others return [`StepError::PeerFailed`]). A non-finite loss shows in
/// the summed loss every rank reads, and every rank returns it.
///
/// On one device nothing is read back before the end of the step: the losses are summed on the
/// device, the clipping factor is computed there and handed to the update, and loss and norm come
/// back in one read. A non-finite loss or norm has then made the issued update non-finite, so the
/// error comes without the model (and the optimizer's moments for this step are not to be kept).
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<A, O>(
    model: MambaLM<A>,
    optim: &mut O,
    shares: &[Share],
    step: u64,
    lr: f64,
    settings: &StepSettings,
    skip_decay: &HashSet<ParamId>,
    device: &A::Device,
    peer: Option<&Peer>,
) -> Result<(MambaLM<A>, StepReport), StepError>
where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
    O: ScaledStep<MambaLM<A>, A>,
{
    let rank = peer.map_or(0, |p| p.rank);
    let simulated = std::env::var(SIMULATE_OOM_ENV)
        .ok()
        .and_then(|v| parse_simulated_oom(&v))
        .is_some_and(|(at, r)| at == step + 1 && r.is_none_or(|r| r == rank));
    // A micro-batch without a counted target has no mean: every rank sees the same counts.
    if shares.iter().any(|s| s.micro_targets == 0) {
        return Err(StepError::NonFinite(f64::NAN));
    }
    // Any device allocation failure in the forward/backward, at issue or at a sync.
    let issued = std::time::Instant::now();
    let local = if simulated {
        Err(StepError::OutOfMemory(format!(
            "can't allocate buffer of size: 1073741824 (simulated by {SIMULATE_OOM_ENV})"
        )))
    } else {
        guard_oom(|| forward_backward(&model, shares, step, rank, settings, device))
    };
    let accum_n = shares.len().max(1) as f64;
    // One device: the loss stays there until the end of the step. Data-parallel: the ranks
    // share whether their forward/backward failed and their loss before the gradients.
    let (grads, loss) = match peer {
        None => {
            let (grads, part) = local?;
            (grads, Loss::OnDevice(part))
        }
        Some(peer) => {
            // The ranks exchange their parts now, so each reads its own first.
            let local = local
                .and_then(|(grads, part)| guard_oom(|| Ok((grads, read_values(vec![part])[0]))));
            let (failed, part) = match &local {
                Ok((_, part)) => (0.0, *part),
                Err(_) => (1.0, 0.0),
            };
            let sums = peer
                .sum_values::<A::InnerBackend>(&[failed, part], device)
                .map_err(StepError::Other)?;
            let (grads, _) = local?;
            if sums[0] > 0.0 {
                return Err(StepError::PeerFailed);
            }
            let loss = sums[1] / accum_n;
            if !loss.is_finite() {
                return Err(StepError::NonFinite(loss));
            }
            (grads, Loss::Read(loss))
        }
    };
    let grads = match peer {
        Some(peer) => guard_oom(|| peer.sum_grads(&model, grads).map_err(StepError::Other))?,
        None => grads,
    };
    let forward_backward_s = issued.elapsed().as_secs_f64();
    let updated = std::time::Instant::now();
    let (model, norm) = guard_oom(|| {
        Ok(clip_and_update(
            model, optim, grads, accum_n, lr, settings, skip_decay,
        ))
    })?;
    let update_s = updated.elapsed().as_secs_f64();
    // The step's one read: the loss (one device) and the norm, after everything is issued.
    let waited = std::time::Instant::now();
    let (loss, grad_norm) = guard_oom(|| {
        let mut read = Vec::with_capacity(2);
        if let Loss::OnDevice(t) = &loss {
            read.push(t.clone());
        }
        read.extend(norm.clone());
        let values = read_values(read);
        let mut values = values.into_iter();
        let loss = match loss {
            Loss::OnDevice(_) => values.next().expect("read") / accum_n,
            Loss::Read(v) => v,
        };
        let norm = values.next().map_or(0.0, |sq| sq.sqrt() / accum_n);
        mamba_kernels::memory::sample::<A>(device);
        Ok((loss, norm))
    })?;
    let wait_s = waited.elapsed().as_secs_f64();
    // The update was issued with these in its factor: a non-finite loss or norm made it
    // non-finite too, so the model is not handed back (the caller stops with the error).
    if !loss.is_finite() {
        return Err(StepError::NonFinite(loss));
    }
    if !grad_norm.is_finite() {
        return Err(StepError::NonFiniteNorm(grad_norm));
    }
    Ok((
        model,
        StepReport {
            loss,
            grad_norm,
            targets: shares.iter().map(|s| s.micro_targets).sum(),
            tokens: shares.iter().map(|s| s.micro_tokens).sum(),
            times: StepTimes {
                forward_backward_s,
                update_s,
                wait_s,
            },
        },
    ))
}

/// A step's loss: still on the device (`[1]`, the weighted sum over micro-batches) or already
/// read (data-parallel, where the ranks share it before the gradients).
enum Loss<B: burn::tensor::backend::Backend> {
    OnDevice(Tensor<B, 1>),
    Read(f64),
}

/// `[1]` tensors read back to the host in one transfer (one wait for the device).
fn read_values<B: burn::tensor::backend::Backend>(values: Vec<Tensor<B, 1>>) -> Vec<f64> {
    if values.is_empty() {
        return Vec::new();
    }
    let values: Vec<Tensor<B, 1>> = values
        .into_iter()
        .map(|t| t.cast(burn::tensor::DType::F32))
        .collect();
    Tensor::cat(values, 0).into_data().iter::<f64>().collect()
}

/// `MAMBA_SIMULATE_OOM_AT_STEP` = `N` (every rank) or `N@R` (rank R only).
fn parse_simulated_oom(v: &str) -> Option<(u64, Option<usize>)> {
    match v.split_once('@') {
        Some((n, r)) => Some((n.trim().parse().ok()?, Some(r.trim().parse().ok()?))),
        None => Some((v.trim().parse().ok()?, None)),
    }
}

/// The micro-batches' forward and backward: the gradients, each part's weighted by its share of
/// its micro-batch's targets and summed over the micro-batches, and the weighted loss sum.
fn forward_backward<A>(
    model: &MambaLM<A>,
    shares: &[Share],
    step: u64,
    rank: usize,
    settings: &StepSettings,
    device: &A::Device,
) -> Result<(GradientsParams, Tensor<A::InnerBackend, 1>), StepError>
where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
{
    // Dropout draws from the backend RNG: seeded per step (and rank), so that a resumed run
    // repeats them.
    let seed = settings
        .backprop
        .seed
        .wrapping_add(rank as u64 * 0x9E37_79B9_7F4A_7C15);
    A::seed(
        device,
        seed.wrapping_add(step).wrapping_mul(0x2545_F491_4F6C_DD1D),
    );
    let mut accum = GradientsAccumulator::<MambaLM<A>>::new();
    let mut loss_sum: Option<Tensor<A::InnerBackend, 1>> = None;
    for (micro, share) in shares.iter().enumerate() {
        let batch = &share.batch;
        let weight = batch.tokens as f64 / share.micro_targets as f64;
        if batch.tokens == 0 {
            // This rank's rows count nothing: a zero gradient keeps the ranks' sets equal.
            accum.accumulate(model, zero_grads(model));
            continue;
        }
        let (ids, labels) = batch_tensors::<A>(batch, device);
        let opts = BackpropOptions {
            seed: seed
                .wrapping_add(step.wrapping_mul(0x2545_F491_4F6C_DD1D))
                .wrapping_add(micro as u64),
            ..settings.backprop
        };
        // The batch's count of targets is on the host already: counting on the device would be
        // a read, and a wait, in every micro-batch.
        let out = model.loss_and_grads_counted(ids, labels, batch.tokens, opts);
        // Read at the end of the step (with the gradient norm), not here: a read now would
        // leave the device idle while the host issues the update.
        let part = out.loss.cast(burn::tensor::DType::F32);
        let part = if weight == 1.0 { part } else { part * weight };
        loss_sum = Some(match loss_sum {
            Some(sum) => sum + part,
            None => part,
        });
        let mut grads = out.grads;
        if weight != 1.0 {
            model.visit(&mut Scale {
                grads: &mut grads,
                factor: weight,
            });
        }
        accum.accumulate(model, grads);
    }
    let loss_sum = loss_sum.unwrap_or_else(|| Tensor::zeros([1], device));
    Ok((accum.grads(), loss_sum))
}

/// Zeros in the place of every trainable parameter's gradient.
fn zero_grads<A: AutodiffBackend>(model: &MambaLM<A>) -> GradientsParams {
    struct Zeros(GradientsParams);
    impl<A: AutodiffBackend> ModuleVisitor<A> for Zeros {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            if param.is_require_grad() {
                let value = param.val().inner();
                self.0.register(param.id, value.zeros_like());
            }
        }
    }
    let mut z = Zeros(GradientsParams::new());
    model.visit(&mut z);
    z.0
}

/// The mean over `accum_n` micro-batches of `grads` (their sum), clipped by its global norm as
/// torch's `clip_grad_norm_` clips (`min(1, max / (norm + 1e-6))`), decoupled weight decay, the
/// optimizer step (the scale and the decay folded into it: one launch a parameter with
/// [`crate::optim::AdamW`]). Issues all of it without reading anything back: the clipping
/// factor is computed on the device and handed to the update there. Returns the model and the
/// squared norm of the summed gradients (`None` without trainable gradients), on the device.
fn clip_and_update<A, O>(
    model: MambaLM<A>,
    optim: &mut O,
    grads: GradientsParams,
    accum_n: f64,
    lr: f64,
    settings: &StepSettings,
    skip_decay: &HashSet<ParamId>,
) -> (MambaLM<A>, Option<Tensor<A::InnerBackend, 1>>)
where
    A: AutodiffBackend,
    A::InnerBackend: MambaBackend,
    O: ScaledStep<MambaLM<A>, A>,
{
    let mut flat = FlatGrads::<A> {
        grads: &grads,
        flat: Vec::new(),
    };
    model.visit(&mut flat);
    let squared = <A::InnerBackend as MambaBackend>::squared_norm(flat.flat);
    // norm = √squared / n, so max / (norm + 1e-6) = max·n / (√squared + 1e-6·n).
    let max = settings.max_grad_norm;
    let clip = squared.clone().filter(|_| max > 0.0).map(|sq| {
        sq.sqrt()
            .add_scalar(1e-6 * accum_n)
            .recip()
            .mul_scalar(max * accum_n)
            .clamp_max(1.0)
    });
    let scaling = Scaling {
        grad_scale: 1.0 / accum_n,
        device_scale: clip,
        weight_decay: settings.weight_decay,
        skip_decay: Some(skip_decay),
    };
    (optim.step_scaled(lr, model, grads, scaling), squared)
}

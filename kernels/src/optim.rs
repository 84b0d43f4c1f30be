//! One AdamW update of one parameter as a single op ([`crate::MambaBackend::adamw_step`]): what
//! burn's `AdamW` does in ~14 tensor ops a parameter (and our step in two more: the gradient's
//! scale and the decoupled decay), which at LoRA's hundred-odd small parameters is ~1,900
//! launches a step with the device idle while the host issues them.
//!
//! The arithmetic is burn's, in its order and in f32 ([`adamw_reference`] is the composition the
//! kernel is tested against): `g = grad · grad_scale`; `m = β₁ m + (1 − β₁) g`;
//! `v = β₂ v + (1 − β₂) g²`; `Δ = (m / c₁) / (√(v / c₂) + ε)` with `cᵢ = 1 − βᵢᵗ`;
//! `p = p · decay − lr · Δ`. Without a state (the first step) `m` and `v` start at zero, which is
//! burn's first step exactly.

use burn::tensor::{backend::Backend, Tensor};

/// One parameter's AdamW step: the tensors (flattened, one shape) and the step's scalars.
#[derive(Debug, Clone)]
pub struct AdamWInput<B: Backend> {
    pub param: Tensor<B, 1>,
    pub grad: Tensor<B, 1>,
    /// The moments before this step; `None` before the first.
    pub moments: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    /// A factor the gradient is multiplied by besides `scalars.grad_scale`, `[1]` f32 on the
    /// device: the step's clipping factor, computed there so that the host does not wait for
    /// the global norm before it issues the update.
    pub device_scale: Option<Tensor<B, 1>>,
    pub scalars: AdamWScalars,
}

/// The scalars of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    pub lr: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// The step's number, from 1 (after this update), for the bias corrections.
    pub time: usize,
    /// The gradient is multiplied by this first (the mean over micro-batches, clipping).
    pub grad_scale: f64,
    /// The parameter is multiplied by this before the update (decoupled weight decay,
    /// `1 − lr · wd`; 1 for none).
    pub decay: f64,
}

impl AdamWScalars {
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`, computed as burn computes them (f32).
    pub fn corrections(&self) -> (f32, f32) {
        let t = self.time as i32;
        (1f32 - self.beta_1.powi(t), 1f32 - self.beta_2.powi(t))
    }
}

/// The updated parameter and moments.
#[derive(Debug, Clone)]
pub struct AdamWOutput<B: Backend> {
    pub param: Tensor<B, 1>,
    pub moment_1: Tensor<B, 1>,
    pub moment_2: Tensor<B, 1>,
}

/// [`crate::MambaBackend::adamw_step`] in tensor ops, as burn's `AdamW` (with our gradient
/// scale and decay around it) computes it.
pub fn adamw_reference<B: Backend>(input: AdamWInput<B>) -> AdamWOutput<B> {
    let AdamWInput {
        param,
        grad,
        moments,
        device_scale,
        scalars: s,
    } = input;
    let grad = if s.grad_scale == 1.0 {
        grad
    } else {
        grad * s.grad_scale
    };
    let grad = match device_scale {
        Some(f) => {
            let dtype = grad.dtype();
            grad * f.cast(dtype)
        }
        None => grad,
    };
    let (f1, f2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
    let (m, v) = match moments {
        Some((m, v)) => (
            m.mul_scalar(s.beta_1).add(grad.clone().mul_scalar(f1)),
            v.mul_scalar(s.beta_2).add(grad.square().mul_scalar(f2)),
        ),
        None => (grad.clone().mul_scalar(f1), grad.square().mul_scalar(f2)),
    };
    let (c1, c2) = s.corrections();
    let delta = m
        .clone()
        .div_scalar(c1)
        .div(v.clone().div_scalar(c2).sqrt().add_scalar(s.epsilon));
    let param = if s.decay == 1.0 {
        param
    } else {
        param * s.decay
    };
    AdamWOutput {
        param: param - delta.mul_scalar(s.lr),
        moment_1: m,
        moment_2: v,
    }
}

/// `Σ_t Σ_i t_i²` over all of `tensors` (any shapes, flattened), `[1]` in f32: the squared global
/// norm of a set of gradients, for clipping; `None` for no tensors. In tensor ops (three
/// launches a tensor); the cube backends run one launch a tensor
/// ([`crate::MambaBackend::squared_norm`]).
pub fn squared_norm_reference<B: Backend>(tensors: Vec<Tensor<B, 1>>) -> Option<Tensor<B, 1>> {
    let mut total: Option<Tensor<B, 1>> = None;
    for t in tensors {
        let t = if t.dtype() == burn::tensor::DType::F32 {
            t
        } else {
            t.cast(burn::tensor::DType::F32)
        };
        let s = t.square().sum();
        total = Some(match total {
            Some(acc) => acc + s,
            None => s,
        });
    }
    total
}

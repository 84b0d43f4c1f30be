//! Numeric precision, with Lightning's names: `f32`, `bf16-mixed`, `bf16`.
//!
//! How precision flows through the model ([`Compute`] is the compute dtype of one model):
//!
//! ```text
//! embeddings ─ f32 residual stream ─┬─ norm (f32 math) → act ─ in_proj ─ conv ─ SSD ─ gated norm ─ out_proj ─┐
//!                                   └──────────────── + ← f32 ←──────────────────────────────────────────────┘
//! norm_f (f32 math) → act ─ LM head chunk (compute dtype) → f32 → log-softmax / cross-entropy (f32)
//! ```
//!
//! - Activations between ops, and so the tensors autodiff saves, are in the compute dtype; the
//!   residual stream stays f32 (`residual_in_fp32`, as Mamba's configs ask).
//! - A matmul casts its weight to its input's dtype at use; the cast is an autodiff node, so the
//!   gradient reaches an f32 master as f32 ([`Compute::weight`]).
//! - Norms, the SSD's cumulative sums, chunk states and passed states, the conv's and SSD's
//!   reductions, and the loss accumulate in f32 whatever their inputs' dtype (the kernels load
//!   bf16 and compute in f32; the norms upcast).
//! - Frozen weight matrices (the LoRA base, or every matrix at inference) are stored once, in
//!   the compute dtype ([`cast_frozen`]): a 7B base is 14.6 GB in bf16, not 29. Vectors (norm
//!   weights, biases, Mamba2's per-head `A_log`, `D`, `dt_bias`) stay f32, as do the per-head
//!   parameters' reads in the SSD kernels.
//!
//! On a backend without bf16 arithmetic (ndarray, wgpu's WGSL), `bf16-mixed` and `bf16` run as
//! bf16 *storage* with f32 compute ([`Compute::Bf16Emulated`]): every value that would be stored
//! in bf16 is rounded to the nearest bf16 and kept in f32, so the numerics of the cast points
//! are the same and only the speed differs.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// What the user asks for (`train.precision`, `--precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything f32.
    #[default]
    F32,
    /// f32 trainable parameters and optimizer state (master copies); matmuls, activations and
    /// saved tensors in bf16; norms, SSD states, cross-entropy and the loss in f32; frozen
    /// weights stored in bf16.
    Bf16Mixed,
    /// As `bf16-mixed`, and the trainable parameters and optimizer state are bf16 too (no
    /// masters). Updates smaller than a bf16 ulp of a weight are lost, as in torch with a bf16
    /// model: the known way this diverges from f32 training at small learning rates.
    Bf16,
}

impl Precision {
    /// Whether activations and matmuls run in bf16.
    pub fn is_bf16(self) -> bool {
        !matches!(self, Self::F32)
    }

    /// The compute dtype on `device` for backend `B`: bf16 where the backend has it, the
    /// emulation otherwise.
    pub fn compute<B: Backend>(self, device: &B::Device) -> Compute {
        match self {
            Self::F32 => Compute::F32,
            _ if B::supports_dtype(device, DType::BF16) => Compute::Bf16,
            _ => Compute::Bf16Emulated,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "f32" | "32" | "32-true" => Ok(Self::F32),
            "bf16-mixed" => Ok(Self::Bf16Mixed),
            "bf16" | "bf16-true" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown precision `{other}`: expected \"f32\", \"bf16-mixed\" or \"bf16\""
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16Mixed => "bf16-mixed",
            Self::Bf16 => "bf16",
        })
    }
}

/// The compute dtype of a model, and the casts at its cast points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    #[default]
    F32,
    /// Native bf16 tensors.
    Bf16,
    /// bf16 storage emulated in f32 (values rounded to bf16), for backends without bf16.
    Bf16Emulated,
    /// Any other native float dtype (f64 on ndarray): the same cast points as `Bf16`, so that
    /// tests on a CPU catch a tensor left in the wrong dtype.
    Native(DType),
}

impl Compute {
    /// The dtype activations are stored in.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 | Self::Bf16Emulated => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::Native(d) => d,
        }
    }

    /// A short name for logs.
    pub fn describe(self) -> String {
        match self {
            Self::F32 => "f32".into(),
            Self::Bf16 => "bf16 (tensor cores where the device has them)".into(),
            Self::Bf16Emulated => {
                "bf16 emulated (values rounded to bf16, f32 compute: this backend has no bf16)"
                    .into()
            }
            Self::Native(d) => format!("{d:?}"),
        }
    }

    /// An activation into the compute dtype (cast, or rounded when emulated).
    pub fn act<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::F32 => to_dtype(t, DType::F32),
            Self::Bf16Emulated => round_bf16(to_dtype(t, DType::F32)),
            Self::Bf16 | Self::Native(_) => to_dtype(t, self.dtype()),
        }
    }

    /// A weight for use in an op whose input is in the compute dtype: cast (an autodiff node,
    /// so an f32 master gets an f32 gradient), or rounded when emulated.
    pub fn weight<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        self.act(t)
    }

    /// A vector parameter (a bias) for an op that reads it in any float dtype and computes in
    /// f32, such as [`mamba_kernels::MambaBackend::mamba2_step`]: as stored (an f32 vector
    /// beside bf16 weights is not cast every step), except rounded when bf16 is emulated.
    pub fn vector<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Bf16Emulated => self.act(t),
            _ => t,
        }
    }

    /// Back to f32 (the residual stream, the loss).
    pub fn f32<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        to_dtype(t, DType::F32)
    }
}

/// `t` in `dtype` (no op when it already is).
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// The nearest bf16 value of each element, kept in `t`'s (f32) dtype; the gradient passes
/// straight through. `2^(⌊log2|x|⌋ − 7)` is the bf16 ulp at `x`; rounding to a multiple of it
/// keeps 8 significant bits, as bf16 does (ties to even, via `round`).
pub fn round_bf16<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let x = t.clone().detach();
    let magnitude = x.clone().abs().clamp_min(f32::MIN_POSITIVE as f64);
    let guess = (magnitude.clone().log() / std::f64::consts::LN_2).floor(); // ⌊log2|x|⌋, ±1
                                                                            // log2 can land one off next to a power of two: settle the exponent on exact powers.
    let two = x.ones_like() * 2.0;
    let low = two.clone().powf(guess.clone());
    let guess = guess
        .clone()
        .mask_where(low.greater(magnitude.clone()), guess - 1.0);
    let high = two.clone().powf(guess.clone() + 1.0);
    let exponent = guess
        .clone()
        .mask_where(high.lower_equal(magnitude), guess + 1.0);
    let ulp = two.powf(exponent - 7.0);
    let rounded = (x.clone() / ulp.clone()).round() * ulp;
    t + (rounded - x)
}

/// Stores every weight matrix that takes no gradient (the LoRA base when training; all of them
/// at inference) in the compute dtype, once: cast to bf16, or rounded to bf16 values when
/// emulated. Trainable parameters and vectors keep their dtype (the f32 masters of
/// `bf16-mixed`).
pub fn cast_frozen<B: Backend, M: Module<B>>(module: M, compute: Compute) -> M {
    module.map(&mut CastParams {
        compute,
        all: false,
    })
}

/// Stores every weight matrix in the compute dtype, trainable or not (`bf16`: no masters).
pub fn cast_all<B: Backend, M: Module<B>>(module: M, compute: Compute) -> M {
    module.map(&mut CastParams { compute, all: true })
}

struct CastParams {
    compute: Compute,
    all: bool,
}

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let trainable = tensor.is_require_grad();
        // Vectors (norm weights, biases, Mamba2's A_log, D, dt_bias) stay f32: they weigh
        // nothing, and the norms and the SSD read them as f32.
        if (trainable && !self.all) || D < 2 {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        // Off the graph first (burn's `detach` keeps a leaf's flag), then stored.
        let stored = self.compute.act(tensor.set_require_grad(false));
        let stored = if trainable {
            stored.require_grad()
        } else {
            stored
        };
        Param::from_mapped_value(id, stored, mapper)
    }
}

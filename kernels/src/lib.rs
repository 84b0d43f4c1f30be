//! The Mamba ops boundary.
//!
//! [`MambaBackend`] is a burn backend extension (the custom-kernel pattern of burn's
//! `examples/custom-cubecl-kernel`): it carries the hot ops of Mamba and Mamba2, the causal
//! depthwise conv1d, the SSD chunked scan and Mamba1's selective scan, plus their one-token
//! decode updates. Every method has a reference implementation in plain tensor ops
//! ([`reference`]), so every backend (and `Autodiff<B>`, which differentiates the reference ops)
//! gets correct results; cube backends override them with cubecl kernels.
//!
//! This crate never depends on the model: the model only ever calls this trait.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor};

pub mod reference;

/// Which implementation of the hot ops the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpsMode {
    /// The backend's best: kernels where the backend has them, the reference otherwise.
    #[default]
    Auto,
    /// Always the plain tensor-op reference (for comparison and debugging).
    Reference,
}

/// Inputs of the SSD chunked scan (Mamba2).
///
/// `y_t = C_t · h_t + D · x_t`, `h_t = exp(dt_t · A) · h_{t-1} + dt_t · B_t ⊗ x_t`, with
/// `dt = clamp(softplus(dt_raw + dt_bias), dt_limit)`. Heads map to groups as `h / (H / G)`.
#[derive(Debug, Clone)]
pub struct SsdInput<B: Backend> {
    /// `[batch, seq, heads, head_dim]`
    pub x: Tensor<B, 4>,
    /// `[batch, seq, heads]`, before `dt_bias` and softplus.
    pub dt: Tensor<B, 3>,
    /// `[heads]`, negative: `A = -exp(A_log)`.
    pub a: Tensor<B, 1>,
    /// `[batch, seq, groups, state]`
    pub b: Tensor<B, 4>,
    /// `[batch, seq, groups, state]`
    pub c: Tensor<B, 4>,
    /// `[heads]`
    pub d: Tensor<B, 1>,
    /// `[heads]`
    pub dt_bias: Tensor<B, 1>,
    /// Clamp of `dt` after softplus; `(0, inf)` means none.
    pub dt_limit: (f64, f64),
    /// `[batch, heads, head_dim, state]`
    pub initial_state: Option<Tensor<B, 4>>,
    pub chunk_size: usize,
}

/// Outputs of the SSD chunked scan.
#[derive(Debug, Clone)]
pub struct SsdOutput<B: Backend> {
    /// `[batch, seq, heads, head_dim]`
    pub y: Tensor<B, 4>,
    /// `[batch, heads, head_dim, state]`: the state after the last position.
    pub final_state: Tensor<B, 4>,
}

/// One-token SSD update.
#[derive(Debug, Clone)]
pub struct SsdStepInput<B: Backend> {
    /// `[batch, heads, head_dim]`
    pub x: Tensor<B, 3>,
    /// `[batch, heads]`, before `dt_bias` and softplus.
    pub dt: Tensor<B, 2>,
    /// `[heads]`
    pub a: Tensor<B, 1>,
    /// `[batch, groups, state]`
    pub b: Tensor<B, 3>,
    /// `[batch, groups, state]`
    pub c: Tensor<B, 3>,
    /// `[heads]`
    pub d: Tensor<B, 1>,
    /// `[heads]`
    pub dt_bias: Tensor<B, 1>,
    pub dt_limit: (f64, f64),
    /// `[batch, heads, head_dim, state]`
    pub state: Tensor<B, 4>,
}

/// Causal depthwise conv1d over the sequence axis, optionally followed by SiLU.
#[derive(Debug, Clone)]
pub struct ConvInput<B: Backend> {
    /// `[batch, seq, channels]`: read in the layout the input projection writes.
    pub x: Tensor<B, 3>,
    /// `[channels, width]` (transformers' `conv1d.weight` `[channels, 1, width]` squeezed)
    pub weight: Tensor<B, 2>,
    /// `[channels]`
    pub bias: Option<Tensor<B, 1>>,
    /// `[batch, channels, width - 1]`: the inputs before the first position (zeros if absent).
    pub initial_state: Option<Tensor<B, 3>>,
    pub silu: bool,
}

/// Outputs of the causal conv1d.
#[derive(Debug, Clone)]
pub struct ConvOutput<B: Backend> {
    /// `[batch, seq, channels]`
    pub y: Tensor<B, 3>,
    /// `[batch, channels, width - 1]`: the last `width - 1` inputs, the state for what follows.
    pub final_state: Tensor<B, 3>,
}

/// Gradients of the causal conv1d's output `y` with respect to its inputs (see
/// [`MambaBackend::causal_conv1d_backward`]).
#[derive(Debug, Clone)]
pub struct ConvGrads<B: Backend> {
    /// `[batch, seq, channels]`
    pub x: Tensor<B, 3>,
    /// `[channels, width]`
    pub weight: Tensor<B, 2>,
    /// `[channels]`; `Some` exactly when the input had a bias.
    pub bias: Option<Tensor<B, 1>>,
    /// `[batch, channels, width - 1]`; `Some` exactly when the input had an initial state.
    pub initial_state: Option<Tensor<B, 3>>,
}

/// Mamba1's selective scan.
///
/// `dt = softplus(delta + delta_bias)` (when `delta_softplus`), `h_t = exp(dt_t A) h_{t-1} +
/// dt_t B_t u_t`, `y_t = C_t · h_t + D u_t`, then `y * silu(z)` when `z` is given.
#[derive(Debug, Clone)]
pub struct SelectiveScanInput<B: Backend> {
    /// `[batch, seq, channels]`
    pub u: Tensor<B, 3>,
    /// `[batch, seq, channels]`
    pub delta: Tensor<B, 3>,
    /// `[channels, state]`, negative.
    pub a: Tensor<B, 2>,
    /// `[batch, seq, state]`
    pub b: Tensor<B, 3>,
    /// `[batch, seq, state]`
    pub c: Tensor<B, 3>,
    /// `[channels]`
    pub d: Tensor<B, 1>,
    /// `[batch, seq, channels]`
    pub z: Option<Tensor<B, 3>>,
    /// `[channels]`
    pub delta_bias: Option<Tensor<B, 1>>,
    pub delta_softplus: bool,
    /// `[batch, channels, state]`
    pub initial_state: Option<Tensor<B, 3>>,
}

/// Outputs of the selective scan.
#[derive(Debug, Clone)]
pub struct SelectiveScanOutput<B: Backend> {
    /// `[batch, seq, channels]`
    pub y: Tensor<B, 3>,
    /// `[batch, channels, state]`
    pub final_state: Tensor<B, 3>,
}

/// The backend extension carrying Mamba's hot ops. Every method defaults to the reference
/// implementation in plain tensor ops.
pub trait MambaBackend: Backend {
    /// Whether this backend overrides the ops with kernels (reported by `--ops auto`).
    fn has_kernels() -> bool {
        false
    }

    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        reference::causal_conv1d(input)
    }

    /// Backward of [`causal_conv1d`](MambaBackend::causal_conv1d)'s output `y`: given the
    /// forward's input and `dy` `[batch, seq, channels]`, the gradients of `x`, the weight, the
    /// bias and the initial state (the final state's own gradient, a slice of the inputs, is not
    /// included). Used by `Autodiff<B>` when `B::has_kernels()`.
    fn causal_conv1d_backward(input: ConvInput<Self>, dy: Tensor<Self, 3>) -> ConvGrads<Self> {
        reference::causal_conv1d_backward(input, dy)
    }

    /// One-token conv update: `x` is `[batch, channels]`, `state` `[batch, channels, width - 1]`.
    /// Returns the output `[batch, channels]` and the shifted state.
    fn causal_conv1d_step(
        x: Tensor<Self, 2>,
        state: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        silu: bool,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        reference::causal_conv1d_step(x, state, weight, bias, silu)
    }

    fn ssd_chunk_scan(input: SsdInput<Self>) -> SsdOutput<Self> {
        reference::ssd_chunk_scan(input)
    }

    /// One-token SSD update. Returns `y` `[batch, heads, head_dim]` and the new state.
    fn ssd_step(input: SsdStepInput<Self>) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        reference::ssd_step(input)
    }

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        reference::selective_scan(input)
    }

    /// One-token selective-scan update. `u`, `dt` (after bias and softplus), `b`, `c` are
    /// `[batch, channels]`/`[batch, state]`; returns `y` `[batch, channels]` (with `D u`, before
    /// any gate) and the new state `[batch, channels, state]`.
    fn selective_step(
        u: Tensor<Self, 2>,
        dt: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        c: Tensor<Self, 2>,
        d: Tensor<Self, 1>,
        state: Tensor<Self, 3>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        reference::selective_step(u, dt, a, b, c, d, state)
    }
}

impl<B: MambaBackend, C: CheckpointStrategy> MambaBackend for Autodiff<B, C> {
    fn has_kernels() -> bool {
        B::has_kernels()
    }

    /// With kernels in `B`, a custom autodiff step runs `B`'s forward and backward ops;
    /// otherwise the reference ops are differentiated as they are.
    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        #[cfg(feature = "cube")]
        if B::has_kernels() {
            return cube::autodiff::causal_conv1d::<B, C>(input);
        }
        reference::causal_conv1d(input)
    }
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> MambaBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
}

#[cfg(feature = "cube")]
pub mod cube;

#[cfg(feature = "cube")]
impl<R, F, I, BT> MambaBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn has_kernels() -> bool {
        true
    }

    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        cube::conv::causal_conv1d(input)
    }

    fn causal_conv1d_backward(input: ConvInput<Self>, dy: Tensor<Self, 3>) -> ConvGrads<Self> {
        cube::conv::causal_conv1d_backward(input, dy)
    }

    /// Forward only: `Autodiff<CubeBackend>` keeps differentiating the reference.
    fn ssd_chunk_scan(input: SsdInput<Self>) -> SsdOutput<Self> {
        cube::ssd::ssd_chunk_scan(input)
    }
}

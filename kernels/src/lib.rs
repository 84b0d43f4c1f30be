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
use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::{backend::Backend, Tensor};

pub mod linear;
pub mod loss;
pub mod memory;
pub mod norm;
pub mod optim;
mod outputs;
pub mod reference;
mod seed;
pub mod split;

pub use memory::MemoryStats;

/// A tensor from its float primitive: what the custom autodiff nodes ([`norm`], [`linear`])
/// hand to the inner backend's ops.
pub(crate) fn from_prim<B: Backend, const D: usize>(
    t: burn::tensor::ops::FloatTensor<B>,
) -> Tensor<B, D> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t))
}

/// A tensor's float primitive (the inverse of [`from_prim`]).
pub(crate) fn to_prim<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The most rows (the decode batch) [`MambaBackend::decode_linear`]'s kernel takes.
pub const DECODE_MAX_ROWS: usize = 32;

/// The chunk length of the SSD kernels ([`SsdKept`] holds one state per chunk).
pub const SSD_KERNEL_CHUNK: usize = 64;

pub use seed::{backward_with, BackwardWith};

/// Which implementation of the hot ops the model uses (`--ops auto|reference|kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpsMode {
    /// The backend's best: kernels where the backend has them, the reference otherwise.
    #[default]
    Auto,
    /// Always the plain tensor-op reference (for comparison and debugging).
    Reference,
    /// The kernels; choosing a backend without them is an error (see [`check_ops_mode`]).
    Kernels,
}

impl std::str::FromStr for OpsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "reference" | "ref" => Ok(Self::Reference),
            "kernels" | "kernel" => Ok(Self::Kernels),
            other => Err(format!(
                "unknown ops mode `{other}`: expected auto, reference or kernels"
            )),
        }
    }
}

impl std::fmt::Display for OpsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Reference => "reference",
            Self::Kernels => "kernels",
        })
    }
}

/// The ops are static functions of the backend type, so the switch between kernels and the
/// reference is process-wide: set once at start-up (or around a comparison), read at every op.
static OPS_MODE: AtomicU8 = AtomicU8::new(0);

/// Selects the implementation of the hot ops for the whole process.
pub fn set_ops_mode(mode: OpsMode) {
    let v = match mode {
        OpsMode::Auto => 0,
        OpsMode::Reference => 1,
        OpsMode::Kernels => 2,
    };
    OPS_MODE.store(v, Ordering::Relaxed);
}

/// The implementation selected by [`set_ops_mode`] (`Auto` unless set).
pub fn ops_mode() -> OpsMode {
    match OPS_MODE.load(Ordering::Relaxed) {
        1 => OpsMode::Reference,
        2 => OpsMode::Kernels,
        _ => OpsMode::Auto,
    }
}

/// Whether backend `B` runs its kernels under the current [`ops_mode`].
pub fn kernels_active<B: MambaBackend>() -> bool {
    B::has_kernels() && ops_mode() != OpsMode::Reference
}

/// Checks that `mode` can be honoured on backend `B` (`kernels` needs a backend with kernels);
/// `backend` names it in the error.
pub fn check_ops_mode<B: MambaBackend>(mode: OpsMode, backend: &str) -> Result<(), String> {
    if mode == OpsMode::Kernels && !B::has_kernels() {
        return Err(format!(
            "--ops kernels: the {backend} backend has no kernels (use --device cuda or wgpu, or --ops reference)"
        ));
    }
    Ok(())
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

/// What the SSD forward computed on its way that its backward would otherwise compute again
/// ([`MambaBackend::ssd_chunk_scan_keeping`]): per chunk of the kernels' chunk length `Q`, all
/// f32. Kept by `Autodiff<B>` between a tracked forward and its backward: the states entering
/// each chunk are `batch · chunks · heads · head_dim · state` floats (≈100 MB a mamba2-130m layer
/// at 8 × 1,024; with gradient checkpointing only the recomputed block's are alive).
#[derive(Debug, Clone)]
pub struct SsdKept<B: Backend> {
    /// `[batch, heads, chunks, Q]`: dt after bias, softplus and clamp (0 past the end).
    pub dt: Tensor<B, 4>,
    /// `[batch, heads, chunks, Q]`: the within-chunk cumsum of `dt · A`.
    pub da_cumsum: Tensor<B, 4>,
    /// `[batch, chunks, heads, head_dim, state]`: the state entering each chunk.
    pub prev_states: Tensor<B, 5>,
    /// `[batch, chunks, groups, Q, Q]`: `C · Bᵀ` within each chunk.
    pub cb: Tensor<B, 5>,
}

/// Gradients of a loss through [`MambaBackend::ssd_chunk_scan`] (see
/// [`MambaBackend::ssd_chunk_scan_backward`]); shapes as in [`SsdInput`].
#[derive(Debug, Clone)]
pub struct SsdGrads<B: Backend> {
    pub x: Tensor<B, 4>,
    /// With respect to the raw `dt` (before `dt_bias` and softplus).
    pub dt: Tensor<B, 3>,
    pub a: Tensor<B, 1>,
    pub b: Tensor<B, 4>,
    pub c: Tensor<B, 4>,
    pub d: Tensor<B, 1>,
    pub dt_bias: Tensor<B, 1>,
    /// `Some` exactly when the input had an initial state.
    pub initial_state: Option<Tensor<B, 4>>,
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

/// One decode step of a Mamba2 mixer between its two projections, read in place from the
/// in-projection's output: the conv step and SiLU on `xBC`, the SSD step with `D x`, and the
/// gate `y · silu(z)` (the gated norm's first half; its RMS and weight follow in
/// [`MambaBackend::norm_forward`]). What [`MambaBackend::mamba2_step`] takes.
#[derive(Debug, Clone)]
pub struct Mamba2StepInput<B: Backend> {
    /// `[batch, 2·d_mlp + I + conv_dim + heads]`: `[mlp (2·d_mlp), z (I), xBC (conv_dim), dt]`
    /// for one token, `I = heads · head_dim`, `conv_dim = I + 2 · groups · state`.
    pub proj: Tensor<B, 2>,
    /// Width of the MLP part at the front of `proj` (skipped).
    pub d_mlp: usize,
    pub groups: usize,
    /// `[batch, conv_dim, width - 1]`
    pub conv_state: Tensor<B, 3>,
    /// `[conv_dim, width]`
    pub conv_weight: Tensor<B, 2>,
    /// `[conv_dim]`
    pub conv_bias: Option<Tensor<B, 1>>,
    /// `[heads]`, negative.
    pub a: Tensor<B, 1>,
    /// `[heads]`
    pub d: Tensor<B, 1>,
    /// `[heads]`
    pub dt_bias: Tensor<B, 1>,
    pub dt_limit: (f64, f64),
    /// `[batch, heads, head_dim, state]`
    pub ssm_state: Tensor<B, 4>,
}

/// Outputs of [`MambaBackend::mamba2_step`].
#[derive(Debug, Clone)]
pub struct Mamba2StepOutput<B: Backend> {
    /// `[batch, I]`: `(C · h + D x) · silu(z)`, in `proj`'s dtype.
    pub y: Tensor<B, 2>,
    /// `[batch, conv_dim, width - 1]`
    pub conv_state: Tensor<B, 3>,
    /// `[batch, heads, head_dim, state]`
    pub ssm_state: Tensor<B, 4>,
}

/// A projection of a decode step with the RMSNorm before it and the residual add after it folded
/// in: `out = residual + norm_G(x) · Wᵀ + b`. What [`MambaBackend::decode_linear`] takes.
#[derive(Debug, Clone)]
pub struct DecodeLinearInput<B: Backend> {
    /// `[rows, k]`: the rows of one decode step (the batch).
    pub x: Tensor<B, 2>,
    /// The RMSNorm applied to `x` first: its weight `[k]`, the number of groups of `k` it
    /// normalises over separately, and `eps`.
    pub norm: Option<(Tensor<B, 1>, usize, f64)>,
    /// `[n, k]` (transformers' layout).
    pub weight: Tensor<B, 2>,
    /// `[n]`
    pub bias: Option<Tensor<B, 1>>,
    /// `[rows, n]`: added to the product; the output then takes its dtype.
    pub residual: Option<Tensor<B, 2>>,
    /// The output's dtype when there is no residual.
    pub out_dtype: burn::tensor::DType,
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

/// Gradients of a loss through [`MambaBackend::selective_scan`]; shapes as in
/// [`SelectiveScanInput`]. Optional inputs get `Some` exactly when they were given.
#[derive(Debug, Clone)]
pub struct SelectiveScanGrads<B: Backend> {
    pub u: Tensor<B, 3>,
    /// With respect to the raw `delta` (before `delta_bias` and softplus).
    pub delta: Tensor<B, 3>,
    pub a: Tensor<B, 2>,
    pub b: Tensor<B, 3>,
    pub c: Tensor<B, 3>,
    pub d: Tensor<B, 1>,
    pub z: Option<Tensor<B, 3>>,
    pub delta_bias: Option<Tensor<B, 1>>,
    pub initial_state: Option<Tensor<B, 3>>,
}

/// The backend extension carrying Mamba's hot ops. Every method defaults to the reference
/// implementation in plain tensor ops.
pub trait MambaBackend: Backend {
    /// The device's memory as the allocator sees it; `None` where the backend does not say
    /// (the CPU backend).
    fn memory_stats(_device: &Self::Device) -> Option<MemoryStats> {
        None
    }

    /// One AdamW update of one parameter ([`optim`]: burn's arithmetic with the gradient's
    /// scale and the decoupled decay folded in). The default composes it in tensor ops; kernel
    /// backends run one launch.
    fn adamw_step(input: optim::AdamWInput<Self>) -> optim::AdamWOutput<Self> {
        optim::adamw_reference(input)
    }

    /// The squared global norm of `tensors` (flattened gradients): `Σ_t Σ_i t_i²`, `[1]` f32,
    /// `None` for none. Tensor ops here (three launches a tensor); one launch a tensor and one
    /// sum on the cube backends.
    fn squared_norm(tensors: Vec<Tensor<Self, 1>>) -> Option<Tensor<Self, 1>> {
        optim::squared_norm_reference(tensors)
    }

    /// Reads `t` to the host while `meanwhile` runs: the copy is queued behind the work already
    /// queued and ahead of whatever `meanwhile` queues, and is waited for after `meanwhile`
    /// returns, so the device never waits for the host in between. A decode loop reads step
    /// `n`'s tokens while it queues step `n + 1`. The default reads first (backends that do not
    /// queue work).
    fn read_while<T>(
        t: Tensor<Self, 1, burn::tensor::Int>,
        meanwhile: impl FnOnce() -> T,
    ) -> (burn::tensor::TensorData, T) {
        let data = t.into_data();
        (data, meanwhile())
    }

    /// Which implementation runs [`matmul_t`](MambaBackend::matmul_t) on this backend: `"burn"`
    /// (burn's matmul), `"cubecl"` (the cube backend's autotuned matmul), `"cublas"` (on CUDA)
    /// or `"cublas-host-sync"` (cuBLAS where CUPTI could not name cubecl's stream).
    fn matmul_provider() -> &'static str {
        "burn"
    }

    /// `op(a) · op(b)` with `op` a transpose where `ta` / `tb` say: `a` `[m, k]` (`[k, m]` with
    /// `ta`), `b` `[k, n]` (`[n, k]` with `tb`), same dtype; the output `[m, n]` in that dtype,
    /// accumulated in f32. The default is burn's matmul over transposed views; on CUDA the cube
    /// backend hands it to cuBLAS (`cube::cublas`, DESIGN.md "Matrix products").
    fn matmul_t(a: Tensor<Self, 2>, b: Tensor<Self, 2>, ta: bool, tb: bool) -> Tensor<Self, 2> {
        linear::matmul_t_reference(a, b, ta, tb)
    }

    /// `acc + op(a) · op(b)` ([`matmul_t`](MambaBackend::matmul_t)'s operands). On CUDA the
    /// product is added into `acc`'s memory by cuBLAS (`beta = 1`) when nothing else holds `acc`:
    /// no separate product and add.
    fn matmul_t_into(
        acc: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        ta: bool,
        tb: bool,
    ) -> Tensor<Self, 2> {
        acc + Self::matmul_t(a, b, ta, tb)
    }

    /// A linear layer with a LoRA adapter and no dropout: `x · wᵀ + bias + (s · x · aᵀ) · bᵀ`,
    /// `a` `[r, in]`, `b` `[out, r]`, `s` the adapter's scaling (applied to the rank-`r`
    /// activation). Autodiff backends make it one node ([`linear::lora_linear`]) whose products
    /// add into each other's outputs ([`matmul_t_into`](MambaBackend::matmul_t_into)) both ways.
    fn lora_linear(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        linear::lora_forward::<Self>(x, w, bias, a, b, scale)
    }

    /// A linear layer in PyTorch's layout: `x · wᵀ + bias`, `x` `[rows, in]`, `w` `[out, in]`,
    /// `bias` `[out]`. Through [`matmul_t`](MambaBackend::matmul_t), so no transposed copy of `w`
    /// is made; autodiff backends make it one node whose backward is two more `matmul_t`s
    /// (`dx = dy · w`, `dw = dyᵀ · x`), each taken only for an input that needs it.
    fn linear_layer(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 2> {
        linear::linear_forward::<Self>(x, w, bias)
    }

    /// RMSNorm over the last dimension: `w · x / sqrt(mean(x²) + eps)`, `x` `[b, l, width]`.
    /// Autodiff backends make it one node that keeps only `x` and `w` ([`norm`]).
    fn rms_norm(x: Tensor<Self, 3>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        Self::norm_forward(x, None, w, 1, eps)
    }

    /// The (gated) norm's forward as one op: `w · norm_G(y · silu(z))` (or of `y` alone), f32
    /// math, the output in `y`'s dtype. What [`rms_norm`](MambaBackend::rms_norm) and
    /// [`gated_rms_norm`](MambaBackend::gated_rms_norm) run.
    fn norm_forward(
        y: Tensor<Self, 3>,
        z: Option<Tensor<Self, 3>>,
        w: Tensor<Self, 1>,
        groups: usize,
        eps: f64,
    ) -> Tensor<Self, 3> {
        norm::norm_forward_reference(y, z, w, groups, eps)
    }

    /// The backward of [`norm_forward`](MambaBackend::norm_forward) from the inputs alone
    /// (recomputing the rest): `dy`, `dz` with the gate, `dw` when `want_dw`.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        y: Tensor<Self, 3>,
        z: Option<Tensor<Self, 3>>,
        w: Tensor<Self, 1>,
        dout: Tensor<Self, 3>,
        groups: usize,
        eps: f64,
        want_dw: bool,
    ) -> norm::NormGrads<Self> {
        norm::norm_backward_reference(y, z, w, dout, groups, eps, want_dw)
    }

    /// A decode step's residual add and the next block's RMSNorm as one op: `sum = x + h` in
    /// `x`'s dtype (the residual stream's), and `w · sum / sqrt(mean(sum²) + eps)` in `h`'s
    /// (the compute dtype). `x`, `h` `[b, l, width]`. Inference only: `Autodiff` runs the
    /// reference when an input is tracked.
    fn add_rms_norm(
        x: Tensor<Self, 3>,
        h: Tensor<Self, 3>,
        w: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        norm::add_rms_norm_reference(x, h, w, eps)
    }

    /// Mamba2's gated RMSNorm: `w · norm(y · silu(z))`, the RMS over each of `groups` groups of
    /// the last dimension. `y`, `z` `[b, l, width]`. One node keeping `y`, `z`, `w` under
    /// autodiff.
    fn gated_rms_norm(
        y: Tensor<Self, 3>,
        z: Tensor<Self, 3>,
        w: Tensor<Self, 1>,
        groups: usize,
        eps: f64,
    ) -> Tensor<Self, 3> {
        Self::norm_forward(y, Some(z), w, groups, eps)
    }

    /// `x` `[.., width]` cut along its last dimension into pieces of `sizes` (which add up to
    /// `width`), as views. Autodiff backends make the pieces one op whose backward writes the
    /// input's gradient once, the pieces' gradients side by side ([`split`]), where `narrow`'s
    /// backward fills a full-size zero tensor per piece and adds them.
    fn split_last<const D: usize>(x: Tensor<Self, D>, sizes: &[usize]) -> Vec<Tensor<Self, D>> {
        split::split_last_reference(x, sizes)
    }

    /// `pieces` side by side along the last dimension (all other dimensions equal, one dtype):
    /// the gradient of [`split_last`](MambaBackend::split_last)'s input. `Tensor::cat` here
    /// (on the cube backends an empty output and a slice-assign a piece); kernel backends write
    /// two or three pieces in one launch.
    fn cat_last<const D: usize>(pieces: Vec<Tensor<Self, D>>) -> Tensor<Self, D> {
        Tensor::cat(pieces, D - 1)
    }

    /// The causal-LM loss's cross-entropy per row: the negative log-likelihood of `labels` `[n]`
    /// under `logits` `[n, vocab]`, `[n]` in f32, 0 where a label is [`loss::IGNORE_INDEX`].
    /// Autodiff backends make it one node over [`nll_forward`](MambaBackend::nll_forward) and
    /// [`nll_backward`](MambaBackend::nll_backward), so the log-softmax is never stored.
    fn nll_rows(
        logits: Tensor<Self, 2>,
        labels: Tensor<Self, 1, burn::tensor::Int>,
    ) -> Tensor<Self, 1> {
        Self::nll_forward(logits, labels).0
    }

    /// [`nll_rows`](MambaBackend::nll_rows)'s values and each row's log-sum-exp, both `[n]` f32.
    /// Tensor ops here; one kernel on the cube backends.
    fn nll_forward(
        logits: Tensor<Self, 2>,
        labels: Tensor<Self, 1, burn::tensor::Int>,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
        loss::nll_forward_reference(logits, labels)
    }

    /// The logits' gradient of [`nll_rows`](MambaBackend::nll_rows) given `dnll` `[n]` and the
    /// forward's `lse`, in the logits' dtype. Tensor ops here; one kernel on the cube backends.
    fn nll_backward(
        logits: Tensor<Self, 2>,
        labels: Tensor<Self, 1, burn::tensor::Int>,
        lse: Tensor<Self, 1>,
        dnll: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        loss::nll_backward_reference(logits, labels, lse, dnll)
    }

    /// Whether this backend overrides the ops with kernels. Kernel impls also honour
    /// [`ops_mode`]: under `OpsMode::Reference` they run the reference.
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

    /// [`ssd_chunk_scan`](MambaBackend::ssd_chunk_scan), keeping what its backward can reuse
    /// ([`SsdKept`]) where the backend's backward reads it (the kernel backends); `None` here.
    fn ssd_chunk_scan_keeping(input: SsdInput<Self>) -> (SsdOutput<Self>, Option<SsdKept<Self>>) {
        (Self::ssd_chunk_scan(input), None)
    }

    /// Backward of [`ssd_chunk_scan`](MambaBackend::ssd_chunk_scan): given the forward's input,
    /// what it kept (else it is computed again), the gradient `dy` of its output and
    /// (optionally) `d_final` of its final state, the gradients of every input. Used by
    /// `Autodiff<B>` when kernels are active.
    fn ssd_chunk_scan_backward(
        input: SsdInput<Self>,
        kept: Option<SsdKept<Self>>,
        dy: Tensor<Self, 4>,
        d_final: Option<Tensor<Self, 4>>,
    ) -> SsdGrads<Self> {
        let _ = kept;
        reference::ssd_chunk_scan_backward(input, dy, d_final)
    }

    /// One-token SSD update. Returns `y` `[batch, heads, head_dim]` and the new state.
    fn ssd_step(input: SsdStepInput<Self>) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        reference::ssd_step(input)
    }

    /// A decode step's projection with its norm and residual folded in ([`DecodeLinearInput`]).
    /// The default composes the norm, `linear` and the add; kernel backends run one launch
    /// (for up to [`DECODE_MAX_ROWS`] rows).
    fn decode_linear(input: DecodeLinearInput<Self>) -> Tensor<Self, 2> {
        reference::decode_linear(input)
    }

    /// One decode step of a Mamba2 mixer between its projections ([`Mamba2StepInput`]).
    /// The default composes [`causal_conv1d_step`](MambaBackend::causal_conv1d_step) and
    /// [`ssd_step`](MambaBackend::ssd_step) with the gate in tensor ops; kernel backends fuse it
    /// into one launch.
    fn mamba2_step(input: Mamba2StepInput<Self>) -> Mamba2StepOutput<Self> {
        reference::mamba2_step(input)
    }

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        reference::selective_scan(input)
    }

    /// Backward of [`selective_scan`](MambaBackend::selective_scan), as
    /// [`ssd_chunk_scan_backward`](MambaBackend::ssd_chunk_scan_backward).
    fn selective_scan_backward(
        input: SelectiveScanInput<Self>,
        dy: Tensor<Self, 3>,
        d_final: Option<Tensor<Self, 3>>,
    ) -> SelectiveScanGrads<Self> {
        reference::selective_scan_backward(input, dy, d_final)
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

    fn nll_rows(
        logits: Tensor<Self, 2>,
        labels: Tensor<Self, 1, burn::tensor::Int>,
    ) -> Tensor<Self, 1> {
        loss::nll_rows::<B, C>(logits, labels)
    }

    fn split_last<const D: usize>(x: Tensor<Self, D>, sizes: &[usize]) -> Vec<Tensor<Self, D>> {
        split::split_last::<B, C, D>(x, sizes)
    }

    fn memory_stats(device: &Self::Device) -> Option<MemoryStats> {
        B::memory_stats(device)
    }

    fn matmul_provider() -> &'static str {
        B::matmul_provider()
    }

    fn read_while<T>(
        t: Tensor<Self, 1, burn::tensor::Int>,
        meanwhile: impl FnOnce() -> T,
    ) -> (burn::tensor::TensorData, T) {
        B::read_while(Tensor::from_primitive(t.into_primitive()), meanwhile)
    }

    fn matmul_t(a: Tensor<Self, 2>, b: Tensor<Self, 2>, ta: bool, tb: bool) -> Tensor<Self, 2> {
        let x = if ta { a.transpose() } else { a };
        // Through the linear node (`x · wᵀ`) so that its backward is `B::matmul_t` too.
        let w = if tb { b } else { b.transpose() };
        linear::linear::<B, C>(x, w, None)
    }

    fn linear_layer(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 2> {
        linear::linear::<B, C>(x, w, bias)
    }

    fn lora_linear(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        linear::lora_linear::<B, C>(x, w, bias, a, b, scale)
    }

    fn rms_norm(x: Tensor<Self, 3>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        norm::rms_norm::<B, C>(x, w, eps)
    }

    fn gated_rms_norm(
        y: Tensor<Self, 3>,
        z: Tensor<Self, 3>,
        w: Tensor<Self, 1>,
        groups: usize,
        eps: f64,
    ) -> Tensor<Self, 3> {
        norm::gated_rms_norm::<B, C>(y, z, w, groups, eps)
    }

    /// With kernels active in `B`, a custom autodiff step runs `B`'s forward and backward ops;
    /// otherwise the reference ops are differentiated as they are. Whether the kernels take an
    /// input is decided here, at forward time: a backward step must not fall back to the
    /// reference backward, which would start a second `backward()` inside the first one (burn's
    /// autodiff graph lock makes that a deadlock).
    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() {
            return cube::autodiff::causal_conv1d::<B, C>(input);
        }
        reference::causal_conv1d(input)
    }

    fn ssd_chunk_scan(input: SsdInput<Self>) -> SsdOutput<Self> {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() && cube::ssd::kernels_apply(&input) {
            return cube::autodiff::ssd_chunk_scan::<B, C>(input);
        }
        reference::ssd_chunk_scan(input)
    }

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() && cube::selective::supported(&input, &[]) {
            return cube::autodiff::selective_scan::<B, C>(input);
        }
        reference::selective_scan(input)
    }

    // Decode steps are inference-only: without tracked inputs the inner kernels do the work.
    fn causal_conv1d_step(
        x: Tensor<Self, 2>,
        state: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        silu: bool,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() {
            return cube::autodiff::causal_conv1d_step::<B, C>(x, state, weight, bias, silu);
        }
        reference::causal_conv1d_step(x, state, weight, bias, silu)
    }

    fn ssd_step(input: SsdStepInput<Self>) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() {
            return cube::autodiff::ssd_step::<B, C>(input);
        }
        reference::ssd_step(input)
    }

    fn mamba2_step(input: Mamba2StepInput<Self>) -> Mamba2StepOutput<Self> {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() {
            return cube::autodiff::mamba2_step::<B, C>(input);
        }
        reference::mamba2_step(input)
    }

    fn add_rms_norm(
        x: Tensor<Self, 3>,
        h: Tensor<Self, 3>,
        w: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        if <Self as BackwardWith>::is_tracked(&x)
            || <Self as BackwardWith>::is_tracked(&h)
            || <Self as BackwardWith>::is_tracked(&w)
        {
            return norm::add_rms_norm_reference(x, h, w, eps);
        }
        let (s, o) = B::add_rms_norm(x.inner(), h.inner(), w.inner(), eps);
        (Tensor::from_inner(s), Tensor::from_inner(o))
    }

    fn decode_linear(input: DecodeLinearInput<Self>) -> Tensor<Self, 2> {
        let tracked = <Self as BackwardWith>::is_tracked(&input.x)
            || <Self as BackwardWith>::is_tracked(&input.weight)
            || input
                .norm
                .as_ref()
                .is_some_and(|(w, _, _)| <Self as BackwardWith>::is_tracked(w))
            || input
                .bias
                .as_ref()
                .is_some_and(<Self as BackwardWith>::is_tracked)
            || input
                .residual
                .as_ref()
                .is_some_and(<Self as BackwardWith>::is_tracked);
        if tracked {
            return reference::decode_linear(input);
        }
        Tensor::from_inner(B::decode_linear(DecodeLinearInput {
            x: input.x.inner(),
            norm: input.norm.map(|(w, g, e)| (w.inner(), g, e)),
            weight: input.weight.inner(),
            bias: input.bias.map(Tensor::inner),
            residual: input.residual.map(Tensor::inner),
            out_dtype: input.out_dtype,
        }))
    }

    fn selective_step(
        u: Tensor<Self, 2>,
        dt: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        c: Tensor<Self, 2>,
        d: Tensor<Self, 1>,
        state: Tensor<Self, 3>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        #[cfg(feature = "cube")]
        if kernels_active::<B>() {
            return cube::autodiff::selective_step::<B, C>(u, dt, a, b, c, d, state);
        }
        reference::selective_step(u, dt, a, b, c, d, state)
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

    fn memory_stats(device: &Self::Device) -> Option<MemoryStats> {
        let client = R::client(device);
        let usage = client.memory_usage().ok()?;
        // CUDA sizes its largest page as a quarter of the device's memory (cubecl-cuda's
        // runtime); other runtimes size it from their own limits, so no total is claimed there.
        let total = std::any::type_name::<R>()
            .contains("Cuda")
            .then(|| client.properties().memory.max_page_size * 4);
        Some(MemoryStats {
            in_use: usage.bytes_in_use,
            reserved: usage.bytes_reserved,
            total,
        })
    }

    fn read_while<T>(
        t: Tensor<Self, 1, burn::tensor::Int>,
        meanwhile: impl FnOnce() -> T,
    ) -> (burn::tensor::TensorData, T) {
        cube::read_while::<Self, R, T>(t, meanwhile)
    }

    fn adamw_step(input: optim::AdamWInput<Self>) -> optim::AdamWOutput<Self> {
        if !kernels_active::<Self>() {
            return optim::adamw_reference(input);
        }
        cube::optim::adamw_step(input)
    }

    fn squared_norm(tensors: Vec<Tensor<Self, 1>>) -> Option<Tensor<Self, 1>> {
        if !kernels_active::<Self>() {
            return optim::squared_norm_reference(tensors);
        }
        cube::optim::squared_norm(tensors)
    }

    fn nll_forward(
        logits: Tensor<Self, 2>,
        labels: Tensor<Self, 1, burn::tensor::Int>,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
        if !kernels_active::<Self>() {
            return loss::nll_forward_reference(logits, labels);
        }
        cube::loss::nll_forward(logits, labels)
    }

    fn nll_backward(
        logits: Tensor<Self, 2>,
        labels: Tensor<Self, 1, burn::tensor::Int>,
        lse: Tensor<Self, 1>,
        dnll: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        if !kernels_active::<Self>() {
            return loss::nll_backward_reference(logits, labels, lse, dnll);
        }
        cube::loss::nll_backward(logits, labels, lse, dnll)
    }

    fn matmul_provider() -> &'static str {
        #[cfg(feature = "cuda")]
        if std::any::TypeId::of::<R>() == std::any::TypeId::of::<cubecl::cuda::CudaRuntime>() {
            return cube::cublas::provider();
        }
        "cubecl"
    }

    fn matmul_t(a: Tensor<Self, 2>, b: Tensor<Self, 2>, ta: bool, tb: bool) -> Tensor<Self, 2> {
        #[cfg(feature = "cuda")]
        if let Some(out) = cube::cublas::matmul_t(
            &a.clone().into_primitive().tensor(),
            &b.clone().into_primitive().tensor(),
            ta,
            tb,
        ) {
            return cube::wrap(out);
        }
        linear::matmul_t_reference(a, b, ta, tb)
    }

    fn matmul_t_into(
        acc: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        ta: bool,
        tb: bool,
    ) -> Tensor<Self, 2> {
        #[cfg(feature = "cuda")]
        let acc = match cube::cublas::matmul_t_into(
            acc.into_primitive().tensor(),
            &a.clone().into_primitive().tensor(),
            &b.clone().into_primitive().tensor(),
            ta,
            tb,
        ) {
            Ok(out) => return cube::wrap(out),
            Err(acc) => cube::wrap(acc),
        };
        acc + Self::matmul_t(a, b, ta, tb)
    }

    fn norm_forward(
        y: Tensor<Self, 3>,
        z: Option<Tensor<Self, 3>>,
        w: Tensor<Self, 1>,
        groups: usize,
        eps: f64,
    ) -> Tensor<Self, 3> {
        if !kernels_active::<Self>() {
            return norm::norm_forward_reference(y, z, w, groups, eps);
        }
        cube::norm::norm_forward(y, z, w, groups, eps)
    }

    fn norm_backward(
        y: Tensor<Self, 3>,
        z: Option<Tensor<Self, 3>>,
        w: Tensor<Self, 1>,
        dout: Tensor<Self, 3>,
        groups: usize,
        eps: f64,
        want_dw: bool,
    ) -> norm::NormGrads<Self> {
        if !kernels_active::<Self>() {
            return norm::norm_backward_reference(y, z, w, dout, groups, eps, want_dw);
        }
        cube::norm::norm_backward(y, z, w, dout, groups, eps, want_dw)
    }

    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        if !kernels_active::<Self>() {
            return reference::causal_conv1d(input);
        }
        cube::conv::causal_conv1d(input)
    }

    fn causal_conv1d_backward(input: ConvInput<Self>, dy: Tensor<Self, 3>) -> ConvGrads<Self> {
        if !kernels_active::<Self>() {
            return reference::causal_conv1d_backward(input, dy);
        }
        cube::conv::causal_conv1d_backward(input, dy)
    }

    fn causal_conv1d_step(
        x: Tensor<Self, 2>,
        state: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        silu: bool,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !kernels_active::<Self>() {
            return reference::causal_conv1d_step(x, state, weight, bias, silu);
        }
        cube::step::causal_conv1d_step(x, state, weight, bias, silu)
    }

    fn ssd_chunk_scan(input: SsdInput<Self>) -> SsdOutput<Self> {
        if !kernels_active::<Self>() {
            return reference::ssd_chunk_scan(input);
        }
        cube::ssd::ssd_chunk_scan(input)
    }

    fn split_last<const D: usize>(x: Tensor<Self, D>, sizes: &[usize]) -> Vec<Tensor<Self, D>> {
        if !kernels_active::<Self>() {
            return split::split_last_reference(x, sizes);
        }
        cube::split::split_last(x, sizes)
    }

    fn cat_last<const D: usize>(pieces: Vec<Tensor<Self, D>>) -> Tensor<Self, D> {
        if !kernels_active::<Self>() {
            return Tensor::cat(pieces, D - 1);
        }
        cube::split::cat_last(pieces)
    }

    fn ssd_chunk_scan_keeping(input: SsdInput<Self>) -> (SsdOutput<Self>, Option<SsdKept<Self>>) {
        if !kernels_active::<Self>() {
            return (reference::ssd_chunk_scan(input), None);
        }
        cube::ssd::ssd_chunk_scan_keeping(input)
    }

    fn ssd_chunk_scan_backward(
        input: SsdInput<Self>,
        kept: Option<SsdKept<Self>>,
        dy: Tensor<Self, 4>,
        d_final: Option<Tensor<Self, 4>>,
    ) -> SsdGrads<Self> {
        if !kernels_active::<Self>() {
            return reference::ssd_chunk_scan_backward(input, dy, d_final);
        }
        cube::ssd_bwd::ssd_chunk_scan_backward(input, kept, dy, d_final)
    }

    fn ssd_step(input: SsdStepInput<Self>) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        if !kernels_active::<Self>() {
            return reference::ssd_step(input);
        }
        cube::step::ssd_step(input)
    }

    fn mamba2_step(input: Mamba2StepInput<Self>) -> Mamba2StepOutput<Self> {
        if !kernels_active::<Self>() {
            return reference::mamba2_step(input);
        }
        cube::step::mamba2_step(input)
    }

    fn add_rms_norm(
        x: Tensor<Self, 3>,
        h: Tensor<Self, 3>,
        w: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        if !kernels_active::<Self>() {
            return norm::add_rms_norm_reference(x, h, w, eps);
        }
        cube::norm::add_rms_norm(x, h, w, eps)
    }

    fn decode_linear(input: DecodeLinearInput<Self>) -> Tensor<Self, 2> {
        if !kernels_active::<Self>() {
            return reference::decode_linear(input);
        }
        cube::gemv::decode_linear(input)
    }

    fn selective_scan(input: SelectiveScanInput<Self>) -> SelectiveScanOutput<Self> {
        if !kernels_active::<Self>() {
            return reference::selective_scan(input);
        }
        cube::selective::selective_scan(input)
    }

    fn selective_scan_backward(
        input: SelectiveScanInput<Self>,
        dy: Tensor<Self, 3>,
        d_final: Option<Tensor<Self, 3>>,
    ) -> SelectiveScanGrads<Self> {
        if !kernels_active::<Self>() {
            return reference::selective_scan_backward(input, dy, d_final);
        }
        cube::selective::selective_scan_backward(input, dy, d_final)
    }

    fn selective_step(
        u: Tensor<Self, 2>,
        dt: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        c: Tensor<Self, 2>,
        d: Tensor<Self, 1>,
        state: Tensor<Self, 3>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 3>) {
        if !kernels_active::<Self>() {
            return reference::selective_step(u, dt, a, b, c, d, state);
        }
        cube::step::selective_step(u, dt, a, b, c, d, state)
    }
}

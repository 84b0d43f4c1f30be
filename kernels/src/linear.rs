//! Linear layers as one matrix product each way, in PyTorch's weight layout.
//!
//! A linear layer `y = x · wᵀ` (`x` `[rows, in]`, `w` `[out, in]`) needs three products: the
//! forward, `dx = dy · w` and `dw = dyᵀ · x`. Each is one [`MambaBackend::matmul_t`], which reads
//! its operands transposed or not as they lie in memory, so no transposed copy of a weight or an
//! activation is ever made; on CUDA the cube backend gives them to cuBLAS (`cube::cublas`), on
//! every other backend they are burn's matmul over transposed views.
//!
//! On `Autodiff<B>` the layer is one node ([`linear`]) whose backward runs those two products,
//! each only for an input that takes a gradient: a frozen LoRA base weight costs no `dw`, and then
//! the node keeps no copy of `x` either (burn's own matmul node decides the same way).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::{from_prim as inner, to_prim as prim, MambaBackend};

/// How f32 products run where the backend has a choice (CUDA), with torch's names
/// (`torch.set_float32_matmul_precision`): `high` (the default) lets them use TF32 tensor cores
/// (10-bit mantissa operands, f32 accumulation), as cubecl's matmul did on CUDA and as torch does
/// with `allow_tf32`; `highest` keeps every product in f32 (several times slower on an H200).
/// Set with `MAMBA_F32_MATMUL=high|highest`; bf16 and f16 products are unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Matmul {
    High,
    Highest,
}

/// `MAMBA_F32_MATMUL`, read once; an unknown value warns and means `high`.
pub fn f32_matmul() -> F32Matmul {
    static P: std::sync::OnceLock<F32Matmul> = std::sync::OnceLock::new();
    *P.get_or_init(
        || match std::env::var("MAMBA_F32_MATMUL").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("high") => F32Matmul::High,
            Ok("highest") => F32Matmul::Highest,
            Ok(other) => {
                eprintln!("warning: MAMBA_F32_MATMUL=`{other}` is not high or highest; using high");
                F32Matmul::High
            }
        },
    )
}

/// Runs `f` (one decode step of a model) with its small products kept off cuBLAS: on CUDA a
/// product under 1 GFLOP then runs on cubecl's matmul, which does not make the host wait for
/// cubecl's queue as a cuBLAS product does (DESIGN.md, "Matrix products"). Elsewhere, and for
/// training, it changes nothing. Scoped to the calling thread.
pub fn decode_products<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    {
        crate::cube::cublas::in_decode(f)
    }
    #[cfg(not(feature = "cuda"))]
    {
        f()
    }
}

/// `op(a) · op(b)` in burn's tensor ops (the default of [`MambaBackend::matmul_t`]).
pub fn matmul_t_reference<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    ta: bool,
    tb: bool,
) -> Tensor<B, 2> {
    let a = if ta { a.transpose() } else { a };
    let b = if tb { b.transpose() } else { b };
    a.matmul(b)
}

/// `x · wᵀ + bias` through `B::matmul_t` (the default of [`MambaBackend::linear_layer`] on backends
/// without autodiff).
pub fn linear_forward<B: MambaBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let y = B::matmul_t(x, w, false, true);
    match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: MambaBackend> Backward<B, 2> for LinearBackward {
    /// `x` when `w` takes a gradient, `w` when `x` does.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = inner::<B, 2>(grads.consume::<B>(&ops.node)); // [rows, out]
        let (x, w) = ops.state;
        let [nx, nw] = ops.parents;
        if let (Some(n), Some(w)) = (nx, w) {
            // dx = dy · w: [rows, out] · [out, in]
            let dx = B::matmul_t(dy.clone(), inner(w), false, false);
            grads.register::<B>(n.id, prim(dx));
        }
        if let (Some(n), Some(x)) = (nw, x) {
            // dw = dyᵀ · x: [out, rows] · [rows, in]
            let dw = B::matmul_t(dy, inner(x), true, false);
            grads.register::<B>(n.id, prim(dw));
        }
    }
}

/// [`MambaBackend::linear_layer`] on `Autodiff<B>`: `x · wᵀ` as one node over `B::matmul_t`, then the
/// bias as an ordinary (differentiated) add.
pub fn linear<B: MambaBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
    bias: Option<Tensor<Autodiff<B, C>, 1>>,
) -> Tensor<Autodiff<B, C>, 2> {
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let forward =
        |x: FloatTensor<B>, w: FloatTensor<B>| prim(B::matmul_t(inner(x), inner(w), false, true));
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    let out = match LinearBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                w_tracked.then(|| x.primitive.clone()),
                x_tracked.then(|| w.primitive.clone()),
            );
            prep.finish(state, forward(x.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive)),
    };
    let y = Tensor::from_primitive(TensorPrimitive::Float(out));
    match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    }
}

/// [`MambaBackend::lora_linear`] as products: `h = s · x · aᵀ` (`[rows, r]`), `y = x · wᵀ`, then
/// `y += h · bᵀ` in `y`'s memory where the backend can ([`MambaBackend::matmul_t_into`]).
pub fn lora_forward<B: MambaBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    let h = B::matmul_t(x.clone(), a, false, true) * scale;
    let y = B::matmul_t_into(B::matmul_t(x, w, false, true), h, b, false, true);
    match bias {
        Some(bias) => y + bias.unsqueeze::<2>(),
        None => y,
    }
}

/// What the LoRA layer's backward keeps: `x` (for `dw`, `da`), `w` and `a` (for `dx`), `b` (for
/// the adapter's input gradient), `h = s · x · aᵀ` (for `db`), each only when a gradient needs it;
/// and the scale.
type LoraState<B> = (
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    f64,
);

#[derive(Debug)]
struct LoraBackward;

impl<B: MambaBackend> Backward<B, 4> for LoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = inner::<B, 2>(grads.consume::<B>(&ops.node)); // [rows, out]
        let (x, w, a, b, h, scale) = ops.state;
        let [nx, nw, na, nb] = ops.parents;
        // g = s · dy · b: the gradient at the adapter's rank-r activation (before the scale).
        let g = b.map(|b| B::matmul_t(dy.clone(), inner(b), false, false) * scale); // [rows, r]
        if let (Some(n), Some(w), Some(a), Some(g)) = (nx, w, a, g.clone()) {
            // dx = dy · w + g · a, the second product added into the first's output.
            let dx = B::matmul_t(dy.clone(), inner(w), false, false);
            let dx = B::matmul_t_into(dx, g, inner(a), false, false);
            grads.register::<B>(n.id, prim(dx));
        }
        if let (Some(n), Some(x)) = (nw, x.clone()) {
            grads.register::<B>(n.id, prim(B::matmul_t(dy.clone(), inner(x), true, false)));
        }
        if let (Some(n), Some(x), Some(g)) = (na, x, g) {
            // da = gᵀ · x: [r, in]
            grads.register::<B>(n.id, prim(B::matmul_t(g, inner(x), true, false)));
        }
        if let (Some(n), Some(h)) = (nb, h) {
            // db = dyᵀ · h: [out, r]
            grads.register::<B>(n.id, prim(B::matmul_t(dy, inner(h), true, false)));
        }
    }
}

/// [`MambaBackend::lora_linear`] on `Autodiff<B>`: the base product and the adapter's two as one
/// node, whose forward adds the adapter's output into the base's (`y += h · bᵀ`) and whose
/// backward adds the adapter's input gradient into the base's (`dx += g · a`), where burn's ops
/// would make each a separate tensor and an add, a pass over `[rows, out]` forward and over
/// `[rows, in]` backward. The bias is an ordinary (differentiated) add.
pub fn lora_linear<B: MambaBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
    bias: Option<Tensor<Autodiff<B, C>, 1>>,
    a: Tensor<Autodiff<B, C>, 2>,
    b: Tensor<Autodiff<B, C>, 2>,
    scale: f64,
) -> Tensor<Autodiff<B, C>, 2> {
    let [x, w, a, b] = [x, w, a, b].map(|t| t.into_primitive().tensor());
    let tracked = [&x, &w, &a, &b].map(|t| t.is_tracked());
    let [tx, tw, ta, tb] = tracked;
    let h = B::matmul_t(
        inner(x.primitive.clone()),
        inner(a.primitive.clone()),
        false,
        true,
    ) * scale;
    let y = B::matmul_t(
        inner(x.primitive.clone()),
        inner(w.primitive.clone()),
        false,
        true,
    );
    let out = match LoraBackward
        .prepare::<C>([
            x.node.clone(),
            w.node.clone(),
            a.node.clone(),
            b.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state: LoraState<B> = (
                (tw || ta).then(|| x.primitive.clone()),
                tx.then(|| w.primitive.clone()),
                tx.then(|| a.primitive.clone()),
                (tx || ta).then(|| b.primitive.clone()),
                tb.then(|| prim(h.clone())),
                scale,
            );
            let y = B::matmul_t_into(y, h, inner(b.primitive), false, true);
            prep.finish(state, prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(B::matmul_t_into(
            y,
            h,
            inner(b.primitive),
            false,
            true,
        ))),
    };
    let y = Tensor::from_primitive(TensorPrimitive::Float(out));
    match bias {
        Some(bias) => y + bias.unsqueeze::<2>(),
        None => y,
    }
}

//! RMSNorm and Mamba2's gated RMSNorm with a backward that keeps only the op's inputs.
//!
//! Differentiated op by op, `w · x / sqrt(mean(x²) + eps)` keeps `x`, `x²`'s input, the
//! reciprocal, the normalised tensor and more for backward (and the gated form also `silu(z)`
//! and the gated product): about five activation-sized tensors per norm. Here a norm is one
//! autodiff node that saves its inputs (`x`, or `y` and `z`, and the weight) and recomputes the
//! rest in backward from the closed-form gradient, as mamba_ssm's fused Triton norms do:
//!
//! ```text
//! g = y · silu(z)                (gated form; g = x otherwise)
//! r = 1 / sqrt(mean_group(g²) + eps),   n = g · r,   out = n · w
//! dw = Σ_tokens dout · n
//! dn = dout · w,   dg = r · (dn − n · mean_group(dn · n))
//! dy = dg · silu(z),   dz = dg · y · σ(z) · (1 + z · (1 − σ(z)))
//! ```
//!
//! The forward and backward are the backend's ([`MambaBackend::norm_forward`],
//! [`MambaBackend::norm_backward`]): plain tensor ops here for every backend, one kernel each way
//! on the cube backends (`cube::norm`). The math runs in f32 whatever
//! the inputs' dtypes (bf16 activations, f32 weights); each output and gradient takes the dtype
//! of the tensor it belongs to.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use crate::{from_prim as inner, to_prim as prim, MambaBackend};

/// `x / sqrt(mean(x², last) + eps)` over groups of the last dimension: `x` `[b, l, width]`,
/// `groups` dividing `width`. Returns the normalised tensor and `r` `[b, l, groups, 1]`.
fn normalize<B: Backend>(x: Tensor<B, 3>, groups: usize, eps: f64) -> (Tensor<B, 3>, Tensor<B, 4>) {
    let [b, l, width] = x.dims();
    if groups == 1 {
        let r = (x.clone().square().mean_dim(2) + eps).sqrt().recip(); // [b, l, 1]
        return (x * r.clone(), r.unsqueeze_dim(3));
    }
    let g = x.reshape([b, l, groups, width / groups]); // [b, l, G, width/G]
    let r = (g.clone().square().mean_dim(3) + eps).sqrt().recip(); // [b, l, G, 1]
    ((g * r.clone()).reshape([b, l, width]), r)
}

/// `t` in f32 (no op when it is).
fn f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    to(t, DType::F32)
}

fn to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// The (gated) norm: `w · norm_G(g)` with `g = y · silu(z)` (or `y` without `z`), the RMS over
/// each of `groups` groups of the last dimension. `y`, `z` `[b, l, width]`, `w` `[width]`.
/// Computed in f32 whatever the inputs' dtypes; the output has `y`'s dtype.
pub fn norm_forward_reference<B: Backend>(
    y: Tensor<B, 3>,
    z: Option<Tensor<B, 3>>,
    w: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<B, 3> {
    let dtype = y.dtype();
    let g = match z {
        Some(z) => f32(y) * silu(f32(z)),
        None => f32(y),
    };
    to(normalize(g, groups, eps).0 * f32(w).unsqueeze::<3>(), dtype)
}

/// RMSNorm: `w · x / sqrt(mean(x²) + eps)`, `x` `[b, l, width]`, `w` `[width]`.
pub fn rms_norm_reference<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    norm_forward_reference(x, None, w, 1, eps)
}

/// A decode step's residual add with the next RMSNorm: `sum = x + h` in `x`'s dtype, and
/// `w · sum / sqrt(mean(sum²) + eps)` in `h`'s dtype. `x`, `h` `[b, l, width]`.
pub fn add_rms_norm_reference<B: Backend>(
    x: Tensor<B, 3>,
    h: Tensor<B, 3>,
    w: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let out_dtype = h.dtype();
    let sum = x.clone() + to(h, x.dtype());
    let out = to(
        norm_forward_reference(sum.clone(), None, w, 1, eps),
        out_dtype,
    );
    (sum, out)
}

/// Gated RMSNorm: `w · norm_G(y · silu(z))`, the RMS taken over each of `groups` groups of the
/// last dimension. `y`, `z` `[b, l, width]`, `w` `[width]`.
pub fn gated_rms_norm_reference<B: Backend>(
    y: Tensor<B, 3>,
    z: Tensor<B, 3>,
    w: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<B, 3> {
    norm_forward_reference(y, Some(z), w, groups, eps)
}

/// The gradients of the (gated) norm, each in the dtype of the tensor it belongs to.
#[derive(Debug, Clone)]
pub struct NormGrads<B: Backend> {
    pub dy: Tensor<B, 3>,
    /// With the gate.
    pub dz: Option<Tensor<B, 3>>,
    /// When asked for (the weight trains).
    pub dw: Option<Tensor<B, 1>>,
}

/// `dg` from `dout` for `g` (the tensor that was normalised): also `dw`. All f32.
fn norm_backward<B: Backend>(
    g: Tensor<B, 3>,
    w: Tensor<B, 1>,
    dout: Tensor<B, 3>,
    groups: usize,
    eps: f64,
) -> (Tensor<B, 3>, Tensor<B, 1>) {
    let [b, l, width] = g.dims();
    let (n, r) = normalize(g, groups, eps); // [b, l, width], [b, l, G, 1]
    let dw = (dout.clone() * n.clone())
        .reshape([b * l, width])
        .sum_dim(0)
        .reshape([width]);
    let shape = [b, l, groups, width / groups];
    let dn = (dout * w.unsqueeze::<3>()).reshape(shape);
    let n = n.reshape(shape);
    let proj = (dn.clone() * n.clone()).mean_dim(3); // [b, l, G, 1]
    let dg = ((dn - n * proj) * r).reshape([b, l, width]);
    (dg, dw)
}

/// The backward of [`norm_forward_reference`] in tensor ops (f32 math).
pub fn norm_backward_reference<B: Backend>(
    y: Tensor<B, 3>,
    z: Option<Tensor<B, 3>>,
    w: Tensor<B, 1>,
    dout: Tensor<B, 3>,
    groups: usize,
    eps: f64,
    want_dw: bool,
) -> NormGrads<B> {
    let (yt, wt) = (y.dtype(), w.dtype());
    let y = f32(y);
    match z {
        Some(z) => {
            let zt = z.dtype();
            let z = f32(z);
            let s = silu(z.clone());
            let (dg, dw) = norm_backward(y.clone() * s.clone(), f32(w), f32(dout), groups, eps);
            let sig = sigmoid(z.clone());
            // silu'(z) = σ(z) · (1 + z · (1 − σ(z)))
            let dsilu = sig.clone() * ((-sig + 1.0) * z + 1.0);
            NormGrads {
                dz: Some(to(dg.clone() * y * dsilu, zt)),
                dy: to(dg * s, yt),
                dw: want_dw.then(|| to(dw, wt)),
            }
        }
        None => {
            let (dg, dw) = norm_backward(y, f32(w), f32(dout), groups, eps);
            NormGrads {
                dy: to(dg, yt),
                dz: None,
                dw: want_dw.then(|| to(dw, wt)),
            }
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: MambaBackend> Backward<B, 2> for RmsNormBackward {
    /// `x`, `w`, `eps`.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = inner::<B, 3>(grads.consume::<B>(&ops.node));
        let (x, w, eps) = ops.state;
        let [nx, nw] = ops.parents;
        let g = B::norm_backward(inner(x), None, inner(w), dout, 1, eps, nw.is_some());
        if let Some(n) = nx {
            grads.register::<B>(n.id, prim(g.dy));
        }
        if let (Some(n), Some(dw)) = (nw, g.dw) {
            grads.register::<B>(n.id, prim(dw));
        }
    }
}

/// The RMSNorm of `B` ([`MambaBackend::norm_forward`]) on `Autodiff<B>` as one node that
/// saves `x` and `w`.
pub fn rms_norm<B: MambaBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 3>,
    w: Tensor<Autodiff<B, C>, 1>,
    eps: f64,
) -> Tensor<Autodiff<B, C>, 3> {
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let forward = |x: FloatTensor<B>, w: FloatTensor<B>| {
        prim(B::norm_forward(inner(x), None, inner(w), 1, eps))
    };
    let out = match RmsNormBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (x.primitive.clone(), w.primitive.clone(), eps);
            prep.finish(state, forward(x.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct GatedNormBackward;

/// `y`, `z`, `w`, `groups`, `eps`.
type GatedState<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize, f64);

impl<B: MambaBackend> Backward<B, 3> for GatedNormBackward {
    type State = GatedState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = inner::<B, 3>(grads.consume::<B>(&ops.node));
        let (y, z, w, groups, eps) = ops.state;
        let [ny, nz, nw] = ops.parents;
        let g = B::norm_backward(
            inner(y),
            Some(inner(z)),
            inner(w),
            dout,
            groups,
            eps,
            nw.is_some(),
        );
        if let (Some(n), Some(dz)) = (nz, g.dz) {
            grads.register::<B>(n.id, prim(dz));
        }
        if let Some(n) = ny {
            grads.register::<B>(n.id, prim(g.dy));
        }
        if let (Some(n), Some(dw)) = (nw, g.dw) {
            grads.register::<B>(n.id, prim(dw));
        }
    }
}

/// The gated RMSNorm of `B` ([`MambaBackend::norm_forward`]) on `Autodiff<B>` as one node that
/// saves `y`, `z` and `w`.
pub fn gated_rms_norm<B: MambaBackend, C: CheckpointStrategy>(
    y: Tensor<Autodiff<B, C>, 3>,
    z: Tensor<Autodiff<B, C>, 3>,
    w: Tensor<Autodiff<B, C>, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<Autodiff<B, C>, 3> {
    let y = y.into_primitive().tensor();
    let z = z.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let forward = |y: FloatTensor<B>, z: FloatTensor<B>, w: FloatTensor<B>| {
        prim(B::norm_forward(
            inner(y),
            Some(inner(z)),
            inner(w),
            groups,
            eps,
        ))
    };
    let out = match GatedNormBackward
        .prepare::<C>([y.node.clone(), z.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                y.primitive.clone(),
                z.primitive.clone(),
                w.primitive.clone(),
                groups,
                eps,
            );
            prep.finish(state, forward(y.primitive, z.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(y.primitive, z.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

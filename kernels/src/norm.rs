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
//! Plain tensor ops on the inner backend, so every backend gets it.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

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

/// RMSNorm: `w · x / sqrt(mean(x²) + eps)`, `x` `[b, l, width]`, `w` `[width]`.
pub fn rms_norm_reference<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    normalize(x, 1, eps).0 * w.unsqueeze::<3>()
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
    normalize(y * silu(z), groups, eps).0 * w.unsqueeze::<3>()
}

/// `dg` from `dout` for `g` (the tensor that was normalised): also `dw`.
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

fn inner<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend> Backward<B, 2> for RmsNormBackward {
    /// `x`, `w`, `eps`.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = inner::<B, 3>(grads.consume::<B>(&ops.node));
        let (x, w, eps) = ops.state;
        let (dx, dw) = norm_backward(inner(x), inner(w), dout, 1, eps);
        let [nx, nw] = ops.parents;
        if let Some(n) = nx {
            grads.register::<B>(n.id, prim(dx));
        }
        if let Some(n) = nw {
            grads.register::<B>(n.id, prim(dw));
        }
    }
}

/// [`rms_norm_reference`] on `Autodiff<B>` as one node that saves `x` and `w`.
pub fn rms_norm<B: Backend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 3>,
    w: Tensor<Autodiff<B, C>, 1>,
    eps: f64,
) -> Tensor<Autodiff<B, C>, 3> {
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let forward = |x: FloatTensor<B>, w: FloatTensor<B>| {
        prim(rms_norm_reference::<B>(inner(x), inner(w), eps))
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

impl<B: Backend> Backward<B, 3> for GatedNormBackward {
    type State = GatedState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = inner::<B, 3>(grads.consume::<B>(&ops.node));
        let (y, z, w, groups, eps) = ops.state;
        let (y, z): (Tensor<B, 3>, Tensor<B, 3>) = (inner(y), inner(z));
        let s = silu(z.clone());
        let (dg, dw) = norm_backward(y.clone() * s.clone(), inner(w), dout, groups, eps);
        let [ny, nz, nw] = ops.parents;
        if let Some(n) = nz {
            let sig = sigmoid(z.clone());
            // silu'(z) = σ(z) · (1 + z · (1 − σ(z)))
            let dsilu = sig.clone() * ((-sig + 1.0) * z + 1.0);
            grads.register::<B>(n.id, prim(dg.clone() * y * dsilu));
        }
        if let Some(n) = ny {
            grads.register::<B>(n.id, prim(dg * s));
        }
        if let Some(n) = nw {
            grads.register::<B>(n.id, prim(dw));
        }
    }
}

/// [`gated_rms_norm_reference`] on `Autodiff<B>` as one node that saves `y`, `z` and `w`.
pub fn gated_rms_norm<B: Backend, C: CheckpointStrategy>(
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
        prim(gated_rms_norm_reference::<B>(
            inner(y),
            inner(z),
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

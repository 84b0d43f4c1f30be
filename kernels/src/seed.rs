//! `backward_with`: the backward pass of a tensor for a given upstream gradient, torch's
//! `y.backward(dy)`.
//!
//! burn's `Tensor::backward` seeds the root with ones, so "the gradients for an upstream `dy`"
//! is usually written `(y * dy).sum().backward()`, which adds a full-size multiply and a
//! reduction (and their backward) to whatever is being measured. Here the root is a one-element
//! placeholder whose backward step hands `dy` to `y` as its gradient: nothing else runs.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// Backward step of the placeholder root: registers the saved `dy` for its one parent.
#[derive(Debug)]
struct Seed;

impl<B: Backend> Backward<B, 1> for Seed {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        // The root's own (ones) gradient is not needed.
        let _ = grads.consume::<B>(&ops.node);
        if let Some(parent) = &ops.parents[0] {
            grads.register::<B>(parent.id, ops.state);
        }
    }
}

/// The gradients of every tracked tensor `y` depends on, for the upstream gradient `dy` (the
/// same as `(y * dy).sum().backward()`, without the multiply and the reduction).
pub fn backward_with<B: Backend, C: CheckpointStrategy, const D: usize>(
    y: Tensor<Autodiff<B, C>, D>,
    dy: Tensor<B, D>,
) -> Gradients {
    assert_eq!(y.dims(), dy.dims(), "backward_with: dy must have y's shape");
    let device = dy.device();
    let y = y.into_primitive().tensor();
    let root: FloatTensor<B> = Tensor::<B, 1>::zeros([1], &device)
        .into_primitive()
        .tensor();
    let root = match Seed
        .prepare::<C>([y.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(dy.into_primitive().tensor(), root),
        OpsKind::UnTracked(prep) => prep.finish(root),
    };
    Tensor::<Autodiff<B, C>, 1>::from_primitive(TensorPrimitive::Float(root)).backward()
}

/// `backward_with` and a tracking test on a generic autodiff backend, for code that drives
/// several backward passes itself (segments of a model run and re-run in backward: gradient
/// checkpointing, a chunked loss head). Implemented for every `Autodiff<B, C>`.
pub trait BackwardWith: burn::tensor::backend::AutodiffBackend {
    /// The gradients of every tracked tensor `y` depends on, seeded with `dy` at `y`.
    fn backward_with<const D: usize>(
        y: Tensor<Self, D>,
        dy: Tensor<Self::InnerBackend, D>,
    ) -> Self::Gradients;

    /// Whether any tracked tensor (a leaf that requires a gradient) reaches `t`.
    fn is_tracked<const D: usize>(t: &Tensor<Self, D>) -> bool;
}

impl<B: Backend, C: CheckpointStrategy> BackwardWith for Autodiff<B, C> {
    fn backward_with<const D: usize>(y: Tensor<Self, D>, dy: Tensor<B, D>) -> Self::Gradients {
        backward_with(y, dy)
    }

    fn is_tracked<const D: usize>(t: &Tensor<Self, D>) -> bool {
        !t.clone()
            .into_primitive()
            .tensor()
            .node
            .requirement
            .is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;
    type A = Autodiff<B>;

    /// The same gradients as the `sum(y · dy)` formulation, through a non-trivial graph.
    #[test]
    fn matches_the_sum_formulation() {
        let device = Default::default();
        let normal = |shape: [usize; 2]| {
            Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (x0, w0, dy) = (normal([3, 5]), normal([5, 4]), normal([3, 4]));
        let run = |seeded: bool| {
            let x = Tensor::<A, 2>::from_inner(x0.clone()).require_grad();
            let w = Tensor::<A, 2>::from_inner(w0.clone()).require_grad();
            let y = x.clone().matmul(w.clone()).tanh();
            let grads = if seeded {
                backward_with(y, dy.clone())
            } else {
                (y * Tensor::from_inner(dy.clone())).sum().backward()
            };
            (x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
        };
        let (gx, gw) = run(true);
        let (rx, rw) = run(false);
        let diff = |a: Tensor<B, 2>, b: Tensor<B, 2>| (a - b).abs().max().into_scalar();
        let size = |a: &Tensor<B, 2>| a.clone().abs().max().into_scalar();
        assert!(size(&rx) > 1e-2 && size(&rw) > 1e-2);
        assert!(diff(gx, rx) < 1e-6);
        assert!(diff(gw, rw) < 1e-6);
    }
}

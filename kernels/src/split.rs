//! Cutting a tensor into pieces along its last dimension, with one backward for all of them.
//!
//! Mamba2 cuts its input projection into `z`, `xBC` and `dt`, and the conv's output into `x`,
//! `B` and `C`. Through burn's `narrow`, each piece's backward is a zero-filled tensor of the
//! whole input's size with the piece's gradient assigned into it, and the pieces' gradients are
//! then added: per cut into three, three full-size fills, three assigns and two full-size adds
//! (in the 130m step's profile, 481 fills and 202 assigns a step). Here the pieces are one op:
//! forward they are views (no copy), backward their gradients are written side by side into the
//! input's gradient once ([`crate::MambaBackend::cat_last`]: one launch on the cube backends,
//! where burn's `cat` is an empty tensor and a slice-assign a piece), a zero piece only where a
//! piece took no gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use std::sync::Arc;

use crate::outputs::{GradSlot, SecondOutput};
use crate::MambaBackend;
use crate::{from_prim as inner, to_prim as prim};

/// `x` `[.., width]` as pieces of `sizes` along the last dimension, by `narrow` (views).
/// Panics unless `sizes` sum to `width`.
pub fn split_last_reference<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    sizes: &[usize],
) -> Vec<Tensor<B, D>> {
    let width = x.dims()[D - 1];
    assert_eq!(
        sizes.iter().sum::<usize>(),
        width,
        "split_last: pieces {sizes:?} do not add up to the width {width}"
    );
    let mut start = 0;
    sizes
        .iter()
        .map(|&len| {
            let piece = x.clone().narrow(D - 1, start, len);
            start += len;
            piece
        })
        .collect()
}

/// What the backward needs: each piece's shape, the further pieces' gradient slots, and the
/// input (for its dtype and device, and as the handle burn looks a gradient up with; the pieces
/// are views of it, so keeping it costs no memory).
#[derive(Debug, Clone)]
struct SplitState<B: Backend> {
    shapes: Vec<Vec<usize>>,
    slots: Vec<GradSlot<B>>,
    input: FloatTensor<B>,
}

#[derive(Debug)]
struct SplitBackward<const D: usize>;

impl<B: MambaBackend, const D: usize> Backward<B, 1> for SplitBackward<D> {
    type State = SplitState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let SplitState {
            shapes,
            slots,
            input,
        } = ops.state;
        let dtype: DType = burn::tensor::TensorMetadata::dtype(&input);
        let device = B::float_device(&input);
        // The first piece is this node's own output; it may have taken no gradient when only
        // the other pieces were used.
        let first = grads.remove::<B>(&FloatTensor::<Autodiff<B>> {
            primitive: input,
            node: ops.node.clone(),
            rc: Arc::new(ops.node.id),
        });
        let [parent] = ops.parents;
        let Some(parent) = parent else { return };
        let mut pieces = Vec::with_capacity(shapes.len());
        let taken = std::iter::once(first).chain(
            slots
                .iter()
                .map(|s| s.lock().expect("gradient slot poisoned").take()),
        );
        for (g, shape) in taken.zip(&shapes) {
            let g = match g {
                Some(g) => inner::<B, D>(g),
                None => Tensor::<B, D>::zeros(shape.clone(), (&device, dtype)),
            };
            pieces.push(g);
        }
        let dx = B::cat_last(pieces);
        grads.register::<B>(parent.id, prim(dx));
    }
}

/// [`crate::MambaBackend::split_last`] on `Autodiff<B>`: the pieces as one op (see the module).
pub fn split_last<B: MambaBackend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<B, C>, D>,
    sizes: &[usize],
) -> Vec<Tensor<Autodiff<B, C>, D>> {
    let x = x.into_primitive().tensor();
    let pieces = B::split_last(inner::<B, D>(x.primitive.clone()), sizes);
    let shapes: Vec<Vec<usize>> = pieces.iter().map(|p| p.dims().to_vec()).collect();
    let slots: Vec<GradSlot<B>> = (1..pieces.len())
        .map(|_| GradSlot::<B>::default())
        .collect();
    let mut pieces = pieces.into_iter();
    let Some(first) = pieces.next() else {
        return Vec::new();
    };
    let state = SplitState::<B> {
        shapes,
        slots: slots.clone(),
        input: x.primitive.clone(),
    };
    let head = match SplitBackward::<D>
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, prim(first)),
        OpsKind::UnTracked(prep) => prep.finish(prim(first)),
    };
    let mut out = Vec::with_capacity(slots.len() + 1);
    let head_node = head.node.clone();
    out.push(Tensor::from_primitive(TensorPrimitive::Float(head)));
    for (piece, slot) in pieces.zip(slots) {
        let t = match SecondOutput
            .prepare::<C>([head_node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(slot, prim(piece)),
            OpsKind::UnTracked(prep) => prep.finish(prim(piece)),
        };
        out.push(Tensor::from_primitive(TensorPrimitive::Float(t)));
    }
    out
}

//! Ops with several outputs on `Autodiff<B>`.
//!
//! burn's autodiff gives a node one output. An op with more makes its first output its own node
//! and each further output a [`SecondOutput`] node whose one parent is the op's node: deeper in
//! the graph, so burn's tape (deepest first) runs their steps before the op's. Each parks the
//! gradient that reached its output in a [`GradSlot`], and the op's step takes them all at once.
//! An output nothing read has no step on the tape, and its slot stays empty.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use std::sync::{Arc, Mutex};

/// The gradient of one of an op's further outputs, handed by that output's node to the op's
/// own node.
pub(crate) type GradSlot<B> = Arc<Mutex<Option<FloatTensor<B>>>>;

/// Backward step of an op's further output (the final state of the scans, a piece of a split).
/// It registers nothing: it parks its gradient in the [`GradSlot`] the op's step reads.
///
/// This is how one op gets two outputs without packing them into one tensor: packing cost a
/// copy of `y` in the forward and, in the backward, a zero-filled full-size gradient per
/// `narrow` plus a copy back out: 0.24 / 0.45 / 0.55 ms of an SSD forward+backward at the
/// three bench shapes on an H100.
#[derive(Debug)]
pub(crate) struct SecondOutput;

impl<B: Backend> Backward<B, 1> for SecondOutput {
    type State = GradSlot<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<B>(&ops.node);
        *ops.state.lock().expect("gradient slot poisoned") = Some(g);
    }
}

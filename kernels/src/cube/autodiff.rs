//! Autodiff for the kernel ops: custom backward steps (burn-autodiff's `Backward` pattern) that
//! run the inner backend's forward and backward ops, so that `Autodiff<CubeBackend>` uses the
//! kernels both ways instead of differentiating the reference tensor ops.
//!
//! Generic over any inner [`MambaBackend`]; `lib.rs` only routes here when
//! `B::has_kernels()`, so other backends keep differentiating the reference.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::{ConvGrads, ConvInput, ConvOutput, MambaBackend};

type Ad<B, C> = Autodiff<B, C>;

/// The inner primitives the conv backward needs: `x`, `weight`, `bias`, `initial_state`, `silu`.
type ConvState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    bool,
);

fn inner<B: MambaBackend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Backward step of `y = causal_conv1d(x, weight, bias, initial_state)`; parents are
/// `[x, weight, bias, initial_state]` (absent ones are untracked placeholders).
#[derive(Debug)]
struct ConvBackward;

impl<B: MambaBackend> Backward<B, 4> for ConvBackward {
    type State = ConvState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b, node_s] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, bias, init, silu) = ops.state;
        let input = ConvInput::<B> {
            x: inner(x),
            weight: inner(weight),
            bias: bias.map(inner),
            initial_state: init.map(inner),
            silu,
        };
        let ConvGrads {
            x: dx,
            weight: dw,
            bias: db,
            initial_state: ds,
        } = B::causal_conv1d_backward(input, inner(dy));
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
        if let (Some(node), Some(db)) = (node_b, db) {
            grads.register::<B>(node.id, db.into_primitive().tensor());
        }
        if let (Some(node), Some(ds)) = (node_s, ds) {
            grads.register::<B>(node.id, ds.into_primitive().tensor());
        }
    }
}

/// The causal conv1d on `Autodiff<B>` with the inner backend's forward and backward ops for `y`.
///
/// The final state is the last `width - 1` rows of `cat(initial_state, x)`: a slice, built here
/// from tensor ops on the autodiff tensors so that its gradient flows back through burn's own
/// slice/concat backward.
pub fn causal_conv1d<B: MambaBackend, C: CheckpointStrategy>(
    input: ConvInput<Ad<B, C>>,
) -> ConvOutput<Ad<B, C>> {
    let ConvInput {
        x,
        weight,
        bias,
        initial_state,
        silu,
    } = input;
    let [batch, seqlen, channels] = x.dims();
    let [_, width] = weight.dims();
    let device = x.device();
    let wm1 = width - 1;

    // Final state from autodiff tensor ops: [batch, channels, width - 1]
    let final_state = if seqlen >= wm1 {
        x.clone().narrow(1, seqlen - wm1, wm1).swap_dims(1, 2)
    } else {
        let state = match &initial_state {
            Some(s) => s.clone(),
            None => Tensor::zeros([batch, channels, wm1], &device),
        };
        let ext = Tensor::cat(vec![state.swap_dims(1, 2), x.clone()], 1); // [b, l + w - 1, c]
        ext.narrow(1, seqlen, wm1).swap_dims(1, 2)
    };

    // Untracked placeholders keep the parent list fixed at four.
    let bias_t = bias
        .clone()
        .unwrap_or_else(|| Tensor::zeros([channels], &device));
    let init_t = initial_state
        .clone()
        .unwrap_or_else(|| Tensor::zeros([batch, channels, wm1], &device));
    let x_p = x.into_primitive().tensor();
    let w_p = weight.into_primitive().tensor();
    let b_p = bias_t.into_primitive().tensor();
    let s_p = init_t.into_primitive().tensor();
    let has_bias = bias.is_some();
    let has_init = initial_state.is_some();

    let forward = |x: Tensor<B, 3>, w, b: Option<Tensor<B, 1>>, s: Option<Tensor<B, 3>>| {
        B::causal_conv1d(ConvInput {
            x,
            weight: w,
            bias: b,
            initial_state: s,
            silu,
        })
        .y
    };

    let y = match ConvBackward
        .prepare::<C>([
            x_p.node.clone(),
            w_p.node.clone(),
            b_p.node.clone(),
            s_p.node.clone(),
        ])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let bias_in = has_bias.then(|| b_p.primitive.clone());
            let init_in = has_init.then(|| s_p.primitive.clone());
            let state: ConvState<B> = (
                x_p.primitive.clone(),
                w_p.primitive.clone(),
                bias_in.clone(),
                init_in.clone(),
                silu,
            );
            let y = forward(
                inner(x_p.primitive),
                inner(w_p.primitive),
                bias_in.map(inner),
                init_in.map(inner),
            );
            prep.finish(state, y.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            let y = forward(
                inner(x_p.primitive),
                inner(w_p.primitive),
                has_bias.then(|| inner(b_p.primitive)),
                has_init.then(|| inner(s_p.primitive)),
            );
            prep.finish(y.into_primitive().tensor())
        }
    };

    ConvOutput {
        y: Tensor::from_primitive(TensorPrimitive::Float(y)),
        final_state,
    }
}

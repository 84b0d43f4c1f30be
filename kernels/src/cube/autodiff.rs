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
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use std::sync::Arc;

use super::prim;
use crate::outputs::{GradSlot, SecondOutput};

use crate::{
    ConvGrads, ConvInput, ConvOutput, Mamba2StepInput, Mamba2StepOutput, MambaBackend,
    SelectiveScanGrads, SelectiveScanInput, SelectiveScanOutput, SsdGrads, SsdInput, SsdKept,
    SsdOutput, SsdStepInput,
};

type Ad<B, C> = Autodiff<B, C>;

/// An `Autodiff<B>` float primitive (whatever the checkpoint strategy): a tensor and its node.
type AdTensor<B> = FloatTensor<Autodiff<B>>;

/// A decode step's two outputs (the output and the new state) on `Autodiff<B>`.
type StepOut<B, C, const D1: usize, const D2: usize> = (Tensor<Ad<B, C>, D1>, Tensor<Ad<B, C>, D2>);

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
            None => Tensor::zeros([batch, channels, wm1], (&device, x.dtype())),
        };
        let ext = Tensor::cat(vec![state.swap_dims(1, 2), x.clone()], 1); // [b, l + w - 1, c]
        ext.narrow(1, seqlen, wm1).swap_dims(1, 2)
    };

    // Untracked placeholders keep the parent list fixed at four.
    let bias_t = bias
        .clone()
        .unwrap_or_else(|| Tensor::zeros([channels], (&device, x.dtype())));
    // `x` stands in for a missing initial state (no launch; `ds` is `None` then, so nothing is
    // registered for it).
    let init_t = initial_state.clone().unwrap_or_else(|| x.clone());
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

fn is_tracked<B: MambaBackend, C: CheckpointStrategy, const D: usize>(
    t: &Tensor<Ad<B, C>, D>,
) -> bool {
    <Ad<B, C> as crate::BackwardWith>::is_tracked(t)
}

fn register<B: MambaBackend, const D: usize>(
    grads: &mut Gradients,
    node: Option<burn::backend::autodiff::NodeId>,
    g: Option<Tensor<B, D>>,
) {
    if let (Some(id), Some(g)) = (node, g) {
        grads.register::<B>(id, g.into_primitive().tensor());
    }
}

/// The gradient registered for the node of `ops`, or `None` where nothing reached it
/// (`Gradients::consume` panics then). `like` is any inner tensor: only the node is looked up.
fn take_grad<B: Backend, S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    like: FloatTensor<B>,
) -> Option<FloatTensor<B>> {
    let key = AdTensor::<B> {
        primitive: like,
        node: ops.node.clone(),
        rc: Arc::new(ops.node.id),
    };
    grads.remove::<B>(&key)
}

/// An op's two outputs (`y`, final state) as `Autodiff` primitives.
type TwoOutputs<B, C> = (FloatTensor<Ad<B, C>>, FloatTensor<Ad<B, C>>);

/// Finishes a two-output op whose preparation is `kind`: `forward(input, keep)` gives the inner
/// outputs `(y, final_state)` and, asked to `keep` (the op is tracked), what its backward can
/// reuse; `y` becomes the op's node, saving `saved(input, kept, slot)` for its backward step,
/// and the final state a [`SecondOutput`] node whose gradient goes to `slot`.
fn finish_two<B, C, BO, S, I, K, const N: usize>(
    kind: OpsKind<BO, B, S, C, N>,
    input: I,
    saved: impl FnOnce(I, Option<K>, GradSlot<B>) -> S,
    forward: impl FnOnce(I, bool) -> (FloatTensor<B>, FloatTensor<B>, Option<K>),
) -> TwoOutputs<B, C>
where
    B: Backend,
    C: CheckpointStrategy,
    BO: Backward<B, N, State = S>,
    S: Clone + Send + std::fmt::Debug + 'static,
    I: Clone,
{
    let slot = GradSlot::<B>::default();
    let (y, last) = match kind {
        OpsKind::Tracked(prep) => {
            let (y, last, kept) = forward(input.clone(), true);
            let state = saved(input, kept, slot.clone());
            (prep.finish(state, y), last)
        }
        OpsKind::UnTracked(prep) => {
            let (y, last, _) = forward(input, false);
            (prep.finish(y), last)
        }
    };
    let last = match SecondOutput
        .prepare::<C>([y.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(slot, last),
        OpsKind::UnTracked(prep) => prep.finish(last),
    };
    (y, last)
}

fn outer<B: MambaBackend, C: CheckpointStrategy, const D: usize>(
    t: FloatTensor<Ad<B, C>>,
) -> Tensor<Ad<B, C>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Everything the SSD backward needs of its forward: the inner inputs and the static arguments,
/// and what the forward kept of its way there (else the backward computes it again).
#[derive(Debug, Clone)]
struct SsdSaved<B: MambaBackend> {
    input: SsdInput<B>,
    kept: Option<SsdKept<B>>,
    /// The final state's gradient, from its [`SecondOutput`] node.
    d_final: GradSlot<B>,
}

/// Backward step of the SSD scan. Its node carries `y`; the final state is a
/// [`SecondOutput`] node whose gradient arrives through the saved slot. Parents are
/// `[x, dt, a, b, c, d, dt_bias, initial_state]`.
#[derive(Debug)]
struct SsdBackward;

impl<B: MambaBackend> Backward<B, 8> for SsdBackward {
    type State = SsdSaved<B>;

    fn backward(self, ops: Ops<Self::State, 8>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x_like = ops.state.input.x.clone().into_primitive().tensor();
        let dy = take_grad::<B, _, 8>(grads, &ops, x_like);
        let d_final = ops
            .state
            .d_final
            .lock()
            .expect("gradient slot poisoned")
            .take();
        let [nx, ndt, na, nb, nc, nd, nbias, ns] = ops.parents.map(|n| n.map(|n| n.id));
        let input = ops.state.input;
        let kept = ops.state.kept;
        // Only the final state reached the loss: y's gradient is zero.
        let dy: Tensor<B, 4> = match dy {
            Some(dy) => inner(dy),
            None => input.x.zeros_like(),
        };
        let SsdGrads {
            x,
            dt,
            a,
            b,
            c,
            d,
            dt_bias,
            initial_state,
        } = B::ssd_chunk_scan_backward(input, kept, dy, d_final.map(inner));
        register(grads, nx, Some(x));
        register(grads, ndt, Some(dt));
        register(grads, na, Some(a));
        register(grads, nb, Some(b));
        register(grads, nc, Some(c));
        register(grads, nd, Some(d));
        register(grads, nbias, Some(dt_bias));
        register(grads, ns, initial_state);
    }
}

/// The SSD scan on `Autodiff<B>` with the inner backend's forward and backward ops.
pub fn ssd_chunk_scan<B: MambaBackend, C: CheckpointStrategy>(
    input: SsdInput<Ad<B, C>>,
) -> SsdOutput<Ad<B, C>> {
    let has_init = input.initial_state.is_some();
    // Without an initial state, `x` stands in for it in the parent list (the list is fixed at
    // eight): nothing reads it, and no gradient is registered for it (`initial_state` of the
    // gradients is `None` then), so no zero state is filled in every layer.
    let init = input
        .initial_state
        .clone()
        .unwrap_or_else(|| input.x.clone());
    let x = input.x.into_primitive().tensor();
    let dt = input.dt.into_primitive().tensor();
    let a = input.a.into_primitive().tensor();
    let b = input.b.into_primitive().tensor();
    let c = input.c.into_primitive().tensor();
    let d = input.d.into_primitive().tensor();
    let bias = input.dt_bias.into_primitive().tensor();
    let s = init.into_primitive().tensor();
    let inner_input = SsdInput::<B> {
        x: inner(x.primitive.clone()),
        dt: inner(dt.primitive.clone()),
        a: inner(a.primitive.clone()),
        b: inner(b.primitive.clone()),
        c: inner(c.primitive.clone()),
        d: inner(d.primitive.clone()),
        dt_bias: inner(bias.primitive.clone()),
        dt_limit: input.dt_limit,
        initial_state: has_init.then(|| inner(s.primitive.clone())),
        chunk_size: input.chunk_size,
    };
    let nodes = [
        x.node, dt.node, a.node, b.node, c.node, d.node, bias.node, s.node,
    ];
    let (y, final_state) = finish_two(
        SsdBackward.prepare::<C>(nodes).compute_bound().stateful(),
        inner_input,
        |input, kept, d_final| SsdSaved {
            input,
            kept,
            d_final,
        },
        |input, keep| {
            let (out, kept) = if keep {
                B::ssd_chunk_scan_keeping(input)
            } else {
                (B::ssd_chunk_scan(input), None)
            };
            (prim(out.y), prim(out.final_state), kept)
        },
    );
    SsdOutput {
        y: outer(y),
        final_state: outer(final_state),
    }
}

#[derive(Debug, Clone)]
struct ScanSaved<B: MambaBackend> {
    input: SelectiveScanInput<B>,
    /// The final state's gradient, from its [`SecondOutput`] node.
    d_final: GradSlot<B>,
}

/// Backward step of the selective scan, with `y` and the final state as the SSD's; parents are
/// `[u, delta, a, b, c, d, z, delta_bias, initial_state]`.
#[derive(Debug)]
struct ScanBackward;

impl<B: MambaBackend> Backward<B, 9> for ScanBackward {
    type State = ScanSaved<B>;

    fn backward(self, ops: Ops<Self::State, 9>, grads: &mut Gradients, _: &mut Checkpointer) {
        let u_like = ops.state.input.u.clone().into_primitive().tensor();
        let dy = take_grad::<B, _, 9>(grads, &ops, u_like);
        let d_final = ops
            .state
            .d_final
            .lock()
            .expect("gradient slot poisoned")
            .take();
        let [nu, ndelta, na, nb, nc, nd, nz, nbias, ns] = ops.parents.map(|n| n.map(|n| n.id));
        let input = ops.state.input;
        // Only the final state reached the loss: y's gradient is zero.
        let dy: Tensor<B, 3> = match dy {
            Some(dy) => inner(dy),
            None => input.u.zeros_like(),
        };
        let g: SelectiveScanGrads<B> = B::selective_scan_backward(input, dy, d_final.map(inner));
        register(grads, nu, Some(g.u));
        register(grads, ndelta, Some(g.delta));
        register(grads, na, Some(g.a));
        register(grads, nb, Some(g.b));
        register(grads, nc, Some(g.c));
        register(grads, nd, Some(g.d));
        register(grads, nz, g.z);
        register(grads, nbias, g.delta_bias);
        register(grads, ns, g.initial_state);
    }
}

/// The selective scan on `Autodiff<B>` with the inner backend's forward and backward ops.
pub fn selective_scan<B: MambaBackend, C: CheckpointStrategy>(
    input: SelectiveScanInput<Ad<B, C>>,
) -> SelectiveScanOutput<Ad<B, C>> {
    let [batch, seqlen, channels] = input.u.dims();
    let dstate = input.a.dims()[1];
    let device = input.u.device();
    let (has_z, has_bias, has_init) = (
        input.z.is_some(),
        input.delta_bias.is_some(),
        input.initial_state.is_some(),
    );
    // Untracked placeholders keep the parent list fixed at nine.
    let z = input
        .z
        .unwrap_or_else(|| Tensor::zeros([batch, seqlen, channels], (&device, input.u.dtype())));
    let bias = input
        .delta_bias
        .unwrap_or_else(|| Tensor::zeros([channels], (&device, input.u.dtype())));
    let init = input
        .initial_state
        .unwrap_or_else(|| Tensor::zeros([batch, channels, dstate], (&device, input.u.dtype())));
    let u = input.u.into_primitive().tensor();
    let delta = input.delta.into_primitive().tensor();
    let a = input.a.into_primitive().tensor();
    let b = input.b.into_primitive().tensor();
    let c = input.c.into_primitive().tensor();
    let d = input.d.into_primitive().tensor();
    let z = z.into_primitive().tensor();
    let bias = bias.into_primitive().tensor();
    let s = init.into_primitive().tensor();
    let inner_input = SelectiveScanInput::<B> {
        u: inner(u.primitive.clone()),
        delta: inner(delta.primitive.clone()),
        a: inner(a.primitive.clone()),
        b: inner(b.primitive.clone()),
        c: inner(c.primitive.clone()),
        d: inner(d.primitive.clone()),
        z: has_z.then(|| inner(z.primitive.clone())),
        delta_bias: has_bias.then(|| inner(bias.primitive.clone())),
        delta_softplus: input.delta_softplus,
        initial_state: has_init.then(|| inner(s.primitive.clone())),
    };
    let nodes = [
        u.node, delta.node, a.node, b.node, c.node, d.node, z.node, bias.node, s.node,
    ];
    let (y, final_state) = finish_two(
        ScanBackward.prepare::<C>(nodes).compute_bound().stateful(),
        inner_input,
        |input, _: Option<()>, d_final| ScanSaved { input, d_final },
        |input, _| {
            let out = B::selective_scan(input);
            (prim(out.y), prim(out.final_state), None)
        },
    );
    SelectiveScanOutput {
        y: outer(y),
        final_state: outer(final_state),
    }
}

// Decode steps. They are inference ops: when no input is tracked the inner backend's kernels run
// and the results come back untracked; a tracked input (a caller differentiating through
// generation) gets the differentiable reference.

/// One-token conv update on `Autodiff<B>`.
pub fn causal_conv1d_step<B: MambaBackend, C: CheckpointStrategy>(
    x: Tensor<Ad<B, C>, 2>,
    state: Tensor<Ad<B, C>, 3>,
    weight: Tensor<Ad<B, C>, 2>,
    bias: Option<Tensor<Ad<B, C>, 1>>,
    silu: bool,
) -> StepOut<B, C, 2, 3> {
    if is_tracked(&x)
        || is_tracked(&state)
        || is_tracked(&weight)
        || bias.as_ref().is_some_and(is_tracked)
    {
        return crate::reference::causal_conv1d_step(x, state, weight, bias, silu);
    }
    let (y, s) = B::causal_conv1d_step(
        x.inner(),
        state.inner(),
        weight.inner(),
        bias.map(Tensor::inner),
        silu,
    );
    (Tensor::from_inner(y), Tensor::from_inner(s))
}

/// One-token SSD update on `Autodiff<B>`.
pub fn ssd_step<B: MambaBackend, C: CheckpointStrategy>(
    input: SsdStepInput<Ad<B, C>>,
) -> StepOut<B, C, 3, 4> {
    let tracked = is_tracked(&input.x)
        || is_tracked(&input.dt)
        || is_tracked(&input.a)
        || is_tracked(&input.b)
        || is_tracked(&input.c)
        || is_tracked(&input.d)
        || is_tracked(&input.dt_bias)
        || is_tracked(&input.state);
    if tracked {
        return crate::reference::ssd_step(input);
    }
    let (y, s) = B::ssd_step(SsdStepInput {
        x: input.x.inner(),
        dt: input.dt.inner(),
        a: input.a.inner(),
        b: input.b.inner(),
        c: input.c.inner(),
        d: input.d.inner(),
        dt_bias: input.dt_bias.inner(),
        dt_limit: input.dt_limit,
        state: input.state.inner(),
    });
    (Tensor::from_inner(y), Tensor::from_inner(s))
}

/// One-token selective-scan update on `Autodiff<B>`.
#[allow(clippy::too_many_arguments)]
pub fn selective_step<B: MambaBackend, C: CheckpointStrategy>(
    u: Tensor<Ad<B, C>, 2>,
    dt: Tensor<Ad<B, C>, 2>,
    a: Tensor<Ad<B, C>, 2>,
    b: Tensor<Ad<B, C>, 2>,
    c: Tensor<Ad<B, C>, 2>,
    d: Tensor<Ad<B, C>, 1>,
    state: Tensor<Ad<B, C>, 3>,
) -> StepOut<B, C, 2, 3> {
    let tracked = is_tracked(&u)
        || is_tracked(&dt)
        || is_tracked(&a)
        || is_tracked(&b)
        || is_tracked(&c)
        || is_tracked(&d)
        || is_tracked(&state);
    if tracked {
        return crate::reference::selective_step(u, dt, a, b, c, d, state);
    }
    let (y, s) = B::selective_step(
        u.inner(),
        dt.inner(),
        a.inner(),
        b.inner(),
        c.inner(),
        d.inner(),
        state.inner(),
    );
    (Tensor::from_inner(y), Tensor::from_inner(s))
}

/// The fused Mamba2 decode step on `Autodiff<B>`: `B`'s op when nothing is tracked, else the
/// differentiable composition.
pub fn mamba2_step<B: MambaBackend, C: CheckpointStrategy>(
    input: Mamba2StepInput<Ad<B, C>>,
) -> Mamba2StepOutput<Ad<B, C>> {
    let tracked = is_tracked(&input.proj)
        || is_tracked(&input.conv_state)
        || is_tracked(&input.conv_weight)
        || input.conv_bias.as_ref().is_some_and(is_tracked)
        || is_tracked(&input.a)
        || is_tracked(&input.d)
        || is_tracked(&input.dt_bias)
        || is_tracked(&input.ssm_state);
    if tracked {
        return crate::reference::mamba2_step(input);
    }
    let out = B::mamba2_step(Mamba2StepInput {
        proj: input.proj.inner(),
        d_mlp: input.d_mlp,
        groups: input.groups,
        conv_state: input.conv_state.inner(),
        conv_weight: input.conv_weight.inner(),
        conv_bias: input.conv_bias.map(Tensor::inner),
        a: input.a.inner(),
        d: input.d.inner(),
        dt_bias: input.dt_bias.inner(),
        dt_limit: input.dt_limit,
        ssm_state: input.ssm_state.inner(),
    });
    Mamba2StepOutput {
        y: Tensor::from_inner(out.y),
        conv_state: Tensor::from_inner(out.conv_state),
        ssm_state: Tensor::from_inner(out.ssm_state),
    }
}

//! The causal-LM loss's cross-entropy as one op each way: per-row negative log-likelihood of the
//! labels under the logits, and its gradient, with the log-softmax never materialised.
//!
//! Differentiated op by op, `log_softmax(logits).gather(labels)` casts the chunk's logits to f32
//! and makes about six full passes over them forward (max, shift, exp, sum, log, shift) and as
//! many backward, plus a zero-filled scatter for the gather: at mamba2-130m's vocabulary of
//! 50,288 that is ~15 passes over 235 MB a chunk of 1,170 tokens. Here the forward reads the
//! logits once and keeps only each row's log-sum-exp; the backward reads them once more and
//! writes the gradient, in the logits' dtype, as Liger-Kernel's fused cross-entropy does:
//!
//! ```text
//! lse_i = log Σ_j exp(logits_ij)              (f32, max-shifted)
//! nll_i = lse_i − logits_i,label_i           (0 where label_i = IGNORE_INDEX)
//! dlogits_ij = dnll_i · (exp(logits_ij − lse_i) − [j = label_i])   (0 rows where ignored)
//! ```
//!
//! [`MambaBackend::nll_forward`] / [`MambaBackend::nll_backward`] are tensor ops here for every
//! backend and one kernel each on the cube backends (`cube::loss`); [`nll_rows`] makes them one
//! autodiff node.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};

use crate::{from_prim as inner, to_prim as prim, MambaBackend};

/// The label value that counts for nothing (transformers' `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

fn f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// `labels` with the ignored ones replaced by 0 (a valid index), and the f32 mask of the
/// counted ones.
fn safe_labels<B: Backend>(labels: Tensor<B, 1, Int>) -> (Tensor<B, 1, Int>, Tensor<B, 1>) {
    let counted = labels.clone().not_equal_elem(IGNORE_INDEX);
    let safe = labels.mask_fill(counted.clone().bool_not(), 0);
    (safe, f32(counted.float()))
}

/// `(nll, lse)`, both `[n]` f32: the per-row negative log-likelihood of `labels` `[n]` under
/// `logits` `[n, vocab]` (0 where the label is [`IGNORE_INDEX`]) and each row's log-sum-exp. In
/// tensor ops, f32 math whatever the logits' dtype.
pub fn nll_forward_reference<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [n, _] = logits.dims();
    let logits = f32(logits);
    let (safe, counted) = safe_labels(labels);
    let max = logits.clone().max_dim(1); // [n, 1]
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max; // [n, 1]
    let picked = logits.gather(1, safe.reshape([n, 1])); // [n, 1]
    let lse = lse.reshape([n]);
    ((lse.clone() - picked.reshape([n])) * counted, lse)
}

/// The gradient of [`nll_forward_reference`]'s `nll` with respect to the logits, given `dnll`
/// `[n]`: `dnll_i · (softmax_i − onehot(label_i))`, zero rows where ignored, in the logits'
/// dtype.
pub fn nll_backward_reference<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    dnll: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let [n, vocab] = logits.dims();
    let dtype = logits.dtype();
    let device = logits.device();
    let (safe, counted) = safe_labels(labels);
    let p = (f32(logits) - lse.reshape([n, 1])).exp(); // [n, V]
    let cols = Tensor::<B, 1, Int>::arange(0..vocab as i64, &device).reshape([1, vocab]);
    let onehot = f32(cols.equal(safe.reshape([n, 1])).float()); // [n, V]
    let g = (f32(dnll) * counted).reshape([n, 1]);
    let d = (p - onehot) * g;
    if dtype == DType::F32 {
        d
    } else {
        d.cast(dtype)
    }
}

#[derive(Debug)]
struct NllBackward;

impl<B: MambaBackend> Backward<B, 1> for NllBackward {
    /// `logits`, `labels`, `lse`.
    type State = (FloatTensor<B>, Tensor<B, 1, Int>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dnll = inner::<B, 1>(grads.consume::<B>(&ops.node));
        let (logits, labels, lse) = ops.state;
        let [node] = ops.parents;
        if let Some(n) = node {
            let d = B::nll_backward(inner(logits), labels, inner(lse), dnll);
            grads.register::<B>(n.id, prim(d));
        }
    }
}

/// [`MambaBackend::nll_rows`] on `Autodiff<B>`: one node over `B`'s forward and backward that
/// saves the logits (already held by the graph's caller) and the `[n]` log-sum-exp.
pub fn nll_rows<B: MambaBackend, C: CheckpointStrategy>(
    logits: Tensor<Autodiff<B, C>, 2>,
    labels: Tensor<Autodiff<B, C>, 1, Int>,
) -> Tensor<Autodiff<B, C>, 1> {
    let labels = Tensor::<B, 1, Int>::from_primitive(labels.into_primitive());
    let logits = logits.into_primitive().tensor();
    let out = match NllBackward
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (nll, lse) = B::nll_forward(inner(logits.primitive.clone()), labels.clone());
            prep.finish((logits.primitive, labels, prim(lse)), prim(nll))
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(prim(B::nll_forward(inner(logits.primitive), labels).0))
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

//! Causal-LM loss as transformers computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{backend::Backend, Int, Tensor};

/// Label value that is not counted.
pub const IGNORE_INDEX: i64 = -100;

/// Next-token cross-entropy: `logits` `[batch, seq, vocab]`, `labels` `[batch, seq]` (not yet
/// shifted; `-100` ignored). Position `t` predicts `labels[t + 1]`; the mean runs over counted
/// labels. Returns `[1]`.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    if seq < 2 {
        // Nothing to predict: transformers returns NaN (0/0); so do we.
        return Tensor::<B, 1>::zeros([1], &logits.device()) / 0.0;
    }
    let logits = logits.narrow(1, 0, seq - 1); // [b, l-1, V]
    let labels = labels.narrow(1, 1, seq - 1); // [b, l-1]
    let counted = labels.clone().not_equal_elem(IGNORE_INDEX); // [b, l-1]
    let safe = labels.mask_fill(counted.clone().bool_not(), 0); // [b, l-1]
    let logp = log_softmax(logits, 2);
    let picked = logp
        .gather(2, safe.reshape([batch, seq - 1, 1]))
        .reshape([batch, seq - 1]); // [b, l-1]
    let weights = counted.float();
    let total = (picked * weights.clone()).sum().neg();
    let _ = vocab;
    total / weights.sum()
}

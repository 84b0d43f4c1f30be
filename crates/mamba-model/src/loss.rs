//! Causal-LM loss as transformers computes it, whole or in chunks of tokens.

use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor};
use mamba_kernels::MambaBackend;

/// Label value that is not counted.
pub use mamba_kernels::loss::IGNORE_INDEX;

/// Elements of one chunk's logits (`tokens × vocab`) when the chunk size is left to us: 2^26,
/// 256 MiB in f32 (1,334 tokens at mamba2-130m's vocab of 50,288; 2,048 at Codestral's 32,768).
pub const LOGITS_CHUNK_ELEMENTS: usize = 1 << 26;

/// Tokens per chunk of the LM head over `n` tokens: `chunk` if set; else at most
/// [`LOGITS_CHUNK_ELEMENTS`] / `vocab`, evened out over the chunks `n` needs (8,184 tokens at
/// 50,288 vocab: 7 chunks of 1,170 and one of 1,164, rather than 6 of 1,334 and one of 180), so
/// that the chunks' matmuls share one shape and one autotune result on GPUs.
pub fn chunk_tokens(chunk: usize, vocab: usize, n: usize) -> usize {
    if chunk > 0 {
        return chunk;
    }
    let max = (LOGITS_CHUNK_ELEMENTS / vocab.max(1)).max(1);
    let count = n.div_ceil(max).max(1);
    n.div_ceil(count).max(1)
}

/// Next-token cross-entropy: `logits` `[batch, seq, vocab]`, `labels` `[batch, seq]` (not yet
/// shifted; `-100` ignored). Position `t` predicts `labels[t + 1]`; the mean runs over counted
/// labels. Returns `[1]`.
pub fn causal_lm_loss<B: MambaBackend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    if seq < 2 {
        // Nothing to predict: transformers returns NaN (0/0); so do we.
        return Tensor::<B, 1>::zeros([1], &logits.device()) / 0.0;
    }
    let logits = logits
        .narrow(1, 0, seq - 1)
        .reshape([batch * (seq - 1), vocab]); // [n, V]
    let labels = shift_labels(labels); // [n]
    let counted = labels.clone().not_equal_elem(IGNORE_INDEX).float().sum();
    nll_sum(logits, labels) / counted
}

/// `labels` `[batch, seq]` → the targets of positions `0..seq-1`, flattened `[batch·(seq-1)]`.
pub fn shift_labels<B: Backend>(labels: Tensor<B, 2, Int>) -> Tensor<B, 1, Int> {
    let [batch, seq] = labels.dims();
    labels.narrow(1, 1, seq - 1).reshape([batch * (seq - 1)])
}

/// Summed negative log-likelihood of `labels` `[n]` under `logits` `[n, vocab]`, `-100`
/// skipped, in f32 whatever dtype the head ran in. Returns `[1]`. One op each way
/// ([`MambaBackend::nll_rows`]): the log-softmax is never stored.
pub fn nll_sum<B: MambaBackend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    B::nll_rows(logits, labels).sum()
}

/// The number of counted (not `-100`) targets after the shift.
pub fn counted_targets<B: Backend>(labels: &Tensor<B, 2, Int>) -> usize {
    let [_, seq] = labels.dims();
    if seq < 2 {
        return 0;
    }
    shift_labels(labels.clone())
        .not_equal_elem(IGNORE_INDEX)
        .int()
        .sum()
        .into_scalar()
        .elem::<i64>() as usize
}

/// [`causal_lm_loss`] from the final hidden states `h` `[batch, seq, hidden]` and a head
/// `logits_of` (`[n, hidden]` → `[n, vocab]`), `chunk` tokens at a time, so that the logits of
/// all positions never exist at once. The same value as the whole-tensor loss.
pub fn chunked_causal_lm_loss<B: MambaBackend>(
    h: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
    chunk: usize,
    logits_of: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [batch, seq, hidden] = h.dims();
    if seq < 2 {
        return Tensor::<B, 1>::zeros([1], &h.device()) / 0.0;
    }
    let n = batch * (seq - 1);
    let h = h.narrow(1, 0, seq - 1).reshape([n, hidden]); // [n, d]
    let labels = shift_labels(labels); // [n]
    let counted = labels.clone().not_equal_elem(IGNORE_INDEX).float().sum();
    let mut total: Option<Tensor<B, 1>> = None;
    let mut start = 0;
    while start < n {
        let len = chunk.max(1).min(n - start);
        let part = nll_sum(
            logits_of(h.clone().narrow(0, start, len)),
            labels.clone().narrow(0, start, len),
        );
        total = Some(match total {
            Some(t) => t + part,
            None => part,
        });
        start += len;
    }
    total.expect("n > 0") / counted
}

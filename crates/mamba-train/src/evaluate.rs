//! Loss and perplexity over token-id sequences.

use anyhow::{bail, ensure, Context, Result};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use mamba_model::{MambaBackend, MambaLM};
use serde::Serialize;

/// What `eval --json` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    /// Mean next-token cross-entropy over counted tokens.
    pub loss: f64,
    pub perplexity: f64,
    /// Number of predicted (counted) tokens.
    pub tokens: usize,
}

/// Read a JSON file holding a list of equal-length token-id lists.
pub fn read_token_ids(path: &std::path::Path) -> Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).with_context(|| {
        format!("{}: expected a JSON list of lists of non-negative token ids, e.g. [[1, 2, 3], [4, 5, 6]]", path.display())
    })?;
    ensure!(
        !rows.is_empty(),
        "{}: the list of sequences is empty",
        path.display()
    );
    let len = rows[0].len();
    for (i, r) in rows.iter().enumerate() {
        ensure!(
            r.len() == len,
            "{}: sequence {i} has {} tokens but sequence 0 has {len}; all must have the same length",
            path.display(),
            r.len()
        );
    }
    ensure!(
        len >= 2,
        "{}: sequences need at least 2 tokens to predict one, got {len}",
        path.display()
    );
    Ok(rows)
}

/// Check every id is below the vocabulary size.
pub fn check_ids(rows: &[Vec<u32>], vocab: usize, what: &str) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if let Some((j, id)) = r.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
            bail!("{what}: token {id} (sequence {i}, position {j}) is out of range for the model's vocab_size {vocab}");
        }
    }
    Ok(())
}

pub fn ids_tensor<B: MambaBackend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows[0].len();
    let data: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), len]), device)
}

/// Loss over all sequences (labels = inputs, every next token counted), in batches.
pub fn evaluate_ids<B: MambaBackend>(
    model: &MambaLM<B>,
    rows: &[Vec<u32>],
    batch_size: usize,
    device: &B::Device,
) -> Result<EvalReport> {
    let mut nll = 0.0f64;
    let mut tokens = 0usize;
    for chunk in rows.chunks(batch_size.max(1)) {
        let ids = ids_tensor::<B>(chunk, device);
        let loss: f64 = model.loss(ids.clone(), ids).into_scalar().elem();
        let counted = chunk.len() * (chunk[0].len() - 1);
        ensure!(
            loss.is_finite(),
            "the loss is not finite ({loss}) for a batch of {} sequences",
            chunk.len()
        );
        nll += loss * counted as f64;
        tokens += counted;
    }
    let loss = nll / tokens as f64;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

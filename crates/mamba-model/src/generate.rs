//! Greedy decoding, cached (prefill + O(1) steps) or uncached (a full forward per token).

use burn::tensor::{Int, Tensor, TensorData};
use mamba_kernels::MambaBackend;

use crate::model::MambaLM;

fn argmax_rows<B: MambaBackend>(logits: Tensor<B, 2>) -> Vec<i64> {
    let [batch, _] = logits.dims();
    let ids = logits.argmax(1).reshape([batch]).into_data();
    ids.iter::<i64>().collect()
}

/// Greedy continuation of `prompt` by `max_new_tokens` tokens: returns the prompt followed by the
/// new tokens, as transformers' `generate` does. Stops early at `eos` when given.
pub fn greedy<B: MambaBackend>(
    model: &MambaLM<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
    use_cache: bool,
    device: &B::Device,
) -> Vec<u32> {
    let mut ids: Vec<u32> = prompt.to_vec();
    if max_new_tokens == 0 || prompt.is_empty() {
        return ids;
    }
    let to_tensor = |ids: &[u32]| {
        let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, ids.len()]), device)
    };
    if use_cache {
        let (logits, mut cache) = model.prefill(to_tensor(&ids));
        let mut next = argmax_rows(logits)[0] as u32;
        for n in 0..max_new_tokens {
            ids.push(next);
            if Some(next) == eos || n + 1 == max_new_tokens {
                break;
            }
            let tok =
                Tensor::<B, 1, Int>::from_data(TensorData::new(vec![next as i64], [1]), device);
            let (logits, c) = model.step(tok, cache);
            cache = c;
            next = argmax_rows(logits)[0] as u32;
        }
    } else {
        for _ in 0..max_new_tokens {
            let logits = model.forward(to_tensor(&ids));
            let [_, seq, vocab] = logits.dims();
            let last = logits.narrow(1, seq - 1, 1).reshape([1, vocab]);
            let next = argmax_rows(last)[0] as u32;
            ids.push(next);
            if Some(next) == eos {
                break;
            }
        }
    }
    ids
}

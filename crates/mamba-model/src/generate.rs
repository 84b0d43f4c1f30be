//! Generation as transformers' `generate` does it: greedy or sampled decoding through the logits
//! processors its users know (repetition penalty, `min_new_tokens`, temperature, top-k, top-p),
//! several EOS ids, batched prompts with left padding, and a callback per decoded token for
//! streaming.
//!
//! A batch of prompts of different lengths is left-padded and masked (the pad positions are
//! zeroed before the conv and the scan, as in transformers), so each row continues exactly as its
//! prompt alone would; a row that produces an EOS id stops growing while the others go on.
//! Decoding is cached by default: one prefill over the prompts, then one O(1) recurrent step per
//! token ([`MambaLM::step`]). Greedy decoding without a repetition penalty picks tokens on the
//! device and feeds them straight to the next step, which is queued before the tokens are read
//! back (one `[batch]` read a step, overlapping the next step); the other modes read the step's
//! logits back and process them on the host.

use burn::tensor::{Int, Tensor, TensorData};
use mamba_kernels::MambaBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{ForwardArgs, MambaLM};

/// Decoding options, named and meant as in transformers' `GenerationConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// New tokens to generate at most (EOS included).
    pub max_new_tokens: usize,
    /// EOS ids are suppressed until this many new tokens exist.
    pub min_new_tokens: usize,
    /// Sample from the processed distribution instead of taking its argmax.
    pub do_sample: bool,
    /// Logits divided by this before sampling (`> 0`; sampling only).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (`0`: all; sampling only). transformers' default 50.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (`(0, 1]`, `1`: all; sampling only).
    pub top_p: f32,
    /// CTRL's penalty on tokens already in the sequence (prompt included): logits `> 0` divided
    /// by it, `< 0` multiplied (`> 0`, `1`: off). Applies to greedy decoding too.
    pub repetition_penalty: f32,
    /// The sampling RNG's seed: the same seed, prompts and options give the same tokens.
    pub seed: u64,
    /// Generation of a row stops after it produces any of these (empty: never).
    pub eos_token_ids: Vec<u32>,
    /// What fills the left padding of shorter prompts (masked out, so its value does not matter
    /// to the result) and the finished rows.
    pub pad_token_id: u32,
    /// Prefill + O(1) recurrent steps (`true`) or a full forward of the whole sequence per token.
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            use_cache: true,
        }
    }
}

/// Why a generation request was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenerationError {
    #[error("no prompts given")]
    NoPrompts,
    #[error("prompt {0} is empty: generation continues a sequence, give at least one token")]
    EmptyPrompt(usize),
    #[error("prompt {row}: token id {id} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange { row: usize, id: u32, vocab: usize },
    #[error("{what} = {id} is outside the vocabulary (0..{vocab})")]
    SpecialOutOfRange {
        what: &'static str,
        id: u32,
        vocab: usize,
    },
    #[error("temperature = {0}: sampling needs a temperature > 0 (for greedy decoding leave do_sample off)")]
    Temperature(f32),
    #[error("top_p = {0}: expected a value in (0, 1]")]
    TopP(f32),
    #[error("repetition_penalty = {0}: expected a value > 0 (1 is off)")]
    RepetitionPenalty(f32),
    #[error("min_new_tokens = {min} is more than max_new_tokens = {max}")]
    MinAboveMax { min: usize, max: usize },
}

impl GenerationConfig {
    /// Checks the options against a vocabulary of `vocab` ids.
    pub fn validate(&self, vocab: usize) -> Result<(), GenerationError> {
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(GenerationError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GenerationError::TopP(self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(GenerationError::RepetitionPenalty(self.repetition_penalty));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(GenerationError::MinAboveMax {
                min: self.min_new_tokens,
                max: self.max_new_tokens,
            });
        }
        for &id in &self.eos_token_ids {
            if id as usize >= vocab {
                return Err(GenerationError::SpecialOutOfRange {
                    what: "eos_token_id",
                    id,
                    vocab,
                });
            }
        }
        if self.pad_token_id as usize >= vocab {
            return Err(GenerationError::SpecialOutOfRange {
                what: "pad_token_id",
                id: self.pad_token_id,
                vocab,
            });
        }
        Ok(())
    }

    /// Whether tokens can be chosen on the device (argmax, with the EOS suppression of
    /// `min_new_tokens` as a bias): greedy and no repetition penalty.
    fn device_greedy(&self) -> bool {
        !self.do_sample && self.repetition_penalty == 1.0
    }
}

/// One row's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The prompt followed by the new tokens (the EOS that ended it included), as transformers
    /// returns a row without its padding.
    pub ids: Vec<u32>,
    /// How many of `ids` are new.
    pub new_tokens: usize,
    /// Whether the row stopped at an EOS id (else at `max_new_tokens`).
    pub eos: bool,
}

impl Generated {
    pub fn new_ids(&self) -> &[u32] {
        &self.ids[self.ids.len() - self.new_tokens..]
    }
}

impl<B: MambaBackend> MambaLM<B> {
    /// Continues each prompt under `cfg` (see the module docs); `on_token(row, id)` is called
    /// for every new token as soon as it is chosen, in order (streaming).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        device: &B::Device,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Generated>, GenerationError> {
        let vocab = self.config.vocab_size();
        cfg.validate(vocab)?;
        if prompts.is_empty() {
            return Err(GenerationError::NoPrompts);
        }
        for (row, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(GenerationError::EmptyPrompt(row));
            }
            if let Some(&id) = p.iter().find(|&&id| id as usize >= vocab) {
                return Err(GenerationError::TokenOutOfRange { row, id, vocab });
            }
        }
        let batch = prompts.len();
        let mut rows: Vec<Generated> = prompts
            .iter()
            .map(|p| Generated {
                ids: p.clone(),
                new_tokens: 0,
                eos: false,
            })
            .collect();
        if cfg.max_new_tokens == 0 {
            return Ok(rows);
        }
        let mut picker = Picker::new(cfg, vocab, batch, device);
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let ragged = prompts.iter().any(|p| p.len() != width);
        let (ids, mask) = left_pad::<B>(prompts, width, cfg.pad_token_id, ragged, device);

        let mut cache = None;
        let mut logits = if cfg.use_cache {
            let out = self.forward_with(
                ids,
                ForwardArgs {
                    attention_mask: mask.clone(),
                    return_cache: true,
                    logits_to_keep: 1,
                    ..Default::default()
                },
            );
            cache = out.cache;
            out.logits.reshape([batch, vocab])
        } else {
            self.last_logits(ids, mask.clone())
        };
        // The whole sequences so far, for the uncached path only: [batch, width + n].
        let (mut seq, mut mask_rows): (Vec<Vec<u32>>, Vec<Vec<f32>>) = if cfg.use_cache {
            (Vec::new(), Vec::new())
        } else {
            prompts
                .iter()
                .map(|p| {
                    let pad = width - p.len();
                    let mut ids = vec![cfg.pad_token_id; pad];
                    ids.extend_from_slice(p);
                    let mut mask = vec![0f32; pad];
                    mask.resize(width, 1.0);
                    (ids, mask)
                })
                .unzip()
        };
        for n in 0..cfg.max_new_tokens {
            let last = n + 1 == cfg.max_new_tokens;
            // Greedy on the device with a cache: step n + 1 is queued on step n's tokens before
            // they are read back, so the host queues the next step while the device runs this
            // one. Every row is fed its own argmax, a finished row too (rows do not mix; its
            // extra tokens are dropped below), and a step queued after the last row finished
            // is dropped unread.
            let (next, ahead) = match (picker.on_device(&logits, n), cache.take()) {
                (Some(tok), Some(c)) if !last => {
                    let (ids, ahead) = B::read_while(tok.clone(), || self.step(tok, c));
                    (ids_of(ids), Some(ahead))
                }
                (tok, c) => {
                    cache = c;
                    let next = match tok {
                        Some(tok) => ids_of(tok.into_data()),
                        None => picker.pick_on_host(logits, n, &rows),
                    };
                    (next, None)
                }
            };
            let mut fed = Vec::with_capacity(batch);
            for (row, (r, &tok)) in rows.iter_mut().zip(&next).enumerate() {
                if r.eos {
                    fed.push(cfg.pad_token_id);
                    continue;
                }
                r.ids.push(tok);
                r.new_tokens += 1;
                r.eos = cfg.eos_token_ids.contains(&tok);
                on_token(row, tok);
                fed.push(tok);
            }
            if last || rows.iter().all(|r| r.eos) {
                break;
            }
            logits = match (ahead, cache.take()) {
                (Some((l, c)), _) => {
                    cache = Some(c);
                    l
                }
                (None, Some(c)) => {
                    let data: Vec<i64> = fed.iter().map(|&t| t as i64).collect();
                    let tok =
                        Tensor::<B, 1, Int>::from_data(TensorData::new(data, [batch]), device);
                    let (l, c) = self.step(tok, c);
                    cache = Some(c);
                    l
                }
                (None, None) => {
                    for ((s, m), &t) in seq.iter_mut().zip(&mut mask_rows).zip(&fed) {
                        s.push(t);
                        m.push(1.0);
                    }
                    let len = width + n + 1;
                    let ids = int_tensor::<B>(seq.concat(), [batch, len], device);
                    let mask = ragged.then(|| {
                        Tensor::<B, 2>::from_data(
                            TensorData::new(mask_rows.concat(), [batch, len]),
                            device,
                        )
                    });
                    self.last_logits(ids, mask)
                }
            };
        }
        Ok(rows)
    }

    /// The last position's logits `[batch, vocab]` of a full forward.
    fn last_logits(&self, ids: Tensor<B, 2, Int>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let [batch, _] = ids.dims();
        let out = self.forward_with(
            ids,
            ForwardArgs {
                attention_mask: mask,
                logits_to_keep: 1,
                ..Default::default()
            },
        );
        out.logits.reshape([batch, self.config.vocab_size()])
    }
}

fn int_tensor<B: MambaBackend>(
    ids: Vec<u32>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.into_iter().map(i64::from).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Prompts left-padded to `width` with `pad`, and their mask (1 token, 0 pad) when `ragged`.
fn left_pad<B: MambaBackend>(
    prompts: &[Vec<u32>],
    width: usize,
    pad: u32,
    ragged: bool,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Option<Tensor<B, 2>>) {
    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut mask = Vec::with_capacity(prompts.len() * width);
    for p in prompts {
        ids.extend(std::iter::repeat_n(pad, width - p.len()));
        ids.extend_from_slice(p);
        mask.extend(std::iter::repeat_n(0f32, width - p.len()));
        mask.extend(std::iter::repeat_n(1f32, p.len()));
    }
    let ids = int_tensor::<B>(ids, [prompts.len(), width], device);
    let mask = ragged
        .then(|| Tensor::<B, 2>::from_data(TensorData::new(mask, [prompts.len(), width]), device));
    (ids, mask)
}

/// Chooses each step's tokens from its logits: on the device for plain greedy decoding, on the
/// host (transformers' processor order) otherwise.
struct Picker<'a, B: MambaBackend> {
    cfg: &'a GenerationConfig,
    vocab: usize,
    rng: StdRng,
    /// `[1, vocab]`: `-inf` at the EOS ids, 0 elsewhere (the `min_new_tokens` suppression on
    /// the device).
    eos_bias: Option<Tensor<B, 2>>,
    batch: usize,
}

impl<'a, B: MambaBackend> Picker<'a, B> {
    fn new(cfg: &'a GenerationConfig, vocab: usize, batch: usize, device: &B::Device) -> Self {
        let eos_bias = (cfg.device_greedy()
            && cfg.min_new_tokens > 0
            && !cfg.eos_token_ids.is_empty())
        .then(|| {
            let mut bias = vec![0f32; vocab];
            for &e in &cfg.eos_token_ids {
                bias[e as usize] = f32::NEG_INFINITY;
            }
            Tensor::from_data(TensorData::new(bias, [1, vocab]), device)
        });
        Self {
            cfg,
            vocab,
            rng: StdRng::seed_from_u64(cfg.seed),
            eos_bias,
            batch,
        }
    }

    /// The next token of every row chosen on the device, `[batch]`, where the mode allows it
    /// (greedy, no repetition penalty), `n` new tokens existing so far.
    fn on_device(&self, logits: &Tensor<B, 2>, n: usize) -> Option<Tensor<B, 1, Int>> {
        if !self.cfg.device_greedy() {
            return None;
        }
        let logits = match (&self.eos_bias, n < self.cfg.min_new_tokens) {
            (Some(bias), true) => logits.clone() + bias.clone(),
            _ => logits.clone(),
        };
        Some(logits.argmax(1).reshape([self.batch]))
    }

    /// The next token of every row chosen on the host from the logits read back (sampling, a
    /// repetition penalty; finished rows' entries are ignored by the caller), `n` new tokens
    /// existing so far.
    fn pick_on_host(&mut self, logits: Tensor<B, 2>, n: usize, rows: &[Generated]) -> Vec<u32> {
        let suppress = n < self.cfg.min_new_tokens;
        let data = logits.into_data().convert::<f32>();
        let flat = data.as_slice::<f32>().expect("f32 logits");
        flat.chunks_exact(self.vocab)
            .zip(rows)
            .map(|(row, r)| {
                let mut scores = row.to_vec();
                process(&mut scores, self.cfg, &r.ids, suppress);
                if self.cfg.do_sample {
                    sample(&scores, &mut self.rng)
                } else {
                    argmax(&scores)
                }
            })
            .collect()
    }
}

/// Token ids read back from the device.
fn ids_of(data: TensorData) -> Vec<u32> {
    data.iter::<i64>().map(|i| i as u32).collect()
}

/// transformers' logits processors in its order, on one row's scores: repetition penalty,
/// `min_new_tokens` EOS suppression, then (sampling) temperature, top-k, top-p. Removed tokens
/// get `-inf`.
pub fn process(scores: &mut [f32], cfg: &GenerationConfig, seen: &[u32], suppress_eos: bool) {
    if cfg.repetition_penalty != 1.0 {
        let mut done = vec![false; scores.len()];
        for &t in seen {
            let t = t as usize;
            if t < scores.len() && !done[t] {
                done[t] = true;
                let s = scores[t];
                scores[t] = if s < 0.0 {
                    s * cfg.repetition_penalty
                } else {
                    s / cfg.repetition_penalty
                };
            }
        }
    }
    if suppress_eos {
        for &e in &cfg.eos_token_ids {
            scores[e as usize] = f32::NEG_INFINITY;
        }
    }
    if !cfg.do_sample {
        return;
    }
    if cfg.temperature != 1.0 {
        for s in scores.iter_mut() {
            *s /= cfg.temperature;
        }
    }
    if cfg.top_k > 0 && cfg.top_k < scores.len() {
        // Everything below the k-th largest score goes (ties with it stay, as torch.topk's
        // threshold keeps them).
        let mut sorted = scores.to_vec();
        let k = cfg.top_k;
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for s in scores.iter_mut() {
            if *s < kth {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    if cfg.top_p < 1.0 {
        // Ascending order; the tokens whose cumulative probability stays ≤ 1 − top_p go, the
        // most likely one always stays.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let probs = softmax(scores);
        let mut cum = 0f64;
        let cut = 1.0 - cfg.top_p as f64;
        for &i in &order[..order.len() - 1] {
            cum += probs[i];
            if cum <= cut {
                scores[i] = f32::NEG_INFINITY;
            } else {
                break;
            }
        }
    }
}

fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
        .max(f32::MIN) as f64;
    let e: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// The first index of the largest score (torch's argmax picks the first of ties too).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// A draw from `softmax(scores)`.
fn sample(scores: &[f32], rng: &mut StdRng) -> u32 {
    let probs = softmax(scores);
    let u: f64 = rng.random::<f64>();
    let mut cum = 0.0;
    let mut last = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            cum += p;
            last = i;
            if u < cum {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Greedy continuation of one prompt by up to `max_new_tokens` tokens, stopping after `eos`:
/// the prompt followed by the new tokens. [`MambaLM::generate`] with greedy options.
pub fn greedy<B: MambaBackend>(
    model: &MambaLM<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
    use_cache: bool,
    device: &B::Device,
) -> Vec<u32> {
    if prompt.is_empty() {
        return Vec::new();
    }
    let cfg = GenerationConfig {
        max_new_tokens,
        eos_token_ids: eos.into_iter().collect(),
        use_cache,
        ..Default::default()
    };
    model
        .generate(&[prompt.to_vec()], &cfg, device, |_, _| {})
        .map(|mut rows| rows.remove(0).ids)
        .unwrap_or_else(|e| panic!("greedy: {e}"))
}

//! The causal LM: embeddings → pre-norm residual blocks → norm_f → LM head (tied or not).

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};
use mamba_kernels::MambaBackend;

use crate::cache::{LayerState, ModelCache};
use crate::config::{ConfigError, ModelConfig};
use crate::loss::{causal_lm_loss, chunk_tokens, chunked_causal_lm_loss};
use crate::mamba1::Mamba1Mixer;
use crate::mamba2::Mamba2Mixer;
use crate::nn::{Embedding, Linear, RmsNorm};
use crate::precision::{cast_all, cast_frozen, Compute, Precision};

// The variants differ in size (Mamba1 has two more projections); boxing one would put every
// layer's mixer behind a pointer for no gain, there being one per layer.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer<B: Backend> {
    Mamba1(Mamba1Mixer<B>),
    Mamba2(Mamba2Mixer<B>),
}

/// `x + mixer(norm(x))`. The residual stream `x` stays f32 (`residual_in_fp32`); the mixer runs
/// in the compute dtype.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm: RmsNorm<B>,
    pub mixer: Mixer<B>,
}

impl<B: MambaBackend> Block<B> {
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&Tensor<B, 3>>,
        state: Option<LayerState<B>>,
        want_state: bool,
        c: Compute,
    ) -> (Tensor<B, 3>, Option<LayerState<B>>) {
        let h = c.act(self.norm.forward(x.clone()));
        let (h, state) = match &self.mixer {
            Mixer::Mamba2(m) => {
                let s = state.map(|s| s.into_mamba2());
                let (h, s) = m.forward(h, mask, s, want_state, c);
                (h, s.map(LayerState::Mamba2))
            }
            Mixer::Mamba1(m) => {
                let s = state.map(|s| s.into_mamba1());
                let (h, s) = m.forward(h, mask, s, want_state, c);
                (h, s.map(LayerState::Mamba1))
            }
        };
        (x + c.f32(h), state)
    }

    /// One decode step of the block: `prev`, the previous block's output, is added to the
    /// residual stream `x` together with this block's norm ([`add_norm`]); returns the stream,
    /// this block's output (for the next block to add) and the new state.
    fn step(
        &self,
        x: Tensor<B, 2>,
        prev: Option<Tensor<B, 2>>,
        state: LayerState<B>,
        c: Compute,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, LayerState<B>) {
        let (x, h) = add_norm(&self.norm, x, prev, c);
        let (h, state) = match &self.mixer {
            Mixer::Mamba2(m) => {
                let (h, s) = m.step(h, state.into_mamba2(), c);
                (h, LayerState::Mamba2(s))
            }
            Mixer::Mamba1(m) => {
                let (h, s) = m.step(h, state.into_mamba1(), c);
                (h, LayerState::Mamba1(s))
            }
        };
        (x, h, state)
    }
}

/// `x + prev` (when the previous block's output is given) and `norm` of it, in the compute dtype:
/// one [`MambaBackend::add_rms_norm`] on kernel backends, where the per-layer add and the next
/// norm would be two launches (four with bf16's casts). `x` `[batch, width]` in f32.
fn add_norm<B: MambaBackend>(
    norm: &RmsNorm<B>,
    x: Tensor<B, 2>,
    prev: Option<Tensor<B, 2>>,
    c: Compute,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    match prev {
        None => {
            let h = c.act(norm.forward(x.clone()));
            (x, h)
        }
        Some(p) => {
            let [batch, width] = x.dims();
            let (x, h) = B::add_rms_norm(
                x.reshape([batch, 1, width]),
                c.act(p).reshape([batch, 1, width]),
                norm.weight.val(),
                norm.eps,
            );
            (x.reshape([batch, width]), h.reshape([batch, width]))
        }
    }
}

/// The largest decode batch [`MambaLM::step`] runs in three launches a layer for a model whose
/// in-projection has at most [`FUSED_DECODE_MAX_WEIGHTS`] elements. On the H200 the fused
/// projections took mamba2-130m's step from 3.8 to 2.2 ms at batch 1 but from 4.7 to 12.4 ms at
/// batch 32 (BENCHMARKS.md); with the vectorised kernel, on an H100, batch 32 still lost (8.6
/// against 5.2 ms), batch 4 ran at 2.7 ms.
pub const FUSED_DECODE_MAX_ROWS: usize = 4;

/// The largest in-projection (elements) of a model that runs fused at up to
/// [`FUSED_DECODE_MAX_ROWS`] rows; larger models run fused at batch 1 only. mamba2-130m's is
/// 2.6 M; at the Codestral-7B shape's 76 M, where a step is bound by reading the weights, the
/// vectorised projection kernel took batch 1 from 20.7 ms a token (cubecl's matmuls) to 14.3 ms,
/// and batch 4 was even (23.0 against 22.3 ms; H100, BENCHMARKS.md).
pub const FUSED_DECODE_MAX_WEIGHTS: usize = 8 << 20;

/// `MAMBA_FUSED_DECODE`: `auto` (the default: the rule of [`FUSED_DECODE_MAX_ROWS`] and
/// [`FUSED_DECODE_MAX_WEIGHTS`]), `on` (every Mamba2 model up to the kernel's 32 rows), `off`;
/// for measuring one path against the other in one binary. Read once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FusedDecode {
    Auto,
    On,
    Off,
}

fn fused_decode_mode() -> FusedDecode {
    static MODE: std::sync::OnceLock<FusedDecode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("MAMBA_FUSED_DECODE").as_deref() {
        Ok("on") | Ok("1") => FusedDecode::On,
        Ok("off") | Ok("0") => FusedDecode::Off,
        Ok("auto") | Ok("") | Err(_) => FusedDecode::Auto,
        Ok(other) => {
            eprintln!("MAMBA_FUSED_DECODE={other}: expected auto, on or off; using auto");
            FusedDecode::Auto
        }
    })
}

/// Mamba / Mamba2 causal language model (transformers' `*ForCausalLM`).
#[derive(Module, Debug)]
pub struct MambaLM<B: Backend> {
    pub embeddings: Embedding<B>,
    pub layers: Vec<Block<B>>,
    pub norm_f: RmsNorm<B>,
    /// `None` when tied to the input embeddings.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    /// The compute dtype (see [`crate::precision`]); f32 unless [`MambaLM::with_precision`].
    #[module(skip)]
    pub compute: Compute,
}

/// Options of [`MambaLM::forward_with`].
#[derive(Debug, Clone)]
pub struct ForwardArgs<B: Backend> {
    /// `[batch, seq]`, 1 for tokens and 0 for (left) padding.
    pub attention_mask: Option<Tensor<B, 2>>,
    /// `[batch, seq]`, `-100` ignored; shifted inside.
    pub labels: Option<Tensor<B, 2, Int>>,
    /// Continue from these states (multi-token continuation).
    pub cache: Option<ModelCache<B>>,
    /// Return the states after the last position.
    pub return_cache: bool,
    /// Only compute the logits of the last `n` positions (`0`: all), as transformers'
    /// `logits_to_keep`.
    pub logits_to_keep: usize,
}

impl<B: Backend> Default for ForwardArgs<B> {
    fn default() -> Self {
        Self {
            attention_mask: None,
            labels: None,
            cache: None,
            return_cache: false,
            logits_to_keep: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ForwardOutput<B: Backend> {
    /// `[batch, kept, vocab]`
    pub logits: Tensor<B, 3>,
    /// Mean next-token cross-entropy over counted labels, `[1]`.
    pub loss: Option<Tensor<B, 1>>,
    pub cache: Option<ModelCache<B>>,
}

impl<B: Backend> MambaLM<B> {
    /// A randomly initialised model with mamba_ssm / transformers' init scheme.
    pub fn init(config: &ModelConfig, device: &B::Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let hidden = config.hidden_size();
        let eps = config.layer_norm_epsilon();
        let layers = (0..config.num_layers())
            .map(|_| Block {
                norm: RmsNorm::init(hidden, eps, device),
                mixer: match config {
                    ModelConfig::Mamba1(c) => Mixer::Mamba1(Mamba1Mixer::init(c, device)),
                    ModelConfig::Mamba2(c) => Mixer::Mamba2(Mamba2Mixer::init(c, device)),
                },
            })
            .collect();
        let vocab = config.vocab_size();
        Ok(Self {
            embeddings: Embedding::init(vocab, hidden, 0.02, device),
            layers,
            norm_f: RmsNorm::init(hidden, eps, device),
            lm_head: (!config.tie_word_embeddings())
                .then(|| Linear::init(hidden, vocab, false, device)),
            config: config.clone(),
            compute: Compute::F32,
        })
    }

    /// The model in `precision` on `device`: the compute dtype set, and the weights that take
    /// no gradient (the LoRA base in training, every weight at inference) stored once in it;
    /// with [`Precision::Bf16`] the trainable ones too (no f32 masters). Call after LoRA is
    /// applied, so that the frozen base is known.
    pub fn with_precision(self, precision: Precision, device: &B::Device) -> Self {
        self.with_compute(precision.compute::<B>(device), precision == Precision::Bf16)
    }

    /// As [`MambaLM::with_precision`] with the compute dtype given (`all`: trainable weights
    /// too).
    pub fn with_compute(self, compute: Compute, all: bool) -> Self {
        let mut model = if compute == Compute::F32 {
            self
        } else if all {
            cast_all(self, compute)
        } else {
            cast_frozen(self, compute)
        };
        model.compute = compute;
        model
    }
}

impl<B: MambaBackend> MambaLM<B> {
    /// `[.., hidden]` → `[.., vocab]` through the LM head or the tied embeddings, in the
    /// compute dtype.
    pub fn lm_logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        let c = self.compute;
        match &self.lm_head {
            Some(head) => head.forward(hidden, c),
            None => c.act(crate::nn::linear(
                c.act(hidden),
                c.weight(self.embeddings.weight.val()),
                None,
            )),
        }
    }

    /// Logits `[batch, seq, vocab]` for `ids` `[batch, seq]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_with(ids, ForwardArgs::default()).logits
    }

    /// The full forward: attention mask, labels (loss), cache in/out, `logits_to_keep`.
    pub fn forward_with(&self, ids: Tensor<B, 2, Int>, args: ForwardArgs<B>) -> ForwardOutput<B> {
        let [batch, seq] = ids.dims();
        let mask = args.attention_mask.map(|m| m.reshape([batch, seq, 1]));
        let c = self.compute;
        let mut x = self.embeddings.forward(ids, c); // [b, l, d] f32
        let mut states_in = args.cache.map(|c| c.layers.into_iter());
        let mut states_out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let s = states_in.as_mut().and_then(|it| it.next());
            let (y, s) = layer.forward(x, mask.as_ref(), s, args.return_cache, c);
            x = y;
            if let Some(s) = s {
                states_out.push(s);
            }
        }
        let h = self.norm_f.forward(x);
        let h = if args.logits_to_keep > 0 && args.logits_to_keep < seq {
            h.narrow(1, seq - args.logits_to_keep, args.logits_to_keep)
        } else {
            h
        };
        // f32 logits for the caller (and the loss); the head ran in the compute dtype.
        let logits = c.f32(self.lm_logits(h));
        let loss = args
            .labels
            .map(|labels| causal_lm_loss(logits.clone(), labels));
        ForwardOutput {
            logits,
            loss,
            cache: args
                .return_cache
                .then_some(ModelCache { layers: states_out }),
        }
    }

    /// Mean next-token cross-entropy of `ids` against `labels` (`-100` ignored, shifted inside),
    /// `[1]`. The LM head runs over chunks of tokens, so the logits of the whole batch never
    /// exist at once (the same value as `forward_with` with labels).
    pub fn loss(&self, ids: Tensor<B, 2, Int>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let c = self.compute;
        let mut x = self.embeddings.forward(ids, c); // [b, l, d] f32
        for layer in &self.layers {
            x = layer.forward(x, None, None, false, c).0;
        }
        let h = c.act(self.norm_f.forward(x));
        let [batch, seq, _] = h.dims();
        let chunk = chunk_tokens(0, self.config.vocab_size(), batch * seq.saturating_sub(1));
        chunked_causal_lm_loss(h, labels, chunk, |h| self.lm_logits(h))
    }

    /// Prefill: logits of the last position `[batch, vocab]` and the cache.
    pub fn prefill(&self, ids: Tensor<B, 2, Int>) -> (Tensor<B, 2>, ModelCache<B>) {
        let [batch, _] = ids.dims();
        let vocab = self.config.vocab_size();
        let out = self.forward_with(
            ids,
            ForwardArgs {
                return_cache: true,
                logits_to_keep: 1,
                ..Default::default()
            },
        );
        (
            out.logits.reshape([batch, vocab]),
            out.cache.expect("return_cache was set"),
        )
    }

    /// One-token step in O(1): `ids` `[batch]` → logits `[batch, vocab]` and the updated cache.
    /// Its small products stay off cuBLAS ([`mamba_kernels::linear::decode_products`]).
    pub fn step(
        &self,
        ids: Tensor<B, 1, Int>,
        cache: ModelCache<B>,
    ) -> (Tensor<B, 2>, ModelCache<B>) {
        mamba_kernels::linear::decode_products(|| self.step_inner(ids, cache))
    }

    fn step_inner(
        &self,
        ids: Tensor<B, 1, Int>,
        cache: ModelCache<B>,
    ) -> (Tensor<B, 2>, ModelCache<B>) {
        let [batch] = ids.dims();
        let hidden = self.config.hidden_size();
        let c = self.compute;
        let mut x = self
            .embeddings
            .forward(ids.reshape([batch, 1]), c)
            .reshape([batch, hidden]);
        if self.fused_decode(batch) {
            return self.step_fused(x, cache);
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut prev = None;
        for (layer, state) in self.layers.iter().zip(cache.layers) {
            let (y, h, s) = layer.step(x, prev, state, c);
            (x, prev) = (y, Some(h));
            layers.push(s);
        }
        let (_, h) = add_norm(&self.norm_f, x, prev, c);
        (c.f32(self.lm_logits(h)), ModelCache { layers })
    }

    /// Whether [`Self::step`] takes the fused path ([`Self::step_fused`]): kernels active, every
    /// layer Mamba2, a batch of one, or of at most [`FUSED_DECODE_MAX_ROWS`] for projections
    /// small enough that the step is bound by its launches (an in-projection of at most
    /// [`FUSED_DECODE_MAX_WEIGHTS`] elements), no adapter on the projections or the LM head
    /// (their LoRA paths are not folded in), and compute not emulated. Where the batch is larger,
    /// cubecl's matmuls beat the fused projection kernel (measured: BENCHMARKS.md).
    fn fused_decode(&self, batch: usize) -> bool {
        let plain = |l: &Linear<B>| l.lora.is_none();
        let small = |l: &Linear<B>| l.d_in() * l.d_out() <= FUSED_DECODE_MAX_WEIGHTS;
        let mode = fused_decode_mode();
        let size_ok = |l: &Linear<B>| match mode {
            FusedDecode::Auto => batch == 1 || small(l),
            FusedDecode::On => true,
            FusedDecode::Off => false,
        };
        let max_rows = match mode {
            FusedDecode::On => mamba_kernels::DECODE_MAX_ROWS,
            _ => FUSED_DECODE_MAX_ROWS,
        };
        B::has_kernels()
            && mamba_kernels::kernels_active::<B>()
            && batch <= max_rows
            && !matches!(self.compute, Compute::Bf16Emulated)
            && self.lm_head.as_ref().is_none_or(plain)
            && self.layers.iter().all(|l| match &l.mixer {
                Mixer::Mamba2(m) => plain(&m.in_proj) && plain(&m.out_proj) && size_ok(&m.in_proj),
                Mixer::Mamba1(_) => false,
            })
    }

    /// The decode step in three launches a layer: the in-projection with the block's norm
    /// folded in, the mixer's step ([`Mamba2Mixer::step_inner`]), and the out-projection with
    /// the gated norm's RMS and the residual add folded in ([`MambaBackend::decode_linear`]);
    /// then the LM head with the final norm folded in. Weights are read in their stored dtype.
    fn step_fused(&self, x: Tensor<B, 2>, cache: ModelCache<B>) -> (Tensor<B, 2>, ModelCache<B>) {
        use mamba_kernels::DecodeLinearInput;
        let c = self.compute;
        let lin = |x: Tensor<B, 2>,
                   norm: (Tensor<B, 1>, usize, f64),
                   l: &Linear<B>,
                   residual: Option<Tensor<B, 2>>,
                   out_dtype| {
            B::decode_linear(DecodeLinearInput {
                x,
                norm: Some(norm),
                weight: l.weight.val(),
                bias: l.bias.as_ref().map(|b| b.val()),
                residual,
                out_dtype,
            })
        };
        let mut x = x; // [batch, hidden], f32: the residual stream
        let mut layers = Vec::with_capacity(self.layers.len());
        for (layer, state) in self.layers.iter().zip(cache.layers) {
            let Mixer::Mamba2(m) = &layer.mixer else {
                unreachable!("fused_decode checked every layer is Mamba2")
            };
            let norm = (layer.norm.weight.val(), 1, layer.norm.eps);
            let proj = lin(x.clone(), norm, &m.in_proj, None, c.dtype());
            let (y, s) = m.step_inner(proj, state.into_mamba2(), c);
            let gnorm = (m.norm_weight.val(), m.norm_groups(), m.dims.eps);
            x = lin(y, gnorm, &m.out_proj, Some(x), burn::tensor::DType::F32);
            layers.push(LayerState::Mamba2(s));
        }
        let norm_f = (self.norm_f.weight.val(), 1, self.norm_f.eps);
        let logits = match &self.lm_head {
            Some(head) => lin(x, norm_f, head, None, burn::tensor::DType::F32),
            None => B::decode_linear(DecodeLinearInput {
                x,
                norm: Some(norm_f),
                weight: self.embeddings.weight.val(),
                bias: None,
                residual: None,
                out_dtype: burn::tensor::DType::F32,
            }),
        };
        (logits, ModelCache { layers })
    }

    /// Zero states for `batch` sequences (the cache before any token).
    pub fn empty_cache(&self, batch: usize, device: &B::Device) -> ModelCache<B> {
        ModelCache {
            layers: self
                .layers
                .iter()
                .map(|l| match &l.mixer {
                    Mixer::Mamba1(m) => LayerState::Mamba1(m.zero_state(batch, device)),
                    Mixer::Mamba2(m) => LayerState::Mamba2(m.zero_state(batch, device)),
                })
                .collect(),
        }
    }
}

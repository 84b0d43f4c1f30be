//! LoRA as PEFT does it: `y = W x + scaling · B A dropout(x)` with `scaling = alpha / r` (or
//! `alpha / sqrt(r)` with rsLoRA), A Kaiming-uniform and B zero for linear layers; for
//! embeddings A zero and B normal, `y = E[x] + scaling · (Aᵀ[x]) Bᵀ`. Merging adds
//! `scaling · B A` to the base weight exactly.
//!
//! Adapters live inside [`Linear`] and [`Embedding`], so every forward path — full sequence,
//! recurrent step, kernels or reference ops — goes through them: no target can be bypassed.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, DType, Distribution, Int, Tensor};

use crate::model::{MambaLM, Mixer};
use crate::nn::{linear, Embedding, Linear};
use crate::precision::{to_dtype, Compute};
use mamba_kernels::MambaBackend;

/// LoRA hyper-parameters (PEFT's `LoraConfig` subset that applies to Mamba).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: LoraTargets,
}

/// Which modules get adapters, as PEFT's `target_modules`: a list of names matched against the
/// end of each module's key (`in_proj` matches `backbone.layers.3.mixer.in_proj`), or a regex
/// matched against the whole key.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraTargets {
    Names(Vec<String>),
    Regex(String),
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("lora.r must be positive, got 0")]
    ZeroRank,
    #[error("lora.target_modules: `{0}` matches no module of this model (it has: {1})")]
    UnmatchedTarget(String, String),
    #[error("lora.target_modules: invalid regex `{0}`: {1}")]
    BadRegex(String, String),
    #[error("lora.target_modules: `lm_head` is tied to the embeddings in this model; target `embeddings` instead")]
    TiedHead,
    #[error("lora.dropout must be in [0, 1), got {0}")]
    BadDropout(f64),
}

/// The adapter of a linear layer. `a` `[r, in]`, `b` `[out, r]`.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    pub dropout: Dropout,
    pub scaling: f64,
}

impl<B: Backend> LoraLinear<B> {
    pub fn init(d_in: usize, d_out: usize, cfg: &LoraConfig, device: &B::Device) -> Self {
        // kaiming_uniform_(a = sqrt(5)) over fan_in = d_in: U(±1/sqrt(d_in)).
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            a: Param::from_tensor(Tensor::random(
                [cfg.r, d_in],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([d_out, cfg.r], device)),
            dropout: DropoutConfig::new(cfg.dropout).init(),
            scaling: cfg.scaling(),
        }
    }

    /// `scaling · B A`, `[out, in]`.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.b.val().matmul(self.a.val()) * self.scaling
    }
}

impl<B: MambaBackend> LoraLinear<B> {
    /// Whether dropout changes the adapter's input here (a positive rate, under autodiff).
    pub fn dropout_active<const D: usize>(&self, x: &Tensor<B, D>) -> bool {
        self.dropout.prob > 0.0 && B::ad_enabled(&x.device())
    }

    /// `scaling · B A dropout(x)` over the last dimension, in the compute dtype `c` (the f32
    /// masters `A`, `B` cast at use). The scale multiplies the rank-`r` activation `A x`, not
    /// the layer-wide output (PEFT's order): the same product, without a pass over the output
    /// each way (`[tokens, out]` against `[tokens, r]`); exact when the scale is a power of two,
    /// as `lora_alpha = 2 r` makes it.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, c: Compute) -> Tensor<B, D> {
        let h = c.act(linear(self.dropout.forward(x), c.weight(self.a.val()), None) * self.scaling);
        c.act(linear(h, c.weight(self.b.val()), None))
    }
}

/// The adapter of an embedding. `a` `[r, vocab]` (PEFT `lora_embedding_A`), `b` `[hidden, r]`
/// (`lora_embedding_B`).
#[derive(Module, Debug)]
pub struct LoraEmbedding<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    pub scaling: f64,
}

impl<B: Backend> LoraEmbedding<B> {
    pub fn init(vocab: usize, hidden: usize, cfg: &LoraConfig, device: &B::Device) -> Self {
        Self {
            a: Param::from_tensor(Tensor::zeros([cfg.r, vocab], device)),
            b: Param::from_tensor(Tensor::random(
                [hidden, cfg.r],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            scaling: cfg.scaling(),
        }
    }

    /// `scaling · (B A)ᵀ`, `[vocab, hidden]`.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.b.val().matmul(self.a.val()).transpose() * self.scaling
    }
}

impl<B: MambaBackend> LoraEmbedding<B> {
    /// `[batch, seq]` ids → `[batch, seq, hidden]` correction, in the compute dtype `c`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, c: Compute) -> Tensor<B, 3> {
        let after_a = burn::tensor::module::embedding(c.weight(self.a.val()).transpose(), ids); // [b, l, r]

        // Scaled at rank r, as in `LoraLinear::forward`.
        c.act(linear(
            c.act(after_a * self.scaling),
            c.weight(self.b.val()),
            None,
        ))
    }
}

/// The keys of the modules LoRA can target, in model order: `backbone.embeddings`, each layer's
/// `in_proj`, `x_proj`, `dt_proj`, `out_proj`, and `lm_head` when untied.
pub fn target_keys<B: Backend>(model: &MambaLM<B>) -> Vec<String> {
    let mut keys = vec!["backbone.embeddings".to_string()];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("backbone.layers.{i}.mixer.");
        match &layer.mixer {
            Mixer::Mamba2(_) => keys.extend(["in_proj", "out_proj"].map(|n| format!("{p}{n}"))),
            Mixer::Mamba1(_) => {
                keys.extend(["in_proj", "x_proj", "dt_proj", "out_proj"].map(|n| format!("{p}{n}")))
            }
        }
    }
    if model.lm_head.is_some() {
        keys.push("lm_head".into());
    }
    keys
}

/// The module keys `targets` selects. As in PEFT, names that match nothing in this model are
/// allowed (a Mamba1 `x_proj` in a list used on a Mamba2) as long as something matches; see
/// [`unmatched_targets`].
pub fn select_targets<B: Backend>(
    model: &MambaLM<B>,
    targets: &LoraTargets,
) -> Result<Vec<String>, LoraError> {
    let keys = target_keys(model);
    let names: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.rsplit('.').next())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    match targets {
        LoraTargets::Names(wanted) => {
            if wanted.iter().any(|n| n == "lm_head") && model.lm_head.is_none() && wanted.len() == 1
            {
                return Err(LoraError::TiedHead);
            }
            let out: Vec<String> = keys
                .iter()
                .filter(|k| {
                    wanted
                        .iter()
                        .any(|n| *k == n || k.ends_with(&format!(".{n}")))
                })
                .cloned()
                .collect();
            if out.is_empty() {
                return Err(LoraError::UnmatchedTarget(
                    wanted.join(", "),
                    names.join(", "),
                ));
            }
            Ok(out)
        }
        LoraTargets::Regex(re) => {
            let rx = regex_lite::Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| LoraError::BadRegex(re.clone(), e.to_string()))?;
            let out: Vec<String> = keys.iter().filter(|k| rx.is_match(k)).cloned().collect();
            if out.is_empty() {
                return Err(LoraError::UnmatchedTarget(re.clone(), keys.join(", ")));
            }
            Ok(out)
        }
    }
}

/// Target names that match no module of this model (`lm_head` of a tied model included).
pub fn unmatched_targets<B: Backend>(model: &MambaLM<B>, targets: &LoraTargets) -> Vec<String> {
    let keys = target_keys(model);
    match targets {
        LoraTargets::Names(wanted) => wanted
            .iter()
            .filter(|n| {
                !keys
                    .iter()
                    .any(|k| k == *n || k.ends_with(&format!(".{n}")))
            })
            .cloned()
            .collect(),
        LoraTargets::Regex(_) => Vec::new(),
    }
}

fn linear_mut<'a, B: Backend>(model: &'a mut MambaLM<B>, key: &str) -> Option<&'a mut Linear<B>> {
    if key == "lm_head" {
        return model.lm_head.as_mut();
    }
    let rest = key.strip_prefix("backbone.layers.")?;
    let (i, name) = rest.split_once(".mixer.")?;
    let layer = model.layers.get_mut(i.parse::<usize>().ok()?)?;
    match (&mut layer.mixer, name) {
        (Mixer::Mamba2(m), "in_proj") => Some(&mut m.in_proj),
        (Mixer::Mamba2(m), "out_proj") => Some(&mut m.out_proj),
        (Mixer::Mamba1(m), "in_proj") => Some(&mut m.in_proj),
        (Mixer::Mamba1(m), "x_proj") => Some(&mut m.x_proj),
        (Mixer::Mamba1(m), "dt_proj") => Some(&mut m.dt_proj),
        (Mixer::Mamba1(m), "out_proj") => Some(&mut m.out_proj),
        _ => None,
    }
}

/// Attach fresh adapters to the selected modules and freeze every base parameter (no gradient,
/// hence no optimizer state). Returns the model and the adapted module keys.
pub fn apply_lora<B: Backend>(
    model: MambaLM<B>,
    cfg: &LoraConfig,
    device: &B::Device,
) -> Result<(MambaLM<B>, Vec<String>), LoraError> {
    if cfg.r == 0 {
        return Err(LoraError::ZeroRank);
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        return Err(LoraError::BadDropout(cfg.dropout));
    }
    let keys = select_targets(&model, &cfg.targets)?;
    let mut model = model.no_grad();
    for key in &keys {
        if key == "backbone.embeddings" {
            let [vocab, hidden] = model.embeddings.weight.dims();
            model.embeddings.lora = Some(LoraEmbedding::init(vocab, hidden, cfg, device));
        } else if let Some(lin) = linear_mut(&mut model, key) {
            lin.lora = Some(LoraLinear::init(lin.d_in(), lin.d_out(), cfg, device));
        }
    }
    Ok((model, keys))
}

/// The adapters of linear layers under their module keys, and the embedding adapter.
pub type Adapters<'m, B> = (
    Vec<(String, &'m LoraLinear<B>)>,
    Option<&'m LoraEmbedding<B>>,
);

/// Visit the adapters under their module keys.
pub fn adapters<B: Backend>(model: &MambaLM<B>) -> Adapters<'_, B> {
    let mut out = Vec::new();
    fn push<'m, B: Backend>(
        out: &mut Vec<(String, &'m LoraLinear<B>)>,
        key: String,
        l: &'m Linear<B>,
    ) {
        if let Some(a) = &l.lora {
            out.push((key, a));
        }
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("backbone.layers.{i}.mixer.");
        match &layer.mixer {
            Mixer::Mamba2(m) => {
                push(&mut out, format!("{p}in_proj"), &m.in_proj);
                push(&mut out, format!("{p}out_proj"), &m.out_proj);
            }
            Mixer::Mamba1(m) => {
                push(&mut out, format!("{p}in_proj"), &m.in_proj);
                push(&mut out, format!("{p}x_proj"), &m.x_proj);
                push(&mut out, format!("{p}dt_proj"), &m.dt_proj);
                push(&mut out, format!("{p}out_proj"), &m.out_proj);
            }
        }
    }
    if let Some(h) = &model.lm_head {
        push(&mut out, "lm_head".into(), h);
    }
    (out, model.embeddings.lora.as_ref())
}

/// Set an adapter's tensors (loading a saved adapter). `key` as in [`target_keys`].
pub fn set_adapter<B: Backend>(
    model: &mut MambaLM<B>,
    key: &str,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scaling: f64,
) -> bool {
    if key == "backbone.embeddings" {
        model.embeddings.lora = Some(LoraEmbedding {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scaling,
        });
        return true;
    }
    match linear_mut(model, key) {
        Some(lin) => {
            lin.lora = Some(LoraLinear {
                a: Param::from_tensor(a),
                b: Param::from_tensor(b),
                dropout: DropoutConfig::new(0.0).init(),
                scaling,
            });
            true
        }
        None => false,
    }
}

/// Freeze everything but the adapters (after loading a record, which restores parameters as
/// they were saved).
pub fn freeze_base<B: Backend>(model: MambaLM<B>) -> MambaLM<B> {
    fn thaw<B: Backend>(l: &mut Option<LoraLinear<B>>) {
        if let Some(a) = l.take() {
            *l = Some(LoraLinear {
                a: a.a.set_require_grad(true),
                b: a.b.set_require_grad(true),
                dropout: a.dropout,
                scaling: a.scaling,
            });
        }
    }
    let mut model = model.no_grad();
    if let Some(e) = model.embeddings.lora.take() {
        model.embeddings.lora = Some(LoraEmbedding {
            a: e.a.set_require_grad(true),
            b: e.b.set_require_grad(true),
            scaling: e.scaling,
        });
    }
    for layer in model.layers.iter_mut() {
        match &mut layer.mixer {
            Mixer::Mamba2(m) => {
                thaw(&mut m.in_proj.lora);
                thaw(&mut m.out_proj.lora);
            }
            Mixer::Mamba1(m) => {
                thaw(&mut m.in_proj.lora);
                thaw(&mut m.x_proj.lora);
                thaw(&mut m.dt_proj.lora);
                thaw(&mut m.out_proj.lora);
            }
        }
    }
    if let Some(h) = model.lm_head.as_mut() {
        thaw(&mut h.lora);
    }
    model
}

fn merge_linear<B: Backend>(lin: &mut Linear<B>) {
    if let Some(l) = lin.lora.take() {
        let w = to_dtype(lin.weight.val(), DType::F32) + l.delta(); // merged in f32
        lin.weight = Param::from_tensor(w);
    }
}

/// Fold every adapter into its base weight (`W + scaling · B A`) and drop the adapters.
///
/// An embedding adapter changes only the input embeddings (as in PEFT); when the head is tied to
/// them, merging into the shared weight would change the head too. The merged model is then
/// untied: `lm_head.weight` keeps the original weight, so it computes exactly what the base model
/// with its adapter computes.
pub fn merge<B: Backend>(mut model: MambaLM<B>) -> MambaLM<B> {
    if let Some(l) = model.embeddings.lora.take() {
        if model.lm_head.is_none() {
            model.lm_head = Some(Linear {
                weight: Param::from_tensor(model.embeddings.weight.val()),
                bias: None,
                lora: None,
            });
            model.config = model.config.clone().with_tied_embeddings(false);
        }
        model.embeddings.weight =
            Param::from_tensor(to_dtype(model.embeddings.weight.val(), DType::F32) + l.delta());
    }
    for layer in model.layers.iter_mut() {
        match &mut layer.mixer {
            Mixer::Mamba2(m) => {
                merge_linear(&mut m.in_proj);
                merge_linear(&mut m.out_proj);
            }
            Mixer::Mamba1(m) => {
                merge_linear(&mut m.in_proj);
                merge_linear(&mut m.x_proj);
                merge_linear(&mut m.dt_proj);
                merge_linear(&mut m.out_proj);
            }
        }
    }
    if let Some(h) = model.lm_head.as_mut() {
        merge_linear(h);
    }
    model
}

/// The embedding forward with its adapter (used by [`Embedding::forward`]).
/// The output is f32 (the residual stream's dtype).
pub(crate) fn embed<B: MambaBackend>(
    e: &Embedding<B>,
    ids: Tensor<B, 2, Int>,
    c: Compute,
) -> Tensor<B, 3> {
    let base = c.f32(burn::tensor::module::embedding(e.weight.val(), ids.clone()));
    match &e.lora {
        Some(l) => base + c.f32(l.forward(ids, c)),
        None => base,
    }
}

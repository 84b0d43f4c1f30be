//! Model configuration: the fields of transformers' `Mamba2Config` / `MambaConfig`, with
//! transformers' defaults, validated before any module is built.
//!
//! Reading the on-disk formats (transformers `config.json`, mamba_ssm `config.json`, Codestral
//! `params.json`) lives in `mamba-hf`; these structs are the canonical in-memory form.

use serde::{Deserialize, Serialize};

/// A configuration value that cannot build a model. `field` names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid config: `{field}` {message}")]
    Invalid { field: String, message: String },
    #[error("unsupported model_type `{0}`: expected `mamba` or `mamba2`")]
    UnknownModelType(String),
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// How the gated RMSNorm of the Mamba2 mixer normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormMode {
    /// RMS over each group of `intermediate / n_groups` channels (mamba_ssm, how Codestral was
    /// trained).
    #[default]
    Grouped,
    /// RMS over all `intermediate` channels (transformers' torch path). Same as `Grouped` for
    /// `n_groups = 1`.
    Hf,
}

impl std::str::FromStr for NormMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grouped" => Ok(Self::Grouped),
            "hf" => Ok(Self::Hf),
            other => Err(format!(
                "unknown norm `{other}`: expected `grouped` or `hf`"
            )),
        }
    }
}

/// transformers' `Mamba2Config` (defaults as transformers 5.17 has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Mamba2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub state_size: usize,
    pub n_groups: usize,
    pub expand: usize,
    pub conv_kernel: usize,
    pub chunk_size: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_epsilon: f64,
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub hidden_act: String,
    pub residual_in_fp32: bool,
    pub time_step_rank: usize,
    pub time_step_min: f64,
    pub time_step_max: f64,
    pub time_step_floor: f64,
    /// Read and written by `mamba-hf` (JSON has no infinity; config.json spells it two ways).
    #[serde(skip)]
    pub time_step_limit: (f64, f64),
    pub initializer_range: f64,
    pub rescale_prenorm_residual: bool,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Width of the extra MLP halves some checkpoints put in front of `in_proj` (transformers
    /// infers it from the weight's shape and ignores those outputs). Not a transformers field.
    #[serde(skip)]
    pub d_mlp: usize,
    /// Gated-norm behaviour: a runtime option, not stored in config.json.
    #[serde(skip)]
    pub norm: NormMode,
}

impl Default for Mamba2Config {
    fn default() -> Self {
        Self {
            vocab_size: 32768,
            hidden_size: 4096,
            num_heads: 128,
            head_dim: 64,
            state_size: 128,
            n_groups: 8,
            expand: 2,
            conv_kernel: 4,
            chunk_size: 256,
            num_hidden_layers: 64,
            layer_norm_epsilon: 1e-5,
            use_bias: false,
            use_conv_bias: true,
            hidden_act: "silu".into(),
            residual_in_fp32: true,
            time_step_rank: 256,
            time_step_min: 0.001,
            time_step_max: 0.1,
            time_step_floor: 1e-4,
            time_step_limit: (0.0, f64::INFINITY),
            initializer_range: 0.1,
            rescale_prenorm_residual: false,
            tie_word_embeddings: false,
            pad_token_id: Some(1),
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            d_mlp: 0,
            norm: NormMode::Grouped,
        }
    }
}

impl Mamba2Config {
    pub fn intermediate_size(&self) -> usize {
        self.expand * self.hidden_size
    }
    /// Channels through the conv: `x`, `B` and `C`.
    pub fn conv_dim(&self) -> usize {
        self.intermediate_size() + 2 * self.n_groups * self.state_size
    }
    /// Output width of `in_proj`: `[mlp (2·d_mlp), z (I), xBC (I + 2·G·N), dt (H)]`.
    pub fn in_proj_size(&self) -> usize {
        2 * self.d_mlp + self.intermediate_size() + self.conv_dim() + self.num_heads
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("num_heads", self.num_heads)?;
        positive("head_dim", self.head_dim)?;
        positive("state_size", self.state_size)?;
        positive("n_groups", self.n_groups)?;
        positive("expand", self.expand)?;
        positive("chunk_size", self.chunk_size)?;
        positive("num_hidden_layers", self.num_hidden_layers)?;
        if self.conv_kernel < 2 {
            return Err(invalid(
                "conv_kernel",
                format!("must be at least 2, got {}", self.conv_kernel),
            ));
        }
        if self.num_heads * self.head_dim != self.intermediate_size() {
            return Err(invalid(
                "num_heads",
                format!(
                    "× head_dim must equal expand × hidden_size: {} × {} = {} but {} × {} = {}",
                    self.num_heads,
                    self.head_dim,
                    self.num_heads * self.head_dim,
                    self.expand,
                    self.hidden_size,
                    self.intermediate_size()
                ),
            ));
        }
        if !self.num_heads.is_multiple_of(self.n_groups) {
            return Err(invalid(
                "n_groups",
                format!(
                    "must divide num_heads = {}, got {}",
                    self.num_heads, self.n_groups
                ),
            ));
        }
        check_act(&self.hidden_act)?;
        check_eps(self.layer_norm_epsilon)?;
        let (lo, hi) = self.time_step_limit;
        if !(lo >= 0.0 && hi > lo) {
            return Err(invalid(
                "time_step_limit",
                format!("must be [min, max] with 0 <= min < max, got [{lo}, {hi}]"),
            ));
        }
        Ok(())
    }
}

/// transformers' `MambaConfig` (Mamba1; defaults as transformers 5.17 has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Mamba1Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub state_size: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_epsilon: f64,
    pub expand: usize,
    pub intermediate_size: usize,
    pub conv_kernel: usize,
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub hidden_act: String,
    pub initializer_range: f64,
    pub residual_in_fp32: bool,
    pub time_step_rank: usize,
    pub time_step_scale: f64,
    pub time_step_min: f64,
    pub time_step_max: f64,
    pub time_step_init_scheme: String,
    pub time_step_floor: f64,
    pub rescale_prenorm_residual: bool,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Default for Mamba1Config {
    fn default() -> Self {
        Self {
            vocab_size: 50280,
            hidden_size: 768,
            state_size: 16,
            num_hidden_layers: 32,
            layer_norm_epsilon: 1e-5,
            expand: 2,
            intermediate_size: 1536,
            conv_kernel: 4,
            use_bias: false,
            use_conv_bias: true,
            hidden_act: "silu".into(),
            initializer_range: 0.1,
            residual_in_fp32: true,
            time_step_rank: 48,
            time_step_scale: 1.0,
            time_step_min: 0.001,
            time_step_max: 0.1,
            time_step_init_scheme: "random".into(),
            time_step_floor: 1e-4,
            rescale_prenorm_residual: false,
            tie_word_embeddings: true,
            pad_token_id: Some(0),
            bos_token_id: Some(0),
            eos_token_id: Some(0),
        }
    }
}

impl Mamba1Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("state_size", self.state_size)?;
        positive("num_hidden_layers", self.num_hidden_layers)?;
        positive("time_step_rank", self.time_step_rank)?;
        positive("expand", self.expand)?;
        if self.conv_kernel < 2 {
            return Err(invalid(
                "conv_kernel",
                format!("must be at least 2, got {}", self.conv_kernel),
            ));
        }
        if self.intermediate_size != self.expand * self.hidden_size {
            return Err(invalid(
                "intermediate_size",
                format!(
                    "must equal expand × hidden_size = {} × {} = {}, got {}",
                    self.expand,
                    self.hidden_size,
                    self.expand * self.hidden_size,
                    self.intermediate_size
                ),
            ));
        }
        check_act(&self.hidden_act)?;
        check_eps(self.layer_norm_epsilon)?;
        Ok(())
    }
}

fn positive(field: &str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        Err(invalid(field, "must be positive, got 0"))
    } else {
        Ok(())
    }
}

fn check_act(act: &str) -> Result<(), ConfigError> {
    match act {
        "silu" | "swish" => Ok(()),
        other => Err(invalid(
            "hidden_act",
            format!("must be `silu`, got `{other}`"),
        )),
    }
}

fn check_eps(eps: f64) -> Result<(), ConfigError> {
    if eps > 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(invalid(
            "layer_norm_epsilon",
            format!("must be a positive number, got {eps}"),
        ))
    }
}

/// A Mamba (v1) or Mamba2 model configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Mamba1(Mamba1Config),
    Mamba2(Mamba2Config),
}

impl ModelConfig {
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Mamba1(_) => "mamba",
            Self::Mamba2(_) => "mamba2",
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Mamba1(c) => c.vocab_size,
            Self::Mamba2(c) => c.vocab_size,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Mamba1(c) => c.hidden_size,
            Self::Mamba2(c) => c.hidden_size,
        }
    }
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Mamba1(c) => c.num_hidden_layers,
            Self::Mamba2(c) => c.num_hidden_layers,
        }
    }
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            Self::Mamba1(c) => c.tie_word_embeddings,
            Self::Mamba2(c) => c.tie_word_embeddings,
        }
    }
    pub fn layer_norm_epsilon(&self) -> f64 {
        match self {
            Self::Mamba1(c) => c.layer_norm_epsilon,
            Self::Mamba2(c) => c.layer_norm_epsilon,
        }
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Self::Mamba1(c) => c.eos_token_id,
            Self::Mamba2(c) => c.eos_token_id,
        }
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            Self::Mamba1(c) => c.pad_token_id,
            Self::Mamba2(c) => c.pad_token_id,
        }
    }
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Mamba1(c) => c.validate(),
            Self::Mamba2(c) => c.validate(),
        }
    }
    /// Sets `tie_word_embeddings`.
    pub fn with_tied_embeddings(mut self, tie: bool) -> Self {
        match &mut self {
            Self::Mamba1(c) => c.tie_word_embeddings = tie,
            Self::Mamba2(c) => c.tie_word_embeddings = tie,
        }
        self
    }

    /// Selects the gated-norm behaviour (Mamba2 only; Mamba1 has no gated norm).
    pub fn with_norm(mut self, norm: NormMode) -> Self {
        if let Self::Mamba2(c) = &mut self {
            c.norm = norm;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inconsistent_heads_name_the_field() {
        let cfg = Mamba2Config {
            num_heads: 10,
            ..Mamba2Config::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`num_heads`"), "{err}");
        assert!(err.contains("640"), "{err}");
    }

    #[test]
    fn groups_must_divide_heads() {
        let cfg = Mamba2Config {
            n_groups: 3,
            ..Mamba2Config::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`n_groups`") && err.contains("128"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        Mamba2Config::default().validate().unwrap();
        Mamba1Config::default().validate().unwrap();
    }
}

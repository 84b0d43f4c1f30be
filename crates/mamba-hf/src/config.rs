//! Reading and writing model configs: transformers `config.json` (`mamba`, `mamba2`), mamba_ssm
//! `config.json` (`d_model`, `n_layer`, `ssm_cfg`, ...) and Codestral's `params.json`.

use std::path::Path;

use mamba_model::{Mamba1Config, Mamba2Config, ModelConfig};
use serde_json::{Map, Value};

use crate::{io_err, HfError};

/// Parse JSON that may contain the bare tokens `Infinity`, `-Infinity` and `NaN` (as Python's
/// `json` writes them). They become `{"__float__": "..."}`, the form newer transformers writes.
pub fn parse_json_lenient(text: &str) -> Result<Value, serde_json::Error> {
    let mut out = String::with_capacity(text.len() + 32);
    let mut chars = text.char_indices().peekable();
    let mut in_string = false;
    let mut escaped = false;
    while let Some((i, ch)) = chars.next() {
        if in_string {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
            continue;
        }
        if ch == '"' {
            in_string = true;
            out.push(ch);
            continue;
        }
        let rest = &text[i..];
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = token {
            out.push_str(&format!("{{\"__float__\": \"{t}\"}}"));
            for _ in 1..t.len() {
                chars.next();
            }
        } else {
            out.push(ch);
        }
    }
    serde_json::from_str(&out)
}

/// A float from a JSON number, a `{"__float__": "Infinity"}` object or a string such as
/// `"inf"`.
fn json_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_float_str(s),
        Value::Object(m) => m
            .get("__float__")
            .and_then(|s| s.as_str())
            .and_then(parse_float_str),
        _ => None,
    }
}

fn parse_float_str(s: &str) -> Option<f64> {
    match s.trim() {
        "Infinity" | "inf" | "+inf" | "Inf" => Some(f64::INFINITY),
        "-Infinity" | "-inf" | "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

fn field_err(path: &Path, field: &str, message: impl Into<String>) -> HfError {
    HfError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

fn take_limit(
    path: &Path,
    obj: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<(f64, f64)>, HfError> {
    let Some(v) = obj.remove(key) else {
        return Ok(None);
    };
    let arr = v
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(|| field_err(path, key, format!("expected [min, max], got {v}")))?;
    let lo = json_float(&arr[0])
        .ok_or_else(|| field_err(path, key, format!("min is not a number: {}", arr[0])))?;
    let hi = json_float(&arr[1])
        .ok_or_else(|| field_err(path, key, format!("max is not a number: {}", arr[1])))?;
    Ok(Some((lo, hi)))
}

/// `time_step_rank` may be `"auto"` (`ceil(hidden / 16)`).
fn take_rank(
    path: &Path,
    obj: &mut Map<String, Value>,
    key: &str,
    hidden: usize,
) -> Result<Option<usize>, HfError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(Some(hidden.div_ceil(16))),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().map(|v| v as usize)),
        Some(other) => Err(field_err(
            path,
            key,
            format!("expected an integer or \"auto\", got {other}"),
        )),
    }
}

fn deserialize<T: serde::de::DeserializeOwned>(
    path: &Path,
    obj: Map<String, Value>,
) -> Result<T, HfError> {
    serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let field = e.path().to_string();
        field_err(path, &field, e.into_inner().to_string())
    })
}

fn get_usize(obj: &Map<String, Value>, key: &str) -> Option<usize> {
    obj.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

/// Load a model config from a `config.json` (transformers or mamba_ssm format) or a
/// `params.json` (Codestral), validated.
pub fn load_config(path: &Path) -> Result<ModelConfig, HfError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let value = parse_json_lenient(&text).map_err(|e| HfError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let obj = match value {
        Value::Object(o) => o,
        other => {
            return Err(HfError::Json {
                path: path.to_path_buf(),
                message: format!("expected a JSON object, got {}", short(&other)),
            });
        }
    };
    let config = config_from_json(path, obj)?;
    config.validate().map_err(|e| HfError::InvalidConfig {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(config)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..60])
    } else {
        s
    }
}

/// Dispatch on the format of a parsed config object.
pub fn config_from_json(path: &Path, mut obj: Map<String, Value>) -> Result<ModelConfig, HfError> {
    let is_params_json = obj.contains_key("dim") && obj.contains_key("n_layers");
    if is_params_json {
        return codestral_params(path, obj);
    }
    if obj.contains_key("d_model") && obj.contains_key("n_layer") {
        return mamba_ssm_config(path, obj);
    }
    let model_type = obj
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| {
            let arch = obj.get("architectures")?.as_array()?.first()?.as_str()?.to_string();
            match arch.as_str() {
                "Mamba2ForCausalLM" => Some("mamba2".into()),
                "MambaForCausalLM" => Some("mamba".into()),
                _ => None,
            }
        })
        .ok_or_else(|| field_err(path, "model_type", "missing: expected `mamba` or `mamba2` (or a mamba_ssm config with `d_model`/`n_layer`, or a Codestral params.json)"))?;
    // transformers writes both spellings of tying over the years.
    if !obj.contains_key("tie_word_embeddings") {
        if let Some(v) = obj.get("tie_embedding_weights").cloned() {
            obj.insert("tie_word_embeddings".into(), v);
        }
    }
    let hidden = get_usize(&obj, "hidden_size");
    // `null` token ids are allowed; strip other nulls so that defaults apply.
    obj.retain(|k, v| !v.is_null() || k.ends_with("_token_id"));
    match model_type.as_str() {
        "mamba2" => {
            let hidden = hidden.unwrap_or(Mamba2Config::default().hidden_size);
            let limit = take_limit(path, &mut obj, "time_step_limit")?;
            let rank = take_rank(path, &mut obj, "time_step_rank", hidden)?;
            let mut c: Mamba2Config = deserialize(path, obj)?;
            c.time_step_limit = limit.unwrap_or((0.0, f64::INFINITY));
            c.time_step_rank = rank.unwrap_or(hidden.div_ceil(16));
            Ok(ModelConfig::Mamba2(c))
        }
        "mamba" => {
            let hidden = hidden.unwrap_or(Mamba1Config::default().hidden_size);
            let rank = take_rank(path, &mut obj, "time_step_rank", hidden)?;
            let explicit_intermediate = obj.contains_key("intermediate_size");
            let mut c: Mamba1Config = deserialize(path, obj)?;
            c.time_step_rank = rank.unwrap_or(hidden.div_ceil(16));
            if !explicit_intermediate {
                c.intermediate_size = c.expand * c.hidden_size;
            }
            Ok(ModelConfig::Mamba1(c))
        }
        other => Err(HfError::UnknownModelType {
            path: path.to_path_buf(),
            model_type: other.to_string(),
        }),
    }
}

fn pad_vocab(vocab: usize, multiple: usize) -> usize {
    if multiple <= 1 {
        vocab
    } else {
        vocab.div_ceil(multiple) * multiple
    }
}

fn want_usize(path: &Path, obj: &Map<String, Value>, key: &str) -> Result<usize, HfError> {
    get_usize(obj, key).ok_or_else(|| field_err(path, key, "missing or not a non-negative integer"))
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Option<f64> {
    obj.get(key).and_then(json_float)
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Option<bool> {
    obj.get(key).and_then(|v| v.as_bool())
}

fn reject_unsupported(path: &Path, obj: &Map<String, Value>) -> Result<(), HfError> {
    if let Some(v) = obj.get("attn_layer_idx").and_then(|v| v.as_array()) {
        if !v.is_empty() {
            return Err(field_err(
                path,
                "attn_layer_idx",
                "hybrid attention layers are not supported (expected [])",
            ));
        }
    }
    if get_usize(obj, "d_intermediate").unwrap_or(0) > 0 {
        return Err(field_err(
            path,
            "d_intermediate",
            "MLP blocks are not supported (expected 0)",
        ));
    }
    if opt_bool(obj, "rms_norm") == Some(false) {
        return Err(field_err(
            path,
            "rms_norm",
            "LayerNorm models are not supported (expected true)",
        ));
    }
    Ok(())
}

/// mamba_ssm's `MambaConfig` dataclass as saved next to its checkpoints.
fn mamba_ssm_config(path: &Path, obj: Map<String, Value>) -> Result<ModelConfig, HfError> {
    reject_unsupported(path, &obj)?;
    let d_model = want_usize(path, &obj, "d_model")?;
    let n_layer = want_usize(path, &obj, "n_layer")?;
    let vocab = want_usize(path, &obj, "vocab_size")?;
    let multiple = get_usize(&obj, "pad_vocab_size_multiple").unwrap_or(8);
    let vocab = pad_vocab(vocab, multiple);
    let tie = opt_bool(&obj, "tie_embeddings").unwrap_or(true);
    let residual_in_fp32 = opt_bool(&obj, "residual_in_fp32").unwrap_or(true);
    let empty = Map::new();
    let ssm = obj
        .get("ssm_cfg")
        .and_then(|v| v.as_object())
        .unwrap_or(&empty);
    let layer = ssm
        .get("layer")
        .and_then(|v| v.as_str())
        .unwrap_or("Mamba1");
    let eps = opt_f64(&obj, "norm_epsilon").unwrap_or(1e-5);
    match layer {
        "Mamba2" => {
            let expand = get_usize(ssm, "expand").unwrap_or(2);
            let head_dim = get_usize(ssm, "headdim").unwrap_or(64);
            let intermediate = expand * d_model;
            if head_dim == 0 || !intermediate.is_multiple_of(head_dim) {
                return Err(field_err(
                    path,
                    "ssm_cfg.headdim",
                    format!("must divide expand × d_model = {intermediate}, got {head_dim}"),
                ));
            }
            let limit = match ssm.get("dt_limit").and_then(|v| v.as_array()) {
                Some(a) if a.len() == 2 => (
                    json_float(&a[0]).ok_or_else(|| {
                        field_err(path, "ssm_cfg.dt_limit", "min is not a number")
                    })?,
                    json_float(&a[1]).ok_or_else(|| {
                        field_err(path, "ssm_cfg.dt_limit", "max is not a number")
                    })?,
                ),
                Some(_) => return Err(field_err(path, "ssm_cfg.dt_limit", "expected [min, max]")),
                None => (0.0, f64::INFINITY),
            };
            if ssm.get("norm_before_gate").and_then(|v| v.as_bool()) == Some(true) {
                return Err(field_err(
                    path,
                    "ssm_cfg.norm_before_gate",
                    "only false (gate before norm) is supported",
                ));
            }
            Ok(ModelConfig::Mamba2(Mamba2Config {
                vocab_size: vocab,
                hidden_size: d_model,
                num_heads: intermediate / head_dim,
                head_dim,
                state_size: get_usize(ssm, "d_state").unwrap_or(128),
                n_groups: get_usize(ssm, "ngroups").unwrap_or(1),
                expand,
                conv_kernel: get_usize(ssm, "d_conv").unwrap_or(4),
                chunk_size: get_usize(ssm, "chunk_size").unwrap_or(256),
                num_hidden_layers: n_layer,
                layer_norm_epsilon: eps,
                use_bias: opt_bool(ssm, "bias").unwrap_or(false),
                use_conv_bias: opt_bool(ssm, "conv_bias").unwrap_or(true),
                residual_in_fp32,
                time_step_rank: d_model.div_ceil(16),
                time_step_min: opt_f64(ssm, "dt_min").unwrap_or(0.001),
                time_step_max: opt_f64(ssm, "dt_max").unwrap_or(0.1),
                time_step_floor: opt_f64(ssm, "dt_init_floor").unwrap_or(1e-4),
                time_step_limit: limit,
                tie_word_embeddings: tie,
                pad_token_id: Some(0),
                bos_token_id: Some(0),
                eos_token_id: Some(0),
                rescale_prenorm_residual: true,
                ..Mamba2Config::default()
            }))
        }
        "Mamba1" | "Mamba" => {
            let expand = get_usize(ssm, "expand").unwrap_or(2);
            let rank = match ssm.get("dt_rank") {
                None | Some(Value::Null) => d_model.div_ceil(16),
                Some(Value::String(s)) if s == "auto" => d_model.div_ceil(16),
                Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                    field_err(
                        path,
                        "ssm_cfg.dt_rank",
                        format!("expected an integer or \"auto\", got {v}"),
                    )
                })?,
            };
            Ok(ModelConfig::Mamba1(Mamba1Config {
                vocab_size: vocab,
                hidden_size: d_model,
                state_size: get_usize(ssm, "d_state").unwrap_or(16),
                num_hidden_layers: n_layer,
                layer_norm_epsilon: eps,
                expand,
                intermediate_size: expand * d_model,
                conv_kernel: get_usize(ssm, "d_conv").unwrap_or(4),
                use_bias: opt_bool(ssm, "bias").unwrap_or(false),
                use_conv_bias: opt_bool(ssm, "conv_bias").unwrap_or(true),
                residual_in_fp32,
                time_step_rank: rank,
                time_step_scale: opt_f64(ssm, "dt_scale").unwrap_or(1.0),
                time_step_min: opt_f64(ssm, "dt_min").unwrap_or(0.001),
                time_step_max: opt_f64(ssm, "dt_max").unwrap_or(0.1),
                time_step_floor: opt_f64(ssm, "dt_init_floor").unwrap_or(1e-4),
                tie_word_embeddings: tie,
                rescale_prenorm_residual: true,
                ..Mamba1Config::default()
            }))
        }
        other => Err(field_err(
            path,
            "ssm_cfg.layer",
            format!("expected `Mamba1` or `Mamba2`, got `{other}`"),
        )),
    }
}

/// Mistral's `params.json` for Mamba-Codestral (`dim`, `n_layers`, `n_groups`, ...): a Mamba2
/// with head_dim 64, state 128, expand 2, chunk 256.
fn codestral_params(path: &Path, obj: Map<String, Value>) -> Result<ModelConfig, HfError> {
    reject_unsupported(path, &obj)?;
    let dim = want_usize(path, &obj, "dim")?;
    let n_layers = want_usize(path, &obj, "n_layers")?;
    let vocab = want_usize(path, &obj, "vocab_size")?;
    let multiple = get_usize(&obj, "pad_vocab_size_multiple").unwrap_or(1);
    let head_dim = get_usize(&obj, "head_dim").unwrap_or(64);
    let expand = get_usize(&obj, "expand").unwrap_or(2);
    if head_dim == 0 || !(expand * dim).is_multiple_of(head_dim) {
        return Err(field_err(
            path,
            "dim",
            format!(
                "expand × dim = {} is not a multiple of head_dim {head_dim}",
                expand * dim
            ),
        ));
    }
    Ok(ModelConfig::Mamba2(Mamba2Config {
        vocab_size: pad_vocab(vocab, multiple),
        hidden_size: dim,
        num_heads: expand * dim / head_dim,
        head_dim,
        state_size: get_usize(&obj, "d_state").unwrap_or(128),
        n_groups: get_usize(&obj, "n_groups").unwrap_or(8),
        expand,
        conv_kernel: get_usize(&obj, "d_conv").unwrap_or(4),
        chunk_size: get_usize(&obj, "chunk_size").unwrap_or(256),
        num_hidden_layers: n_layers,
        layer_norm_epsilon: opt_f64(&obj, "norm_eps").unwrap_or(1e-5),
        residual_in_fp32: opt_bool(&obj, "residual_in_fp32").unwrap_or(true),
        time_step_rank: dim.div_ceil(16),
        tie_word_embeddings: opt_bool(&obj, "tie_embeddings").unwrap_or(false),
        // Mistral v3 tokenizer: <unk>=0, <s>=1, </s>=2.
        pad_token_id: Some(0),
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        ..Mamba2Config::default()
    }))
}

/// transformers' `config.json` for `config`, with `Infinity` written as a bare token (which every
/// transformers version reads).
pub fn config_to_json(config: &ModelConfig) -> String {
    let mut obj = Map::new();
    let (arch, fields) = match config {
        ModelConfig::Mamba2(c) => {
            let mut v = serde_json::to_value(c).expect("config serializes");
            let m = v.as_object_mut().expect("object");
            let (lo, hi) = c.time_step_limit;
            m.insert(
                "time_step_limit".into(),
                Value::Array(vec![float_placeholder(lo), float_placeholder(hi)]),
            );
            m.insert("intermediate_size".into(), c.intermediate_size().into());
            ("Mamba2ForCausalLM", v)
        }
        ModelConfig::Mamba1(c) => (
            "MambaForCausalLM",
            serde_json::to_value(c).expect("config serializes"),
        ),
    };
    obj.insert("architectures".into(), Value::Array(vec![arch.into()]));
    obj.insert("model_type".into(), config.model_type().into());
    if let Value::Object(m) = fields {
        obj.extend(m);
    }
    obj.insert("dtype".into(), "float32".into());
    obj.insert("use_cache".into(), true.into());
    let text = serde_json::to_string_pretty(&Value::Object(obj)).expect("json serializes");
    text.replace("\"__MB_INF__\"", "Infinity")
        .replace("\"__MB_NEG_INF__\"", "-Infinity")
}

fn float_placeholder(v: f64) -> Value {
    if v == f64::INFINITY {
        "__MB_INF__".into()
    } else if v == f64::NEG_INFINITY {
        "__MB_NEG_INF__".into()
    } else {
        v.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_json_keeps_strings_and_rewrites_tokens() {
        let v =
            parse_json_lenient(r#"{"a": [0.0, Infinity], "s": "Infinity NaN", "b": -Infinity}"#)
                .unwrap();
        assert_eq!(json_float(&v["a"][1]), Some(f64::INFINITY));
        assert_eq!(v["s"], "Infinity NaN");
        assert_eq!(json_float(&v["b"]), Some(f64::NEG_INFINITY));
    }
}

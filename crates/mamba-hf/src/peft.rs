//! PEFT LoRA adapters: `adapter_model.safetensors` (keys
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, embeddings
//! `base_model.model.backbone.embeddings.lora_embedding_A` / `_B`) and `adapter_config.json`.

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use mamba_model::lora::{adapters, set_adapter, target_keys, LoraConfig, LoraTargets};
use mamba_model::MambaLM;
use serde_json::{json, Value};

use crate::checkpoint::{to_safetensors_bytes, write_atomic, NamedTensors, TensorSource};
use crate::{io_err, HfError};

const PREFIX: &str = "base_model.model.";

fn values<B: Backend>(t: Tensor<B, 2>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (
        shape,
        t.into_data().convert::<f32>().into_vec().expect("f32 data"),
    )
}

/// The adapter tensors under PEFT's keys.
pub fn adapter_tensors<B: Backend>(model: &MambaLM<B>) -> NamedTensors {
    let (linears, emb) = adapters(model);
    let mut out = Vec::new();
    if let Some(e) = emb {
        let (s, v) = values(e.a.val());
        out.push((
            format!("{PREFIX}backbone.embeddings.lora_embedding_A"),
            s,
            v,
        ));
        let (s, v) = values(e.b.val());
        out.push((
            format!("{PREFIX}backbone.embeddings.lora_embedding_B"),
            s,
            v,
        ));
    }
    for (key, l) in linears {
        let (s, v) = values(l.a.val());
        out.push((format!("{PREFIX}{key}.lora_A.weight"), s, v));
        let (s, v) = values(l.b.val());
        out.push((format!("{PREFIX}{key}.lora_B.weight"), s, v));
    }
    out
}

/// Write `adapter_model.safetensors` and `adapter_config.json` into `dir`, atomically.
pub fn save_adapter<B: Backend>(
    model: &MambaLM<B>,
    cfg: &LoraConfig,
    base_model: &str,
    dir: &Path,
) -> Result<(), HfError> {
    let tensors = adapter_tensors(model);
    write_atomic(
        &dir.join("adapter_model.safetensors"),
        &to_safetensors_bytes(&tensors, Default::default())?,
    )?;
    let targets = match &cfg.targets {
        LoraTargets::Names(n) => json!(n),
        LoraTargets::Regex(r) => json!(r),
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    });
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)
            .expect("json")
            .as_bytes(),
    )
}

/// Read `adapter_config.json` into a [`LoraConfig`].
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, HfError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| HfError::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let field = |k: &str, m: &str| HfError::Config {
        path: path.clone(),
        field: k.into(),
        message: m.into(),
    };
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(field(
                "peft_type",
                &format!("expected \"LORA\", got \"{t}\""),
            ));
        }
    }
    let r = v
        .get("r")
        .and_then(|r| r.as_u64())
        .ok_or_else(|| field("r", "missing or not a positive integer"))? as usize;
    let alpha = v.get("lora_alpha").and_then(|a| a.as_f64()).unwrap_or(8.0);
    for (k, bad) in [("use_dora", true), ("fan_in_fan_out", true)] {
        if v.get(k).and_then(|x| x.as_bool()) == Some(bad) {
            return Err(field(k, "is not supported (expected false)"));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(|x| x.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(field(
                k,
                "per-module ranks/alphas are not supported (expected {})",
            ));
        }
    }
    let targets = match v.get("target_modules") {
        Some(Value::String(s)) => LoraTargets::Regex(s.clone()),
        Some(Value::Array(a)) => LoraTargets::Names(
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
        ),
        _ => {
            return Err(field(
                "target_modules",
                "missing: expected a list of module names or a regex",
            ))
        }
    };
    Ok(LoraConfig {
        r,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|d| d.as_f64())
            .unwrap_or(0.0),
        use_rslora: v
            .get("use_rslora")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        targets,
    })
}

/// Put the adapter saved in `dir` onto `model` (its base weights stay as they are).
pub fn load_adapter<B: Backend>(
    model: MambaLM<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<(MambaLM<B>, LoraConfig), HfError> {
    let cfg = read_adapter_config(dir)?;
    // Base weights frozen: only the adapters set below are trainable.
    let mut model = burn::module::Module::no_grad(model);
    let file = dir.join("adapter_model.safetensors");
    let src = TensorSource::open(std::slice::from_ref(&file))?;
    let scaling = cfg.scaling();
    let modules = target_keys(&model);
    // TensorSource normalises keys for model checkpoints; adapter keys start with
    // `base_model.` and so come through as `backbone.base_model.model...`.
    let find = |key: String| -> Option<String> { src.keys().find(|k| k.ends_with(&key)).cloned() };
    let mut used = Vec::new();
    let mut problems = Vec::new();
    for m in &modules {
        let (ka, kb) = if m == "backbone.embeddings" {
            (
                format!("{PREFIX}{m}.lora_embedding_A"),
                format!("{PREFIX}{m}.lora_embedding_B"),
            )
        } else {
            (
                format!("{PREFIX}{m}.lora_A.weight"),
                format!("{PREFIX}{m}.lora_B.weight"),
            )
        };
        match (find(ka.clone()), find(kb.clone())) {
            (None, None) => continue,
            (Some(a), Some(b)) => {
                let (av, ash) = src.read_f32(&a)?;
                let (bv, bsh) = src.read_f32(&b)?;
                if ash.len() != 2 || bsh.len() != 2 || ash[0] != cfg.r || bsh[1] != cfg.r {
                    problems.push(format!(
                        "{ka} {ash:?} / {kb} {bsh:?}: expected rank {} (A [r, in], B [out, r])",
                        cfg.r
                    ));
                    continue;
                }
                let ta = Tensor::from_data(TensorData::new(av, [ash[0], ash[1]]), device);
                let tb = Tensor::from_data(TensorData::new(bv, [bsh[0], bsh[1]]), device);
                set_adapter(&mut model, m, ta, tb, scaling);
                used.push(a);
                used.push(b);
            }
            (a, _) => problems.push(format!(
                "{}: only one of lora_A / lora_B present",
                if a.is_some() { kb } else { ka }
            )),
        }
    }
    let unexpected: Vec<String> = src.keys().filter(|k| !used.contains(k)).cloned().collect();
    if !problems.is_empty() || !unexpected.is_empty() || used.is_empty() {
        return Err(HfError::Tensors {
            path: file,
            missing: if used.is_empty() {
                vec!["(no adapter of this model's modules)".into()]
            } else {
                vec![]
            },
            unexpected,
            misshapen: problems,
        });
    }
    Ok((model, cfg))
}

//! Hugging Face interop for mamba-burn: config formats, safetensors checkpoints in and out under
//! transformers' names, and hub ids resolved through `hf-hub` and its cache.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use mamba_model::{MambaLM, NormMode};

pub mod checkpoint;
pub mod config;
pub mod hub;
pub mod peft;

pub use checkpoint::SaveDtype;
pub use config::{config_to_json, load_config};
pub use hub::resolve_model_dir;

/// Everything that can go wrong reading or writing a checkpoint. Each variant names the file and,
/// where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: malformed JSON: {message}", path.display())]
    Json { path: PathBuf, message: String },
    #[error("{}: `{field}` {message}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    InvalidConfig {
        path: PathBuf,
        source: mamba_model::ConfigError,
    },
    #[error("{}: unsupported model_type `{model_type}`: expected `mamba` or `mamba2`", path.display())]
    UnknownModelType { path: PathBuf, model_type: String },
    #[error("{}: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("{}: the checkpoint does not match its config:{}", path.display(), tensor_report(missing, unexpected, misshapen))]
    Tensors {
        path: PathBuf,
        missing: Vec<String>,
        unexpected: Vec<String>,
        misshapen: Vec<String>,
    },
    #[error("{what}: {message}")]
    NotFound { what: String, message: String },
}

fn tensor_report(missing: &[String], unexpected: &[String], misshapen: &[String]) -> String {
    let mut s = String::new();
    let mut list = |title: &str, items: &[String]| {
        if !items.is_empty() {
            s.push_str(&format!("\n  {title} ({}):", items.len()));
            for it in items.iter().take(20) {
                s.push_str(&format!("\n    {it}"));
            }
            if items.len() > 20 {
                s.push_str(&format!("\n    … and {} more", items.len() - 20));
            }
        }
    };
    list("missing tensors", missing);
    list("unexpected tensors", unexpected);
    list("wrong shapes", misshapen);
    s
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> HfError {
    HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The config file of a model directory: `config.json`, else `params.json`.
pub fn config_path(dir: &Path) -> Result<PathBuf, HfError> {
    ["config.json", "params.json"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| HfError::NotFound {
            what: dir.display().to_string(),
            message: "no config.json or params.json in it".into(),
        })
}

/// Load a model from a directory or hub id: config, then weights, checked against each other.
pub fn load_model<B: Backend>(
    spec: &str,
    norm: NormMode,
    device: &B::Device,
) -> Result<MambaLM<B>, HfError> {
    let dir = resolve_model_dir(spec)?;
    load_model_dir(&dir, norm, device)
}

/// Load a model from a local directory.
pub fn load_model_dir<B: Backend>(
    dir: &Path,
    norm: NormMode,
    device: &B::Device,
) -> Result<MambaLM<B>, HfError> {
    let mut config = load_config(&config_path(dir)?)?.with_norm(norm);
    let files = checkpoint::weight_files(dir)?;
    let src = checkpoint::TensorSource::open(&files)?;
    checkpoint::check_tensors(&mut config, &src, dir)?;
    checkpoint::build_model(&config, &src, device)
}

/// Save `model` in transformers' format: `config.json` + `model.safetensors`, each written
/// atomically.
pub fn save_model<B: Backend>(
    model: &MambaLM<B>,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), HfError> {
    let tensors = checkpoint::export_tensors(model);
    let bytes = checkpoint::to_safetensors_bytes(&tensors, dtype)?;
    checkpoint::write_atomic(&dir.join("model.safetensors"), &bytes)?;
    let mut json = config_to_json(&model.config);
    if dtype != SaveDtype::F32 {
        let name = if dtype == SaveDtype::Bf16 {
            "bfloat16"
        } else {
            "float16"
        };
        json = json.replace("\"dtype\": \"float32\"", &format!("\"dtype\": \"{name}\""));
    }
    checkpoint::write_atomic(&dir.join("config.json"), json.as_bytes())
}

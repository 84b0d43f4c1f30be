//! Resolving a model (or dataset) argument: a local directory, or a hub id looked up in the
//! standard Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`) and downloaded through `hf-hub` unless
//! offline (`HF_HUB_OFFLINE=1`).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::HfError;

/// Whether the hub must not be contacted (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to a
/// true value).
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false)
    })
}

/// The hub cache directory: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(p) if !p.is_empty() => Cache::new(PathBuf::from(p)),
        _ => Cache::from_env(),
    }
}

/// What to do without the hub, for the model errors.
const OFFLINE_ADVICE: &str = "to train without the hub, pass a local model directory (`model.source = \"path/to/dir\"`), or make one offline first: `cargo run --release --bin train -- --config configs/quickstart.toml`, then `--set model.source=runs/quickstart/model`";

/// Why the hub did not give a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubFailure {
    /// No answer: no network, DNS, refused connection, timeout.
    Unreachable,
    /// The hub answered that the repository or file is not there (or not accessible).
    NotFound,
    Other,
}

/// Classifies an `hf-hub` error by its transport error.
pub fn classify(e: &hf_hub::api::sync::ApiError) -> HubFailure {
    use hf_hub::api::sync::ApiError;
    match e {
        ApiError::RequestError(err) => match err.as_ref() {
            ureq::Error::Status(401 | 403 | 404, _) => HubFailure::NotFound,
            ureq::Error::Status(..) => HubFailure::Other,
            ureq::Error::Transport(_) => HubFailure::Unreachable,
        },
        ApiError::TooManyRetries(inner) => classify(inner),
        _ => HubFailure::Other,
    }
}

/// `owner/name[@revision]`.
fn parse_id(spec: &str) -> Option<(String, Option<String>)> {
    let (id, rev) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev.to_string())),
        None => (spec, None),
    };
    let mut parts = id.split('/');
    let (owner, name) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || owner.is_empty() || name.is_empty() {
        return None;
    }
    Some((id.to_string(), rev))
}

fn repo(id: &str, rev: &Option<String>, kind: RepoType) -> Repo {
    match rev {
        Some(r) => Repo::with_revision(id.to_string(), kind, r.clone()),
        None => Repo::new(id.to_string(), kind),
    }
}

/// Files a model directory needs, first found wins for the weights.
const CONFIG_FILES: [&str; 2] = ["config.json", "params.json"];

/// Resolve `spec` (a directory or a hub id) to a local directory holding the model's config and
/// weights. Hub ids are read from the cache; if missing there and not offline, they are
/// downloaded.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf, HfError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some((id, rev)) = parse_id(spec) else {
        return Err(HfError::NotFound {
            what: spec.to_string(),
            message: "no such directory, and not a hub id of the form `owner/name[@revision]`"
                .into(),
        });
    };
    let cache = cache();
    let cached = cache.repo(repo(&id, &rev, RepoType::Model));
    let config_in_cache = CONFIG_FILES.iter().find_map(|f| cached.get(f));
    if let Some(config) = config_in_cache {
        let dir = config
            .parent()
            .expect("a cached file has a parent")
            .to_path_buf();
        // Sharded checkpoints: make sure every shard the index names is there too.
        if dir.join("model.safetensors").exists() || dir.join("consolidated.safetensors").exists() {
            return Ok(dir);
        }
        if dir.join("model.safetensors.index.json").exists() {
            return Ok(dir);
        }
        if offline() {
            return Err(HfError::NotFound {
                what: spec.to_string(),
                message: format!(
                    "the cache at {} has the config but no weights, and HF_HUB_OFFLINE is set",
                    dir.display()
                ),
            });
        }
    } else if offline() {
        return Err(HfError::NotFound {
            what: spec.to_string(),
            message: format!(
                "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache at {}; download it on a connected machine, or {OFFLINE_ADVICE}",
                cache.path().display()
            ),
        });
    }
    download_model(&id, &rev, spec)
}

fn download_model(id: &str, rev: &Option<String>, spec: &str) -> Result<PathBuf, HfError> {
    let hub_err = |message: String| HfError::NotFound {
        what: spec.to_string(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache().path().clone())
        .with_progress(true)
        .build()
        .map_err(|e| hub_err(format!("cannot reach the hub: {e}")))?;
    let api_repo = api.repo(repo(id, rev, RepoType::Model));
    let mut failures = Vec::new();
    let config = CONFIG_FILES.iter().find_map(|f| match api_repo.get(f) {
        Ok(p) => Some(p),
        Err(e) => {
            failures.push((classify(&e), e.to_string()));
            None
        }
    });
    let config = config.ok_or_else(|| {
        let cached = cache().path().display().to_string();
        if let Some((_, e)) = failures.iter().find(|f| f.0 == HubFailure::Unreachable) {
            hub_err(format!(
                "cannot reach the Hugging Face hub ({e}), and the model is not in the cache at {cached}; {OFFLINE_ADVICE}"
            ))
        } else if failures.iter().all(|f| f.0 == HubFailure::NotFound) {
            hub_err(format!(
                "the Hugging Face hub has no model `{id}` (no config.json or params.json; check the id, or log in for a gated model); {OFFLINE_ADVICE}"
            ))
        } else {
            let all: Vec<&str> = failures.iter().map(|f| f.1.as_str()).collect();
            hub_err(format!(
                "the hub did not give its config ({}); {OFFLINE_ADVICE}",
                all.join("; ")
            ))
        }
    })?;
    let dir = config
        .parent()
        .expect("a cached file has a parent")
        .to_path_buf();
    // Tokenizer files are optional.
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let _ = api_repo.get(f);
    }
    if api_repo.get("model.safetensors").is_ok() {
        return Ok(dir);
    }
    if let Ok(index) = api_repo.get("model.safetensors.index.json") {
        for shard in crate::checkpoint::shard_files(&index)? {
            api_repo
                .get(&shard)
                .map_err(|e| hub_err(format!("cannot download shard {shard}: {e}")))?;
        }
        return Ok(dir);
    }
    if api_repo.get("consolidated.safetensors").is_ok() {
        return Ok(dir);
    }
    Err(hub_err(
        "the hub has no model.safetensors, sharded index or consolidated.safetensors for it".into(),
    ))
}

/// One file of a model repository, from the cache or downloaded unless offline.
pub fn resolve_repo_file(id_spec: &str, file: &str) -> Result<PathBuf, HfError> {
    resolve_file(id_spec, file, RepoType::Model)
}

/// Resolve a dataset hub id to its snapshot directory in the cache (downloading `files` when
/// not cached and not offline).
pub fn resolve_dataset_file(id_spec: &str, file: &str) -> Result<PathBuf, HfError> {
    resolve_file(id_spec, file, RepoType::Dataset)
}

fn resolve_file(id_spec: &str, file: &str, kind: RepoType) -> Result<PathBuf, HfError> {
    let Some((id, rev)) = parse_id(id_spec) else {
        return Err(HfError::NotFound {
            what: id_spec.to_string(),
            message: "not a hub id of the form `owner/name[@revision]`".into(),
        });
    };
    let cache = cache();
    if let Some(p) = cache.repo(repo(&id, &rev, kind)).get(file) {
        return Ok(p);
    }
    if offline() {
        return Err(HfError::NotFound {
            what: format!("{id_spec}/{file}"),
            message: format!(
                "not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            ),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.path().clone())
        .build()
        .map_err(|e| HfError::NotFound {
            what: id_spec.to_string(),
            message: format!("cannot reach the hub: {e}"),
        })?;
    api.repo(repo(&id, &rev, kind))
        .get(file)
        .map_err(|e| HfError::NotFound {
            what: format!("{id_spec}/{file}"),
            message: format!("download failed: {e}"),
        })
}

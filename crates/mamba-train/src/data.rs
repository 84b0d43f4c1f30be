//! From the run config's data/tokenizer sections to training and validation rows.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use mamba_data::{make_rows, read_texts, split_indices, Layout, Row, TextSpec, Tokenizer};
use mamba_model::ModelConfig;

use crate::config::{DataSection, TokenizerSection};

/// Rows ready for training, with where they came from.
pub struct Prepared {
    pub train: Vec<Row>,
    pub validation: Vec<Row>,
    pub tokenizer: PathBuf,
    pub data_file: PathBuf,
    pub examples: usize,
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// The local file of `data.source`: a path, or a file of a hub dataset (from the cache, or
/// downloaded unless offline).
pub fn resolve_data_file(data: &DataSection) -> Result<PathBuf> {
    let p = Path::new(&data.source);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        let f = data.file.as_deref().with_context(|| {
            format!(
                "`data.source` {} is a directory: set `data.file`",
                p.display()
            )
        })?;
        return Ok(p.join(f));
    }
    if looks_like_hub_id(&data.source) {
        let file = data.file.as_deref().with_context(|| {
            format!("`data.source` {:?} is a hub dataset id: set `data.file` to the file to read (e.g. \"quotes.jsonl\")", data.source)
        })?;
        return match mamba_hf::hub::resolve_dataset_file(&data.source, file) {
            Ok(p) => Ok(p),
            Err(e) => match crate::bundled::dataset_file(&data.source, file)? {
                Some(p) => {
                    eprintln!(
                        "data: {} is not available from the hub or its cache ({e}); using the copy bundled with mamba-burn (the same 2,508 rows, sha256 checked): {}",
                        data.source,
                        p.display()
                    );
                    Ok(p)
                }
                None => Err(e.into()),
            },
        };
    }
    bail!(
        "`data.source`: {} does not exist (and is not a hub dataset id owner/name)",
        data.source
    )
}

/// The `tokenizer.json` to use: `tokenizer.source` (file, directory or hub id), else the model
/// directory's.
pub fn resolve_tokenizer(tok: &TokenizerSection, model_dir: Option<&Path>) -> Result<PathBuf> {
    match &tok.source {
        Some(s) => {
            let p = Path::new(s);
            if p.is_file() {
                Ok(p.to_path_buf())
            } else if p.is_dir() {
                let f = p.join("tokenizer.json");
                ensure!(
                    f.is_file(),
                    "`tokenizer.source`: no tokenizer.json in {}",
                    p.display()
                );
                Ok(f)
            } else if looks_like_hub_id(s) {
                let dir = mamba_hf::resolve_model_dir(s).or_else(|_| {
                    mamba_hf::hub::resolve_repo_file(s, "tokenizer.json")
                        .map(|f| f.parent().unwrap_or(Path::new(".")).to_path_buf())
                })?;
                let f = dir.join("tokenizer.json");
                ensure!(f.is_file(), "`tokenizer.source`: {s} has no tokenizer.json");
                Ok(f)
            } else {
                bail!("`tokenizer.source`: {s} does not exist (and is not a hub id owner/name)")
            }
        }
        None => {
            let dir = model_dir.context("`tokenizer.source` is required when the model is initialised from a config (`model.init`)")?;
            let f = dir.join("tokenizer.json");
            ensure!(
                f.is_file(),
                "no tokenizer.json in the model directory {}; set `tokenizer.source`",
                dir.display()
            );
            Ok(f)
        }
    }
}

/// Read, tokenize (EOS appended), split and cut the dataset.
pub fn prepare(
    data: &DataSection,
    tok: &TokenizerSection,
    model: &ModelConfig,
    model_dir: Option<&Path>,
    seed: u64,
) -> Result<Prepared> {
    let file = resolve_data_file(data)?;
    let spec = match (&data.field, &data.template) {
        (Some(f), None) => TextSpec::Field(f.clone()),
        (None, Some(t)) => TextSpec::Template(t.clone()),
        _ => bail!("`data`: give exactly one of `field` and `template`"),
    };
    let mut texts = read_texts(&file, &spec)?;
    if let Some(n) = data.max_examples {
        texts.truncate(n);
    }
    ensure!(
        !texts.is_empty(),
        "{}: the dataset is empty",
        file.display()
    );
    let tokenizer_path = resolve_tokenizer(tok, model_dir)?;
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let vocab = model.vocab_size();
    let eos = tok
        .eos_id
        .or(model.eos_token_id())
        .context("no EOS id: set `tokenizer.eos_id` (the model config has no eos_token_id)")?;
    ensure!(
        (eos as usize) < vocab,
        "`tokenizer.eos_id` {eos} is outside the model's vocab_size {vocab}"
    );
    let pad = tok.pad_id.unwrap_or(eos);
    ensure!(
        (pad as usize) < vocab,
        "`tokenizer.pad_id` {pad} is outside the model's vocab_size {vocab}"
    );
    let mut examples = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let mut ids = tokenizer.encode(t)?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!(
                "{}: example {i} encodes to token {bad}, outside the model's vocab_size {vocab}: tokenizer and model do not match",
                tokenizer_path.display()
            );
        }
        ids.push(eos);
        examples.push(ids);
    }
    let (train_idx, val_idx) = split_indices(examples.len(), data.validation_fraction, seed);
    let layout = if data.layout == "pad" {
        Layout::Pad
    } else {
        Layout::Pack
    };
    let pick =
        |idx: &[usize]| -> Vec<Vec<u32>> { idx.iter().map(|&i| examples[i].clone()).collect() };
    let train = make_rows(&pick(&train_idx), data.seq_len, layout, pad);
    let validation = make_rows(&pick(&val_idx), data.seq_len, layout, pad);
    ensure!(
        !train.is_empty(),
        "{}: no training rows of length {} could be made from {} examples",
        file.display(),
        data.seq_len,
        train_idx.len()
    );
    ensure!(
        data.validation_fraction == 0.0 || !validation.is_empty(),
        "{}: the validation split ({} examples) gives no rows",
        file.display(),
        val_idx.len()
    );
    Ok(Prepared {
        train,
        validation,
        tokenizer: tokenizer_path,
        data_file: file,
        examples: examples.len(),
    })
}

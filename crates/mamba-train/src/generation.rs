//! What the `generate` binary does around [`MambaLM::generate`]: prompts from text, ids or a
//! file, the tokenizer that goes with the model, streamed text, and the JSON report.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use mamba_data::Tokenizer;
use mamba_model::generate::Generated;

use crate::config::TokenizerSection;

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Texts, tokenized with the model's tokenizer.
    Text(Vec<String>),
    /// Token ids, one list per prompt.
    Ids(Vec<Vec<u32>>),
    /// A file: one prompt a line, or JSONL with `field` holding each prompt's text.
    File {
        path: PathBuf,
        field: Option<String>,
    },
}

/// The prompts' texts (when given as text) and token ids.
pub struct Prompts {
    pub texts: Vec<Option<String>>,
    pub ids: Vec<Vec<u32>>,
}

/// Reads `path`: JSONL (each line an object, the prompt in `field`) when `field` is given or the
/// first non-empty line starts with `{`; otherwise one prompt a line. Empty lines are skipped.
pub fn read_prompt_file(path: &Path, field: Option<&str>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--prompt-file {}: cannot read it", path.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    ensure!(
        !lines.is_empty(),
        "--prompt-file {}: no prompts in it (empty file)",
        path.display()
    );
    let jsonl = field.is_some() || lines[0].1.trim_start().starts_with('{');
    if !jsonl {
        return Ok(lines.into_iter().map(|(_, l)| l.to_string()).collect());
    }
    let field = field.unwrap_or("text");
    lines
        .into_iter()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).with_context(|| {
                format!("--prompt-file {} line {}: not JSON", path.display(), i + 1)
            })?;
            match v.get(field) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!(
                    "--prompt-file {} line {}: field `{field}` is {other}, expected a string",
                    path.display(),
                    i + 1
                ),
                None => bail!(
                    "--prompt-file {} line {}: no field `{field}` (pass --field NAME)",
                    path.display(),
                    i + 1
                ),
            }
        })
        .collect()
}

/// The `tokenizer.json` for `model` (a directory or hub id): `explicit` (file, directory or hub
/// id) when given, else the model's own. `None` when neither has one and `required` is false.
pub fn find_tokenizer(
    model: &str,
    explicit: Option<&str>,
    required: bool,
) -> Result<Option<PathBuf>> {
    if let Some(s) = explicit {
        let tok = TokenizerSection {
            source: Some(s.to_string()),
            ..Default::default()
        };
        return crate::data::resolve_tokenizer(&tok, None)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--tokenizer: {e:#}"));
    }
    let dir = mamba_hf::resolve_model_dir(model).ok();
    let found = dir
        .as_ref()
        .map(|d| d.join("tokenizer.json"))
        .filter(|f| f.is_file());
    if found.is_none() && required {
        bail!(
            "no tokenizer.json beside the model {model}: pass --tokenizer <tokenizer.json | directory | hub id> (for the Mamba/Mamba2 checkpoints: tokenizers/gpt-neox-20b/tokenizer.json in this repository), or give --prompt-ids"
        );
    }
    Ok(found)
}

/// Tokenizes or checks the prompts.
pub fn prepare_prompts(source: PromptSource, tokenizer: Option<&Tokenizer>) -> Result<Prompts> {
    let texts = match source {
        PromptSource::Ids(ids) => {
            ensure!(!ids.is_empty(), "--prompt-ids: no ids given");
            return Ok(Prompts {
                texts: vec![None; ids.len()],
                ids,
            });
        }
        PromptSource::Text(t) => t,
        PromptSource::File { path, field } => read_prompt_file(&path, field.as_deref())?,
    };
    let tok = tokenizer.context("text prompts need a tokenizer")?;
    let mut ids = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        ensure!(
            !t.is_empty(),
            "prompt {}: empty text (generation continues a text; give at least one word)",
            i + 1
        );
        let e = tok.encode(t)?;
        ensure!(
            !e.is_empty(),
            "prompt {}: {t:?} tokenizes to no tokens",
            i + 1
        );
        ids.push(e);
    }
    Ok(Prompts {
        texts: texts.into_iter().map(Some).collect(),
        ids,
    })
}

/// Writes the continuation of one prompt as it is decoded: the text of all new tokens so far,
/// less what was already written; text that ends inside a multi-byte character (a lone
/// U+FFFD) waits for the next token.
pub struct TextStream<'a, W: Write> {
    tokenizer: &'a Tokenizer,
    out: W,
    ids: Vec<u32>,
    written: usize,
}

impl<'a, W: Write> TextStream<'a, W> {
    pub fn new(tokenizer: &'a Tokenizer, out: W) -> Self {
        Self {
            tokenizer,
            out,
            ids: Vec::new(),
            written: 0,
        }
    }

    pub fn push(&mut self, id: u32) -> Result<()> {
        self.ids.push(id);
        let text = self.tokenizer.decode_skip_special(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.written {
            return Ok(());
        }
        if let Some(new) = text.get(self.written..) {
            self.out.write_all(new.as_bytes())?;
            self.out.flush()?;
            self.written = text.len();
        }
        Ok(())
    }

    /// Writes what is left (a trailing partial character included) and a newline.
    pub fn finish(mut self) -> Result<()> {
        let text = self.tokenizer.decode_skip_special(&self.ids)?;
        if let Some(rest) = text.get(self.written..) {
            self.out.write_all(rest.as_bytes())?;
        }
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }
}

/// One prompt's report for `--json`: the whole ids (prompt + new), the new tokens' text
/// (special tokens skipped; `null` without a tokenizer), and how it ended.
pub fn report(
    g: &Generated,
    prompt_text: Option<&str>,
    tokenizer: Option<&Tokenizer>,
) -> Result<serde_json::Value> {
    let text = match tokenizer {
        Some(t) => Some(t.decode_skip_special(g.new_ids())?),
        None => None,
    };
    Ok(serde_json::json!({
        "prompt": prompt_text,
        "ids": g.ids,
        "new_ids": g.new_ids(),
        "text": text,
        "new_tokens": g.new_tokens,
        "stopped_at_eos": g.eos,
    }))
}

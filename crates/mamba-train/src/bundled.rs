//! Data that ships inside the binaries, for runs without the Hugging Face hub: the
//! `Abirate/english_quotes` rows the main job trains on (CC BY 4.0; `datasets/english_quotes/`
//! holds the file with its licence and provenance).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

/// `datasets/english_quotes/quotes.jsonl`, 2,508 rows.
const QUOTES: &[u8] = include_bytes!("../../../datasets/english_quotes/quotes.jsonl");
const QUOTES_SHA256: &str = "ebf40b047b04ab2357ba6e9e22c16e07357bf4ecd0be7375293c3a3b77420382";

/// The bundled copy of hub dataset `id`'s `file`, if there is one: written once to a directory
/// under the system's temporary directory (atomically) after its sha256 is checked.
pub fn dataset_file(id: &str, file: &str) -> Result<Option<PathBuf>> {
    if !id.eq_ignore_ascii_case("Abirate/english_quotes") || file != "quotes.jsonl" {
        return Ok(None);
    }
    let digest = hex(&Sha256::digest(QUOTES));
    ensure!(
        digest == QUOTES_SHA256,
        "the bundled english_quotes copy has sha256 {digest}, expected {QUOTES_SHA256}"
    );
    let dir = std::env::temp_dir().join(format!("mamba-burn-english_quotes-{}", &digest[..12]));
    let path = dir.join("quotes.jsonl");
    let fresh = std::fs::metadata(&path).is_ok_and(|m| m.len() == QUOTES.len() as u64);
    if !fresh {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        mamba_hf::checkpoint::write_atomic(&path, QUOTES)?;
    }
    Ok(Some(path))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

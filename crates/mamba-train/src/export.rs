//! What a finished run writes for other tools: a LoRA run's PEFT adapter (and, if asked, the
//! merged model), a full run's model, each in transformers' format with the tokenizer beside it.

use std::path::Path;

use anyhow::{Context, Result};
use mamba_hf::save_model;
use mamba_model::lora::{merge, LoraConfig};
use mamba_model::{MambaBackend, MambaLM};

use crate::config::RunConfig;
use crate::train::save_dtype;

pub fn export_run<B: MambaBackend>(
    cfg: &RunConfig,
    model: &MambaLM<B>,
    lora: Option<&LoraConfig>,
    tokenizer: &Path,
) -> Result<()> {
    let out = &cfg.output.dir;
    let dtype = save_dtype(cfg);
    let base_name = cfg
        .model
        .source
        .clone()
        .unwrap_or_else(|| out.join("base").display().to_string());
    let copy_tokenizer = |dir: &Path| -> Result<()> {
        std::fs::copy(tokenizer, dir.join("tokenizer.json"))
            .with_context(|| format!("copying the tokenizer into {}", dir.display()))?;
        Ok(())
    };
    match lora {
        Some(l) => {
            let dir = out.join("adapter");
            mamba_hf::peft::save_adapter(model, l, &base_name, &dir)?;
            eprintln!("wrote {}", dir.display());
            if cfg.output.export_merged {
                let dir = out.join("merged");
                save_model(&merge(model.clone()), &dir, dtype)?;
                copy_tokenizer(&dir)?;
                eprintln!("wrote {}", dir.display());
            }
        }
        None => {
            let dir = out.join("model");
            save_model(model, &dir, dtype)?;
            copy_tokenizer(&dir)?;
            eprintln!("wrote {}", dir.display());
        }
    }
    Ok(())
}

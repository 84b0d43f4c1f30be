//! Writes checkpoints with mamba-burn's writer for `scripts/check_roundtrip.py`, which loads them
//! in transformers and compares its loss with ours.
//!
//!     cargo run --example export_roundtrip -- <out-dir>
//!
//! For each case it writes `<out>/<case>/` (config.json + model.safetensors, as `save_model`
//! writes them) and `<out>/cases.json` with the token ids and the losses mamba-burn computes
//! (transformers-compatible norm, every next token counted).

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use mamba_burn::hf::{load_model_dir, save_model, SaveDtype};
use mamba_burn::model::{ForwardArgs, Mamba1Config, Mamba2Config, MambaLM, ModelConfig, NormMode};

type B = burn::backend::NdArray<f32>;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: export_roundtrip <out-dir>"),
    );
    std::fs::create_dir_all(&out)?;
    let device = Default::default();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut models: Vec<(String, MambaLM<B>, SaveDtype)> = Vec::new();
    for case in [
        "mamba2_g2_untied_bias_limit",
        "mamba2_g4_bf16_sharded",
        "mamba1_untied_f16",
    ] {
        models.push((
            format!("resaved_{case}"),
            load_model_dir(&fixtures.join(case), NormMode::Hf, &device)?,
            SaveDtype::F32,
        ));
    }
    let m2 = ModelConfig::Mamba2(Mamba2Config {
        vocab_size: 120,
        hidden_size: 48,
        num_heads: 6,
        head_dim: 16,
        state_size: 16,
        n_groups: 3,
        chunk_size: 16,
        num_hidden_layers: 3,
        time_step_rank: 3,
        tie_word_embeddings: true,
        ..Mamba2Config::default()
    })
    .with_norm(NormMode::Hf);
    let m1 = ModelConfig::Mamba1(Mamba1Config {
        vocab_size: 120,
        hidden_size: 48,
        intermediate_size: 96,
        state_size: 8,
        num_hidden_layers: 3,
        time_step_rank: 3,
        use_bias: true,
        tie_word_embeddings: false,
        ..Mamba1Config::default()
    });
    models.push((
        "random_mamba2_g3".into(),
        MambaLM::init(&m2, &device)?,
        SaveDtype::F32,
    ));
    models.push((
        "random_mamba1_bf16".into(),
        MambaLM::init(&m1, &device)?,
        SaveDtype::Bf16,
    ));

    let mut cases = Vec::new();
    for (name, model, dtype) in models {
        let dir = out.join(&name);
        save_model(&model, &dir, dtype)?;
        // Reload what was written (so bf16 rounding is in our number too).
        let model: MambaLM<B> = load_model_dir(&dir, NormMode::Hf, &device)?;
        let vocab = model.config.vocab_size() as i64;
        let ids: Vec<i64> = (0..2 * 41).map(|i| (i * 37 + 11) % vocab).collect();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 41]), &device);
        let loss: f32 = model
            .forward_with(
                t.clone(),
                ForwardArgs {
                    labels: Some(t),
                    ..Default::default()
                },
            )
            .loss
            .unwrap()
            .into_scalar();
        cases.push(serde_json::json!({
            "name": name,
            "model_type": model.config.model_type(),
            "ids": ids.chunks(41).map(|c| c.to_vec()).collect::<Vec<_>>(),
            "loss": loss,
        }));
        eprintln!("{name}: loss {loss}");
    }
    std::fs::write(
        out.join("cases.json"),
        serde_json::to_string_pretty(&cases)?,
    )?;
    Ok(())
}

//! Shared helpers for the end-to-end tests: fixtures written by `scripts/make_fixtures.py`
//! (transformers 5.17), comparisons, small random models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use mamba_burn::hf::checkpoint::TensorSource;
use serde_json::Value;

pub type Cpu = burn::backend::NdArray<f32>;
pub type CpuAd = burn::backend::Autodiff<Cpu>;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The repository's own root: the data the tests read (english_quotes, the GPT-NeoX tokenizer,
/// model configs) is vendored there, so nothing outside the checkout is needed.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The bundled english_quotes rows.
pub fn quotes() -> PathBuf {
    repo_root().join("datasets/english_quotes/quotes.jsonl")
}

/// A model config under `configs/models/`.
pub fn model_config(name: &str) -> PathBuf {
    repo_root().join("configs/models").join(name)
}

pub struct Reference {
    pub dir: PathBuf,
    pub json: Value,
    pub tensors: TensorSource,
}

impl Reference {
    pub fn load(case: &str) -> Self {
        let dir = fixtures().join(case);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tensors = TensorSource::open(&[dir.join("reference.safetensors")]).unwrap();
        Self { dir, json, tensors }
    }

    /// A reference tensor; keys are stored as written (`logits`, `grad.backbone...`).
    pub fn tensor(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
        // TensorSource normalises keys to transformers' form; reference keys have no
        // `backbone.` prefix of their own, so look both ways.
        self.tensors
            .read_f32(&format!("backbone.{key}"))
            .or_else(|_| self.tensors.read_f32(key))
            .unwrap_or_else(|e| panic!("reference tensor {key}: {e}"))
    }

    pub fn ids(&self, key: &str) -> Vec<Vec<i64>> {
        serde_json::from_value(self.json[key].clone()).unwrap()
    }

    pub fn u32s(&self, key: &str) -> Vec<u32> {
        serde_json::from_value(self.json[key].clone()).unwrap()
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.json[key]
            .as_f64()
            .unwrap_or_else(|| panic!("reference.json has no number `{key}`"))
    }
}

pub fn int_tensor<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), rows[0].len()]), device)
}

pub fn float_tensor<B: Backend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2> {
    let data: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), rows[0].len()]), device)
}

pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// Max |a - b|; NaN anywhere fails.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut m = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert!(
            x.is_finite() && y.is_finite(),
            "non-finite value: {x} vs {y}"
        );
        m = m.max((x - y).abs());
    }
    m
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere fails.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        assert!(
            x.is_finite() && y.is_finite(),
            "non-finite value: {x} vs {y}"
        );
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    assert!(den > 0.0, "reference is all zeros");
    (num / den).sqrt()
}

/// `model` with LoRA r 4 on every projection, the embeddings and an untied head, every adapter
/// made nonzero (B starts at zero) so that each one carries gradient signal.
pub fn lora_model(model: mamba_burn::model::MambaLM<CpuAd>) -> mamba_burn::model::MambaLM<CpuAd> {
    use burn::module::{Module, Param};
    use mamba_burn::model::lora::{apply_lora, LoraConfig, LoraTargets};
    let mut targets = vec!["in_proj", "out_proj", "x_proj", "dt_proj", "embeddings"];
    if model.lm_head.is_some() {
        targets.push("lm_head");
    }
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: LoraTargets::Names(targets.iter().map(|s| s.to_string()).collect()),
    };
    let (model, _) = apply_lora(model, &cfg, &Default::default()).unwrap();
    struct Noisy;
    impl burn::module::ModuleMapper<CpuAd> for Noisy {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<CpuAd, D>>,
        ) -> Param<Tensor<CpuAd, D>> {
            if !param.is_require_grad() {
                return param;
            }
            param.map(|t| {
                let noise = Tensor::random(
                    t.shape(),
                    burn::tensor::Distribution::Normal(0.0, 0.05),
                    &t.device(),
                );
                (t + noise).detach().require_grad()
            })
        }
    }
    model.map(&mut Noisy)
}

/// The `(step, loss)` records of a run's `metrics.jsonl`.
pub fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

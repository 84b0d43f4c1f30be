//! Resumable checkpoints: `checkpoints/step-NNNNNNNN/` written into a temporary directory and
//! renamed, so a killed run never leaves a half-written one.
//!
//! A full fine-tune's checkpoint holds the model record; a LoRA run's holds only what trains:
//! `trainable.safetensors` (each trainable parameter under its module path, its burn `ParamId`
//! in the metadata so that the optimizer record's state finds it again) and, in `state.json`, a
//! fingerprint of the frozen base (its config and parameter counts) that `--resume` checks. A
//! 7B base is ~29 GB in f32; its adapters and their AdamW moments are a few MB.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use mamba_model::{MambaBackend, MambaLM};
use serde::{Deserialize, Serialize};

pub type Rec = NamedMpkFileRecorder<FullPrecisionSettings>;

/// The file of a LoRA checkpoint's trainable parameters.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";

/// Saved trainable tensors by module path: (id, shape, values).
type SavedParams = HashMap<String, (ParamId, Vec<usize>, Vec<f32>)>;

/// What `state.json` holds besides the records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    pub initial_val_loss: Option<f64>,
    /// The frozen base of an adapter-only checkpoint.
    #[serde(default)]
    pub base: Option<BaseFingerprint>,
    /// The number of data-parallel devices that wrote it (`None` before data parallelism: 1).
    /// A resume on another number continues exactly (the global batch is the same, split
    /// otherwise); the log says so.
    #[serde(default)]
    pub devices: Option<usize>,
}

/// Identifies the base model an adapter-only checkpoint was trained on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseFingerprint {
    /// The model config as transformers' `config.json` text.
    pub config: String,
    pub total_params: usize,
    pub trainable_params: usize,
}

impl BaseFingerprint {
    pub fn of<B: MambaBackend>(model: &MambaLM<B>) -> Self {
        let (total, trainable) = crate::train::count_params(model);
        Self {
            config: mamba_hf::config::config_to_json(&model.config),
            total_params: total,
            trainable_params: trainable,
        }
    }
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Complete checkpoints (`step-NNNNNNNN` directories with a `state.json`), oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(out))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Module paths (`layers.3.mixer.in_proj.lora.a`) of the float parameters a visitor sees.
#[derive(Default)]
struct Path_ {
    stack: Vec<String>,
}

impl Path_ {
    fn enter(&mut self, name: &str) {
        self.stack.push(name.to_string());
    }
    fn exit(&mut self) {
        self.stack.pop();
    }
    fn key(&self) -> String {
        self.stack.join(".")
    }
}

/// Collects the trainable parameters: (path, id, shape, values).
struct Trainable {
    path: Path_,
    out: Vec<(String, ParamId, Vec<usize>, Vec<f32>)>,
}

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Trainable {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let t = param.val();
        let shape = t.dims().to_vec();
        let values = t.into_data().convert::<f32>().into_vec().expect("f32 data");
        self.out.push((self.path.key(), param.id, shape, values));
    }
}

/// Puts saved values and ids back into the trainable parameters.
struct Restore<'a, B: burn::tensor::backend::Backend> {
    path: Path_,
    saved: &'a SavedParams,
    device: B::Device,
    restored: usize,
    errors: Vec<String>,
}

impl<B: burn::tensor::backend::Backend> ModuleMapper<B> for Restore<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if !param.is_require_grad() {
            return param;
        }
        let key = self.path.key();
        let Some((id, shape, values)) = self.saved.get(&key) else {
            self.errors.push(format!(
                "`{key}` is trainable here but not in the checkpoint"
            ));
            return param;
        };
        if shape.as_slice() != param.shape().dims::<D>().as_slice() {
            self.errors.push(format!(
                "`{key}`: shape {shape:?} in the checkpoint, {:?} in the model",
                param.shape().dims::<D>()
            ));
            return param;
        }
        self.restored += 1;
        let t =
            Tensor::<B, D>::from_data(TensorData::new(values.clone(), shape.clone()), &self.device);
        Param::initialized(*id, t.require_grad())
    }
}

/// Writes `checkpoints/step-N` atomically (a temporary directory, then a rename); older
/// checkpoints beyond `keep` are removed only once the new one is complete. `adapter_only`
/// writes the trainable parameters instead of the whole model.
#[allow(clippy::too_many_arguments)]
pub fn save<A: AutodiffBackend + MambaBackend, O: Optimizer<MambaLM<A>, A>>(
    out: &Path,
    model: &MambaLM<A>,
    optim: &O,
    recorder: &Rec,
    state: &TrainState,
    keep: usize,
    adapter_only: bool,
) -> Result<()> {
    let root = checkpoints_dir(out);
    let step = state.step;
    let tmp = root.join(format!(".tmp-step-{step:08}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if adapter_only {
        let mut t = Trainable {
            path: Path_::default(),
            out: Vec::new(),
        };
        model.visit(&mut t);
        write_trainable(&tmp.join(TRAINABLE_FILE), &t.out)?;
    } else {
        model
            .clone()
            .save_file(tmp.join("model"), recorder)
            .context("saving the model record")?;
    }
    recorder
        .record(optim.to_record(), tmp.join("optimizer"))
        .context("saving the optimizer record")?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string(state)?)?;
    let dst = root.join(format!("step-{step:08}"));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    let all = list_checkpoints(out);
    if all.len() > keep.max(1) {
        for (_, old) in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(())
}

fn write_trainable(path: &Path, params: &[(String, ParamId, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(k, _, s, v)| (k.clone(), s.clone(), bytemuck_f32(v)))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta: HashMap<String, String> = params
        .iter()
        .map(|(k, id, _, _)| (format!("id.{k}"), id.serialize()))
        .collect();
    let data = safetensors::serialize(views, Some(meta))?;
    mamba_hf::checkpoint::write_atomic(path, &data)?;
    Ok(())
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_trainable(path: &Path) -> Result<SavedParams> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let ids = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        ensure!(
            view.dtype() == safetensors::Dtype::F32,
            "{}: `{name}` is {:?}, expected F32",
            path.display(),
            view.dtype()
        );
        let id = ids
            .get(&format!("id.{name}"))
            .and_then(|s| ParamId::try_deserialize(s))
            .with_context(|| format!("{}: no parameter id for `{name}`", path.display()))?;
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (id, view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Loads checkpoint `dir` into `model` (its trainable parameters for an adapter-only one, after
/// checking the base's fingerprint) and returns the model, the optimizer record and the state.
pub fn load<A: AutodiffBackend + MambaBackend, O: Optimizer<MambaLM<A>, A>>(
    dir: &Path,
    model: MambaLM<A>,
    optim: O,
    recorder: &Rec,
    device: &A::Device,
) -> Result<(MambaLM<A>, O, TrainState)> {
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("reading {}", dir.join("state.json").display()))?,
    )
    .with_context(|| format!("parsing {}", dir.join("state.json").display()))?;
    let trainable = dir.join(TRAINABLE_FILE);
    let model = if trainable.is_file() {
        let here = BaseFingerprint::of(&model);
        if let Some(saved) = &state.base {
            if saved != &here {
                bail!(
                    "{}: this checkpoint was trained on another base model (checkpoint: {} parameters, {} trainable, config {}; now: {} parameters, {} trainable, config {}). Resume with the run's own model.source and lora settings",
                    dir.display(),
                    saved.total_params,
                    saved.trainable_params,
                    saved.config,
                    here.total_params,
                    here.trainable_params,
                    here.config
                );
            }
        }
        let saved = read_trainable(&trainable)?;
        let mut r = Restore::<A> {
            path: Path_::default(),
            saved: &saved,
            device: device.clone(),
            restored: 0,
            errors: Vec::new(),
        };
        let model = model.map(&mut r);
        if r.errors.is_empty() && r.restored != saved.len() {
            r.errors.push(format!(
                "the checkpoint holds {} trainable tensors, the model {}",
                saved.len(),
                r.restored
            ));
        }
        ensure!(
            r.errors.is_empty(),
            "{}: does not match this model: {}",
            trainable.display(),
            r.errors.join("; ")
        );
        model
    } else {
        model
            .load_file(dir.join("model"), recorder, device)
            .with_context(|| format!("loading checkpoint {}", dir.display()))?
    };
    let rec = recorder
        .load(dir.join("optimizer"), device)
        .with_context(|| format!("loading optimizer state from {}", dir.display()))?;
    Ok((model, optim.load_record(rec), state))
}

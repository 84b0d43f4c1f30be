//! Safetensors checkpoints in and out, with transformers' key names and shapes.
//!
//! Loading reads `model.safetensors`, `model-0000k-of-0000n.safetensors` + index, or
//! `consolidated.safetensors` (Codestral), in f32/f16/bf16/f64, upcast to f32. Keys follow
//! `*ForCausalLM` (`backbone.embeddings.weight`, ...); mamba_ssm's `backbone.embedding.weight` and
//! a base model's unprefixed keys are accepted too. Before any tensor is built, the file's keys and
//! shapes are compared with what the config expects, and every missing, unexpected or misshapen
//! tensor is listed in one error.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use mamba_model::mamba1::{Mamba1Dims, Mamba1Mixer};
use mamba_model::mamba2::{Mamba2Dims, Mamba2Mixer};
use mamba_model::nn::{Embedding, Linear, RmsNorm};
use mamba_model::{Block, MambaLM, Mixer, ModelConfig};
use safetensors::{Dtype, SafeTensors};

use crate::{io_err, HfError};

/// Storage dtype for saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

/// The tensors a config expects, with their shapes, in transformers' naming.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let h = config.hidden_size();
    out.push((
        "backbone.embeddings.weight".to_string(),
        vec![config.vocab_size(), h],
    ));
    for i in 0..config.num_layers() {
        let p = format!("backbone.layers.{i}.");
        out.push((format!("{p}norm.weight"), vec![h]));
        match config {
            ModelConfig::Mamba2(c) => {
                let inner = c.intermediate_size();
                let conv = c.conv_dim();
                let proj = c.in_proj_size();
                out.push((format!("{p}mixer.in_proj.weight"), vec![proj, h]));
                if c.use_bias {
                    out.push((format!("{p}mixer.in_proj.bias"), vec![proj]));
                }
                out.push((
                    format!("{p}mixer.conv1d.weight"),
                    vec![conv, 1, c.conv_kernel],
                ));
                if c.use_conv_bias {
                    out.push((format!("{p}mixer.conv1d.bias"), vec![conv]));
                }
                out.push((format!("{p}mixer.dt_bias"), vec![c.num_heads]));
                out.push((format!("{p}mixer.A_log"), vec![c.num_heads]));
                out.push((format!("{p}mixer.D"), vec![c.num_heads]));
                out.push((format!("{p}mixer.norm.weight"), vec![inner]));
                out.push((format!("{p}mixer.out_proj.weight"), vec![h, inner]));
                if c.use_bias {
                    out.push((format!("{p}mixer.out_proj.bias"), vec![h]));
                }
            }
            ModelConfig::Mamba1(c) => {
                let inner = c.intermediate_size;
                let (r, n) = (c.time_step_rank, c.state_size);
                out.push((format!("{p}mixer.in_proj.weight"), vec![2 * inner, h]));
                if c.use_bias {
                    out.push((format!("{p}mixer.in_proj.bias"), vec![2 * inner]));
                }
                out.push((
                    format!("{p}mixer.conv1d.weight"),
                    vec![inner, 1, c.conv_kernel],
                ));
                if c.use_conv_bias {
                    out.push((format!("{p}mixer.conv1d.bias"), vec![inner]));
                }
                out.push((format!("{p}mixer.x_proj.weight"), vec![r + 2 * n, inner]));
                out.push((format!("{p}mixer.dt_proj.weight"), vec![inner, r]));
                out.push((format!("{p}mixer.dt_proj.bias"), vec![inner]));
                out.push((format!("{p}mixer.A_log"), vec![inner, n]));
                out.push((format!("{p}mixer.D"), vec![inner]));
                out.push((format!("{p}mixer.out_proj.weight"), vec![h, inner]));
                if c.use_bias {
                    out.push((format!("{p}mixer.out_proj.bias"), vec![h]));
                }
            }
        }
    }
    out.push(("backbone.norm_f.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings() {
        out.push(("lm_head.weight".to_string(), vec![config.vocab_size(), h]));
    }
    out
}

/// The weight files of a checkpoint directory, in order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(shard_files(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect());
    }
    let consolidated = dir.join("consolidated.safetensors");
    if consolidated.is_file() {
        return Ok(vec![consolidated]);
    }
    Err(HfError::NotFound {
        what: dir.display().to_string(),
        message:
            "no model.safetensors, model.safetensors.index.json or consolidated.safetensors in it"
                .into(),
    })
}

/// The distinct shard file names an index's `weight_map` names.
pub fn shard_files(index: &Path) -> Result<Vec<String>, HfError> {
    let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| HfError::Json {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| HfError::Json {
            path: index.to_path_buf(),
            message: "missing object `weight_map`".into(),
        })?;
    let mut files: Vec<String> = Vec::new();
    for (key, f) in map {
        let f = f.as_str().ok_or_else(|| HfError::Json {
            path: index.to_path_buf(),
            message: format!("`weight_map.{key}` is not a file name"),
        })?;
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// Memory-mapped safetensors files and where each (normalised) key lives.
pub struct TensorSource {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    /// normalised key → (file index, key in file)
    index: BTreeMap<String, (usize, String)>,
}

/// transformers' key for a key found in a file: `embedding.` → `embeddings.` (mamba_ssm), and a
/// base model's keys get the `backbone.` prefix.
fn normalise_key(key: &str) -> String {
    let key = if key.starts_with("backbone.") || key.starts_with("lm_head.") {
        key.to_string()
    } else {
        format!("backbone.{key}")
    };
    key.replacen("backbone.embedding.", "backbone.embeddings.", 1)
}

impl TensorSource {
    pub fn open(files: &[PathBuf]) -> Result<Self, HfError> {
        let mut maps = Vec::new();
        let mut index = BTreeMap::new();
        for (fi, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| io_err(path, e))?;
            // SAFETY: the map is read-only and lives as long as `self`; a checkpoint modified
            // while loading is outside what any loader can guard against.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
            let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| HfError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for key in meta.tensors().keys() {
                if let Some((prev, _)) = index.insert(normalise_key(key), (fi, key.clone())) {
                    if prev != fi {
                        return Err(HfError::Safetensors {
                            path: path.clone(),
                            message: format!(
                                "tensor `{key}` also appears in {}",
                                files[prev].display()
                            ),
                        });
                    }
                }
            }
            maps.push((path.clone(), map));
        }
        Ok(Self { maps, index })
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let (fi, k) = self.index.get(key)?;
        let st = SafeTensors::deserialize(&self.maps[*fi].1).ok()?;
        st.tensor(k).ok().map(|t| t.shape().to_vec())
    }

    /// The tensor as f32 values and its shape.
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>), HfError> {
        let (fi, k) = self.index.get(key).ok_or_else(|| HfError::Safetensors {
            path: self.maps.first().map(|m| m.0.clone()).unwrap_or_default(),
            message: format!("no tensor `{key}`"),
        })?;
        let (path, map) = &self.maps[*fi];
        let st = SafeTensors::deserialize(map).map_err(|e| HfError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let view = st.tensor(k).map_err(|e| HfError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(HfError::Safetensors {
                    path: path.clone(),
                    message: format!(
                        "tensor `{k}` has dtype {other:?}; expected F32, F16, BF16 or F64"
                    ),
                });
            }
        };
        Ok((values, view.shape().to_vec()))
    }
}

/// Compare the file's tensors with what `config` expects. Infers `d_mlp` for Mamba2 when the
/// in_proj is wider by an even amount, as transformers does.
pub fn check_tensors(
    config: &mut ModelConfig,
    src: &TensorSource,
    what: &Path,
) -> Result<(), HfError> {
    if let ModelConfig::Mamba2(c) = config {
        if let Some(shape) = src.shape("backbone.layers.0.mixer.in_proj.weight") {
            let base = c.in_proj_size() - 2 * c.d_mlp;
            if shape.len() == 2 && shape[0] > base && (shape[0] - base) % 2 == 0 {
                c.d_mlp = (shape[0] - base) / 2;
            }
        }
    }
    let expected = expected_tensors(config);
    let mut missing = Vec::new();
    let mut misshapen = Vec::new();
    for (key, shape) in &expected {
        match src.shape(key) {
            None => missing.push(key.clone()),
            Some(s) if &s != shape => {
                misshapen.push(format!("{key}: expected {shape:?}, found {s:?}"))
            }
            Some(_) => {}
        }
    }
    let tied = config.tie_word_embeddings();
    let unexpected: Vec<String> = src
        .keys()
        .filter(|k| !expected.iter().any(|(e, _)| e == *k))
        // A tied checkpoint may still carry the head (transformers ignores it).
        .filter(|k| !(tied && k.as_str() == "lm_head.weight"))
        .cloned()
        .collect();
    if missing.is_empty() && misshapen.is_empty() && unexpected.is_empty() {
        Ok(())
    } else {
        Err(HfError::Tensors {
            path: what.to_path_buf(),
            missing,
            unexpected,
            misshapen,
        })
    }
}

fn param<B: Backend, const D: usize>(
    src: &TensorSource,
    key: &str,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Param<Tensor<B, D>>, HfError> {
    let (values, _) = src.read_f32(key)?;
    Ok(Param::from_tensor(Tensor::from_data(
        TensorData::new(values, shape),
        device,
    )))
}

fn linear<B: Backend>(
    src: &TensorSource,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>, HfError> {
    Ok(Linear {
        weight: param(src, &format!("{prefix}.weight"), [d_out, d_in], device)?,
        bias: if bias {
            Some(param(src, &format!("{prefix}.bias"), [d_out], device)?)
        } else {
            None
        },
        lora: None,
    })
}

/// Build the model from checked tensors.
pub fn build_model<B: Backend>(
    config: &ModelConfig,
    src: &TensorSource,
    device: &B::Device,
) -> Result<MambaLM<B>, HfError> {
    let h = config.hidden_size();
    let eps = config.layer_norm_epsilon();
    let vocab = config.vocab_size();
    let mut layers = Vec::with_capacity(config.num_layers());
    for i in 0..config.num_layers() {
        let p = format!("backbone.layers.{i}.");
        let norm = RmsNorm {
            weight: param(src, &format!("{p}norm.weight"), [h], device)?,
            eps,
        };
        let mixer = match config {
            ModelConfig::Mamba2(c) => {
                let dims = Mamba2Dims::from_config(c);
                let conv = dims.conv_dim();
                Mixer::Mamba2(Mamba2Mixer {
                    in_proj: linear(
                        src,
                        &format!("{p}mixer.in_proj"),
                        h,
                        c.in_proj_size(),
                        c.use_bias,
                        device,
                    )?,
                    conv1d_weight: param(
                        src,
                        &format!("{p}mixer.conv1d.weight"),
                        [conv, c.conv_kernel],
                        device,
                    )?,
                    conv1d_bias: if c.use_conv_bias {
                        Some(param(
                            src,
                            &format!("{p}mixer.conv1d.bias"),
                            [conv],
                            device,
                        )?)
                    } else {
                        None
                    },
                    dt_bias: param(src, &format!("{p}mixer.dt_bias"), [c.num_heads], device)?,
                    a_log: param(src, &format!("{p}mixer.A_log"), [c.num_heads], device)?,
                    d: param(src, &format!("{p}mixer.D"), [c.num_heads], device)?,
                    norm_weight: param(
                        src,
                        &format!("{p}mixer.norm.weight"),
                        [dims.intermediate],
                        device,
                    )?,
                    out_proj: linear(
                        src,
                        &format!("{p}mixer.out_proj"),
                        dims.intermediate,
                        h,
                        c.use_bias,
                        device,
                    )?,
                    dims,
                })
            }
            ModelConfig::Mamba1(c) => {
                let inner = c.intermediate_size;
                let (r, n) = (c.time_step_rank, c.state_size);
                Mixer::Mamba1(Mamba1Mixer {
                    in_proj: linear(
                        src,
                        &format!("{p}mixer.in_proj"),
                        h,
                        2 * inner,
                        c.use_bias,
                        device,
                    )?,
                    conv1d_weight: param(
                        src,
                        &format!("{p}mixer.conv1d.weight"),
                        [inner, c.conv_kernel],
                        device,
                    )?,
                    conv1d_bias: if c.use_conv_bias {
                        Some(param(
                            src,
                            &format!("{p}mixer.conv1d.bias"),
                            [inner],
                            device,
                        )?)
                    } else {
                        None
                    },
                    x_proj: linear(
                        src,
                        &format!("{p}mixer.x_proj"),
                        inner,
                        r + 2 * n,
                        false,
                        device,
                    )?,
                    dt_proj: linear(src, &format!("{p}mixer.dt_proj"), r, inner, true, device)?,
                    a_log: param(src, &format!("{p}mixer.A_log"), [inner, n], device)?,
                    d: param(src, &format!("{p}mixer.D"), [inner], device)?,
                    out_proj: linear(
                        src,
                        &format!("{p}mixer.out_proj"),
                        inner,
                        h,
                        c.use_bias,
                        device,
                    )?,
                    dims: Mamba1Dims {
                        hidden: h,
                        intermediate: inner,
                        state: n,
                        dt_rank: r,
                        conv_kernel: c.conv_kernel,
                    },
                })
            }
        };
        layers.push(Block { norm, mixer });
    }
    Ok(MambaLM {
        embeddings: Embedding {
            weight: param(src, "backbone.embeddings.weight", [vocab, h], device)?,
            lora: None,
        },
        layers,
        norm_f: RmsNorm {
            weight: param(src, "backbone.norm_f.weight", [h], device)?,
            eps,
        },
        lm_head: if config.tie_word_embeddings() {
            None
        } else {
            Some(linear(src, "lm_head", h, vocab, false, device)?)
        },
        config: config.clone(),
        compute: mamba_model::Compute::F32,
    })
}

/// Visits every parameter of a model under its transformers key, with the shape the checkpoint
/// stores it in (conv weights are `[C, 1, K]` on disk, `[C, K]` in the module).
pub trait NamedParamVisitor<B: Backend> {
    fn visit<const D: usize>(
        &mut self,
        key: String,
        param: &Param<Tensor<B, D>>,
        hf_shape: Vec<usize>,
    );
}

/// Walk `model`'s parameters in checkpoint order.
pub fn visit_named_params<B: Backend, V: NamedParamVisitor<B>>(model: &MambaLM<B>, v: &mut V) {
    fn plain<B: Backend, V: NamedParamVisitor<B>, const D: usize>(
        v: &mut V,
        key: String,
        p: &Param<Tensor<B, D>>,
    ) {
        let shape = p.dims().to_vec();
        v.visit(key, p, shape);
    }
    fn lin<B: Backend, V: NamedParamVisitor<B>>(v: &mut V, prefix: &str, l: &Linear<B>) {
        plain(v, format!("{prefix}.weight"), &l.weight);
        if let Some(b) = &l.bias {
            plain(v, format!("{prefix}.bias"), b);
        }
    }
    fn conv<B: Backend, V: NamedParamVisitor<B>>(
        v: &mut V,
        p: &str,
        w: &Param<Tensor<B, 2>>,
        b: &Option<Param<Tensor<B, 1>>>,
    ) {
        let [c, k] = w.dims();
        v.visit(format!("{p}mixer.conv1d.weight"), w, vec![c, 1, k]);
        if let Some(b) = b {
            plain(v, format!("{p}mixer.conv1d.bias"), b);
        }
    }
    plain(
        v,
        "backbone.embeddings.weight".into(),
        &model.embeddings.weight,
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("backbone.layers.{i}.");
        plain(v, format!("{p}norm.weight"), &layer.norm.weight);
        match &layer.mixer {
            Mixer::Mamba2(m) => {
                lin(v, &format!("{p}mixer.in_proj"), &m.in_proj);
                conv(v, &p, &m.conv1d_weight, &m.conv1d_bias);
                plain(v, format!("{p}mixer.dt_bias"), &m.dt_bias);
                plain(v, format!("{p}mixer.A_log"), &m.a_log);
                plain(v, format!("{p}mixer.D"), &m.d);
                plain(v, format!("{p}mixer.norm.weight"), &m.norm_weight);
                lin(v, &format!("{p}mixer.out_proj"), &m.out_proj);
            }
            Mixer::Mamba1(m) => {
                lin(v, &format!("{p}mixer.in_proj"), &m.in_proj);
                conv(v, &p, &m.conv1d_weight, &m.conv1d_bias);
                lin(v, &format!("{p}mixer.x_proj"), &m.x_proj);
                lin(v, &format!("{p}mixer.dt_proj"), &m.dt_proj);
                plain(v, format!("{p}mixer.A_log"), &m.a_log);
                plain(v, format!("{p}mixer.D"), &m.d);
                lin(v, &format!("{p}mixer.out_proj"), &m.out_proj);
            }
        }
    }
    plain(v, "backbone.norm_f.weight".into(), &model.norm_f.weight);
    if let Some(head) = &model.lm_head {
        lin(v, "lm_head", head);
    }
}

/// Named f32 tensors: key, checkpoint shape, values.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The model's tensors under transformers' names and shapes.
pub fn export_tensors<B: Backend>(model: &MambaLM<B>) -> NamedTensors {
    struct Collect(NamedTensors);
    impl<B: Backend> NamedParamVisitor<B> for Collect {
        fn visit<const D: usize>(
            &mut self,
            key: String,
            param: &Param<Tensor<B, D>>,
            hf_shape: Vec<usize>,
        ) {
            let values: Vec<f32> = param
                .val()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 data");
            self.0.push((key, hf_shape, values));
        }
    }
    let mut c = Collect(Vec::new());
    visit_named_params(model, &mut c);
    c.0
}

/// The gradients of a model's parameters under transformers' names (parameters without a
/// gradient are left out).
pub fn export_grads<B: burn::tensor::backend::AutodiffBackend>(
    model: &MambaLM<B>,
    grads: &B::Gradients,
) -> NamedTensors {
    struct Collect<'a, B: burn::tensor::backend::AutodiffBackend>(NamedTensors, &'a B::Gradients);
    impl<B: burn::tensor::backend::AutodiffBackend> NamedParamVisitor<B> for Collect<'_, B> {
        fn visit<const D: usize>(
            &mut self,
            key: String,
            param: &Param<Tensor<B, D>>,
            hf_shape: Vec<usize>,
        ) {
            if let Some(g) = param.val().grad(self.1) {
                let values: Vec<f32> = g.into_data().convert::<f32>().into_vec().expect("f32 data");
                self.0.push((key, hf_shape, values));
            }
        }
    }
    let mut c = Collect::<B>(Vec::new(), grads);
    visit_named_params(model, &mut c);
    c.0
}

/// Serialise named f32 tensors to safetensors bytes in `dtype`, with `{"format": "pt"}`
/// metadata as transformers expects.
pub fn to_safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: SaveDtype,
) -> Result<Vec<u8>, HfError> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, s, v)| {
            let bytes = match dtype {
                SaveDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                SaveDtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                SaveDtype::Bf16 => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
            };
            (k.clone(), s.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::F16 => Dtype::F16,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = encoded
        .iter()
        .map(|(k, s, b)| {
            safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| HfError::Safetensors {
                    path: PathBuf::from(k),
                    message: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).map_err(|e| HfError::Safetensors {
        path: PathBuf::new(),
        message: e.to_string(),
    })
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HfError> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}

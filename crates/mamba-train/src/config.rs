//! The run config (TOML): sections model, tokenizer, data, train, lora, output, device. Unknown
//! keys are rejected; every key can be overridden with `--set section.key=value`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub output: OutputSection,
    #[serde(default)]
    pub device: DeviceSection,
    #[serde(default)]
    pub nodes: NodesSection,
}

/// Several processes (machines) in one data-parallel run, joined by burn-collective's
/// orchestrator (as torchrun's `--nnodes`, `--node_rank`, `--master_addr`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodesSection {
    /// Processes in the run, each with the same number of devices (`train.devices`); 1: this
    /// process alone.
    pub count: usize,
    /// This process's place, `0..count`. Node 0 starts the orchestrator and alone validates,
    /// logs, checkpoints and exports; the others only train (a resume reads `output.dir`, so it
    /// must hold node 0's checkpoints on every node: a shared directory, or a copy).
    pub rank: usize,
    /// The orchestrator, `ws://host:port`; node 0 listens on that port.
    pub orchestrator: Option<String>,
    /// This node's data service as the other nodes reach it, `ws://host:port`; it listens on that
    /// port.
    pub address: Option<String>,
}

impl Default for NodesSection {
    fn default() -> Self {
        Self {
            count: 1,
            rank: 0,
            orchestrator: None,
            address: None,
        }
    }
}

/// Why `nodes.count` > 1 is refused: what the loopback test (tests/parallel.rs, ignored) shows.
pub const NODES_BLOCKED: &str = "`nodes.count` > 1: training across processes is refused: burn-collective 0.21's cross-process all-reduce finishes only its first operation and then waits forever (its SyncService::sync clears a copy of the list of synced peers, not the list, so every later barrier waits for a set it can never see; two processes on loopback hang at the second all-reduce of the first step). Use several devices in one process (`--device cuda:0,cuda:1` or `cuda:all`); set MAMBA_ALLOW_MULTI_NODE=1 to try it anyway";

/// Set to try several processes despite [`NODES_BLOCKED`].
pub const ALLOW_NODES_ENV: &str = "MAMBA_ALLOW_MULTI_NODE";

/// The port of a `ws://host:port[/...]` address, or an error naming `key`.
pub fn ws_port(key: &str, address: &str) -> Result<u16> {
    let rest = address.strip_prefix("ws://").with_context(|| {
        format!("`{key}` = {address:?}: expected ws://host:port (burn-collective speaks WebSocket)")
    })?;
    let host_port = rest.split('/').next().unwrap_or_default();
    let port = host_port
        .rsplit_once(':')
        .map(|(_, p)| p)
        .with_context(|| format!("`{key}` = {address:?}: no port (ws://host:port)"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("`{key}` = {address:?}: the port {port:?} is not a port number"))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A local model directory or a hub id (`owner/name[@revision]`).
    pub source: Option<String>,
    /// Random init from a model config JSON (transformers or mamba_ssm format).
    pub init: Option<PathBuf>,
    /// Mamba2 gated norm: `grouped` or `hf`.
    #[serde(default = "default_norm")]
    pub norm: String,
}

fn default_norm() -> String {
    "grouped".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// `tokenizer.json` path, a directory holding one, or a hub id; default: the model's directory.
    pub source: Option<String>,
    /// End-of-sequence id appended to every example; default: the model config's `eos_token_id`.
    pub eos_id: Option<u32>,
    /// Padding id (labels are `-100` there anyway); default: the model config's `pad_token_id`,
    /// else the EOS id.
    pub pad_id: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A local file (`.jsonl`, `.json`, `.csv`, text) or a hub dataset id.
    pub source: String,
    /// File inside a hub dataset repository (e.g. `quotes.jsonl`).
    pub file: Option<String>,
    /// The field holding the text ...
    pub field: Option<String>,
    /// ... or a template such as `{quote} — {author}`.
    pub template: Option<String>,
    #[serde(default = "default_val_fraction")]
    pub validation_fraction: f64,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// `pack` (concatenate and cut) or `pad` (one example a row).
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Use only the first N examples (after reading, before the split).
    pub max_examples: Option<usize>,
}

fn default_val_fraction() -> f64 {
    0.1
}
fn default_seq_len() -> usize {
    128
}
fn default_layout() -> String {
    "pack".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps.
    pub steps: u64,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    /// Cosine decay ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay, never applied to A_log, D, dt_bias, norms and biases.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm gradient clipping; 0 disables.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Validate every N steps (and at the end); 0: only at the end.
    pub eval_every: u64,
    /// At most this many validation batches per evaluation (0: all).
    pub eval_batches: usize,
    pub log_every: u64,
    /// Write a resumable checkpoint every N steps; 0: none.
    pub checkpoint_every: u64,
    /// Complete checkpoints kept.
    pub keep_checkpoints: usize,
    /// Keep only each block's input and re-run the block in backward (transformers'
    /// `gradient_checkpointing`): the same loss and gradients in far less memory.
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`: checkpoint blocks `0, k, 2k, …` only (1: every block;
    /// larger trades memory back for speed).
    pub checkpoint_every_k_blocks: usize,
    /// Tokens per chunk of the LM head + loss (the logits of one chunk exist at a time); 0
    /// picks 2^26 logits per chunk.
    pub loss_chunk_tokens: usize,
    /// `"f32"`, `"bf16-mixed"` (f32 masters and optimizer state, bf16 matmuls and
    /// activations, f32 reductions; the frozen base stored in bf16) or `"bf16"` (no masters),
    /// as Lightning names them.
    pub precision: String,
    /// Data parallelism: the devices to train on, one model replica each (`["cuda:0",
    /// "cuda:1"]`, `["cuda:all"]`; `["cpu", "cpu"]` runs CPU replicas). `batch_size` is the
    /// global batch, split evenly over them. Empty (the default): `device.name`.
    pub devices: Vec<String>,
}

impl TrainSection {
    /// `precision`, parsed (validated when the config loads).
    pub fn precision(&self) -> mamba_model::Precision {
        self.precision.parse().unwrap_or_default()
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-3,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 50,
            eval_batches: 0,
            log_every: 10,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            gradient_checkpointing: false,
            checkpoint_every_k_blocks: 1,
            loss_chunk_tokens: 0,
            precision: "f32".into(),
            devices: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub enabled: bool,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (`in_proj`, `out_proj`, `x_proj`, `dt_proj`, `embeddings`, `lm_head`) ...
    pub target_modules: Vec<String>,
    /// ... or a regex over full module keys (`backbone.layers.\d+.mixer.in_proj`).
    pub target_regex: Option<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            enabled: false,
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            rslora: false,
            target_modules: vec!["in_proj".into(), "out_proj".into()],
            target_regex: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    /// Also write the merged model (LoRA folded in) in transformers' format.
    #[serde(default = "yes")]
    pub export_merged: bool,
    /// `f32`, `f16` or `bf16` for exported weights.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn yes() -> bool {
    true
}
fn default_dtype() -> String {
    "f32".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// `auto`, `cuda`, `cuda:N`, `wgpu` or `cpu`.
    #[serde(default = "default_device")]
    pub name: String,
    /// The hot ops: `auto` (kernels where the backend has them), `reference` (plain tensor ops)
    /// or `kernels` (an error on a backend without them).
    #[serde(default = "default_ops")]
    pub ops: String,
}

impl Default for DeviceSection {
    fn default() -> Self {
        Self {
            name: default_device(),
            ops: default_ops(),
        }
    }
}

fn default_device() -> String {
    "auto".into()
}
fn default_ops() -> String {
    "auto".into()
}

impl DeviceSection {
    /// `ops` parsed; an unknown value is an error naming `device.ops`.
    pub fn ops_mode(&self) -> Result<mamba_kernels::OpsMode> {
        self.ops
            .parse()
            .map_err(|e| anyhow::anyhow!("`device.ops`: {e}"))
    }
}

/// Parse `--set section.key=value`: the value is read as TOML (`3`, `true`, `"x"`, `[1, 2]`) and,
/// failing that, as a plain string. An empty value (`--set model.init=`) removes the key.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    let (path, raw) = spec
        .split_once('=')
        .with_context(|| format!("--set {spec}: expected section.key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        bail!("--set {spec}: expected section.key=value");
    }
    let remove = raw.trim().is_empty();
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", raw.trim()))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let mut table = doc;
    for k in &keys[..keys.len() - 1] {
        table = table
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {spec}: `{k}` is not a section"))?;
    }
    if remove {
        table.remove(keys[keys.len() - 1]);
    } else {
        table.insert(keys[keys.len() - 1].to_string(), value);
    }
    Ok(())
}

impl RunConfig {
    /// Read `path`, apply the overrides, check every value.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading run config {}", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("run config {}", path.display()))
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut doc: toml::Table = toml::from_str(text).context("malformed TOML")?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let cfg: RunConfig =
            serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
                let path = e.path().to_string();
                anyhow::anyhow!("`{path}`: {}", e.into_inner())
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        match (&self.model.source, &self.model.init) {
            (Some(_), Some(_)) => bail!("`model`: give either `source` (a model to fine-tune) or `init` (a config to train from scratch), not both"),
            (None, None) => bail!("`model`: missing `source` (model directory or hub id) or `init` (model config JSON)"),
            _ => {}
        }
        if !matches!(self.model.norm.as_str(), "grouped" | "hf") {
            bail!(
                "`model.norm`: expected \"grouped\" or \"hf\", got {:?}",
                self.model.norm
            );
        }
        match (&self.data.field, &self.data.template) {
            (Some(_), Some(_)) => bail!("`data`: give either `field` or `template`, not both"),
            (None, None) => bail!("`data`: missing `field` (e.g. \"quote\") or `template` (e.g. \"{{quote}} — {{author}}\")"),
            _ => {}
        }
        if !(0.0..1.0).contains(&self.data.validation_fraction) {
            bail!(
                "`data.validation_fraction`: expected a value in [0, 1), got {}",
                self.data.validation_fraction
            );
        }
        if self.data.seq_len < 2 {
            bail!(
                "`data.seq_len`: must be at least 2 (one token to predict the next), got {}",
                self.data.seq_len
            );
        }
        if !matches!(self.data.layout.as_str(), "pack" | "pad") {
            bail!(
                "`data.layout`: expected \"pack\" or \"pad\", got {:?}",
                self.data.layout
            );
        }
        let t = &self.train;
        if t.steps == 0 || t.batch_size == 0 || t.grad_accum == 0 {
            bail!("`train.steps`, `train.batch_size` and `train.grad_accum` must be positive");
        }
        if let Err(e) = t.precision.parse::<mamba_model::Precision>() {
            bail!("`train.precision`: {e}");
        }
        if t.checkpoint_every_k_blocks == 0 {
            bail!("`train.checkpoint_every_k_blocks`: expected 1 or more (1 checkpoints every block), got 0");
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bail!("`train.lr`: must be a positive number, got {}", t.lr);
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            bail!(
                "`train.min_lr_ratio`: expected a value in [0, 1], got {}",
                t.min_lr_ratio
            );
        }
        if self.lora.enabled {
            if self.lora.r == 0 {
                bail!("`lora.r`: must be positive, got 0");
            }
            if self.lora.target_modules.is_empty() && self.lora.target_regex.is_none() {
                bail!("`lora.target_modules`: empty; name modules (in_proj, out_proj, x_proj, dt_proj, embeddings, lm_head) or set `lora.target_regex`");
            }
        }
        if !matches!(self.output.dtype.as_str(), "f32" | "f16" | "bf16") {
            bail!(
                "`output.dtype`: expected \"f32\", \"f16\" or \"bf16\", got {:?}",
                self.output.dtype
            );
        }
        let n = &self.nodes;
        if n.count == 0 || n.rank >= n.count {
            bail!(
                "`nodes.rank` = {} with `nodes.count` = {}: expected 0 ≤ rank < count (count ≥ 1)",
                n.rank,
                n.count
            );
        }
        if n.count > 1 && std::env::var_os(ALLOW_NODES_ENV).is_none() {
            bail!("{}", NODES_BLOCKED);
        }
        if n.count > 1 {
            for (key, value) in [
                ("nodes.orchestrator", &n.orchestrator),
                ("nodes.address", &n.address),
            ] {
                let value = value.as_deref().with_context(|| {
                    format!("`{key}`: required when `nodes.count` > 1 (ws://host:port)")
                })?;
                ws_port(key, value)?;
            }
        }
        let key = if t.devices.is_empty() {
            "device.name"
        } else {
            "train.devices"
        };
        let devices = crate::DeviceList::from_config(&t.devices, &self.device.name)
            .map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?;
        let n = devices.specs().len() * self.nodes.count;
        if n > 1 && !t.batch_size.is_multiple_of(n) {
            let what = if self.nodes.count > 1 {
                format!("the {n} devices of `{key}` × `nodes.count`")
            } else {
                format!("the {n} devices of `{key}`")
            };
            bail!(
                "`train.batch_size` = {} does not split evenly over {what}: use a multiple of {n} (it is the global batch; each device takes batch_size / {n} rows)",
                t.batch_size
            );
        }
        self.device.ops_mode()?;
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine to `lr · min_lr_ratio`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let t = &self.train;
        if step < t.warmup_steps {
            return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
        }
        let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
        let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
        let min = t.lr * t.min_lr_ratio;
        min + 0.5 * (t.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
init = "m.json"
[data]
source = "q.jsonl"
field = "quote"
[output]
dir = "runs/x"
"#;

    /// Every config the repository ships loads, with the files it names present.
    #[test]
    fn shipped_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut n = 0;
        for entry in std::fs::read_dir(root.join("configs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = RunConfig::load(&path, &[]).unwrap();
                for local in [
                    cfg.model.init.clone(),
                    cfg.tokenizer.source.clone().map(PathBuf::from),
                ]
                .into_iter()
                .flatten()
                {
                    assert!(
                        root.join(&local).is_file(),
                        "{}: {}",
                        path.display(),
                        local.display()
                    );
                }
                n += 1;
            }
        }
        assert!(n >= 3, "{n} configs");
        let two = RunConfig::load(
            &root.join("configs/lora-codestral-shape.toml"),
            &[
                "train.batch_size=8".into(),
                "train.devices=[\"cuda:0\", \"cuda:1\"]".into(),
            ],
        )
        .unwrap();
        assert_eq!(two.train.devices, ["cuda:0", "cuda:1"]);
        let e = RunConfig::load(
            &root.join("configs/lora-codestral-shape.toml"),
            &[
                "train.batch_size=3".into(),
                "train.devices=[\"cuda:0\", \"cuda:1\"]".into(),
            ],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("`train.batch_size` = 3 does not split evenly over the 2 devices of `train.devices`"), "{e:#}");
    }

    #[test]
    fn nodes() {
        let with = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            RunConfig::parse(BASE, &sets).map_err(|e| format!("{e:#}"))
        };
        let all = [
            "nodes.count=2",
            "nodes.orchestrator=\"ws://10.0.0.1:3000\"",
            "nodes.address=\"ws://10.0.0.2:3001\"",
        ];
        assert!(with(&all)
            .unwrap_err()
            .contains("SyncService::sync clears a copy"));
        // The rest of the checks, as they run with the refusal lifted (no other test reads it).
        std::env::set_var(ALLOW_NODES_ENV, "1");
        let ok = with(&[
            "nodes.count=2",
            "nodes.rank=1",
            "nodes.orchestrator=\"ws://10.0.0.1:3000\"",
            "nodes.address=\"ws://10.0.0.2:3001\"",
        ])
        .unwrap();
        assert_eq!((ok.nodes.count, ok.nodes.rank), (2, 1));
        assert_eq!(ws_port("k", "ws://10.0.0.2:3001/x").unwrap(), 3001);
        for (sets, says) in [
            (
                &["nodes.count=2", "nodes.rank=2"][..],
                "expected 0 ≤ rank < count",
            ),
            (&["nodes.count=2"][..], "`nodes.orchestrator`: required"),
            (
                &[
                    "nodes.count=2",
                    "nodes.orchestrator=\"10.0.0.1:3000\"",
                    "nodes.address=\"ws://h:1\"",
                ][..],
                "expected ws://host:port",
            ),
            (
                &[
                    "nodes.count=2",
                    "nodes.orchestrator=\"ws://h:1\"",
                    "nodes.address=\"ws://h\"",
                ][..],
                "`nodes.address` = \"ws://h\": no port",
            ),
            (
                &[
                    "nodes.count=2",
                    "nodes.orchestrator=\"ws://h:1\"",
                    "nodes.address=\"ws://h:2\"",
                    "train.batch_size=3",
                ][..],
                "over the 2 devices of `device.name` × `nodes.count`",
            ),
        ] {
            let e = with(sets).unwrap_err();
            assert!(e.contains(says), "{sets:?}: {e}");
        }
    }

    #[test]
    fn overrides_and_unknown_keys() {
        let c = RunConfig::parse(
            BASE,
            &[
                "train.lr=0.01".into(),
                "lora.target_modules=[\"x_proj\"]".into(),
                "data.field=author".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 0.01);
        assert_eq!(c.lora.target_modules, vec!["x_proj"]);
        assert_eq!(c.data.field.as_deref(), Some("author"));
        let e = format!(
            "{:#}",
            RunConfig::parse(&format!("{BASE}\n[train]\nlearning_rate = 1.0\n"), &[]).unwrap_err()
        );
        assert!(e.contains("train") && e.contains("learning_rate"), "{e}");
        let e = format!(
            "{:#}",
            RunConfig::parse(BASE, &["train.steps=\"many\"".into()]).unwrap_err()
        );
        assert!(e.contains("`train.steps`"), "{e}");
        let e = format!(
            "{:#}",
            RunConfig::parse(BASE, &["data.seq_len=1".into()]).unwrap_err()
        );
        assert!(e.contains("`data.seq_len`"), "{e}");
        let c = RunConfig::parse(BASE, &["device.ops=reference".into()]).unwrap();
        assert_eq!(
            c.device.ops_mode().unwrap(),
            mamba_kernels::OpsMode::Reference
        );
        let e = format!(
            "{:#}",
            RunConfig::parse(BASE, &["device.ops=fast".into()]).unwrap_err()
        );
        assert!(e.contains("`device.ops`") && e.contains("fast"), "{e}");
    }

    #[test]
    fn schedule() {
        let mut c = RunConfig::parse(BASE, &[]).unwrap();
        c.train.steps = 110;
        c.train.warmup_steps = 10;
        c.train.lr = 1.0;
        c.train.min_lr_ratio = 0.1;
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(110) - 0.1).abs() < 1e-12);
    }
}

//! `bench kernels`: each hot op of [`MambaBackend`] at realistic shapes, with the kernels and with
//! the reference ops: median time of the forward (on `B`) and of forward + backward (on
//! `Autodiff<B>`, the backward for a fixed random upstream gradient `dy`, as torch's
//! `y.backward(dy)`: [`backward_with`], no loss reduction), and the largest
//! relative error of the kernels against the reference over the outputs and every input's
//! gradient.
//!
//! The ops are called through the trait, so this measures whatever implementation is in place;
//! "kernels" and "reference" are the process-wide [`OpsMode`]s `Kernels` and `Reference`. A
//! backend without kernels (the CPU) measures the reference only. A phase that panics (the
//! reference running out of device memory at a large shape, say) is reported as `null` with a
//! note, and the bench goes on.
//!
//! For the causal conv1d, a memory-bound op, the report also gives the device's copy bandwidth
//! and the conv's achieved bandwidth as a fraction of it.

use std::str::FromStr;

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor, TensorData};
use mamba_kernels::{
    backward_with, set_ops_mode, ConvInput, MambaBackend, OpsMode, SelectiveScanInput, SsdInput,
};
use serde::Serialize;
use serde_json::{json, Value};

use super::{catch, host, rel_err, time_issue_ms, time_ms, worst, Num, RunInfo};

/// Which shapes to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeSet {
    /// Realistic sizes (mamba2-130m, a Codestral-like layer, mamba-130m); minutes on a GPU.
    Bench,
    /// A few tiny odd shapes that run in seconds on lavapipe or the CPU.
    Small,
}

impl FromStr for ShapeSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bench" => Ok(Self::Bench),
            "small" => Ok(Self::Small),
            other => Err(format!(
                "unknown shape set `{other}`: expected bench or small"
            )),
        }
    }
}

/// The ops benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The SSD chunked scan (Mamba2).
    Ssd,
    /// The causal depthwise conv1d with bias and SiLU.
    Conv,
    /// Mamba1's selective scan.
    Scan,
}

impl FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "ssd" => Ok(Self::Ssd),
            "conv" => Ok(Self::Conv),
            "scan" | "selective" => Ok(Self::Scan),
            other => Err(format!("unknown op `{other}`: expected ssd, conv or scan")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub shapes: ShapeSet,
    pub warmup: usize,
    pub iters: usize,
    /// SSD chunk size; default 256 for `bench`, 16 for `small`.
    pub chunk: Option<usize>,
    pub only: Vec<Op>,
    pub seed: u64,
    /// Also compute the SSD scan's outputs and gradients in f64 on the CPU (the reference ops on
    /// ndarray, from the same inputs) and report both sides' errors against them: which of two
    /// f32 implementations that disagree is the less exact.
    pub truth_f64: bool,
    /// dtype of the SSD's activations (`x`, `dt`, `B`, `C`, `dy`; `A`, `D` and the `dt` bias
    /// stay f32, as under bf16-mixed): f32, or bf16 for the bf16 kernels (with
    /// `MAMBA_SSD_TENSOR_CORES=1`, their tensor-core path).
    pub ssd_dtype: SsdDtype,
}

/// The SSD's activation dtype in `bench kernels` (`--ssd-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SsdDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for SsdDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("--ssd-dtype `{other}`: expected f32 or bf16")),
        }
    }
}

impl SsdDtype {
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::Bf16 => burn::tensor::DType::BF16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// SSD shape: `(batch, seqlen, heads, head_dim, state, groups)` and the chunk size.
#[derive(Debug, Clone, Copy)]
struct SsdShape {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    state: usize,
    groups: usize,
    chunk: usize,
}

impl SsdShape {
    /// The channels of the conv in front of it: `x`, `B` and `C` (Mamba2's `xBC`).
    fn conv_channels(&self) -> usize {
        self.heads * self.head_dim + 2 * self.groups * self.state
    }
}

/// Selective-scan shape.
#[derive(Debug, Clone, Copy)]
struct ScanShape {
    batch: usize,
    seq: usize,
    channels: usize,
    state: usize,
}

/// Conv shape (width 4, bias, SiLU).
#[derive(Debug, Clone, Copy)]
struct ConvShape {
    batch: usize,
    seq: usize,
    channels: usize,
    width: usize,
}

fn ssd_shapes(set: ShapeSet, chunk: Option<usize>) -> Vec<SsdShape> {
    let s = |batch, seq, heads, head_dim, state, groups, default_chunk| SsdShape {
        batch,
        seq,
        heads,
        head_dim,
        state,
        groups,
        chunk: chunk.unwrap_or(default_chunk),
    };
    match set {
        ShapeSet::Bench => vec![
            s(8, 1024, 24, 64, 128, 1, 256),
            s(4, 4096, 24, 64, 128, 1, 256),
            s(2, 2048, 128, 64, 128, 8, 256),
        ],
        ShapeSet::Small => vec![s(2, 37, 4, 8, 8, 2, 16), s(1, 50, 6, 5, 7, 3, 16)],
    }
}

fn scan_shapes(set: ShapeSet) -> Vec<ScanShape> {
    let s = |batch, seq, channels, state| ScanShape {
        batch,
        seq,
        channels,
        state,
    };
    match set {
        ShapeSet::Bench => vec![s(8, 1024, 1536, 16)],
        ShapeSet::Small => vec![s(2, 37, 24, 5), s(1, 50, 17, 3)],
    }
}

/// One op at one shape with its inputs on the device. `forward` runs the op on `B`;
/// `forward_backward` runs it on `Autodiff<B>` with every input a tracked leaf and backpropagates
/// `dy` from `y` ([`backward_with`]). With `keep` they return the named outputs / input gradients (flattened), else
/// nothing (for timing).
trait Case<B: MambaBackend> {
    fn forward(&self, keep: bool) -> Vec<(&'static str, Tensor<B, 1>)>;
    fn forward_backward(&self, keep: bool) -> Vec<(&'static str, Option<Tensor<B, 1>>)>;
}

type Grads<B> = <Autodiff<B> as AutodiffBackend>::Gradients;

fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

/// A tracked copy of an input on `Autodiff<B>`.
fn leaf<B: MambaBackend, const D: usize>(t: &Tensor<B, D>) -> Tensor<Autodiff<B>, D> {
    Tensor::from_inner(t.clone()).require_grad()
}

fn grad<B: MambaBackend, const D: usize>(
    name: &'static str,
    t: &Tensor<Autodiff<B>, D>,
    grads: &Grads<B>,
) -> (&'static str, Option<Tensor<B, 1>>) {
    (name, t.grad(grads).map(flat))
}

fn normal<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn uniform<B: Backend, const D: usize>(
    shape: [usize; D],
    lo: f64,
    hi: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Uniform(lo, hi), device)
}

/// `softplus⁻¹(dt₀)` with `dt₀` log-uniform in [0.001, 0.1], mamba_ssm's `dt_bias` init: with
/// raw `dt ~ N(0, 1)` the step sizes land around 0.001–0.1.
fn dt_bias<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 1> {
    let dt0 = uniform::<B, 1>([n], 0.001f64.ln(), 0.1f64.ln(), device).exp();
    (dt0.exp() - 1.0).log()
}

struct SsdCase<B: Backend> {
    input: SsdInput<B>,
    dy: Tensor<B, 4>,
}

impl<B: MambaBackend> SsdCase<B> {
    /// Random inputs of shape `s`, the activations in `dtype`.
    fn new(s: &SsdShape, dtype: burn::tensor::DType, device: &B::Device) -> Self {
        let (b, l, h, p, n, g) = (s.batch, s.seq, s.heads, s.head_dim, s.state, s.groups);
        fn act<B: Backend, const D: usize>(
            t: Tensor<B, D>,
            dtype: burn::tensor::DType,
        ) -> Tensor<B, D> {
            if t.dtype() == dtype {
                t
            } else {
                t.cast(dtype)
            }
        }
        Self {
            input: SsdInput {
                x: act(normal([b, l, h, p], device), dtype),
                dt: act(normal([b, l, h], device), dtype),
                // A = -exp(U(log 1, log 16)), as mamba_ssm initialises A_log.
                a: uniform::<B, 1>([h], 0.0, 16f64.ln(), device).exp().neg(),
                b: act(normal([b, l, g, n], device), dtype),
                c: act(normal([b, l, g, n], device), dtype),
                d: Tensor::ones([h], device),
                dt_bias: dt_bias(h, device),
                dt_limit: (0.0, f64::INFINITY),
                initial_state: None,
                chunk_size: s.chunk,
            },
            dy: act(normal([b, l, h, p], device), dtype),
        }
    }
}

/// Host copies of every output and input gradient of `case` computed in f64 by the reference
/// ops on the CPU (rounded to f32 for the comparison, which is far below the errors measured).
#[cfg(feature = "ndarray")]
fn ssd_truth_f64<B: MambaBackend>(case: &SsdCase<B>) -> Result<Tensors, String> {
    type T64 = burn::backend::NdArray<f64>;
    let dev = Default::default();
    fn f64_of<B: Backend, const D: usize>(
        t: &Tensor<B, D>,
        dev: &burn::backend::ndarray::NdArrayDevice,
    ) -> Tensor<T64, D> {
        Tensor::from_data(t.to_data().convert::<f64>(), dev)
    }
    let i = &case.input;
    let case64 = SsdCase::<T64> {
        input: SsdInput {
            x: f64_of(&i.x, &dev),
            dt: f64_of(&i.dt, &dev),
            a: f64_of(&i.a, &dev),
            b: f64_of(&i.b, &dev),
            c: f64_of(&i.c, &dev),
            d: f64_of(&i.d, &dev),
            dt_bias: f64_of(&i.dt_bias, &dev),
            dt_limit: i.dt_limit,
            initial_state: i.initial_state.as_ref().map(|t| f64_of(t, &dev)),
            chunk_size: i.chunk_size,
        },
        dy: f64_of(&case.dy, &dev),
    };
    catch(|| {
        let mut out: Tensors = case64
            .forward(true)
            .into_iter()
            .map(|(n, t)| (n, Some(host(t))))
            .collect();
        out.extend(
            case64
                .forward_backward(true)
                .into_iter()
                .map(|(n, t)| (n, t.map(host))),
        );
        out
    })
}

#[cfg(not(feature = "ndarray"))]
fn ssd_truth_f64<B: MambaBackend>(_case: &SsdCase<B>) -> Result<Tensors, String> {
    Err("--truth-f64 needs the ndarray feature".into())
}

impl<B: MambaBackend> Case<B> for SsdCase<B> {
    fn forward(&self, keep: bool) -> Vec<(&'static str, Tensor<B, 1>)> {
        let out = B::ssd_chunk_scan(self.input.clone());
        if !keep {
            return Vec::new();
        }
        vec![("y", flat(out.y)), ("final_state", flat(out.final_state))]
    }

    fn forward_backward(&self, keep: bool) -> Vec<(&'static str, Option<Tensor<B, 1>>)> {
        let i = &self.input;
        let (x, dt, a, b, c, d, dt_bias) = (
            leaf(&i.x),
            leaf(&i.dt),
            leaf(&i.a),
            leaf(&i.b),
            leaf(&i.c),
            leaf(&i.d),
            leaf(&i.dt_bias),
        );
        let out = Autodiff::<B>::ssd_chunk_scan(SsdInput {
            x: x.clone(),
            dt: dt.clone(),
            a: a.clone(),
            b: b.clone(),
            c: c.clone(),
            d: d.clone(),
            dt_bias: dt_bias.clone(),
            dt_limit: i.dt_limit,
            initial_state: None,
            chunk_size: i.chunk_size,
        });
        let grads = backward_with(out.y, self.dy.clone());
        if !keep {
            return Vec::new();
        }
        vec![
            grad("dx", &x, &grads),
            grad("ddt", &dt, &grads),
            grad("dA", &a, &grads),
            grad("dB", &b, &grads),
            grad("dC", &c, &grads),
            grad("dD", &d, &grads),
            grad("ddt_bias", &dt_bias, &grads),
        ]
    }
}

struct ConvCase<B: Backend> {
    input: ConvInput<B>,
    dy: Tensor<B, 3>,
}

impl<B: MambaBackend> ConvCase<B> {
    fn new(s: &ConvShape, device: &B::Device) -> Self {
        // PyTorch's Conv1d init for a depthwise conv: U(±1/sqrt(width)) for weight and bias.
        let bound = 1.0 / (s.width as f64).sqrt();
        Self {
            input: ConvInput {
                x: normal([s.batch, s.seq, s.channels], device),
                weight: uniform([s.channels, s.width], -bound, bound, device),
                bias: Some(uniform([s.channels], -bound, bound, device)),
                initial_state: None,
                silu: true,
            },
            dy: normal([s.batch, s.seq, s.channels], device),
        }
    }
}

impl<B: MambaBackend> Case<B> for ConvCase<B> {
    fn forward(&self, keep: bool) -> Vec<(&'static str, Tensor<B, 1>)> {
        let out = B::causal_conv1d(self.input.clone());
        if !keep {
            return Vec::new();
        }
        vec![("y", flat(out.y)), ("final_state", flat(out.final_state))]
    }

    fn forward_backward(&self, keep: bool) -> Vec<(&'static str, Option<Tensor<B, 1>>)> {
        let i = &self.input;
        let (x, weight) = (leaf(&i.x), leaf(&i.weight));
        let bias = i.bias.as_ref().map(leaf);
        let out = Autodiff::<B>::causal_conv1d(ConvInput {
            x: x.clone(),
            weight: weight.clone(),
            bias: bias.clone(),
            initial_state: None,
            silu: i.silu,
        });
        let grads = backward_with(out.y, self.dy.clone());
        if !keep {
            return Vec::new();
        }
        let mut g = vec![grad("dx", &x, &grads), grad("dweight", &weight, &grads)];
        if let Some(b) = &bias {
            g.push(grad("dbias", b, &grads));
        }
        g
    }
}

struct ScanCase<B: Backend> {
    input: SelectiveScanInput<B>,
    dy: Tensor<B, 3>,
}

impl<B: MambaBackend> ScanCase<B> {
    fn new(s: &ScanShape, device: &B::Device) -> Self {
        let (b, l, d, n) = (s.batch, s.seq, s.channels, s.state);
        // S4D-real init, as mamba_ssm's: A[c, k] = -(k + 1).
        let a: Vec<f32> = (0..d).flat_map(|_| (1..=n).map(|k| -(k as f32))).collect();
        Self {
            input: SelectiveScanInput {
                u: normal([b, l, d], device),
                delta: normal([b, l, d], device),
                a: Tensor::from_data(TensorData::new(a, [d, n]), device),
                b: normal([b, l, n], device),
                c: normal([b, l, n], device),
                d: Tensor::ones([d], device),
                z: Some(normal([b, l, d], device)),
                delta_bias: Some(dt_bias(d, device)),
                delta_softplus: true,
                initial_state: None,
            },
            dy: normal([b, l, d], device),
        }
    }
}

impl<B: MambaBackend> Case<B> for ScanCase<B> {
    fn forward(&self, keep: bool) -> Vec<(&'static str, Tensor<B, 1>)> {
        let out = B::selective_scan(self.input.clone());
        if !keep {
            return Vec::new();
        }
        vec![("y", flat(out.y)), ("final_state", flat(out.final_state))]
    }

    fn forward_backward(&self, keep: bool) -> Vec<(&'static str, Option<Tensor<B, 1>>)> {
        let i = &self.input;
        let (u, delta, a, b, c, d) = (
            leaf(&i.u),
            leaf(&i.delta),
            leaf(&i.a),
            leaf(&i.b),
            leaf(&i.c),
            leaf(&i.d),
        );
        let z = i.z.as_ref().map(leaf);
        let delta_bias = i.delta_bias.as_ref().map(leaf);
        let out = Autodiff::<B>::selective_scan(SelectiveScanInput {
            u: u.clone(),
            delta: delta.clone(),
            a: a.clone(),
            b: b.clone(),
            c: c.clone(),
            d: d.clone(),
            z: z.clone(),
            delta_bias: delta_bias.clone(),
            delta_softplus: i.delta_softplus,
            initial_state: None,
        });
        let grads = backward_with(out.y, self.dy.clone());
        if !keep {
            return Vec::new();
        }
        let mut g = vec![
            grad("du", &u, &grads),
            grad("ddelta", &delta, &grads),
            grad("dA", &a, &grads),
            grad("dB", &b, &grads),
            grad("dC", &c, &grads),
            grad("dD", &d, &grads),
        ];
        if let Some(z) = &z {
            g.push(grad("dz", z, &grads));
        }
        if let Some(db) = &delta_bias {
            g.push(grad("ddelta_bias", db, &grads));
        }
        g
    }
}

/// Times of one implementation; `None` where the phase failed (see the notes).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub fwd_ms: Option<f64>,
    pub fwd_bwd_ms: Option<f64>,
    /// Median host time to issue the forward / forward+backward (see
    /// [`super::time_issue_ms`]): near the wall time, the device waited on the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_issue_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_bwd_issue_ms: Option<f64>,
    /// Conv only: achieved bandwidth (the op's minimum bytes over the time), GB/s ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_bwd_gbps: Option<f64>,
    /// ... and as a fraction of the device's copy bandwidth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_copy_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwd_bwd_copy_fraction: Option<f64>,
}

/// The conv's bandwidth context.
#[derive(Debug, Clone, Serialize)]
pub struct Bandwidth {
    /// How the copy was made.
    pub copy_method: &'static str,
    /// Bytes the copy reads and writes (2 × the conv input's size).
    pub copy_bytes: u64,
    pub copy_ms: Option<f64>,
    pub copy_gbps: Option<f64>,
    /// The least the conv's kernels must move: forward reads x, weight, bias and writes y and
    /// the final state; backward reads x, dy, weight, bias and writes dx, dweight, dbias. The
    /// forward+backward time also covers seeding `dy` (one one-element tensor), not counted.
    pub fwd_bytes: u64,
    pub fwd_bwd_bytes: u64,
}

/// One op at one shape.
#[derive(Debug, Clone, Serialize)]
pub struct OpResult {
    pub op: &'static str,
    pub shape: Value,
    /// The shape in short form (`b8 l1024 h24 ...`), for the table.
    #[serde(skip)]
    pub label: String,
    pub dtype: &'static str,
    /// `None` on a backend without kernels.
    pub kernels: Option<Timing>,
    pub reference: Option<Timing>,
    /// Largest `‖k − r‖ / ‖r‖` over the outputs and input gradients both sides produced.
    pub max_rel_err: Option<Num>,
    pub worst_tensor: Option<String>,
    /// Every compared tensor's error: the outputs (`y`, `final_state`) and the input gradients
    /// (`dx`, `dA`, ...).
    pub rel_errs: serde_json::Map<String, Value>,
    /// With `--truth-f64` (SSD only): each side's errors against the f64 computation,
    /// `{"kernels": {...}, "reference": {...}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_f64: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    #[serde(flatten)]
    pub info: RunInfo,
    pub shapes: &'static str,
    pub warmup: usize,
    pub iters: usize,
    pub results: Vec<OpResult>,
}

/// Named host copies of outputs and gradients (`None`: no gradient).
type Tensors = Vec<(&'static str, Option<Vec<f32>>)>;

/// What one implementation produced: times, host copies of its tensors, notes of failures.
#[derive(Default)]
struct Measured {
    timing: Timing,
    tensors: Tensors,
    notes: Vec<String>,
}

/// `‖got − want‖ / ‖want‖` for every tensor both lists hold (infinite where only one side has
/// it).
fn errors(got: &Tensors, want: &Tensors, notes: &mut Vec<String>) -> Vec<(String, f64)> {
    let mut errs = Vec::new();
    for (name, g) in got {
        let Some((_, w)) = want.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let err = match (g, w) {
            (Some(g), Some(w)) => rel_err(g, w),
            (None, None) => continue,
            _ => {
                notes.push(format!("{name}: one side has no gradient"));
                f64::INFINITY
            }
        };
        errs.push((name.to_string(), err));
    }
    errs
}

fn err_map(errs: &[(String, f64)]) -> serde_json::Map<String, Value> {
    errs.iter()
        .map(|(n, e)| (n.clone(), json!(Num(*e))))
        .collect()
}

fn measure<B: MambaBackend, C: Case<B>>(
    case: &C,
    mode: OpsMode,
    device: &B::Device,
    opts: &Options,
) -> Measured {
    set_ops_mode(mode);
    let mut m = Measured::default();
    let (warmup, iters) = (opts.warmup, opts.iters);
    let forward = catch(|| {
        let ms = time_issue_ms::<B>(device, warmup, iters, || {
            case.forward(false);
        });
        let values: Vec<_> = case
            .forward(true)
            .into_iter()
            .map(|(n, t)| (n, Some(host(t))))
            .collect();
        (ms, values)
    });
    match forward {
        Ok(((ms, issue), values)) => {
            m.timing.fwd_ms = Some(ms);
            m.timing.fwd_issue_ms = Some(issue);
            m.tensors.extend(values);
        }
        Err(e) => m.notes.push(format!("{mode} forward failed: {e}")),
    }
    B::memory_cleanup(device);
    let backward = catch(|| {
        let ms = time_issue_ms::<B>(device, warmup, iters, || {
            case.forward_backward(false);
        });
        let values: Vec<_> = case
            .forward_backward(true)
            .into_iter()
            .map(|(n, t)| (n, t.map(host)))
            .collect();
        (ms, values)
    });
    match backward {
        Ok(((ms, issue), values)) => {
            m.timing.fwd_bwd_ms = Some(ms);
            m.timing.fwd_bwd_issue_ms = Some(issue);
            m.tensors.extend(values);
        }
        Err(e) => m.notes.push(format!("{mode} forward+backward failed: {e}")),
    }
    B::memory_cleanup(device);
    m
}

/// Measures `case` with the kernels (when `B` has them) and the reference, and compares them.
fn run_case<B: MambaBackend, C: Case<B>>(
    op: &'static str,
    shape: &[(&str, &str, Value)],
    case: &C,
    device: &B::Device,
    opts: &Options,
    truth: Option<Result<Tensors, String>>,
    dtype: &'static str,
) -> OpResult {
    let kernels = B::has_kernels().then(|| measure::<B, C>(case, OpsMode::Kernels, device, opts));
    let reference = measure::<B, C>(case, OpsMode::Reference, device, opts);
    set_ops_mode(OpsMode::Auto);
    let mut notes = Vec::new();
    let mut errs: Vec<(String, f64)> = Vec::new();
    if let Some(k) = &kernels {
        notes.extend(k.notes.iter().cloned());
        errs = errors(&k.tensors, &reference.tensors, &mut notes);
    }
    notes.extend(reference.notes.iter().cloned());
    let vs_f64 = truth.map(|truth| match truth {
        Ok(truth) => {
            let mut sides = serde_json::Map::new();
            let mut report = |side: &str, tensors: &Tensors, notes: &mut Vec<String>| {
                let e = errors(tensors, &truth, notes);
                if let Some((name, err)) = worst(&e) {
                    notes.push(format!("{side} vs f64: worst {err:.2e} ({name})"));
                }
                sides.insert(side.to_string(), Value::Object(err_map(&e)));
            };
            if let Some(k) = &kernels {
                report("kernels", &k.tensors, &mut notes);
            }
            report("reference", &reference.tensors, &mut notes);
            Value::Object(sides)
        }
        Err(e) => {
            notes.push(format!("f64 truth failed: {e}"));
            Value::Null
        }
    });
    let worst = worst(&errs);
    OpResult {
        op,
        shape: Value::Object(
            shape
                .iter()
                .map(|(key, _, v)| (key.to_string(), v.clone()))
                .collect(),
        ),
        label: shape
            .iter()
            .filter(|(_, short, _)| !short.is_empty())
            .map(|(_, short, v)| format!("{short}{v}"))
            .collect::<Vec<_>>()
            .join(" "),
        dtype,
        kernels: kernels.map(|k| k.timing),
        reference: Some(reference.timing),
        max_rel_err: worst.as_ref().map(|w| Num(w.1)),
        worst_tensor: worst.map(|w| w.0),
        rel_errs: err_map(&errs),
        vs_f64,
        bandwidth: None,
        notes,
    }
}

/// The conv's bytes and the device's copy bandwidth, and the conv's achieved bandwidth in
/// `result`'s timings.
fn conv_bandwidth<B: MambaBackend>(
    s: &ConvShape,
    case: &ConvCase<B>,
    device: &B::Device,
    opts: &Options,
    result: &mut OpResult,
) {
    let elem = 4u64; // f32
    let big = (s.batch * s.seq * s.channels) as u64 * elem; // x, y, dy, dx
    let small = (s.channels * s.width + s.channels) as u64 * elem; // weight + bias
    let state = (s.batch * s.channels * (s.width - 1)) as u64 * elem;
    let fwd_bytes = 2 * big + small + state;
    let fwd_bwd_bytes = fwd_bytes + 3 * big + 2 * small;
    // `Tensor::cat` of a single tensor allocates the output and runs one slice-assign kernel
    // over it: a device-to-device copy (burn 0.21 has no public copy op; `clone` only shares
    // the buffer, and `x + 0` may be skipped or fused).
    let copy = catch(|| {
        time_ms::<B>(device, opts.warmup, opts.iters, || {
            let _ = Tensor::cat(vec![case.input.x.clone()], 0);
        })
    });
    let copy_ms = match copy {
        Ok(ms) => Some(ms),
        Err(e) => {
            result.notes.push(format!("copy failed: {e}"));
            None
        }
    };
    let gbps = |bytes: u64, ms: Option<f64>| ms.map(|ms| bytes as f64 / (ms * 1e-3) / 1e9);
    let copy_gbps = gbps(2 * big, copy_ms);
    for t in [&mut result.kernels, &mut result.reference]
        .into_iter()
        .flatten()
    {
        t.fwd_gbps = gbps(fwd_bytes, t.fwd_ms);
        t.fwd_bwd_gbps = gbps(fwd_bwd_bytes, t.fwd_bwd_ms);
        if let Some(c) = copy_gbps {
            t.fwd_copy_fraction = t.fwd_gbps.map(|g| g / c);
            t.fwd_bwd_copy_fraction = t.fwd_bwd_gbps.map(|g| g / c);
        }
    }
    result.bandwidth = Some(Bandwidth {
        copy_method: "Tensor::cat of one tensor (one slice-assign kernel: read + write)",
        copy_bytes: 2 * big,
        copy_ms,
        copy_gbps,
        fwd_bytes,
        fwd_bwd_bytes,
    });
}

/// Runs the kernel benchmark on backend `B`; `name` is what `--device` selected. Progress goes
/// to stderr.
pub fn run<B: MambaBackend>(device: &B::Device, name: &str, opts: &Options) -> Report {
    B::seed(device, opts.seed);
    let only = |op: Op| opts.only.is_empty() || opts.only.contains(&op);
    let mut results = Vec::new();
    eprintln!("{}", header());
    let mut push = |r: OpResult| {
        eprintln!("{}", line(&r));
        results.push(r);
    };
    let ssd = ssd_shapes(opts.shapes, opts.chunk);
    if only(Op::Ssd) {
        for s in &ssd {
            let shape = [
                ("batch", "b", json!(s.batch)),
                ("seqlen", "l", json!(s.seq)),
                ("heads", "h", json!(s.heads)),
                ("head_dim", "p", json!(s.head_dim)),
                ("state", "n", json!(s.state)),
                ("groups", "g", json!(s.groups)),
                ("chunk", "chunk", json!(s.chunk)),
            ];
            let case = SsdCase::<B>::new(s, opts.ssd_dtype.dtype(), device);
            let truth = opts.truth_f64.then(|| ssd_truth_f64(&case));
            push(run_case(
                "ssd",
                &shape,
                &case,
                device,
                opts,
                truth,
                opts.ssd_dtype.name(),
            ));
        }
    }
    if only(Op::Conv) {
        for s in &ssd {
            let s = ConvShape {
                batch: s.batch,
                seq: s.seq,
                channels: s.conv_channels(),
                width: 4,
            };
            let shape = [
                ("batch", "b", json!(s.batch)),
                ("seqlen", "l", json!(s.seq)),
                ("channels", "c", json!(s.channels)),
                ("width", "w", json!(s.width)),
                ("bias", "", json!(true)),
                ("silu", "", json!(true)),
            ];
            let case = ConvCase::<B>::new(&s, device);
            let mut r = run_case("conv", &shape, &case, device, opts, None, "f32");
            conv_bandwidth(&s, &case, device, opts, &mut r);
            push(r);
        }
    }
    if only(Op::Scan) {
        for s in &scan_shapes(opts.shapes) {
            let shape = [
                ("batch", "b", json!(s.batch)),
                ("seqlen", "l", json!(s.seq)),
                ("channels", "d", json!(s.channels)),
                ("state", "n", json!(s.state)),
                ("z", "", json!(true)),
                ("delta_bias", "", json!(true)),
                ("delta_softplus", "", json!(true)),
            ];
            let case = ScanCase::<B>::new(s, device);
            push(run_case("scan", &shape, &case, device, opts, None, "f32"));
        }
    }
    Report {
        bench: "kernels",
        info: RunInfo::new::<B>(device, name),
        shapes: match opts.shapes {
            ShapeSet::Bench => "bench",
            ShapeSet::Small => "small",
        },
        warmup: opts.warmup,
        iters: opts.iters,
        results,
    }
}

/// Three significant digits (at least one decimal below 1000).
fn sig3(v: f64) -> String {
    let digits = if v.abs() >= 100.0 || v == 0.0 {
        1
    } else {
        (2 - v.abs().log10().floor() as i64).clamp(1, 6) as usize
    };
    format!("{v:.digits$}")
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), sig3)
}

fn ratio(r: Option<f64>, k: Option<f64>) -> String {
    match (r, k) {
        (Some(r), Some(k)) if k > 0.0 => format!("{:.1}x", r / k),
        _ => "-".into(),
    }
}

/// The results whose kernels are further than `max` from the truth: their worst error against
/// f64 where the run computed it, else `max_rel_err` against the reference ops; a result
/// without kernels (CPU) has nothing to check. One line each, naming the op, the shape, the
/// error and the tensor.
pub fn over_tolerance(report: &Report, max: f64) -> Vec<String> {
    let mut over = Vec::new();
    for r in report.results.iter().filter(|r| r.kernels.is_some()) {
        let vs_f64 = r
            .vs_f64
            .as_ref()
            .and_then(|v| v.get("kernels"))
            .and_then(Value::as_object)
            .and_then(|m| {
                m.iter()
                    .map(|(n, e)| (n.clone(), e.as_f64().unwrap_or(f64::INFINITY)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
            });
        let (against, worst) = match vs_f64 {
            Some(w) => ("f64", Some(w)),
            None => (
                "the reference",
                r.max_rel_err
                    .as_ref()
                    .map(|e| (r.worst_tensor.clone().unwrap_or_default(), e.0)),
            ),
        };
        match worst {
            Some((_, err)) if err <= max => {}
            Some((tensor, err)) => over.push(format!(
                "{} {}: {err:.2e} against {against} ({tensor})",
                r.op, r.label
            )),
            None => over.push(format!("{} {}: no error was computed", r.op, r.label)),
        }
    }
    over
}

/// One result as a table row (also the progress line).
fn line(r: &OpResult) -> String {
    let t = |t: &Option<Timing>| {
        t.as_ref().map_or("-".into(), |t| {
            format!("{} / {}", ms(t.fwd_ms), ms(t.fwd_bwd_ms))
        })
    };
    let k = r.kernels.as_ref();
    let rf = r.reference.as_ref();
    let speedup = format!(
        "{} / {}",
        ratio(rf.and_then(|t| t.fwd_ms), k.and_then(|t| t.fwd_ms)),
        ratio(rf.and_then(|t| t.fwd_bwd_ms), k.and_then(|t| t.fwd_bwd_ms))
    );
    let err = match (&r.max_rel_err, &r.worst_tensor) {
        (Some(e), Some(w)) => format!("{:.2e} ({w})", e.0),
        _ => "-".into(),
    };
    format!(
        "{:<5} {:<40} {:>21} {:>21} {:>13}  {}",
        r.op,
        r.label,
        t(&r.kernels),
        t(&r.reference),
        speedup,
        err
    )
}

/// The table's column titles.
fn header() -> String {
    format!(
        "{:<5} {:<40} {:>21} {:>21} {:>13}  {}",
        "op",
        "shape",
        "kernels fwd / f+b ms",
        "reference fwd / f+b",
        "speed-up",
        "max rel err (tensor)"
    )
}

/// The readable report.
pub fn table(report: &Report) -> String {
    let mut s = format!(
        "bench kernels on {}; f32, median of {} after {} warm-up\n",
        report.info.describe(),
        report.iters,
        report.warmup
    );
    s += &header();
    s.push('\n');
    for r in &report.results {
        s += &line(r);
        s.push('\n');
        if let Some(b) = &r.bandwidth {
            let gb = |v: Option<f64>| v.map_or("-".into(), sig3);
            let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.0}%", v * 100.0));
            s += &format!(
                "      copy {} ms = {} GB/s;",
                ms(b.copy_ms),
                gb(b.copy_gbps)
            );
            for (label, t) in [("kernels", &r.kernels), ("reference", &r.reference)] {
                if let Some(t) = t {
                    s += &format!(
                        " {label} fwd {} GB/s ({}), f+b {} GB/s ({});",
                        gb(t.fwd_gbps),
                        pct(t.fwd_copy_fraction),
                        gb(t.fwd_bwd_gbps),
                        pct(t.fwd_bwd_copy_fraction)
                    );
                }
            }
            s.pop();
            s.push('\n');
        }
        for n in &r.notes {
            s += &format!("      note: {n}\n");
        }
    }
    s
}

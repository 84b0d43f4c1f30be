//! `bench gemm`: the matrix products of a training step, each through the backend's
//! [`MambaBackend::matmul_t`] (cuBLAS on CUDA) and through burn's matmul (cubecl's on cube
//! backends), timed, with both checked against f64 products computed on the host for a few
//! output rows.
//!
//! The shapes are those of the LoRA step at the two bench shapes (`step`: mamba2-130m at
//! 8 × 1,024 tokens, the Codestral-7B shape at 4 × 2,048) or tiny odd ones (`small`, seconds on
//! the CPU or lavapipe): the projections' forward (`x · wᵀ`), input gradient (`dy · w`) and
//! weight gradient (`dyᵀ · x`), the LM head, and the rank-8 LoRA products.

use anyhow::Result;
use burn::tensor::{DType, Distribution, Tensor};
use mamba_kernels::linear::{f32_matmul, matmul_t_reference, F32Matmul};
use mamba_model::MambaBackend;
use serde::Serialize;

use super::{catch, host, rel_err, time_ms, Num, RunInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GemmShapes {
    /// The training step's products at mamba2-130m (8 × 1,024) and the Codestral-7B shape (4 × 2,048).
    Step,
    /// Tiny odd shapes.
    Small,
}

/// What `bench gemm` runs (also its command-line flags).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    #[arg(long, value_enum, default_value = "step")]
    pub shapes: GemmShapes,
    /// Operand dtypes: f32, bf16 (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "bf16,f32")]
    pub dtypes: Vec<String>,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Only the cases whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Do not run burn's matmul beside (on a cube backend it autotunes every new shape first).
    #[arg(long)]
    pub skip_burn: bool,
}

/// The largest error against the f64 rows that `bench gemm` accepts: f32 products to 1e-5 with
/// `MAMBA_F32_MATMUL=highest`, to 2e-3 with TF32 (`high`, the default: operands rounded to a
/// 10-bit mantissa, ~5e-4); bf16/f16 to 1e-2 (the output's rounding, ~2e-3).
pub fn tolerance(dtype: &str) -> f64 {
    match (dtype, f32_matmul()) {
        ("f32", F32Matmul::Highest) => 1e-5,
        ("f32", F32Matmul::High) => 2e-3,
        _ => 1e-2,
    }
}

/// The cases whose `matmul_t` error exceeds [`tolerance`] (or did not run), one line each.
pub fn failures(r: &Report) -> Vec<String> {
    r.results
        .iter()
        .filter(|x| !x.rel_err.is_some_and(|e| e.0 <= tolerance(&x.dtype)))
        .map(|x| {
            format!(
                "{} {}: error {} (tolerance {:e}){}",
                x.case.name,
                x.dtype,
                opt(&x.rel_err, 8),
                tolerance(&x.dtype),
                x.note
                    .as_ref()
                    .map(|n| format!(", {n}"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// One product: `op(a) · op(b)`, `[m, k] · [k, n]`.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub name: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    /// How the operands lie in memory: `row` (row-major), `col` (a transposed view of a
    /// row-major tensor) or `pitched` (rows further apart than their length: a narrowed view).
    pub a_mem: Mem,
    pub b_mem: Mem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mem {
    Row,
    Col,
    Pitched,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    #[serde(flatten)]
    pub case: Case,
    pub dtype: String,
    /// `B::matmul_t` (what ran it: the report's `matmul`).
    pub ms: Option<Num>,
    pub tflops: Option<Num>,
    /// burn's matmul over transposed views (cubecl's on cube backends).
    pub burn_ms: Option<Num>,
    pub burn_tflops: Option<Num>,
    /// `‖got − truth‖ / ‖truth‖` over the checked rows, truth an f64 product on the host.
    pub rel_err: Option<Num>,
    pub burn_rel_err: Option<Num>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    #[serde(flatten)]
    pub info: RunInfo,
    pub results: Vec<CaseResult>,
}

fn case(name: &str, [m, n, k]: [usize; 3], ta: bool, tb: bool) -> Case {
    Case {
        name: name.into(),
        m,
        n,
        k,
        ta,
        tb,
        a_mem: Mem::Row,
        b_mem: Mem::Row,
    }
}

/// Every transpose flag with every memory layout of both operands, at an odd shape.
fn layouts() -> Vec<Case> {
    let mut v = Vec::new();
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for a_mem in [Mem::Row, Mem::Col, Mem::Pitched] {
            for b_mem in [Mem::Row, Mem::Col, Mem::Pitched] {
                let name = format!(
                    "layout.{}{}.{a_mem:?}.{b_mem:?}",
                    if ta { "T" } else { "N" },
                    if tb { "T" } else { "N" }
                )
                .to_lowercase();
                v.push(Case {
                    a_mem,
                    b_mem,
                    ..case(&name, [37, 53, 24], ta, tb)
                });
            }
        }
    }
    v
}

/// A linear layer's three products (`x · wᵀ`, `dy · w`, `dyᵀ · x`) for `rows` tokens.
fn layer(prefix: &str, rows: usize, d_in: usize, d_out: usize, wgrad: bool) -> Vec<Case> {
    let mut v = vec![
        case(&format!("{prefix}.fwd"), [rows, d_out, d_in], false, true),
        case(
            &format!("{prefix}.dgrad"),
            [rows, d_in, d_out],
            false,
            false,
        ),
    ];
    if wgrad {
        v.push(case(
            &format!("{prefix}.wgrad"),
            [d_out, d_in, rows],
            true,
            false,
        ));
    }
    v
}

pub fn cases(shapes: GemmShapes) -> Vec<Case> {
    match shapes {
        GemmShapes::Small => [
            layouts(),
            layer("small", 37, 24, 53, true),
            layer("small.lora_a", 37, 24, 4, true),
            layer("small.row", 1, 40, 72, false),
        ]
        .concat(),
        GemmShapes::Step => {
            let mut v = Vec::new();
            // mamba2-130m: hidden 768, in_proj 3,352, inner 1,536, vocab 50,280 (padded 50,288).
            let rows = 8 * 1024;
            v.extend(layer("130m.in_proj", rows, 768, 3352, false));
            v.extend(layer("130m.out_proj", rows, 1536, 768, false));
            v.extend(layer("130m.lm_head", rows, 768, 50_288, false));
            v.extend(layer("130m.lora_a", rows, 768, 8, true));
            v.extend(layer("130m.lora_b", rows, 8, 3352, true));
            // Codestral-7B shape: hidden 4,096, in_proj 18,560, inner 8,192, vocab 32,768.
            let rows = 4 * 2048;
            v.extend(layer("7b.in_proj", rows, 4096, 18_560, false));
            v.extend(layer("7b.out_proj", rows, 8192, 4096, false));
            v.extend(layer("7b.lm_head", rows, 4096, 32_768, false));
            v.extend(layer("7b.lora_a", rows, 4096, 8, true));
            v.extend(layer("7b.lora_b", rows, 8, 18_560, true));
            // Decoding: one and 32 rows through the 7B in-projection.
            v.extend(
                layer("7b.decode1.in_proj", 1, 4096, 18_560, false)
                    .into_iter()
                    .take(1),
            );
            v.extend(
                layer("7b.decode32.in_proj", 32, 4096, 18_560, false)
                    .into_iter()
                    .take(1),
            );
            v
        }
    }
}

/// The rows of `op(a) · op(b)` checked against the host: the first two and the last.
fn check_rows(m: usize) -> Vec<usize> {
    let mut r = vec![0, 1.min(m - 1), m - 1];
    r.dedup();
    r
}

/// Rows `rows` of `op(a) · op(b)` (`[m, k] · [k, n]`), summed in f64 from the operands' values
/// in row-major order of their logical shapes (`a` `[k, m]` with `ta`, `b` `[n, k]` with `tb`):
/// the truth `bench gemm` and tests/linear.rs check `matmul_t` against.
pub fn matmul_t_f64(
    a: &[f32],
    b: &[f32],
    [m, n, k]: [usize; 3],
    (ta, tb): (bool, bool),
    rows: &[usize],
) -> Vec<f32> {
    let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] } as f64;
    let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] } as f64;
    let mut out = Vec::with_capacity(rows.len() * n);
    for &i in rows {
        let ai: Vec<f64> = (0..k).map(|p| at(i, p)).collect();
        for j in 0..n {
            out.push(
                ai.iter()
                    .enumerate()
                    .map(|(p, &x)| x * bt(p, j))
                    .sum::<f64>() as f32,
            );
        }
    }
    out
}

fn pick_rows<B: MambaBackend>(t: Tensor<B, 2>, rows: &[usize]) -> Vec<f32> {
    let n = t.dims()[1];
    let all = host(t.cast(DType::F32));
    rows.iter()
        .flat_map(|&i| all[i * n..(i + 1) * n].to_vec())
        .collect()
}

/// A random `[r, c]` operand in `dtype`, lying in memory as `mem` says.
fn operand<B: MambaBackend>(
    [r, c]: [usize; 2],
    mem: Mem,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 2> {
    let random = |dims: [usize; 2]| {
        Tensor::<B, 2>::random(dims, Distribution::Uniform(-1.0, 1.0), device).cast(dtype)
    };
    match mem {
        Mem::Row => random([r, c]),
        Mem::Col => random([c, r]).transpose(),
        Mem::Pitched => random([r, c + 5]).narrow(1, 2, c),
    }
}

fn dtype_of(name: &str) -> Result<DType> {
    match name.trim() {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("--dtypes: `{other}` is not f32, bf16 or f16"),
    }
}

pub fn run<B: MambaBackend>(device: &B::Device, name: &str, opts: &Options) -> Result<Report> {
    let dtypes = opts
        .dtypes
        .iter()
        .map(|d| dtype_of(d).map(|t| (d.trim().to_string(), t)))
        .collect::<Result<Vec<_>>>()?;
    if let Some((d, _)) = dtypes.iter().find(|(_, t)| !B::supports_dtype(device, *t)) {
        anyhow::bail!(
            "--dtypes: the {name} backend has no {d} tensors (on the CPU and wgpu use --dtypes f32)"
        );
    }
    let mut results = Vec::new();
    for c in cases(opts.shapes) {
        if opts
            .filter
            .as_ref()
            .is_some_and(|f| !c.name.contains(f.as_str()))
        {
            continue;
        }
        for (dname, dtype) in &dtypes {
            let r = catch(|| measure::<B>(device, &c, *dtype, opts));
            results.push(match r {
                Ok(r) => CaseResult {
                    case: c.clone(),
                    dtype: dname.clone(),
                    ..r
                },
                Err(e) => CaseResult {
                    case: c.clone(),
                    dtype: dname.clone(),
                    ms: None,
                    tflops: None,
                    burn_ms: None,
                    burn_tflops: None,
                    rel_err: None,
                    burn_rel_err: None,
                    note: Some(e),
                },
            });
        }
    }
    Ok(Report {
        bench: "gemm",
        info: RunInfo::new::<B>(device, name),
        results,
    })
}

fn measure<B: MambaBackend>(
    device: &B::Device,
    c: &Case,
    dtype: DType,
    opts: &Options,
) -> CaseResult {
    let a_dims = if c.ta { [c.k, c.m] } else { [c.m, c.k] };
    let b_dims = if c.tb { [c.n, c.k] } else { [c.k, c.n] };
    let a = operand::<B>(a_dims, c.a_mem, dtype, device);
    let b = operand::<B>(b_dims, c.b_mem, dtype, device);
    // The operands as stored (after rounding to the dtype), for the host truth.
    let (ha, hb) = (
        host(a.clone().cast(DType::F32)),
        host(b.clone().cast(DType::F32)),
    );
    let rows = check_rows(c.m);
    let want = matmul_t_f64(&ha, &hb, [c.m, c.n, c.k], (c.ta, c.tb), &rows);
    let flop = 2.0 * (c.m * c.n * c.k) as f64;
    let tflops = |ms: f64| Num(flop / (ms * 1e-3) / 1e12);

    let ours = B::matmul_t(a.clone(), b.clone(), c.ta, c.tb);
    let err = rel_err(&pick_rows(ours, &rows), &want);
    let ms = time_ms::<B>(device, opts.warmup, opts.iters, || {
        let _ = B::matmul_t(a.clone(), b.clone(), c.ta, c.tb);
    });
    let burn = (!opts.skip_burn).then(|| {
        let theirs = matmul_t_reference(a.clone(), b.clone(), c.ta, c.tb);
        let err = rel_err(&pick_rows(theirs, &rows), &want);
        let ms = time_ms::<B>(device, opts.warmup, opts.iters, || {
            let _ = matmul_t_reference(a.clone(), b.clone(), c.ta, c.tb);
        });
        (ms, err)
    });
    CaseResult {
        case: c.clone(),
        dtype: String::new(),
        ms: Some(Num(ms)),
        tflops: Some(tflops(ms)),
        burn_ms: burn.map(|(ms, _)| Num(ms)),
        burn_tflops: burn.map(|(ms, _)| tflops(ms)),
        rel_err: Some(Num(err)),
        burn_rel_err: burn.map(|(_, e)| Num(e)),
        note: None,
    }
}

fn opt(v: &Option<Num>, prec: usize) -> String {
    v.as_ref()
        .map(|n| format!("{:.*}", prec, n.0))
        .unwrap_or_else(|| "-".into())
}

/// The readable report.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "{}\n{:<24} {:>5} {:>6} {:>6} {:>6} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9}\n",
        r.info.describe(),
        "case",
        "dtype",
        "m",
        "n",
        "k",
        "ms",
        "TFLOP/s",
        "burn ms",
        "TFLOP/s",
        "err",
        "burn err"
    );
    for x in &r.results {
        s += &format!(
            "{:<24} {:>5} {:>6} {:>6} {:>6} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9}{}\n",
            x.case.name,
            x.dtype,
            x.case.m,
            x.case.n,
            x.case.k,
            opt(&x.ms, 3),
            opt(&x.tflops, 1),
            opt(&x.burn_ms, 3),
            opt(&x.burn_tflops, 1),
            opt(&x.rel_err, 6),
            opt(&x.burn_rel_err, 6),
            x.note
                .as_ref()
                .map(|n| format!("  ({n})"))
                .unwrap_or_default()
        );
    }
    s
}

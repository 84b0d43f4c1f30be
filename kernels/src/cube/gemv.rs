//! The projections of a decode step as one kernel each, with the RMSNorm before them and the
//! residual add after them folded in ([`decode_linear`]): `out = residual + norm_G(x) · Wᵀ + b`.
//!
//! A decode step multiplies a few rows (the batch) by each weight matrix, so it reads every
//! weight once and is bound by that read, or, at small models, by the number of launches. A
//! Mamba2 layer's step was a norm, the in-projection, the mixer's step, the gated norm, the
//! out-projection and the residual add; with the norms and the add folded into the projections
//! it is three launches ([`super::step::mamba2_step`] in the middle).
//!
//! One cube of [`THREADS`] threads is [`GROUPS`] groups of [`LANES`]; group `g` owns `cpg`
//! consecutive output columns and its lanes split `k`: lane `l` reads `V` consecutive weights
//! of each of its columns at once (one 16-byte load where `k` allows: 8 bf16 or 4 f32), so a
//! group streams 512 contiguous bytes of a weight row a load, and nothing but the weights comes
//! from memory in the inner loop. The normalised input `x̂` (`rows × kt` f32, the whole of `k`
//! where it fits: [`scratch_len`]) is staged in shared memory once per slab, computed on the fly
//! from `x` with the norm's per-`(row, group)` scales, which every cube works out first (a pass
//! over `x`, small beside the weights). It is laid out so that the `V` values a lane needs for
//! one vector are `LANES` apart and the group's 32 lanes read 32 consecutive floats: no bank
//! conflicts. Each `x̂` value read feeds the lane's `cpg` columns. Accumulation is in f32; the
//! 32 partial sums of a column meet in shared memory at the end.
//!
//! `cpg` and `V` are chosen at launch ([`plan`]): `cpg · rows ≤ 32` accumulators a thread,
//! fewer columns a group where that would leave the GPU with fewer than two cubes a
//! multiprocessor; `V` the widest vector that divides `k` and fits the slab.

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use super::{prim, wrap};
use burn::tensor::{DType, Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::DecodeLinearInput;

/// Threads per cube: [`GROUPS`] groups of [`LANES`].
const THREADS: usize = 256;
/// Threads that share one output column.
const LANES: usize = 32;
/// Thread groups per cube.
const GROUPS: usize = THREADS / LANES;
/// Partial sums reduced per round at the end (`GROUPS · ROUND · LANES` f32 of shared memory).
const ROUND: usize = 8;
/// Most accumulators a thread holds (`cpg · rows`).
const MAX_ACC: usize = 32;
/// The most rows (the decode batch) the kernel takes; larger batches use the plain ops.
pub const MAX_ROWS: usize = crate::DECODE_MAX_ROWS;

/// f32 of shared memory for the staged input: 32 KiB where the device allows 48 KiB a cube
/// (CUDA), else 8 KiB (Vulkan guarantees a workgroup only 16 KiB, and a first version using
/// 40 KiB at 32 rows came out wrong on lavapipe). Never below what the end's reduction needs.
fn scratch_len(max_shared_bytes: usize) -> usize {
    if max_shared_bytes >= 48 << 10 {
        8192
    } else {
        GROUPS * ROUND * LANES
    }
}

/// How one launch splits the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// Weights a lane loads at once (the vector size).
    v: usize,
    /// Output columns per thread group.
    cpg: usize,
    /// `k` per staged slab: a multiple of `LANES · v`, the whole of `k` where it fits.
    kt: usize,
    /// f32 of the staging buffer (`≥ rows · kt`).
    scratch: usize,
}

/// The launch plan for `rows × k → n` with weights of `w_bytes` bytes whose row stride is
/// `ws0` elements (`ws1` between consecutive `k`), on a device whose widest loads are among
/// `vector_sizes`, with `max_shared` bytes of shared memory a cube and `sms` multiprocessors.
#[allow(clippy::too_many_arguments)]
fn plan(
    rows: usize,
    k: usize,
    n: usize,
    ws0: usize,
    ws1: usize,
    vector_sizes: impl Iterator<Item = usize>,
    max_shared: usize,
    sms: usize,
) -> Plan {
    let scratch = scratch_len(max_shared);
    let v = vector_sizes
        .filter(|&v| {
            v == 1
                || (ws1 == 1
                    && k.is_multiple_of(v)
                    && ws0.is_multiple_of(v)
                    && rows * LANES * v <= scratch)
        })
        .max()
        .unwrap_or(1);
    let step = LANES * v;
    let per_row = (scratch / rows / step).max(1) * step;
    let kt = per_row.min(k.div_ceil(step) * step);
    let cpg = [4, 2, 1]
        .into_iter()
        .find(|&c| c * rows <= MAX_ACC && n.div_ceil(GROUPS * c) >= 2 * sms)
        .unwrap_or(1);
    Plan {
        v,
        cpg,
        kt,
        scratch,
    }
}

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// `out[m, n] = residual[m, n] + b[n] + Σ_k x̂[m, k] W[n, k]` with `x̂ = x · r[m, g(k)] · nw[k]`
/// (the RMSNorm over `groups` groups of `k`) when `norm`, else `x̂ = x`. `w` is read `vs` (its
/// vector size `V`) elements at a time: its row stride is a multiple of `vs` and, where
/// `vs > 1`, `k` is contiguous.
///
/// Launched unchecked (no bounds check on each global read and write): every index below is
/// guarded by the kernel itself (`pair < pairs` and `kk < gsize` in the norm pass, `kc < k`
/// while staging, `col < n_out` and `k0 + kk < k` for the weights, `col < n_out` at the end),
/// and the launcher only passes shapes [`applies`] accepted. `check_mode = "validate"` in
/// `cubecl.toml` turns the checks back on and reports a read out of bounds.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_linear_kernel<F: Float, W: Float, N: Float, O: Float, V: Size>(
    x: &Tensor<F>,                        // [rows, k]
    nw: &ComptimeOption<Tensor<N>>,       // [k]: the norm's weight
    w: &Tensor<Vector<W, V>>,             // [n, k]
    bias: &ComptimeOption<Tensor<W>>,     // [n]
    residual: &ComptimeOption<Tensor<O>>, // [rows, n]
    out: &mut Tensor<O>,                  // [rows, n]
    eps: f32,
    #[comptime] rows: usize,
    #[comptime] groups: usize,
    #[comptime] cpg: usize,
    #[comptime] vs: usize,
    #[comptime] kt: usize,
    #[comptime] scratch: usize,
    #[comptime] unroll_k: bool,
    #[define(F, W, N, O)] _dtypes: [StorageType; 4],
) {
    let k = x.shape(1);
    let n_out = out.shape(1);
    let u = UNIT_POS as usize;
    let lane = u % LANES;
    let grp = u / LANES;
    let col0 = (CUBE_POS_X as usize * GROUPS + grp) * cpg;
    let gsize = k / groups;
    let step = comptime!(LANES * vs);
    let (ws0, ws1) = (w.stride(0), w.stride(1));

    // The norm's scales r[m, g] = 1 / sqrt(mean over group g of x[m]² + eps). A (row, group)
    // pair takes `spread` thread groups (all eight for a single pair: one row, one norm group),
    // each lane four independent loads at a time, so that this pass, which every cube makes
    // before it can stream a weight, is short.
    let mut rs = SharedMemory::<f32>::new(comptime!(rows * groups));
    // The staged input, and at the end the partial sums.
    let mut xs = SharedMemory::<f32>::new(scratch);
    #[comptime]
    if let ComptimeOption::Some(_nw) = nw {
        let pairs = comptime!(rows * groups);
        let spread = comptime!(if rows * groups >= GROUPS {
            1
        } else {
            GROUPS / (rows * groups)
        });
        let per_round = comptime!(GROUPS / spread);
        let width = comptime!(spread * LANES);
        let sub = grp % spread;
        for round in 0..comptime!((rows * groups + per_round - 1) / per_round) {
            let pair = round * per_round + grp / spread;
            let mut ss = 0.0f32;
            if pair < pairs {
                let m = pair / groups;
                let g = pair % groups;
                let base = m * x.stride(0) + g * gsize * x.stride(1);
                let first = sub * LANES + lane;
                for it in 0..(gsize + 4 * width - 1) / (4 * width) {
                    #[unroll]
                    for j in 0..4usize {
                        let kk = (it * 4 + j) * width + first;
                        if kk < gsize {
                            let v = f32::cast_from(x[base + kk * x.stride(1)]);
                            ss += v * v;
                        }
                    }
                }
            }
            xs[u] = ss;
            sync_cube();
            if lane == 0 {
                let mut t = 0.0f32;
                for l in 0..LANES {
                    t += xs[grp * LANES + l];
                }
                xs[THREADS + grp] = t;
            }
            sync_cube();
            if lane == 0 && sub == 0 && pair < pairs {
                let mut t = 0.0f32;
                for q in 0..spread {
                    t += xs[THREADS + grp + q];
                }
                rs[pair] = 1.0f32 / (t / f32::cast_from(gsize) + eps).sqrt();
            }
            sync_cube();
        }
    }

    let mut acc = Array::<f32>::new(comptime!(cpg * rows));
    #[unroll]
    for a in 0..comptime!(cpg * rows) {
        acc[a] = 0.0f32;
    }
    for slab in 0..(k + kt - 1) / kt {
        let k0 = slab * kt;
        // Stage x̂[·, k0 .. k0 + kt]: element kk of row m at m·kt + (kk's lane vector) with
        // its V values LANES apart, so that a lane's reads below are consecutive across lanes.
        // Unrolled (at most `scratch / THREADS` = 32 iterations) so that a thread's reads of `x`
        // and the norm's weight are all in flight at once: rolled, each waited for its own
        // round trip to L2 before the next, the latency every cube paid before its first weight.
        #[unroll]
        for e0 in 0..comptime!((rows * kt + THREADS - 1) / THREADS) {
            let e = e0 * THREADS + u;
            if e < comptime!(rows * kt) {
                let m = e / kt;
                let kk = e % kt;
                let kc = k0 + kk;
                let mut v = 0.0f32;
                if kc < k {
                    v = f32::cast_from(x[m * x.stride(0) + kc * x.stride(1)]);
                    #[comptime]
                    if let ComptimeOption::Some(nw) = nw {
                        v *= f32::cast_from(nw[kc * nw.stride(0)]) * rs[m * groups + kc / gsize];
                    }
                }
                let it = kk / step;
                let r = kk % step;
                xs[m * kt + it * step + (r % vs) * LANES + r / vs] = v;
            }
        }
        sync_cube();
        // Unrolled (`unroll_k`), a lane's weight loads of the whole slab can be issued before
        // the first of them is used; rolled, each iteration's `cpg` loads are the only ones in
        // flight, which at batch 1 and one column a group leaves too few bytes in flight per
        // multiprocessor to cover the memory's latency.
        #[unroll(unroll_k)]
        for it in 0..comptime!(kt / (LANES * vs)) {
            let kk = it * step + lane * vs;
            if k0 + kk < k {
                let mut wv = Array::<Vector<f32, V>>::new(cpg);
                #[unroll]
                for c in 0..cpg {
                    let col = col0 + c;
                    let mut t = Vector::<f32, V>::empty().fill(0.0f32);
                    if col < n_out {
                        t = Vector::<f32, V>::cast_from(w[(col * ws0 + (k0 + kk) * ws1) / vs]);
                    }
                    wv[c] = t;
                }
                let xbase = it * step + lane;
                #[unroll]
                for m in 0..rows {
                    #[unroll]
                    for i in 0..vs {
                        let xv = xs[m * kt + xbase + i * LANES];
                        #[unroll]
                        for c in 0..cpg {
                            acc[c * rows + m] += xv * wv[c][i];
                        }
                    }
                }
            }
        }
        sync_cube();
    }

    // The LANES partial sums of each (column, row), ROUND of them a group a round (unrolled:
    // `acc` stays in registers).
    #[unroll]
    for round in 0..comptime!((cpg * rows + ROUND - 1) / ROUND) {
        #[unroll]
        for j in 0..ROUND {
            let a = round * ROUND + j;
            let mut v = 0.0f32;
            if a < comptime!(cpg * rows) {
                v = acc[a];
            }
            xs[(grp * ROUND + j) * LANES + lane] = v;
        }
        sync_cube();
        let a = round * ROUND + lane;
        if lane < ROUND && a < comptime!(cpg * rows) {
            let col = col0 + a / rows;
            let m = a % rows;
            if col < n_out {
                let mut t = 0.0f32;
                for l in 0..LANES {
                    t += xs[(grp * ROUND + lane) * LANES + l];
                }
                #[comptime]
                if let ComptimeOption::Some(bias) = bias {
                    t += f32::cast_from(bias[col * bias.stride(0)]);
                }
                #[comptime]
                if let ComptimeOption::Some(res) = residual {
                    t += f32::cast_from(res[m * res.stride(0) + col * res.stride(1)]);
                }
                out[m * out.stride(0) + col * out.stride(1)] = O::cast_from(t);
            }
        }
        sync_cube();
    }
}

/// `MAMBA_GEMV_UNROLL=on|off` (read once; default on): whether the projection kernel unrolls its
/// loop over a slab's weight vectors, for measuring one against the other in one binary.
fn unroll_k() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(
        || match std::env::var("MAMBA_GEMV_UNROLL").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("on") | Ok("1") => true,
            Ok("off") | Ok("0") => false,
            Ok(other) => {
                eprintln!("warning: MAMBA_GEMV_UNROLL=`{other}` is not on or off; using on");
                true
            }
        },
    )
}

/// Whether [`decode_linear`] runs the kernel for `input` (else the reference).
pub fn applies<B: burn::tensor::backend::Backend>(input: &DecodeLinearInput<B>) -> bool {
    let [rows, k] = input.x.dims();
    let [n, wk] = input.weight.dims();
    let norm_ok = input
        .norm
        .as_ref()
        .is_none_or(|(w, g, _)| *g > 0 && k % g == 0 && w.dims() == [k]);
    (1..=MAX_ROWS).contains(&rows)
        && wk == k
        && k > 0
        && n > 0
        && norm_ok
        && input
            .bias
            .as_ref()
            .is_none_or(|b| b.dims() == [n] && b.dtype() == input.weight.dtype())
        && input
            .residual
            .as_ref()
            .is_none_or(|r| r.dims() == [rows, n])
}

/// Kernel of [`crate::MambaBackend::decode_linear`]; the reference
/// ([`crate::reference::decode_linear`]) where it does not apply (more than [`MAX_ROWS`] rows,
/// shapes that do not fit).
pub fn decode_linear<R, F, I, BT>(
    input: DecodeLinearInput<Cb<R, F, I, BT>>,
) -> BTensor<Cb<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !applies(&input) {
        return crate::reference::decode_linear(input);
    }
    let DecodeLinearInput {
        x,
        norm,
        weight,
        bias,
        residual,
        out_dtype,
    } = input;
    let [rows, _] = x.dims();
    let [n, _] = weight.dims();
    let out_dtype = residual.as_ref().map_or(out_dtype, |r| r.dtype());
    let (xd, wd) = (x.dtype(), weight.dtype());
    let (nw, groups, eps) = match norm {
        Some((w, g, e)) => (Some(w), g, e),
        None => (None, 1, 0.0),
    };
    let nd = nw.as_ref().map_or(DType::F32, |w| w.dtype());
    let x = prim(x);
    let weight = prim(weight);
    let client = x.client.clone();
    let props = client.properties();
    let p = plan(
        rows,
        weight.meta.shape()[1],
        n,
        weight.meta.strides()[0],
        weight.meta.strides()[1],
        client.io_optimized_vector_sizes(wd.size()),
        props.hardware.max_shared_memory_size,
        props.hardware.num_streaming_multiprocessors.unwrap_or(64) as usize,
    );
    let out = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, n]),
        out_dtype,
    );
    // SAFETY: the kernel guards each of its global indices (see its doc), and `applies` held.
    unsafe {
        decode_linear_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(n.div_ceil(GROUPS * p.cpg) as u32, 1, 1),
            CubeDim::new_1d(THREADS as u32),
            p.v,
            x.into_tensor_arg(),
            nw.map(|w| prim(w).into_tensor_arg()).into(),
            weight.into_tensor_arg(),
            bias.map(|b| prim(b).into_tensor_arg()).into(),
            residual.map(|r| prim(r).into_tensor_arg()).into(),
            out.clone().into_tensor_arg(),
            eps as f32,
            rows,
            groups,
            p.cpg,
            p.v,
            p.kt,
            p.scratch,
            unroll_k(),
            [xd.into(), wd.into(), nd.into(), out_dtype.into()],
        );
    }
    wrap(out)
}

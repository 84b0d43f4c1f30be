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
//! where it fits: [`scratch_len`]) is staged in shared memory. Where one slab holds all of `k`
//! (every decode step at batch 1), each cube stages the raw rows (all of a thread's reads in
//! flight at once), takes the norm's per-`(row, group)` sums of squares from shared memory and
//! scales in place; otherwise it works the scales out from `x` first and stages `x̂` slab by
//! slab. It is laid out so that the `V` values a lane needs for one vector are `LANES` apart and
//! the group's 32 lanes read 32 consecutive floats: no bank conflicts. Each `x̂` value read feeds
//! the lane's `cpg` columns. Accumulation is in f32; the 32 partial sums of a column meet in
//! shared memory at the end.
//!
//! `cpg` and `V` are chosen at launch ([`plan`]): `cpg · rows ≤ 32` accumulators a thread,
//! fewer columns a group where that would leave the GPU with fewer than two cubes a
//! multiprocessor; `V` the widest vector that divides `k` and fits the slab.

// Kernel code spells ceil-division and multiples out: `usize::div_ceil` and
// `usize::is_multiple_of` are not cube functions.
#![allow(clippy::manual_div_ceil, clippy::manual_is_multiple_of)]

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
        // What the slab needs (less shared memory a cube, more cubes a multiprocessor), never
        // below what the end's reduction uses.
        scratch: (rows * kt).max(GROUPS * ROUND * LANES),
    }
}

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Position in the staging buffer of element `kk` (of the slab) of row `m`: within each block of
/// `LANES · vs` elements, the `vs` values a lane multiplies with one weight vector are `LANES`
/// apart, so that the group's 32 lanes read 32 consecutive floats.
#[cube]
fn stage_pos(m: usize, kk: usize, #[comptime] kt: usize, #[comptime] vs: usize) -> usize {
    let step = comptime!(LANES * vs);
    let r = kk % step;
    m * kt + (kk / step) * step + (r % vs) * LANES + r / vs
}

/// `out[m, n] = residual[m, n] + b[n] + Σ_k x̂[m, k] W[n, k]` with `x̂ = x · r[m, g(k)] · nw[k]`
/// (the RMSNorm over `groups` groups of `k`) when `norm`, else `x̂ = x`. `w` is read `vs` (its
/// vector size `V`) elements at a time: its row stride is a multiple of `vs` and, where
/// `vs > 1`, `k` is contiguous. `k` is a comptime value: a decode step's projections have fixed
/// shapes, and with `k`, the slab and the norm groups known, the compiler resolves every bound
/// that the shape decides and keeps the loads of an unrolled loop free of branches.
///
/// Every global read is unconditional, at an index clamped into the tensor where the element is
/// past its end (its value then replaced by zero, or multiplied by a staged zero): a read inside
/// a branch cannot be issued before the branch is decided, so a guarded loop waits for each
/// read in turn (one round trip to L2 a staged element, which made the prologue of a cube tens
/// of microseconds at the 7B shape's out-projection: its SASS, `scripts/cuda_offline.py`).
///
/// Launched unchecked (no bounds check on each global read and write): every index is in
/// bounds by construction (clamped reads; writes only for `col < n_out`), and the launcher only
/// passes shapes [`applies`] accepted. `check_mode = "validate"` in `cubecl.toml` turns the
/// checks back on and reports a read out of bounds.
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
    #[comptime] k: usize,
    #[comptime] groups: usize,
    #[comptime] cpg: usize,
    #[comptime] vs: usize,
    #[comptime] kt: usize,
    #[comptime] scratch: usize,
    #[comptime] unroll_k: bool,
    #[define(F, W, N, O)] _dtypes: [StorageType; 4],
) {
    let n_out = out.shape(1);
    let u = UNIT_POS as usize;
    let lane = u % LANES;
    let grp = u / LANES;
    let col0 = (CUBE_POS_X as usize * GROUPS + grp) * cpg;
    let gsize = comptime!(k / groups);
    // One slab holds the whole of `k` (each cube then stages `x` once and takes the norm's
    // sums from shared memory): `kt ≥ k`, the launcher's choice where it fits.
    let whole = comptime!(kt >= k);
    let per_thread = comptime!((rows * kt + THREADS - 1) / THREADS);
    let (xs0, xs1) = (x.stride(0), x.stride(1));
    let (ws0, ws1) = (w.stride(0), w.stride(1));

    // The norm's scales r[m, g] = 1 / sqrt(mean over group g of x[m]² + eps).
    let mut rs = SharedMemory::<f32>::new(comptime!(rows * groups));
    // The staged input, and at the end the partial sums.
    let mut xs = SharedMemory::<f32>::new(scratch);
    // Per-thread partial sums of squares, then per thread group.
    let mut red = SharedMemory::<f32>::new(comptime!(THREADS + GROUPS));
    let pairs = comptime!(rows * groups);
    // A (row, group) pair takes `spread` thread groups (all eight for a single pair: one row,
    // one norm group).
    let spread = comptime!(if rows * groups >= GROUPS {
        1
    } else {
        GROUPS / (rows * groups)
    });
    let per_round = comptime!(GROUPS / spread);
    let width = comptime!(spread * LANES);
    let sub = grp % spread;
    let first = sub * LANES + lane;

    let mut acc = Array::<f32>::new(comptime!(cpg * rows));
    #[unroll]
    for a in 0..comptime!(cpg * rows) {
        acc[a] = 0.0f32;
    }

    #[comptime]
    if whole {
        // Stage the raw rows (all of a thread's reads in flight at once), then the norm from
        // shared memory, then scale in place: no pass over `x` in global memory before it.
        #[unroll]
        for e0 in 0..per_thread {
            let e = e0 * THREADS + u;
            let m = e / kt;
            let kk = e % kt;
            let ok = e < comptime!(rows * kt) && kk < k;
            let v = f32::cast_from(x[select(ok, m * xs0 + kk * xs1, 0)]);
            if e < comptime!(rows * kt) {
                xs[stage_pos(m, kk, kt, vs)] = select(ok, v, 0.0f32);
            }
        }
        #[comptime]
        if let ComptimeOption::Some(nw) = nw {
            sync_cube();
            for round in 0..comptime!((pairs + per_round - 1) / per_round) {
                let pair = round * per_round + grp / spread;
                let mut ss = 0.0f32;
                if pair < pairs {
                    let m = pair / groups;
                    let g0 = (pair % groups) * gsize;
                    for it in 0..comptime!((gsize + width - 1) / width) {
                        let kk = it * width + first;
                        if kk < gsize {
                            let v = xs[stage_pos(m, g0 + kk, kt, vs)];
                            ss += v * v;
                        }
                    }
                }
                norm_scale(&mut red, &mut rs, ss, pair, eps, pairs, gsize, spread);
            }
            #[unroll]
            for e0 in 0..per_thread {
                let e = e0 * THREADS + u;
                let m = e / kt;
                let kk = e % kt;
                let ok = e < comptime!(rows * kt) && kk < k;
                let scale = f32::cast_from(nw[select(ok, kk, 0) * nw.stride(0)]);
                if e < comptime!(rows * kt) {
                    let g = select(kk < k, kk / gsize, 0);
                    let p = stage_pos(m, kk, kt, vs);
                    xs[p] = xs[p] * scale * rs[m * groups + g];
                }
            }
        }
        sync_cube();
        weights_slab::<W, V>(
            w, &xs, &mut acc, 0, n_out, col0, lane, ws0, ws1, rows, k, cpg, vs, kt, unroll_k,
        );
        // The end's partial sums reuse `xs`.
        sync_cube();
    } else {
        #[comptime]
        if let ComptimeOption::Some(_nw) = nw {
            // The norm over `x` in global memory (the rows do not fit in one slab): eight
            // reads a lane at a time, none of them behind a branch.
            let reads = comptime!(8usize);
            for round in 0..comptime!((pairs + per_round - 1) / per_round) {
                let pair = round * per_round + grp / spread;
                let mut ss = 0.0f32;
                let okp = pair < pairs;
                let m = select(okp, pair / groups, 0);
                let base = m * xs0 + select(okp, pair % groups, 0) * gsize * xs1;
                for it in 0..comptime!((gsize + reads * width - 1) / (reads * width)) {
                    #[unroll]
                    for j in 0..reads {
                        let kk = (it * reads + j) * width + first;
                        let ok = okp && kk < gsize;
                        let v = f32::cast_from(x[base + select(ok, kk, 0) * xs1]);
                        ss += select(ok, v * v, 0.0f32);
                    }
                }
                norm_scale(&mut red, &mut rs, ss, pair, eps, pairs, gsize, spread);
            }
        }
        for slab in 0..comptime!((k + kt - 1) / kt) {
            let k0 = slab * kt;
            #[unroll]
            for e0 in 0..per_thread {
                let e = e0 * THREADS + u;
                let m = e / kt;
                let kk = e % kt;
                let kc = k0 + kk;
                let ok = e < comptime!(rows * kt) && kc < k;
                let mut v = f32::cast_from(x[select(ok, m * xs0 + kc * xs1, 0)]);
                #[comptime]
                if let ComptimeOption::Some(nw) = nw {
                    let g = select(ok, kc / gsize, 0);
                    v *= f32::cast_from(nw[select(ok, kc, 0) * nw.stride(0)])
                        * rs[select(ok, m, 0) * groups + g];
                }
                if e < comptime!(rows * kt) {
                    xs[stage_pos(m, kk, kt, vs)] = select(ok, v, 0.0f32);
                }
            }
            sync_cube();
            weights_slab::<W, V>(
                w, &xs, &mut acc, k0, n_out, col0, lane, ws0, ws1, rows, k, cpg, vs, kt, unroll_k,
            );
            sync_cube();
        }
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

/// The end of one round of the norm's sums: each thread's partial `ss` (of pair `pair`, over
/// `spread` thread groups) summed into `rs[pair] = 1 / sqrt(Σ / gsize + eps)`. Every thread
/// takes part (it syncs the cube).
#[cube]
fn norm_scale(
    red: &mut SharedMemory<f32>,
    rs: &mut SharedMemory<f32>,
    ss: f32,
    pair: usize,
    eps: f32,
    #[comptime] pairs: usize,
    #[comptime] gsize: usize,
    #[comptime] spread: usize,
) {
    let u = UNIT_POS as usize;
    let lane = u % LANES;
    let grp = u / LANES;
    red[u] = ss;
    sync_cube();
    if lane == 0 {
        let mut t = 0.0f32;
        for l in 0..LANES {
            t += red[grp * LANES + l];
        }
        red[THREADS + grp] = t;
    }
    sync_cube();
    if lane == 0 && grp % spread == 0 && pair < pairs {
        let mut t = 0.0f32;
        for q in 0..spread {
            t += red[THREADS + grp + q];
        }
        rs[pair] = 1.0f32 / (t / comptime!(gsize as f32) + eps).sqrt();
    }
    sync_cube();
}

/// One staged slab (`x̂[·, k0 .. k0 + kt]` in `xs`) against the weights of this thread group's
/// `cpg` columns, into `acc`. A lane reads `vs` consecutive weights of each column at once; a
/// read past `k` or past the last column is made at a clamped index and its value zeroed (past
/// `k`) or its sum never stored (past the last column), so no read waits on a branch.
/// Unrolled (`unroll_k`), a lane's reads of the whole slab can be issued before the first of
/// them is used.
#[cube]
#[allow(clippy::too_many_arguments)]
fn weights_slab<W: Float, V: Size>(
    w: &Tensor<Vector<W, V>>,
    xs: &SharedMemory<f32>,
    acc: &mut Array<f32>,
    k0: usize,
    n_out: usize,
    col0: usize,
    lane: usize,
    ws0: usize,
    ws1: usize,
    #[comptime] rows: usize,
    #[comptime] k: usize,
    #[comptime] cpg: usize,
    #[comptime] vs: usize,
    #[comptime] kt: usize,
    #[comptime] unroll_k: bool,
) {
    let step = comptime!(LANES * vs);
    #[unroll(unroll_k)]
    for it in 0..comptime!(kt / step) {
        let kk = it * step + lane * vs;
        let ok = k0 + kk < k;
        let kc = select(ok, k0 + kk, 0);
        let mut wv = Array::<Vector<f32, V>>::new(cpg);
        #[unroll]
        for c in 0..cpg {
            let col = col0 + c;
            let colc = select(col < n_out, col, n_out - 1);
            let t = Vector::<f32, V>::cast_from(w[(colc * ws0 + kc * ws1) / vs]);
            wv[c] = select(ok, t, Vector::<f32, V>::empty().fill(0.0f32));
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

/// `MAMBA_GEMV_CPG=1|2|4` (read once; default: the plan's choice): output columns a thread
/// group takes, for measuring the choices against each other in one binary.
fn cpg_override() -> Option<usize> {
    static CPG: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CPG.get_or_init(
        || match std::env::var("MAMBA_GEMV_CPG").as_deref().map(str::trim) {
            Err(_) | Ok("") => None,
            Ok(v) => match v.parse::<usize>() {
                Ok(c @ (1 | 2 | 4)) => Some(c),
                _ => {
                    eprintln!("warning: MAMBA_GEMV_CPG=`{v}` is not 1, 2 or 4; using the plan's");
                    None
                }
            },
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
    let [rows, k] = x.dims();
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
    let mut p = p;
    if let Some(c) = cpg_override().filter(|c| c * rows <= MAX_ACC) {
        p.cpg = c;
    }
    let out = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, n]),
        out_dtype,
    );
    // SAFETY: every global index of the kernel is in bounds by construction (see its doc), and
    // `applies` held.
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
            k,
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

/// The projection's CUDA C++ at the shapes of a decode step (`super::offline`).
#[cfg(all(test, feature = "cuda", feature = "wgpu"))]
mod cuda_source {
    use super::super::offline::{client, emit, settings, tensor};
    use super::decode_linear_kernel::DecodeLinearKernel;
    use cubecl::prelude::ComptimeOptionCompilationArg as Opt;
    use cubecl::prelude::*;

    #[test]
    #[ignore]
    fn emit_decode_linear() {
        let client = client();
        let bf16: StorageType = burn::tensor::DType::BF16.into();
        let f32t: StorageType = burn::tensor::DType::F32.into();
        // (name, rows, k, n, norm groups, weight dtype, its bytes, out-projection)
        for &(name, rows, k, n, groups, wd, bytes, out) in &[
            (
                "in7b", 1usize, 4096usize, 18560usize, 1usize, bf16, 2usize, false,
            ),
            ("out7b", 1, 8192, 4096, 8, bf16, 2, true),
            ("head7b", 1, 4096, 32768, 1, bf16, 2, false),
            ("in7b_b32", 32, 4096, 18560, 1, bf16, 2, false),
            ("out7b_b32", 32, 8192, 4096, 8, bf16, 2, true),
            ("in130m", 1, 768, 3352, 1, f32t, 4, false),
            ("out130m", 1, 1536, 768, 1, f32t, 4, true),
        ] {
            // H100: 227 KiB of shared memory a cube, 132 multiprocessors, 16-byte loads.
            let p = super::plan(
                rows,
                k,
                n,
                k,
                1,
                [16 / bytes, 4, 2, 1].into_iter(),
                227 << 10,
                132,
            );
            for unroll in [true, false] {
                let kernel = DecodeLinearKernel::<cubecl::wgpu::WgpuRuntime>::new(
                    settings(super::THREADS as u32),
                    client.clone(),
                    tensor(),
                    Opt::Some(tensor()),
                    tensor(),
                    Opt::None,
                    if out { Opt::Some(tensor()) } else { Opt::None },
                    tensor(),
                    (),
                    p.v,
                    rows,
                    k,
                    groups,
                    p.cpg,
                    p.v,
                    p.kt,
                    p.scratch,
                    unroll,
                    [wd, wd, wd, if out { f32t } else { wd }],
                );
                let tag = if unroll { "u" } else { "r" };
                eprintln!(
                    "{name}_{tag}: {p:?}, {} cubes",
                    n.div_ceil(super::GROUPS * p.cpg)
                );
                emit(
                    &format!("decode_linear_{name}_{tag}"),
                    kernel,
                    ExecutionMode::Unchecked,
                );
            }
        }
    }
}

//! The projections of a decode step as one kernel each, with the RMSNorm before them and the
//! residual add after them folded in ([`decode_linear`]): `out = residual + norm_G(x) · Wᵀ + b`.
//!
//! A decode step multiplies a few rows (the batch) by each weight matrix, so it reads every
//! weight once and is bound by that read, or, at small models, by the number of launches. A
//! Mamba2 layer's step was a norm, the in-projection, the mixer's step, the gated norm, the
//! out-projection and the residual add; with the norms and the add folded into the projections
//! it is three launches ([`super::step::mamba2_step`] in the middle).
//!
//! One cube of [`THREADS`] computes [`COLS`] output columns for all rows: thread group `j` (32
//! threads) owns column `n = COLS · cube + j` and strides over `k`, reading the weight row
//! `W[n, ·]` (contiguous in transformers' layout) once. The normalised input is staged in shared
//! memory in slabs ([`slab_len`]: `rows × slab ≤` [`SCRATCH`] f32), computed on the fly from `x` with the norm's
//! per-`(row, group)` scales, which every cube works out first (a pass over `x`, small beside
//! the weight). Accumulation is in f32; the 32 partial sums of a column meet in shared memory.

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

/// Threads per cube: [`COLS`] groups of [`LANES`].
const THREADS: usize = 256;
/// Threads that share one output column.
const LANES: usize = 32;
/// Output columns per cube.
const COLS: usize = THREADS / LANES;
/// Shared memory for the staged input and the partial sums, in f32 (8 KiB: Vulkan guarantees a
/// workgroup only 16 KiB, and a first version using 40 KiB at 32 rows came out wrong on
/// lavapipe).
const SCRATCH: usize = COLS * COLS * LANES;
/// `k` per staged slab of the normalised input at `rows` rows: as much as [`SCRATCH`] holds, a
/// multiple of [`LANES`], at most [`THREADS`].
const fn slab_len(rows: usize) -> usize {
    let kt = SCRATCH / rows / LANES * LANES;
    if kt > THREADS {
        THREADS
    } else {
        kt
    }
}
/// The most rows (the decode batch) the kernel takes; larger batches use the plain ops.
pub const MAX_ROWS: usize = crate::DECODE_MAX_ROWS;

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// `out[m, n] = residual[m, n] + b[n] + Σ_k x̂[m, k] W[n, k]` with `x̂ = x · r[m, g(k)] · nw[k]`
/// (the RMSNorm over `groups` groups of `k`) when `norm`, else `x̂ = x`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn decode_linear_kernel<F: Float, W: Float, N: Float, O: Float>(
    x: &Tensor<F>,                        // [rows, k]
    nw: &ComptimeOption<Tensor<N>>,       // [k]: the norm's weight
    w: &Tensor<W>,                        // [n, k]
    bias: &ComptimeOption<Tensor<W>>,     // [n]
    residual: &ComptimeOption<Tensor<O>>, // [rows, n]
    out: &mut Tensor<O>,                  // [rows, n]
    eps: f32,
    #[comptime] rows: usize,
    #[comptime] groups: usize,
    #[define(F, W, N, O)] _dtypes: [StorageType; 4],
) {
    let k = x.shape(1);
    let n_out = w.shape(0);
    let u = UNIT_POS as usize;
    let lane = u % LANES;
    let grp = u / LANES;
    let col = CUBE_POS_X as usize * COLS + grp;
    let gsize = k / groups;

    // The norm's scales r[m, g] = 1 / sqrt(mean over group g of x[m]² + eps): one thread group
    // per (row, group) pair, COLS pairs a round.
    let mut rs = SharedMemory::<f32>::new(comptime!(rows * groups));
    // The staged input, and between its uses the partial sums (of the scales, of the columns).
    let mut xs = SharedMemory::<f32>::new(SCRATCH);
    let kt = comptime!(slab_len(rows));
    #[comptime]
    if let ComptimeOption::Some(_nw) = nw {
        let pairs = comptime!(rows * groups);
        for round in 0..comptime!((rows * groups + COLS - 1) / COLS) {
            let pair = round * COLS + grp;
            let mut ss = 0.0f32;
            if pair < pairs {
                let m = pair / groups;
                let g = pair % groups;
                let base = m * x.stride(0);
                for it in 0..(gsize + LANES - 1) / LANES {
                    let kk = it * LANES + lane;
                    if kk < gsize {
                        let v = f32::cast_from(x[base + (g * gsize + kk) * x.stride(1)]);
                        ss += v * v;
                    }
                }
            }
            xs[u] = ss;
            sync_cube();
            if lane == 0 && pair < pairs {
                let mut t = 0.0f32;
                for l in 0..LANES {
                    t += xs[grp * LANES + l];
                }
                rs[pair] = 1.0f32 / (t / f32::cast_from(gsize) + eps).sqrt();
            }
            sync_cube();
        }
    }

    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for m in 0..rows {
        acc[m] = 0.0f32;
    }
    let wbase = col * w.stride(0);
    for slab in 0..(k + kt - 1) / kt {
        let k0 = slab * kt;
        // Stage x̂[·, k0 .. k0 + kt]: thread u < kt takes column k0 + u of every row.
        let kc = k0 + u;
        let mut scale = 1.0f32;
        #[comptime]
        if let ComptimeOption::Some(nw) = nw {
            if kc < k && u < kt {
                scale = f32::cast_from(nw[kc * nw.stride(0)]);
            }
        }
        if u < kt {
            #[unroll]
            for m in 0..rows {
                let mut v = 0.0f32;
                if kc < k {
                    v = f32::cast_from(x[m * x.stride(0) + kc * x.stride(1)]) * scale;
                    #[comptime]
                    if let ComptimeOption::Some(_nw) = nw {
                        v *= rs[m * groups + kc / gsize];
                    }
                }
                xs[m * kt + u] = v;
            }
        }
        sync_cube();
        if col < n_out {
            for it in 0..comptime!(kt / LANES) {
                let kk = it * LANES + lane;
                if k0 + kk < k {
                    let wv = f32::cast_from(w[wbase + (k0 + kk) * w.stride(1)]);
                    #[unroll]
                    for m in 0..rows {
                        acc[m] += xs[m * kt + kk] * wv;
                    }
                }
            }
        }
        sync_cube();
    }

    // The LANES partial sums of each column, COLS rows a round (unrolled: `acc` stays in
    // registers).
    #[unroll]
    for round in 0..comptime!((rows + COLS - 1) / COLS) {
        #[unroll]
        for j in 0..COLS {
            let m = round * COLS + j;
            let mut v = 0.0f32;
            if m < rows {
                v = acc[m];
            }
            xs[(grp * COLS + j) * LANES + lane] = v;
        }
        sync_cube();
        let m = round * COLS + lane;
        if lane < COLS && m < rows && col < n_out {
            let mut t = 0.0f32;
            for l in 0..LANES {
                t += xs[(grp * COLS + lane) * LANES + l];
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
        sync_cube();
    }
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
    let client = x.client.clone();
    let out = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, n]),
        out_dtype,
    );
    decode_linear_kernel::launch::<R>(
        &client,
        CubeCount::Static(n.div_ceil(COLS) as u32, 1, 1),
        CubeDim::new_1d(THREADS as u32),
        x.into_tensor_arg(),
        nw.map(|w| prim(w).into_tensor_arg()).into(),
        prim(weight).into_tensor_arg(),
        bias.map(|b| prim(b).into_tensor_arg()).into(),
        residual.map(|r| prim(r).into_tensor_arg()).into(),
        out.clone().into_tensor_arg(),
        eps as f32,
        rows,
        groups,
        [xd.into(), wd.into(), nd.into(), out_dtype.into()],
    );
    wrap(out)
}

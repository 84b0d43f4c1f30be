//! RMSNorm and Mamba2's gated RMSNorm as one kernel each way (forward, backward), where the
//! tensor-op form launches ~10 kernels forward and ~20 backward, each a pass over the
//! activation, plus the casts around them in bf16.
//!
//! One cube of [`THREADS`] per `(row, group)` (a row is one token's `[width]`): the threads
//! stride over the group's channels, accumulate in f32, and meet in a shared-memory sum. Inputs
//! are read in their own dtype through their strides (the gate `z` is a narrowed view of the
//! input projection), outputs are written contiguous in the inputs' dtype, the weight is read as
//! f32. The math is that of [`crate::norm`]:
//!
//! ```text
//! g = y · silu(z)   (or y)      r = 1 / sqrt(mean_group(g²) + eps)      out = g · r · w
//! dg = r · (dout·w − g·r · mean_group(dout·w · g·r))
//! dy = dg · silu(z),   dz = dg · y · σ(z) · (1 + z · (1 − σ(z)))
//! ```
//!
//! The backward also writes `r` per `(row, group)`, from which the weight's gradient (needed
//! only when the norm weight trains) is one tensor-op reduction.
//!
//! Where every operand's channels are contiguous and a vector of `vs` channels (16 bytes: 8 bf16
//! or 4 f32) divides the group, the rows' strides and the views' offsets, the vector kernels
//! ([`norm_forward_vec_kernel`], [`norm_backward_vec_kernel`]) run instead: each thread loads
//! whole vectors, keeps its `rounds` of them in registers between the sum and the output pass
//! (the scalar kernels read every element twice), and the cube is sized to the group
//! ([`VecPlan`]) so that few threads idle. The scalar kernels moved 1.0–1.4 TB/s at the
//! Codestral-7B shape (call K's profile: 0.33 ms a forward launch, 0.49 ms a backward).

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use super::{prim, wrap};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
    CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::norm::NormGrads;

/// Threads per cube (a power of two: the shared sum halves it [`LOG2_THREADS`] times).
const THREADS: u32 = 256;
const LOG2_THREADS: u32 = 8;
/// The largest grid dimension every runtime takes (wgpu's limit).
const MAX_GRID: usize = 65_535;

/// `Σ v` over the cube's threads, returned to every thread (`shared`: [`THREADS`] slots).
#[cube]
fn cube_sum(v: f32, shared: &mut SharedMemory<f32>) -> f32 {
    cube_sum_of(v, shared, THREADS as usize, LOG2_THREADS as usize)
}

/// `Σ v` over a cube of `threads` (a power of two, `2^log2`) threads, returned to every thread
/// (`shared`: `threads` slots).
#[cube]
fn cube_sum_of(
    v: f32,
    shared: &mut SharedMemory<f32>,
    #[comptime] threads: usize,
    #[comptime] log2: usize,
) -> f32 {
    let u = UNIT_POS as usize;
    shared[u] = v;
    sync_cube();
    let mut s = comptime!(threads / 2).runtime();
    for _ in 0..log2 {
        if u < s {
            shared[u] = shared[u] + shared[u + s];
        }
        sync_cube();
        s /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

#[cube]
fn sigmoid_f32(z: f32) -> f32 {
    1.0f32 / (1.0f32 + (-z).exp())
}

/// The cube's `(row, group)` index, or past the end for spare cubes of the 2-D grid.
#[cube]
fn cube_index() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// `g` at channel `c` of the row at `yb` / `zb` (element offsets without the channel).
#[cube]
fn gated<F: Float>(
    y: &Tensor<F>,
    z: &Tensor<F>,
    yb: usize,
    zb: usize,
    c: usize,
    #[comptime] gate: bool,
) -> f32 {
    let yv = f32::cast_from(y[yb + c * y.stride(2)]);
    let mut g = yv;
    if gate {
        let zv = f32::cast_from(z[zb + c * z.stride(2)]);
        g = yv * zv * sigmoid_f32(zv);
    }
    g
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn norm_forward_kernel<F: Float>(
    y: &Tensor<F>,       // [batch, seq, width]
    z: &Tensor<F>,       // [batch, seq, width] (a placeholder without the gate)
    w: &Tensor<f32>,     // [width]
    out: &mut Tensor<F>, // [batch, seq, width], contiguous
    eps: f32,
    #[comptime] groups: usize,
    #[comptime] gate: bool,
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = out.shape(1);
    let width = out.shape(2);
    let gw = width / groups;
    let idx = cube_index();
    if idx >= out.shape(0) * seqlen * groups {
        terminate!();
    }
    let grp = idx % groups;
    let row = idx / groups;
    let b = row / seqlen;
    let t = row % seqlen;
    let yb = b * y.stride(0) + t * y.stride(1);
    let zb = b * z.stride(0) + t * z.stride(1);
    let ob = b * out.stride(0) + t * out.stride(1);
    let u = UNIT_POS as usize;
    let lo = grp * gw;
    let rounds = (gw + THREADS as usize - 1) / THREADS as usize;
    let mut shared = SharedMemory::<f32>::new(THREADS as usize);

    let mut ss = 0.0f32;
    for k in 0..rounds {
        let j = k * THREADS as usize + u;
        if j < gw {
            let g = gated::<F>(y, z, yb, zb, lo + j, gate);
            ss += g * g;
        }
    }
    let total = cube_sum(ss, &mut shared);
    let r = 1.0f32 / (total / f32::cast_from(gw) + eps).sqrt();
    for k in 0..rounds {
        let j = k * THREADS as usize + u;
        if j < gw {
            let c = lo + j;
            let g = gated::<F>(y, z, yb, zb, c, gate);
            out[ob + c * out.stride(2)] = F::cast_from(g * r * w[c * w.stride(0)]);
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn norm_backward_kernel<F: Float>(
    y: &Tensor<F>,          // [batch, seq, width]
    z: &Tensor<F>,          // [batch, seq, width] (a placeholder without the gate)
    w: &Tensor<f32>,        // [width]
    dout: &Tensor<F>,       // [batch, seq, width]
    dy: &mut Tensor<F>,     // [batch, seq, width], contiguous
    dz: &mut Tensor<F>,     // [batch, seq, width], contiguous (a placeholder without the gate)
    rstd: &mut Tensor<f32>, // [batch · seq, groups]
    eps: f32,
    #[comptime] groups: usize,
    #[comptime] gate: bool,
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = dy.shape(1);
    let width = dy.shape(2);
    let gw = width / groups;
    let idx = cube_index();
    if idx >= dy.shape(0) * seqlen * groups {
        terminate!();
    }
    let grp = idx % groups;
    let row = idx / groups;
    let b = row / seqlen;
    let t = row % seqlen;
    let yb = b * y.stride(0) + t * y.stride(1);
    let zb = b * z.stride(0) + t * z.stride(1);
    let db = b * dout.stride(0) + t * dout.stride(1);
    let ob = b * dy.stride(0) + t * dy.stride(1);
    let u = UNIT_POS as usize;
    let lo = grp * gw;
    let rounds = (gw + THREADS as usize - 1) / THREADS as usize;
    let mut shared = SharedMemory::<f32>::new(THREADS as usize);

    let mut ss = 0.0f32;
    let mut dot = 0.0f32;
    for k in 0..rounds {
        let j = k * THREADS as usize + u;
        if j < gw {
            let c = lo + j;
            let g = gated::<F>(y, z, yb, zb, c, gate);
            ss += g * g;
            dot += f32::cast_from(dout[db + c * dout.stride(2)]) * w[c * w.stride(0)] * g;
        }
    }
    let ss_total = cube_sum(ss, &mut shared);
    let dot_total = cube_sum(dot, &mut shared);
    let n = f32::cast_from(gw);
    let r = 1.0f32 / (ss_total / n + eps).sqrt();
    // mean over the group of dn · (g r)
    let proj = r * dot_total / n;
    if u == 0 {
        rstd[row * rstd.stride(0) + grp * rstd.stride(1)] = r;
    }
    for k in 0..rounds {
        let j = k * THREADS as usize + u;
        if j < gw {
            let c = lo + j;
            let yv = f32::cast_from(y[yb + c * y.stride(2)]);
            let dn = f32::cast_from(dout[db + c * dout.stride(2)]) * w[c * w.stride(0)];
            if gate {
                let zv = f32::cast_from(z[zb + c * z.stride(2)]);
                let sig = sigmoid_f32(zv);
                let s = zv * sig;
                let g = yv * s;
                let dg = r * (dn - g * r * proj);
                dy[ob + c * dy.stride(2)] = F::cast_from(dg * s);
                dz[ob + c * dz.stride(2)] =
                    F::cast_from(dg * yv * sig * (1.0f32 + zv * (1.0f32 - sig)));
            } else {
                let dg = r * (dn - yv * r * proj);
                dy[ob + c * dy.stride(2)] = F::cast_from(dg);
            }
        }
    }
}

/// How a vector kernel covers one `(row, group)`: vectors of `vs` channels, a cube of `threads`
/// (a power of two), each thread `rounds` vectors (`j = round · threads + thread`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct VecPlan {
    pub vs: usize,
    pub threads: usize,
    pub rounds: usize,
}

/// Channels a thread keeps in registers at most (`rounds · vs`); wider groups take the scalar
/// kernels.
const MAX_HELD: usize = 32;

impl VecPlan {
    /// The plan for groups of `gw` channels with vectors of `vs`: the cube size with the fewest
    /// idle threads (the larger on a tie), `None` when the group is not whole vectors or needs
    /// more than [`MAX_HELD`] channels a thread.
    pub(crate) fn new(gw: usize, vs: usize) -> Option<Self> {
        if vs == 0 || gw == 0 || !gw.is_multiple_of(vs) {
            return None;
        }
        let nv = gw / vs;
        [256, 128, 64, 32]
            .into_iter()
            .map(|threads| VecPlan {
                vs,
                threads,
                rounds: nv.div_ceil(threads),
            })
            .filter(|p| p.rounds * p.vs <= MAX_HELD)
            .min_by_key(|p| (p.rounds * p.threads - nv, usize::MAX - p.threads))
    }

    fn log2(&self) -> usize {
        self.threads.trailing_zeros() as usize
    }
}

/// Vector `j` of the group (clamped into it: a thread past the group's end reads its first
/// vector and discards it) as f32 lanes.
#[cube]
fn load_vec<F: Float, V: Size>(
    t: &Tensor<Vector<F, V>>,
    at: usize,
    #[comptime] vs: usize,
) -> Vector<f32, V> {
    Vector::<f32, V>::cast_from(t[at / vs])
}

/// The vector forward: as [`norm_forward_kernel`], `y`, `z`, `w` and `out` read and written
/// `vs` channels at a time, the gated values kept in registers between the two passes.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn norm_forward_vec_kernel<F: Float, V: Size>(
    y: &Tensor<Vector<F, V>>,       // [batch, seq, width], channels contiguous
    z: &Tensor<Vector<F, V>>,       // [batch, seq, width] (a placeholder without the gate)
    w: &Tensor<Vector<f32, V>>,     // [width]
    out: &mut Tensor<Vector<F, V>>, // [batch, seq, width], contiguous
    eps: f32,
    #[comptime] gw: usize,
    #[comptime] groups: usize,
    #[comptime] gate: bool,
    #[comptime] plan: VecPlan,
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = out.shape(1);
    let idx = cube_index();
    if idx >= out.shape(0) * seqlen * groups {
        terminate!();
    }
    let vs = comptime!(plan.vs);
    let nv = comptime!(gw / plan.vs);
    let grp = idx % groups;
    let row = idx / groups;
    let b = row / seqlen;
    let t = row % seqlen;
    let lo = grp * gw;
    let yb = b * y.stride(0) + t * y.stride(1) + lo;
    let zb = b * z.stride(0) + t * z.stride(1) + lo;
    let ob = b * out.stride(0) + t * out.stride(1) + lo;
    let u = UNIT_POS as usize;
    let mut shared = SharedMemory::<f32>::new(comptime!(plan.threads));
    let mut held = Array::<Vector<f32, V>>::new(comptime!(plan.rounds));

    let mut ss = 0.0f32;
    #[unroll]
    for k in 0..comptime!(plan.rounds) {
        let j = k * comptime!(plan.threads) + u;
        let ok = j < nv;
        let c = select(ok, j, 0) * vs;
        let mut g = load_vec::<F, V>(y, yb + c, vs);
        if gate {
            let zv = load_vec::<F, V>(z, zb + c, vs);
            #[unroll]
            for i in 0..vs {
                g[i] = g[i] * zv[i] * sigmoid_f32(zv[i]);
            }
        }
        let mut part = 0.0f32;
        #[unroll]
        for i in 0..vs {
            part += g[i] * g[i];
        }
        ss += select(ok, part, 0.0f32);
        held[k] = g;
    }
    let total = cube_sum_of(
        ss,
        &mut shared,
        comptime!(plan.threads),
        comptime!(plan.log2()),
    );
    let r = 1.0f32 / (total / f32::cast_from(gw) + eps).sqrt();
    #[unroll]
    for k in 0..comptime!(plan.rounds) {
        let j = k * comptime!(plan.threads) + u;
        if j < nv {
            let c = j * vs;
            let wv = w[(lo + c) / vs];
            let g = held[k];
            let mut o = Vector::<F, V>::empty();
            #[unroll]
            for i in 0..vs {
                o[i] = F::cast_from(g[i] * r * wv[i]);
            }
            out[(ob + c) / vs] = o;
        }
    }
}

/// The vector backward: as [`norm_backward_kernel`], `vs` channels at a time, `y`, `z` and
/// `dout` kept in registers between the two passes.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn norm_backward_vec_kernel<F: Float, V: Size>(
    y: &Tensor<Vector<F, V>>,      // [batch, seq, width], channels contiguous
    z: &Tensor<Vector<F, V>>,      // [batch, seq, width] (a placeholder without the gate)
    w: &Tensor<Vector<f32, V>>,    // [width]
    dout: &Tensor<Vector<F, V>>,   // [batch, seq, width]
    dy: &mut Tensor<Vector<F, V>>, // [batch, seq, width], contiguous
    dz: &mut Tensor<Vector<F, V>>, // [batch, seq, width], contiguous (a placeholder without the gate)
    rstd: &mut Tensor<f32>,        // [batch · seq, groups]
    eps: f32,
    #[comptime] gw: usize,
    #[comptime] groups: usize,
    #[comptime] gate: bool,
    #[comptime] plan: VecPlan,
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = dy.shape(1);
    let idx = cube_index();
    if idx >= dy.shape(0) * seqlen * groups {
        terminate!();
    }
    let vs = comptime!(plan.vs);
    let nv = comptime!(gw / plan.vs);
    let grp = idx % groups;
    let row = idx / groups;
    let b = row / seqlen;
    let t = row % seqlen;
    let lo = grp * gw;
    let yb = b * y.stride(0) + t * y.stride(1) + lo;
    let zb = b * z.stride(0) + t * z.stride(1) + lo;
    let db = b * dout.stride(0) + t * dout.stride(1) + lo;
    let ob = b * dy.stride(0) + t * dy.stride(1) + lo;
    let u = UNIT_POS as usize;
    let mut shared = SharedMemory::<f32>::new(comptime!(plan.threads));
    let mut ys = Array::<Vector<f32, V>>::new(comptime!(plan.rounds));
    let mut zs = Array::<Vector<f32, V>>::new(comptime!(plan.rounds));
    let mut dns = Array::<Vector<f32, V>>::new(comptime!(plan.rounds));

    let mut ss = 0.0f32;
    let mut dot = 0.0f32;
    #[unroll]
    for k in 0..comptime!(plan.rounds) {
        let j = k * comptime!(plan.threads) + u;
        let ok = j < nv;
        let c = select(ok, j, 0) * vs;
        let yv = load_vec::<F, V>(y, yb + c, vs);
        let wv = w[(lo + c) / vs];
        let mut dn = load_vec::<F, V>(dout, db + c, vs);
        let mut zv = yv;
        if gate {
            zv = load_vec::<F, V>(z, zb + c, vs);
        }
        let mut s2 = 0.0f32;
        let mut d2 = 0.0f32;
        #[unroll]
        for i in 0..vs {
            let mut g = yv[i];
            if gate {
                g = yv[i] * zv[i] * sigmoid_f32(zv[i]);
            }
            dn[i] = dn[i] * wv[i];
            s2 += g * g;
            d2 += dn[i] * g;
        }
        ss += select(ok, s2, 0.0f32);
        dot += select(ok, d2, 0.0f32);
        ys[k] = yv;
        zs[k] = zv;
        dns[k] = dn;
    }
    let ss_total = cube_sum_of(
        ss,
        &mut shared,
        comptime!(plan.threads),
        comptime!(plan.log2()),
    );
    let dot_total = cube_sum_of(
        dot,
        &mut shared,
        comptime!(plan.threads),
        comptime!(plan.log2()),
    );
    let n = f32::cast_from(gw);
    let r = 1.0f32 / (ss_total / n + eps).sqrt();
    // mean over the group of dn · (g r)
    let proj = r * dot_total / n;
    if u == 0 {
        rstd[row * rstd.stride(0) + grp * rstd.stride(1)] = r;
    }
    #[unroll]
    for k in 0..comptime!(plan.rounds) {
        let j = k * comptime!(plan.threads) + u;
        if j < nv {
            let c = j * vs;
            let yv = ys[k];
            let zv = zs[k];
            let dn = dns[k];
            let mut dyv = Vector::<F, V>::empty();
            let mut dzv = Vector::<F, V>::empty();
            #[unroll]
            for i in 0..vs {
                if gate {
                    let sig = sigmoid_f32(zv[i]);
                    let s = zv[i] * sig;
                    let g = yv[i] * s;
                    let dg = r * (dn[i] - g * r * proj);
                    dyv[i] = F::cast_from(dg * s);
                    dzv[i] = F::cast_from(dg * yv[i] * sig * (1.0f32 + zv[i] * (1.0f32 - sig)));
                } else {
                    let dg = r * (dn[i] - yv[i] * r * proj);
                    dyv[i] = F::cast_from(dg);
                }
            }
            dy[(ob + c) / vs] = dyv;
            if gate {
                dz[(ob + c) / vs] = dzv;
            }
        }
    }
}

/// Whether the kernels take these inputs: `y` (and `z`) of one float dtype, groups dividing the
/// width.
fn applies<B: burn::tensor::backend::Backend>(
    y: &BTensor<B, 3>,
    z: Option<&BTensor<B, 3>>,
    groups: usize,
) -> bool {
    let [_, _, width] = y.dims();
    groups > 0 && width % groups == 0 && width > 0 && z.is_none_or(|z| z.dtype() == y.dtype())
}

/// The vector plan for a norm over groups of `gw` channels whose operands are `tensors` (the
/// outputs the launcher allocates are contiguous and aligned; the f32 weight is checked as
/// one of them), or `None` for the scalar kernels: the widest vector the runtime loads at once
/// for `dtype` that divides the group, every operand's row strides and its view's offset, with
/// the channels contiguous.
fn vec_plan<R: CubeRuntime>(
    client: &ComputeClient<R>,
    tensors: &[&CubeTensor<R>],
    dtype: DType,
    gw: usize,
) -> Option<VecPlan> {
    if vec_off() {
        return None;
    }
    client
        .io_optimized_vector_sizes(dtype.size())
        .filter(|&vs| vs > 1)
        .find(|&vs| {
            gw.is_multiple_of(vs)
                && tensors.iter().all(|t| {
                    let shape = t.meta.shape();
                    let strides = t.meta.strides();
                    let rank = shape.num_dims();
                    let elem = t.dtype.size() as u64;
                    strides[rank - 1] == 1
                        && (0..rank - 1).all(|d| shape[d] == 1 || strides[d] % vs == 0)
                        && t.handle.offset_start.unwrap_or(0) % (vs as u64 * elem) == 0
                })
        })
        .and_then(|vs| VecPlan::new(gw, vs))
}

/// `MAMBA_NORM_VECTORS=off` (read once): the scalar norm kernels everywhere, for measuring the
/// two against each other in one binary.
fn vec_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| {
        matches!(
            std::env::var("MAMBA_NORM_VECTORS")
                .as_deref()
                .map(str::trim),
            Ok("off") | Ok("0")
        )
    })
}

fn grid(n: usize) -> (CubeCount, CubeDim) {
    let x = n.clamp(1, MAX_GRID);
    (
        CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1),
        CubeDim::new_1d(THREADS),
    )
}

fn f32_weight<B: burn::tensor::backend::Backend>(w: BTensor<B, 1>) -> BTensor<B, 1> {
    if w.dtype() == DType::F32 {
        w
    } else {
        w.cast(DType::F32)
    }
}

/// A decode step's residual add and the next RMSNorm, one cube per row: `sum = x + h` (in `x`'s
/// dtype) and `w · sum / rms(sum)` (in `h`'s dtype), the weight read in its own dtype. What the
/// per-layer `x + h` and the next block's norm take in two launches (four with the casts of
/// bf16).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn add_norm_kernel<F: Float, G: Float, W: Float>(
    x: &Tensor<F>,       // [batch, seq, width]: the residual stream
    h: &Tensor<G>,       // [batch, seq, width]: what the last layer adds to it
    w: &Tensor<W>,       // [width]
    sum: &mut Tensor<F>, // [batch, seq, width], contiguous
    out: &mut Tensor<G>, // [batch, seq, width], contiguous
    eps: f32,
    #[define(F, G, W)] _dtypes: [StorageType; 3],
) {
    let seqlen = out.shape(1);
    let width = out.shape(2);
    let row = cube_index();
    if row >= out.shape(0) * seqlen {
        terminate!();
    }
    let b = row / seqlen;
    let t = row % seqlen;
    let xb = b * x.stride(0) + t * x.stride(1);
    let hb = b * h.stride(0) + t * h.stride(1);
    let sb = b * sum.stride(0) + t * sum.stride(1);
    let ob = b * out.stride(0) + t * out.stride(1);
    let u = UNIT_POS as usize;
    let rounds = (width + THREADS as usize - 1) / THREADS as usize;
    let mut shared = SharedMemory::<f32>::new(THREADS as usize);

    let mut ss = 0.0f32;
    for k in 0..rounds {
        let c = k * THREADS as usize + u;
        if c < width {
            let v = F::cast_from(
                f32::cast_from(x[xb + c * x.stride(2)]) + f32::cast_from(h[hb + c * h.stride(2)]),
            );
            sum[sb + c * sum.stride(2)] = v;
            let vf = f32::cast_from(v);
            ss += vf * vf;
        }
    }
    let total = cube_sum(ss, &mut shared);
    let r = 1.0f32 / (total / f32::cast_from(width) + eps).sqrt();
    for k in 0..rounds {
        let c = k * THREADS as usize + u;
        if c < width {
            let v = f32::cast_from(F::cast_from(
                f32::cast_from(x[xb + c * x.stride(2)]) + f32::cast_from(h[hb + c * h.stride(2)]),
            ));
            out[ob + c * out.stride(2)] = G::cast_from(v * r * f32::cast_from(w[c * w.stride(0)]));
        }
    }
}

/// The residual stream after the add, and its norm.
type SumAndNorm<R, F, I, BT> = (
    BTensor<CubeBackend<R, F, I, BT>, 3>,
    BTensor<CubeBackend<R, F, I, BT>, 3>,
);

/// Kernel of [`crate::MambaBackend::add_rms_norm`]; the reference where the shapes differ.
pub fn add_rms_norm<R, F, I, BT>(
    x: BTensor<CubeBackend<R, F, I, BT>, 3>,
    h: BTensor<CubeBackend<R, F, I, BT>, 3>,
    w: BTensor<CubeBackend<R, F, I, BT>, 1>,
    eps: f64,
) -> SumAndNorm<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [batch, seqlen, width] = x.dims();
    if h.dims() != [batch, seqlen, width] || w.dims() != [width] || width == 0 {
        return crate::norm::add_rms_norm_reference(x, h, w, eps);
    }
    let (xd, hd, wd) = (x.dtype(), h.dtype(), w.dtype());
    let x = prim(x);
    let (client, device) = (x.client.clone(), x.device.clone());
    let shape = Shape::new([batch, seqlen, width]);
    let sum = empty_device_contiguous_dtype(client.clone(), device.clone(), shape.clone(), xd);
    let out = empty_device_contiguous_dtype(client.clone(), device, shape, hd);
    let n = batch * seqlen;
    if n > 0 {
        let (count, dim) = grid(n);
        add_norm_kernel::launch::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            prim(h).into_tensor_arg(),
            prim(w).into_tensor_arg(),
            sum.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            eps as f32,
            [xd.into(), hd.into(), wd.into()],
        );
    }
    (wrap(sum), wrap(out))
}

/// Kernel forward of the (gated) norm; the reference where the kernels don't apply.
pub fn norm_forward<R, F, I, BT>(
    y: BTensor<CubeBackend<R, F, I, BT>, 3>,
    z: Option<BTensor<CubeBackend<R, F, I, BT>, 3>>,
    w: BTensor<CubeBackend<R, F, I, BT>, 1>,
    groups: usize,
    eps: f64,
) -> BTensor<CubeBackend<R, F, I, BT>, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !applies(&y, z.as_ref(), groups) {
        return crate::norm::norm_forward_reference(y, z, w, groups, eps);
    }
    let [batch, seqlen, width] = y.dims();
    let gate = z.is_some();
    let y = prim(y);
    let z = z.map(prim).unwrap_or_else(|| y.clone());
    let w = prim(f32_weight(w));
    let dtype = y.dtype;
    let out = empty_device_contiguous_dtype(
        y.client.clone(),
        y.device.clone(),
        Shape::new([batch, seqlen, width]),
        dtype,
    );
    let n = batch * seqlen * groups;
    let gw = width / groups;
    if n > 0 {
        let (count, dim) = grid(n);
        if let Some(plan) = vec_plan(&y.client, &[&y, &z, &w], dtype, gw) {
            norm_forward_vec_kernel::launch::<R>(
                &y.client,
                count,
                CubeDim::new_1d(plan.threads as u32),
                plan.vs,
                y.clone().into_tensor_arg(),
                z.into_tensor_arg(),
                w.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                eps as f32,
                gw,
                groups,
                gate,
                plan,
                dtype.into(),
            );
        } else {
            norm_forward_kernel::launch::<R>(
                &y.client,
                count,
                dim,
                y.clone().into_tensor_arg(),
                z.into_tensor_arg(),
                w.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                eps as f32,
                groups,
                gate,
                dtype.into(),
            );
        }
    }
    wrap(out)
}

/// Kernel backward of the (gated) norm: `dy`, `dz` (gated), and `dw` when `want_dw`.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward<R, F, I, BT>(
    y: BTensor<CubeBackend<R, F, I, BT>, 3>,
    z: Option<BTensor<CubeBackend<R, F, I, BT>, 3>>,
    w: BTensor<CubeBackend<R, F, I, BT>, 1>,
    dout: BTensor<CubeBackend<R, F, I, BT>, 3>,
    groups: usize,
    eps: f64,
    want_dw: bool,
) -> NormGrads<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !applies(&y, z.as_ref(), groups) || dout.dtype() != y.dtype() {
        return crate::norm::norm_backward_reference(y, z, w, dout, groups, eps, want_dw);
    }
    let [batch, seqlen, width] = y.dims();
    let w_dtype = w.dtype();
    let gate = z.is_some();
    let (y_t, z_t, w32) = (y.clone(), z.clone(), f32_weight(w));
    let y = prim(y);
    let z = z.map(prim).unwrap_or_else(|| y.clone());
    let dtype = y.dtype;
    let (client, device) = (y.client.clone(), y.device.clone());
    let shape = Shape::new([batch, seqlen, width]);
    let dy = empty_device_contiguous_dtype(client.clone(), device.clone(), shape.clone(), dtype);
    let dz = if gate {
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape, dtype)
    } else {
        // A placeholder whose width every vector size divides.
        empty_device_contiguous_dtype(
            client.clone(),
            device.clone(),
            Shape::new([1, 1, 16]),
            dtype,
        )
    };
    let rstd = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([batch * seqlen, groups]),
        DType::F32,
    );
    let n = batch * seqlen * groups;
    let gw = width / groups;
    if n > 0 {
        let (count, dim) = grid(n);
        let w32 = prim(w32);
        let dout_p = prim(dout.clone());
        if let Some(plan) = vec_plan(&client, &[&y, &z, &w32, &dout_p], dtype, gw) {
            norm_backward_vec_kernel::launch::<R>(
                &client,
                count,
                CubeDim::new_1d(plan.threads as u32),
                plan.vs,
                y.into_tensor_arg(),
                z.into_tensor_arg(),
                w32.into_tensor_arg(),
                dout_p.into_tensor_arg(),
                dy.clone().into_tensor_arg(),
                dz.clone().into_tensor_arg(),
                rstd.clone().into_tensor_arg(),
                eps as f32,
                gw,
                groups,
                gate,
                plan,
                dtype.into(),
            );
        } else {
            norm_backward_kernel::launch::<R>(
                &client,
                count,
                dim,
                y.into_tensor_arg(),
                z.into_tensor_arg(),
                w32.into_tensor_arg(),
                dout_p.into_tensor_arg(),
                dy.clone().into_tensor_arg(),
                dz.clone().into_tensor_arg(),
                rstd.clone().into_tensor_arg(),
                eps as f32,
                groups,
                gate,
                dtype.into(),
            );
        }
    }
    // dw = Σ_tokens dout · g · r, only when the weight trains.
    let dw = want_dw.then(|| {
        let to32 = |t: BTensor<CubeBackend<R, F, I, BT>, 3>| {
            if t.dtype() == DType::F32 {
                t
            } else {
                t.cast(DType::F32)
            }
        };
        let g = match z_t {
            Some(z) => to32(y_t) * silu(to32(z)),
            None => to32(y_t),
        }; // [b, l, width] f32
        let r: BTensor<CubeBackend<R, F, I, BT>, 2> = wrap(rstd);
        let n = g.reshape([batch * seqlen, groups, width / groups])
            * r.reshape([batch * seqlen, groups, 1]);
        let dw = (to32(dout).reshape([batch * seqlen, groups, width / groups]) * n)
            .sum_dim(0)
            .reshape([width]);
        if w_dtype == DType::F32 {
            dw
        } else {
            dw.cast(w_dtype)
        }
    });
    NormGrads {
        dy: wrap(dy),
        dz: gate.then(|| wrap(dz)),
        dw,
    }
}

#[cfg(test)]
mod tests {
    use super::VecPlan;

    /// The cube sizes the model's norms get (mamba2-130m's 768- and 1,536-wide rows, the 7B
    /// shape's 4,096-wide pre-norm and 1,024-wide gated groups), and the groups left to the
    /// scalar kernels.
    #[test]
    fn vec_plans() {
        let plan = |gw, vs| VecPlan::new(gw, vs).map(|p| (p.threads, p.rounds));
        assert_eq!(plan(768, 4), Some((64, 3))); // 192 vectors: no idle thread
        assert_eq!(plan(1536, 8), Some((64, 3)));
        assert_eq!(plan(4096, 4), Some((256, 4)));
        assert_eq!(plan(1024, 8), Some((128, 1)));
        assert_eq!(plan(300, 4), Some((32, 3))); // 75 vectors: 21 idle at 32, more otherwise
        assert_eq!(plan(1536, 4), Some((128, 3)));
        assert_eq!(plan(65, 4), None); // not whole vectors
        assert_eq!(plan(65_536, 8), None); // 32 vectors a thread at 256: past MAX_HELD
        assert_eq!(plan(0, 4), None);
    }
}

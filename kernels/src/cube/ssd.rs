//! The SSD chunked scan (Mamba2) forward as cubecl kernels, in the five-kernel split of
//! mamba_ssm's Triton `ssd_combined.py`:
//!
//! 1. chunk cumsum: `dt = clamp(softplus(dt + dt_bias))` and the within-chunk cumulative sum of
//!    `dt · A`;
//! 2. chunk state: each chunk's contribution to the state at its end;
//! 3. state passing: the state entering each chunk (sequential over chunks) and the final state;
//! 4. `C · Bᵀ` within each chunk, per group, and from it the per-head mixing matrix
//!    `M = C Bᵀ ∘ decay ∘ dt`;
//! 5. chunk scan: `y = C · h_prev · exp(cumsum) + M · x + D x`.
//!
//! Factors that inner loops would otherwise recompute (`exp(cs)`, the state weights, `M`) are
//! computed once into small f32 buffers.
//!
//! The sequence is padded logically to a multiple of the chunk size: positions past the end get
//! `dt = 0` (the identity on the state) and are never read. All intermediates are f32.

use super::{elemwise, prim, wrap};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
    CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::{SsdInput, SsdOutput};

/// Kernel 1: one thread per `(b, h, chunk)`, sequential over the chunk's positions.
#[cube(launch)]
fn ssd_chunk_cumsum_kernel<F: Float>(
    dt: &Tensor<F>,           // [batch, seq, heads], before bias and softplus
    a: &Tensor<F>,            // [heads]
    dt_bias: &Tensor<F>,      // [heads]
    dt_out: &mut Tensor<f32>, // [batch, heads, chunks, chunk]: dt after softplus and clamp
    da_cs: &mut Tensor<f32>,  // [batch, heads, chunks, chunk]: within-chunk cumsum of dt · A
    dt_min: f32,
    dt_max: f32,
    #[comptime] clamp_min: bool,
    #[comptime] clamp_max: bool,
    #[define(F)] _dtype: StorageType,
) {
    let nchunks = dt_out.shape(2);
    let heads = dt_out.shape(1);
    let q_len = dt_out.shape(3);
    let seqlen = dt.shape(1);
    if ABSOLUTE_POS >= dt_out.shape(0) * heads * nchunks {
        terminate!();
    }
    let c = ABSOLUTE_POS % nchunks;
    let h = (ABSOLUTE_POS / nchunks) % heads;
    let b = ABSOLUTE_POS / (nchunks * heads);

    let a_h = f32::cast_from(a[h * a.stride(0)]);
    let bias = f32::cast_from(dt_bias[h * dt_bias.stride(0)]);
    let base = b * dt_out.stride(0) + h * dt_out.stride(1) + c * dt_out.stride(2);
    let mut cs = 0.0f32;
    for q in 0..q_len {
        let t = c * q_len + q;
        let mut dtv = 0.0f32;
        if t < seqlen {
            let v =
                f32::cast_from(dt[b * dt.stride(0) + t * dt.stride(1) + h * dt.stride(2)]) + bias;
            // softplus, exact to f32 past 20
            dtv = v;
            if v <= 20.0f32 {
                dtv = (1.0f32 + v.exp()).ln();
            }
            if clamp_min && dtv < dt_min {
                dtv = dt_min;
            }
            if clamp_max && dtv > dt_max {
                dtv = dt_max;
            }
        }
        cs += dtv * a_h;
        dt_out[base + q * dt_out.stride(3)] = dtv;
        da_cs[base + q * da_cs.stride(3)] = cs;
    }
}

/// Kernel 1b, one thread per `(b, h, chunk, q)`: the per-position factors the other kernels
/// would otherwise recompute in their inner loops, `w_st = exp(L_c − cs_q) · dt_q` (weight of
/// position `q` in its chunk's state) and `e_cs = exp(cs_q)`.
#[cube(launch)]
fn ssd_decay_kernel(
    dt_c: &Tensor<f32>,     // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>,    // [batch, heads, chunks, chunk]
    w_st: &mut Tensor<f32>, // [batch, heads, chunks, chunk]
    e_cs: &mut Tensor<f32>, // [batch, heads, chunks, chunk]
) {
    let heads = dt_c.shape(1);
    let nchunks = dt_c.shape(2);
    let q_len = dt_c.shape(3);
    if ABSOLUTE_POS >= dt_c.shape(0) * heads * nchunks * q_len {
        terminate!();
    }
    let q = ABSOLUTE_POS % q_len;
    let c = (ABSOLUTE_POS / q_len) % nchunks;
    let h = (ABSOLUTE_POS / (q_len * nchunks)) % heads;
    let b = ABSOLUTE_POS / (q_len * nchunks * heads);
    let base = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
    let cs_q = da_cs[base + q * da_cs.stride(3)];
    let last = da_cs[base + (q_len - 1) * da_cs.stride(3)];
    let dt_q =
        dt_c[b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2) + q * dt_c.stride(3)];
    w_st[b * w_st.stride(0) + h * w_st.stride(1) + c * w_st.stride(2) + q * w_st.stride(3)] =
        (last - cs_q).exp() * dt_q;
    e_cs[b * e_cs.stride(0) + h * e_cs.stride(1) + c * e_cs.stride(2) + q * e_cs.stride(3)] =
        cs_q.exp();
}

/// Kernel 4b, one thread per `(b, chunk, h, i, j)`: the within-chunk mixing matrix
/// `M[i, j] = CB[i, j] exp(cs_i − cs_j) dt_j` for `j ≤ i < len`, zero elsewhere, so that the
/// within-chunk output is `M · x` (and its input gradient `Mᵀ · dy`).
#[cube(launch)]
fn ssd_mix_kernel(
    cb: &Tensor<f32>,    // [batch, chunks, groups, chunk, chunk]
    dt_c: &Tensor<f32>,  // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>, // [batch, heads, chunks, chunk]
    m: &mut Tensor<f32>, // [batch, chunks, heads, chunk, chunk]
    seqlen: usize,
) {
    let nchunks = m.shape(1);
    let heads = m.shape(2);
    let q_len = m.shape(3);
    let heads_per_group = heads / cb.shape(2);
    if ABSOLUTE_POS >= m.shape(0) * nchunks * heads * q_len * q_len {
        terminate!();
    }
    let j = ABSOLUTE_POS % q_len;
    let i = (ABSOLUTE_POS / q_len) % q_len;
    let h = (ABSOLUTE_POS / (q_len * q_len)) % heads;
    let c = (ABSOLUTE_POS / (q_len * q_len * heads)) % nchunks;
    let b = ABSOLUTE_POS / (q_len * q_len * heads * nchunks);
    let g = h / heads_per_group;
    let mut v = 0.0f32;
    if j <= i && c * q_len + i < seqlen {
        let base = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
        v = cb[b * cb.stride(0)
            + c * cb.stride(1)
            + g * cb.stride(2)
            + i * cb.stride(3)
            + j * cb.stride(4)]
            * (da_cs[base + i * da_cs.stride(3)] - da_cs[base + j * da_cs.stride(3)]).exp()
            * dt_c
                [b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2) + j * dt_c.stride(3)];
    }
    m[b * m.stride(0) + c * m.stride(1) + h * m.stride(2) + i * m.stride(3) + j * m.stride(4)] = v;
}

/// Kernel 2: one thread per `(b, chunk, h, p, n)`:
/// `states[b, c, h, p, n] = sum_q B[t, g, n] w_st[q] x[t, h, p]`.
#[cube(launch)]
fn ssd_chunk_state_kernel<F: Float>(
    x: &Tensor<F>,            // [batch, seq, heads, head_dim]
    bm: &Tensor<F>,           // [batch, seq, groups, state]
    w_st: &Tensor<f32>,       // [batch, heads, chunks, chunk]
    states: &mut Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    #[define(F)] _dtype: StorageType,
) {
    let nchunks = states.shape(1);
    let heads = states.shape(2);
    let head_dim = states.shape(3);
    let dstate = states.shape(4);
    let seqlen = x.shape(1);
    let q_len = w_st.shape(3);
    let heads_per_group = heads / bm.shape(2);
    if ABSOLUTE_POS >= states.shape(0) * nchunks * heads * head_dim * dstate {
        terminate!();
    }
    let n = ABSOLUTE_POS % dstate;
    let p = (ABSOLUTE_POS / dstate) % head_dim;
    let h = (ABSOLUTE_POS / (dstate * head_dim)) % heads;
    let c = (ABSOLUTE_POS / (dstate * head_dim * heads)) % nchunks;
    let b = ABSOLUTE_POS / (dstate * head_dim * heads * nchunks);
    let g = h / heads_per_group;

    let wbase = b * w_st.stride(0) + h * w_st.stride(1) + c * w_st.stride(2);
    let bbase = b * bm.stride(0) + g * bm.stride(2) + n * bm.stride(3);
    let xbase = b * x.stride(0) + h * x.stride(2) + p * x.stride(3);
    let mut acc = 0.0f32;
    let mut q_end = q_len;
    if c * q_len + q_len > seqlen {
        q_end = seqlen - c * q_len;
    }
    for q in 0..q_end {
        let t = c * q_len + q;
        acc += f32::cast_from(bm[bbase + t * bm.stride(1)])
            * w_st[wbase + q * w_st.stride(3)]
            * f32::cast_from(x[xbase + t * x.stride(1)]);
    }
    states[b * states.stride(0)
        + c * states.stride(1)
        + h * states.stride(2)
        + p * states.stride(3)
        + n * states.stride(4)] = acc;
}

/// Kernel 3: one thread per `(b, h, p, n)`, sequential over chunks: the state entering each
/// chunk (`prev`) and the final state.
#[cube(launch)]
fn ssd_state_passing_kernel<F: Float>(
    states: &Tensor<f32>,             // [batch, chunks, heads, head_dim, state]
    da_cs: &Tensor<f32>,              // [batch, heads, chunks, chunk]
    init: &ComptimeOption<Tensor<F>>, // [batch, heads, head_dim, state]
    prev: &mut Tensor<f32>,           // [batch, chunks, heads, head_dim, state]
    final_state: &mut Tensor<F>,      // [batch, heads, head_dim, state]
    #[define(F)] _dtype: StorageType,
) {
    let heads = final_state.shape(1);
    let head_dim = final_state.shape(2);
    let dstate = final_state.shape(3);
    let nchunks = states.shape(1);
    let q_len = da_cs.shape(3);
    if ABSOLUTE_POS >= final_state.shape(0) * heads * head_dim * dstate {
        terminate!();
    }
    let n = ABSOLUTE_POS % dstate;
    let p = (ABSOLUTE_POS / dstate) % head_dim;
    let h = (ABSOLUTE_POS / (dstate * head_dim)) % heads;
    let b = ABSOLUTE_POS / (dstate * head_dim * heads);

    let mut s = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(init) = init {
        s = f32::cast_from(
            init[b * init.stride(0) + h * init.stride(1) + p * init.stride(2) + n * init.stride(3)],
        );
    }
    for c in 0..nchunks {
        let idx = b * states.stride(0)
            + c * states.stride(1)
            + h * states.stride(2)
            + p * states.stride(3)
            + n * states.stride(4);
        let pidx = b * prev.stride(0)
            + c * prev.stride(1)
            + h * prev.stride(2)
            + p * prev.stride(3)
            + n * prev.stride(4);
        prev[pidx] = s;
        let decay = da_cs[b * da_cs.stride(0)
            + h * da_cs.stride(1)
            + c * da_cs.stride(2)
            + (q_len - 1) * da_cs.stride(3)]
        .exp();
        s = decay * s + states[idx];
    }
    final_state[b * final_state.stride(0)
        + h * final_state.stride(1)
        + p * final_state.stride(2)
        + n * final_state.stride(3)] = F::cast_from(s);
}

/// Kernel 4: one thread per `(b, chunk, g, i, j)`: `cb[b, c, g, i, j] = C[t_i, g] · B[t_j, g]`
/// for `j <= i` inside the sequence, zero elsewhere.
#[cube(launch)]
fn ssd_bmm_kernel<F: Float>(
    cm: &Tensor<F>,       // [batch, seq, groups, state]
    bm: &Tensor<F>,       // [batch, seq, groups, state]
    cb: &mut Tensor<f32>, // [batch, chunks, groups, chunk, chunk]
    #[define(F)] _dtype: StorageType,
) {
    let nchunks = cb.shape(1);
    let groups = cb.shape(2);
    let q_len = cb.shape(3);
    let seqlen = cm.shape(1);
    let dstate = cm.shape(3);
    if ABSOLUTE_POS >= cb.shape(0) * nchunks * groups * q_len * q_len {
        terminate!();
    }
    let j = ABSOLUTE_POS % q_len;
    let i = (ABSOLUTE_POS / q_len) % q_len;
    let g = (ABSOLUTE_POS / (q_len * q_len)) % groups;
    let c = (ABSOLUTE_POS / (q_len * q_len * groups)) % nchunks;
    let b = ABSOLUTE_POS / (q_len * q_len * groups * nchunks);
    let ti = c * q_len + i;
    let tj = c * q_len + j;

    let mut acc = 0.0f32;
    if j <= i && ti < seqlen {
        let ci = b * cm.stride(0) + ti * cm.stride(1) + g * cm.stride(2);
        let bj = b * bm.stride(0) + tj * bm.stride(1) + g * bm.stride(2);
        for n in 0..dstate {
            acc += f32::cast_from(cm[ci + n * cm.stride(3)])
                * f32::cast_from(bm[bj + n * bm.stride(3)]);
        }
    }
    cb[b * cb.stride(0)
        + c * cb.stride(1)
        + g * cb.stride(2)
        + i * cb.stride(3)
        + j * cb.stride(4)] = acc;
}

/// Kernel 5: one thread per output `(b, t, h, p)`:
/// `y = e_cs[q] C[t] · prev[c, h, p] + sum_{j <= q} M[q, j] x[j] + D x[t]`.
#[cube(launch)]
fn ssd_chunk_scan_kernel<F: Float>(
    x: &Tensor<F>,      // [batch, seq, heads, head_dim]
    cm: &Tensor<F>,     // [batch, seq, groups, state]
    d: &Tensor<F>,      // [heads]
    e_cs: &Tensor<f32>, // [batch, heads, chunks, chunk]
    prev: &Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    m: &Tensor<f32>,    // [batch, chunks, heads, chunk, chunk]
    y: &mut Tensor<F>,  // [batch, seq, heads, head_dim]
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = y.shape(1);
    let heads = y.shape(2);
    let head_dim = y.shape(3);
    let q_len = e_cs.shape(3);
    let dstate = cm.shape(3);
    let heads_per_group = heads / cm.shape(2);
    if ABSOLUTE_POS >= y.shape(0) * seqlen * heads * head_dim {
        terminate!();
    }
    let p = ABSOLUTE_POS % head_dim;
    let h = (ABSOLUTE_POS / head_dim) % heads;
    let t = (ABSOLUTE_POS / (head_dim * heads)) % seqlen;
    let b = ABSOLUTE_POS / (head_dim * heads * seqlen);
    let g = h / heads_per_group;
    let c = t / q_len;
    let q = t % q_len;

    // State from the previous chunks.
    let ct = b * cm.stride(0) + t * cm.stride(1) + g * cm.stride(2);
    let pbase = b * prev.stride(0) + c * prev.stride(1) + h * prev.stride(2) + p * prev.stride(3);
    let mut off = 0.0f32;
    for n in 0..dstate {
        off += f32::cast_from(cm[ct + n * cm.stride(3)]) * prev[pbase + n * prev.stride(4)];
    }
    let mut acc = off
        * e_cs[b * e_cs.stride(0) + h * e_cs.stride(1) + c * e_cs.stride(2) + q * e_cs.stride(3)];

    // Within the chunk.
    let mrow = b * m.stride(0) + c * m.stride(1) + h * m.stride(2) + q * m.stride(3);
    let xbase = b * x.stride(0) + (c * q_len) * x.stride(1) + h * x.stride(2) + p * x.stride(3);
    for j in 0..q + 1 {
        acc += m[mrow + j * m.stride(4)] * f32::cast_from(x[xbase + j * x.stride(1)]);
    }

    let xt =
        f32::cast_from(x[b * x.stride(0) + t * x.stride(1) + h * x.stride(2) + p * x.stride(3)]);
    acc += f32::cast_from(d[h * d.stride(0)]) * xt;
    y[b * y.stride(0) + t * y.stride(1) + h * y.stride(2) + p * y.stride(3)] = F::cast_from(acc);
}

/// A contiguous uninitialised tensor on the device of `like`.
pub(crate) fn empty_like_device<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Vec<usize>,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

/// Whether the kernels can take `input` (one float dtype throughout, heads a multiple of the
/// groups); otherwise callers fall back to the reference.
pub(crate) fn kernels_apply<B: Backend>(input: &SsdInput<B>) -> bool {
    let dtype = input.x.dtype();
    let [_, _, heads, _] = input.x.dims();
    let groups = input.b.dims()[2];
    let same = [
        input.dt.dtype(),
        input.a.dtype(),
        input.b.dtype(),
        input.c.dtype(),
        input.d.dtype(),
        input.dt_bias.dtype(),
    ]
    .iter()
    .all(|&d| d == dtype)
        && input
            .initial_state
            .as_ref()
            .is_none_or(|s| s.dtype() == dtype);
    same && groups != 0 && heads % groups == 0 && input.chunk_size != 0
}

/// The SSD inputs as device primitives, the sequence cut into `nchunks` chunks of `q`.
pub(crate) struct Prims<R: CubeRuntime> {
    pub x: CubeTensor<R>,       // [batch, seq, heads, head_dim]
    pub dt: CubeTensor<R>,      // [batch, seq, heads]
    pub a: CubeTensor<R>,       // [heads]
    pub bm: CubeTensor<R>,      // [batch, seq, groups, state]
    pub cm: CubeTensor<R>,      // [batch, seq, groups, state]
    pub d: CubeTensor<R>,       // [heads]
    pub dt_bias: CubeTensor<R>, // [heads]
    pub init: Option<CubeTensor<R>>,
    pub dt_limit: (f64, f64),
    pub q: usize,
    pub nchunks: usize,
    pub dtype: DType,
}

impl<R: CubeRuntime> Prims<R> {
    pub fn new<F: FloatElement, I: IntElement, BT: BoolElement>(
        input: SsdInput<CubeBackend<R, F, I, BT>>,
    ) -> Self {
        let seqlen = input.x.dims()[1];
        let q = input.chunk_size;
        Self {
            dtype: input.x.dtype(),
            x: prim(input.x),
            dt: prim(input.dt),
            a: prim(input.a),
            bm: prim(input.b),
            cm: prim(input.c),
            d: prim(input.d),
            dt_bias: prim(input.dt_bias),
            init: input.initial_state.map(prim),
            dt_limit: input.dt_limit,
            q,
            nchunks: seqlen.div_ceil(q).max(1),
        }
    }

    pub fn dims(&self) -> [usize; 6] {
        let s = &self.x.meta.shape;
        let sb = &self.bm.meta.shape;
        [s[0], s[1], s[2], s[3], sb[2], sb[3]]
    }
}

/// What kernels 1-4 compute, shared by the forward's kernel 5 and by the backward.
pub(crate) struct Parts<R: CubeRuntime> {
    /// `[batch, heads, chunks, chunk]` f32: dt after softplus and clamp (0 past the end).
    pub dt_c: CubeTensor<R>,
    /// `[batch, heads, chunks, chunk]` f32: within-chunk cumsum of dt · A.
    pub da_cs: CubeTensor<R>,
    /// `[batch, chunks, heads, head_dim, state]` f32: the state entering each chunk.
    pub prev: CubeTensor<R>,
    /// `[batch, chunks, groups, chunk, chunk]` f32: C · Bᵀ within chunks (causal, zero outside).
    pub cb: CubeTensor<R>,
    /// `[batch, heads, chunks, chunk]` f32: `exp(cs_q)`.
    pub e_cs: CubeTensor<R>,
    /// `[batch, chunks, heads, chunk, chunk]` f32: `CB[i, j] exp(cs_i − cs_j) dt_j`, causal.
    pub m: CubeTensor<R>,
    /// `[batch, heads, head_dim, state]` in the input dtype.
    pub final_state: CubeTensor<R>,
}

/// Kernels 1-4.
pub(crate) fn parts<R: CubeRuntime>(p: &Prims<R>) -> Parts<R> {
    let [batch, _seqlen, heads, head_dim, groups, dstate] = p.dims();
    let (q, nchunks, dtype) = (p.q, p.nchunks, p.dtype);
    let client = p.x.client.clone();
    let empty = |shape: Vec<usize>, dtype: DType| empty_like_device(&p.x, shape, dtype);

    // 1. dt and the within-chunk cumsum of dt · A: [batch, heads, chunks, chunk]
    let dt_c = empty(vec![batch, heads, nchunks, q], DType::F32);
    let da_cs = empty(vec![batch, heads, nchunks, q], DType::F32);
    let (lo, hi) = p.dt_limit;
    let n = batch * heads * nchunks;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_chunk_cumsum_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.dt.clone().into_tensor_arg(),
            p.a.clone().into_tensor_arg(),
            p.dt_bias.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            lo as f32,
            if hi.is_finite() { hi as f32 } else { 0.0 },
            lo > 0.0,
            hi.is_finite(),
            dtype.into(),
        );
    }

    // 1b. Per-position decay factors.
    let w_st = empty(vec![batch, heads, nchunks, q], DType::F32);
    let e_cs = empty(vec![batch, heads, nchunks, q], DType::F32);
    let n = batch * heads * nchunks * q;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_decay_kernel::launch::<R>(
            &client,
            count,
            dim,
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            w_st.clone().into_tensor_arg(),
            e_cs.clone().into_tensor_arg(),
        );
    }

    // 2. Per-chunk states: [batch, chunks, heads, head_dim, state]
    let states = empty(vec![batch, nchunks, heads, head_dim, dstate], DType::F32);
    let n = batch * nchunks * heads * head_dim * dstate;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_chunk_state_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.x.clone().into_tensor_arg(),
            p.bm.clone().into_tensor_arg(),
            w_st.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    // 3. State passing: states entering each chunk, and the final state.
    let prev = empty(vec![batch, nchunks, heads, head_dim, dstate], DType::F32);
    let final_state = empty(vec![batch, heads, head_dim, dstate], dtype);
    let n = batch * heads * head_dim * dstate;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_state_passing_kernel::launch::<R>(
            &client,
            count,
            dim,
            states.into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            p.init.clone().map(|t| t.into_tensor_arg()).into(),
            prev.clone().into_tensor_arg(),
            final_state.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    // 4. C · Bᵀ within chunks: [batch, chunks, groups, chunk, chunk]
    let cb = empty(vec![batch, nchunks, groups, q, q], DType::F32);
    let n = batch * nchunks * groups * q * q;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_bmm_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.cm.clone().into_tensor_arg(),
            p.bm.clone().into_tensor_arg(),
            cb.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    // 4b. The within-chunk mixing matrix per head: [batch, chunks, heads, chunk, chunk]
    let m = empty(vec![batch, nchunks, heads, q, q], DType::F32);
    let n = batch * nchunks * heads * q * q;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_mix_kernel::launch::<R>(
            &client,
            count,
            dim,
            cb.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            m.clone().into_tensor_arg(),
            p.x.meta.shape[1],
        );
    }

    Parts {
        dt_c,
        da_cs,
        prev,
        cb,
        e_cs,
        m,
        final_state,
    }
}

/// Kernel forward of [`crate::MambaBackend::ssd_chunk_scan`]. Falls back to the reference when
/// the inputs do not share one float dtype or the heads are not a multiple of the groups.
pub fn ssd_chunk_scan<R, F, I, BT>(
    input: SsdInput<CubeBackend<R, F, I, BT>>,
) -> SsdOutput<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !kernels_apply(&input) {
        return crate::reference::ssd_chunk_scan(input);
    }
    let p = Prims::new(input);
    let [batch, seqlen, heads, head_dim, _, _] = p.dims();
    let client = p.x.client.clone();
    let Parts {
        e_cs,
        prev,
        m,
        final_state,
        ..
    } = parts(&p);

    // 5. Outputs: [batch, seq, heads, head_dim]
    let y = empty_like_device(&p.x, vec![batch, seqlen, heads, head_dim], p.dtype);
    let n = batch * seqlen * heads * head_dim;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        ssd_chunk_scan_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.x.into_tensor_arg(),
            p.cm.into_tensor_arg(),
            p.d.into_tensor_arg(),
            e_cs.into_tensor_arg(),
            prev.into_tensor_arg(),
            m.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            p.dtype.into(),
        );
    }

    SsdOutput {
        y: wrap(y),
        final_state: wrap(final_state),
    }
}

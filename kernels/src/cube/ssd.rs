//! The SSD chunked scan (Mamba2) forward as cubecl kernels, in the five-kernel split of
//! mamba_ssm's Triton `ssd_combined.py`, with the contractions tiled in shared memory
//! ([`super::tile`]):
//!
//! 1. chunk cumsum: `dt = clamp(softplus(dt + dt_bias))` and the within-chunk cumulative sum of
//!    `dt · A`, one thread per `(b, h, chunk)`;
//! 2. chunk state: each chunk's contribution to the state at its end,
//!    `Σ_q x_q ⊗ B_q · exp(L − cs_q) dt_q`, one cube per `(b, chunk, h, 64 × 64 tile of p × n)`;
//! 3. state passing: the state entering each chunk (sequential over chunks) and the final state;
//! 4. `C · Bᵀ` within each chunk, per group, one cube per `(b, chunk, g)`;
//! 5. chunk scan: `y = exp(cs) ∘ (C · prevᵀ) + M · x + D x` with the mixing matrix
//!    `M[i, j] = CB[i, j] exp(cs_i − cs_j) dt_j` (`j ≤ i`) built while it is staged, one cube per
//!    `(b, chunk, h, 64 columns of p)`.
//!
//! The kernels chunk the sequence by [`TILE`] (64) whatever `chunk_size` the caller asks for: the
//! chunked form is exact for any chunk length, and 64 keeps the quadratic within-chunk work small
//! and every chunk one tile. The sequence is padded logically to a multiple of 64: positions
//! past the end get `dt = 0` (the identity on the state) and are never read or written. All
//! intermediates are f32.

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use super::tile::{
    contract, fetch_slab, mma_slab, out_smem, slab_k, slab_smem, slab_v, slabs_for, store_slab,
    tc_finish, tc_mma_slab, tc_zero, tile_col, tile_row, zero_acc, Slab, Slabs, KT, THREADS, TILE,
    V4,
};
use super::{elemwise, prim, spread, wrap};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
    CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::{SsdInput, SsdKept, SsdOutput};

/// Positions the chunk cumsum loads at once before using them (a divisor of [`TILE`]).
const RUN: usize = 16;

/// Positions of the chunk starting at `t0` that lie inside a sequence of `seqlen`.
#[cube]
pub(crate) fn chunk_len(seqlen: usize, t0: usize) -> usize {
    let mut len = TILE.runtime();
    if t0 + TILE > seqlen {
        len = seqlen - t0;
    }
    len
}

/// Stages the chunk's `cs` and `dt` (`[batch, heads, chunks, chunk]` rows) in shared memory,
/// and `L`, the cumsum at the chunk's end, in `cs_s[TILE]`. Ends synced.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_chunk(
    dt_c: &Tensor<f32>,
    da_cs: &Tensor<f32>,
    b: usize,
    h: usize,
    c: usize,
    cs_s: &mut SharedMemory<f32>,
    dt_s: &mut SharedMemory<f32>,
) {
    let u = UNIT_POS as usize;
    if u < TILE {
        let base = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
        cs_s[u] = da_cs[base + u * da_cs.stride(3)];
        dt_s[u] =
            dt_c[b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2) + u * dt_c.stride(3)];
        if u == 0 {
            cs_s[TILE] = da_cs[base + (TILE - 1) * da_cs.stride(3)];
        }
    }
    sync_cube();
}

/// `dt` after its bias: softplus (exact to f32 past 20), then the `time_step_limit` clamp.
#[cube]
pub(crate) fn dt_activation(
    v: f32,
    dt_min: f32,
    dt_max: f32,
    #[comptime] clamp_min: bool,
    #[comptime] clamp_max: bool,
) -> f32 {
    let mut dtv = v;
    if v <= 20.0f32 {
        dtv = (1.0f32 + v.exp()).ln();
    }
    if clamp_min && dtv < dt_min {
        dtv = dt_min;
    }
    if clamp_max && dtv > dt_max {
        dtv = dt_max;
    }
    dtv
}

/// Kernel 1: one thread per `(b, h, chunk)` (heads fastest, so that `dt` is read in runs),
/// sequential over the chunk's positions.
#[cube(launch)]
fn ssd_chunk_cumsum_kernel<F: Float>(
    dt: &Tensor<F>,           // [batch, seq, heads], before bias and softplus
    a: &Tensor<f32>,          // [heads]
    dt_bias: &Tensor<f32>,    // [heads]
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
    let h = ABSOLUTE_POS % heads;
    let c = (ABSOLUTE_POS / heads) % nchunks;
    let b = ABSOLUTE_POS / (nchunks * heads);

    let a_h = f32::cast_from(a[h * a.stride(0)]);
    let bias = f32::cast_from(dt_bias[h * dt_bias.stride(0)]);
    let base = b * dt_out.stride(0) + h * dt_out.stride(1) + c * dt_out.stride(2);
    let mut cs = 0.0f32;
    // Runs of RUN positions: a run's raw dt values are loaded first, all together, then used.
    // A rolled loop (or one that interleaves the loads with the stores, which the compiler may
    // not reorder past them) waits for each load in turn, and with one thread per chunk that
    // latency is the kernel's whole time.
    let mut raw = Array::<f32>::new(RUN);
    for r in 0..q_len / RUN {
        #[unroll]
        for e in 0..RUN {
            let t = c * q_len + r * RUN + e;
            let mut v = 0.0f32;
            if t < seqlen {
                v = f32::cast_from(dt[b * dt.stride(0) + t * dt.stride(1) + h * dt.stride(2)]);
            }
            raw[e] = v;
        }
        #[unroll]
        for e in 0..RUN {
            let q = r * RUN + e;
            let t = c * q_len + q;
            let mut dtv = 0.0f32;
            if t < seqlen {
                dtv = dt_activation(raw[e] + bias, dt_min, dt_max, clamp_min, clamp_max);
            }
            cs += dtv * a_h;
            dt_out[base + q * dt_out.stride(3)] = dtv;
            da_cs[base + q * da_cs.stride(3)] = cs;
        }
    }
}

/// Per-position scales of a staged chunk: `rs[q] = exp(cs_q)`, or with `to_end`
/// `exp(L − cs_q) dt_q` (the decay from position `q` to the chunk's end). Ends synced.
#[cube]
pub(crate) fn row_scales(
    cs_s: &SharedMemory<f32>,
    dt_s: &SharedMemory<f32>,
    rs_s: &mut SharedMemory<f32>,
    #[comptime] to_end: bool,
) {
    let u = UNIT_POS as usize;
    if u < TILE {
        let mut s = cs_s[u].exp();
        if to_end {
            s = (cs_s[TILE] - cs_s[u]).exp() * dt_s[u];
        }
        rs_s[u] = s;
    }
    sync_cube();
}

/// Bytes of shared memory the state and scan tile kernels hold beside their slabs: a chunk's
/// `cs` (one more than the chunk), `dt` and row scales, f32.
pub const CHUNK_SMEM: usize = (3 * TILE + 1) * 4;

/// Stages slab `s` of the state kernel's operands: `x` scaled by the row scales `rs_s[k]` (left)
/// and `B` (right), both with their rows contiguous. Not synced.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_state_slab<F: Float, S: Float>(
    xin: &Tensor<F>,
    xbase: usize,
    xs1: usize,
    xs3: usize,
    alim: usize,
    ym: &Tensor<F>,
    ybase: usize,
    ys1: usize,
    ys3: usize,
    blim: usize,
    qlim: usize,
    s: usize,
    rs_s: &SharedMemory<f32>,
    a_s: &mut Slab<S>,
    b_s: &mut Slab<S>,
    #[comptime] slabs: Slabs,
) {
    #[unroll]
    for part in 0..slabs.parts {
        let k0 = s * comptime!(slabs.kb()) + part * KT;
        let av = fetch_slab::<F>(xin, xbase, xs1, xs3, k0, qlim, alim, false);
        let bv = fetch_slab::<F>(ym, ybase, ys1, ys3, k0, qlim, blim, false);
        let sc = rs_s[k0 + slab_k(false)];
        store_slab::<S>(a_s, av * V4::new(sc), part, false, slabs);
        store_slab::<S>(b_s, bv, part, false, slabs);
    }
}

/// Kernel 2 (and the backward's `dprev`), one cube per `(b·chunk·(p tile × n tile), h)`:
/// `out[b, c, h, p, n] = Σ_q xin[t_q, h, p] s_q ym[t_q, g, n]` with `s_q = exp(L − cs_q) dt_q`
/// (`to_end`: the chunk's own state, from `x` and `B`) or `s_q = exp(cs_q)` (the state gradient
/// the chunk's outputs send back, from `dy` and `C`).
#[cube(launch)]
fn ssd_state_tile_kernel<F: Float, S: Float>(
    xin: &Tensor<F>,       // [batch, seq, heads, head_dim]
    ym: &Tensor<F>,        // [batch, seq, groups, state]
    dt_c: &Tensor<f32>,    // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>,   // [batch, heads, chunks, chunk]
    out: &mut Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    #[comptime] to_end: bool,
    #[comptime] slabs: Slabs,
    #[define(F, S)] _dtypes: [StorageType; 2],
) {
    let nchunks = out.shape(1);
    let heads = out.shape(2);
    let head_dim = out.shape(3);
    let dstate = out.shape(4);
    let seqlen = xin.shape(1);
    // The tile index runs fastest, so that the cubes reading one chunk's `xin` tile run
    // together and all but the first find it in L2.
    let ntiles = (dstate + TILE - 1) / TILE;
    let tiles_per_head = ntiles * ((head_dim + TILE - 1) / TILE);
    let z = CUBE_POS_X as usize % tiles_per_head;
    let bc = CUBE_POS_X as usize / tiles_per_head;
    let c = bc % nchunks;
    let b = bc / nchunks;
    let h = CUBE_POS_Y as usize;
    let g = h / (heads / ym.shape(2));
    let p0 = (z / ntiles) * TILE;
    let n0 = (z % ntiles) * TILE;
    let t0 = c * TILE;
    let qlim = chunk_len(seqlen, t0);

    let mut cs_s = SharedMemory::<f32>::new(comptime!(TILE + 1));
    let mut dt_s = SharedMemory::<f32>::new(TILE);
    let mut rs_s = SharedMemory::<f32>::new(TILE);
    stage_chunk(dt_c, da_cs, b, h, c, &mut cs_s, &mut dt_s);
    row_scales(&cs_s, &dt_s, &mut rs_s, to_end);

    let mut a_s = slab_smem::<S>(slabs);
    let mut b_s = slab_smem::<S>(slabs);
    let mut o_s = out_smem(slabs);
    let mut acc = zero_acc();
    let xbase = b * xin.stride(0) + t0 * xin.stride(1) + h * xin.stride(2) + p0 * xin.stride(3);
    let ybase = b * ym.stride(0) + t0 * ym.stride(1) + g * ym.stride(2) + n0 * ym.stride(3);
    // The slab loop of `contract`, with x scaled by `rs_s[k]` on its way to shared memory.
    let (xs1, xs3, ys1, ys3) = (xin.stride(1), xin.stride(3), ym.stride(1), ym.stride(3));
    let kb = comptime!(slabs.kb());
    let nslabs = (qlim + kb - 1) / kb;
    let (alim, blim) = (head_dim - p0, dstate - n0);
    if comptime!(slabs.tensor_cores()) {
        let frags = tc_zero(slabs);
        for s in 0..nslabs {
            stage_state_slab::<F, S>(
                xin, xbase, xs1, xs3, alim, ym, ybase, ys1, ys3, blim, qlim, s, &rs_s, &mut a_s,
                &mut b_s, slabs,
            );
            sync_cube();
            tc_mma_slab::<S>(&a_s, &b_s, &frags, slabs);
            sync_cube();
        }
        tc_finish::<S>(&frags, &mut a_s, &mut o_s, &mut acc, slabs);
    } else {
        for s in 0..nslabs {
            stage_state_slab::<F, S>(
                xin, xbase, xs1, xs3, alim, ym, ybase, ys1, ys3, blim, qlim, s, &rs_s, &mut a_s,
                &mut b_s, slabs,
            );
            sync_cube();
            mma_slab::<S>(&a_s, &b_s, &mut acc, slabs);
            sync_cube();
        }
    }

    let obase = b * out.stride(0) + c * out.stride(1) + h * out.stride(2);
    #[unroll]
    for i in 0..4usize {
        let p = p0 + tile_row(i);
        #[unroll]
        for j in 0..4usize {
            let n = n0 + tile_col(j);
            if p < head_dim && n < dstate {
                out[obase + p * out.stride(3) + n * out.stride(4)] = acc[i * 4 + j];
            }
        }
    }
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

/// Kernel 4, one cube per `(b·chunk, g)`: `cb[b, c, g, i, j] = C[t_i, g] · B[t_j, g]` for every
/// `i, j` of the chunk (zero past the sequence's end; the causal mask is applied by readers).
#[cube(launch)]
fn ssd_cb_tile_kernel<F: Float, S: Float>(
    cm: &Tensor<F>,       // [batch, seq, groups, state]
    bm: &Tensor<F>,       // [batch, seq, groups, state]
    cb: &mut Tensor<f32>, // [batch, chunks, groups, chunk, chunk]
    #[comptime] slabs: Slabs,
    #[define(F, S)] _dtypes: [StorageType; 2],
) {
    let nchunks = cb.shape(1);
    let seqlen = cm.shape(1);
    let dstate = cm.shape(3);
    let c = CUBE_POS_X as usize % nchunks;
    let b = CUBE_POS_X as usize / nchunks;
    let g = CUBE_POS_Y as usize;
    let t0 = c * TILE;
    let qlim = chunk_len(seqlen, t0);

    let mut a_s = slab_smem::<S>(slabs);
    let mut b_s = slab_smem::<S>(slabs);
    let mut o_s = out_smem(slabs);
    let mut acc = zero_acc();
    let cbase = b * cm.stride(0) + t0 * cm.stride(1) + g * cm.stride(2);
    let bbase = b * bm.stride(0) + t0 * bm.stride(1) + g * bm.stride(2);
    contract::<F, F, S>(
        cm,
        cbase,
        cm.stride(3),
        cm.stride(1),
        qlim,
        bm,
        bbase,
        bm.stride(3),
        bm.stride(1),
        qlim,
        dstate,
        &mut a_s,
        &mut b_s,
        &mut o_s,
        &mut acc,
        true,
        true,
        slabs,
    );
    let obase = b * cb.stride(0) + c * cb.stride(1) + g * cb.stride(2);
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..4usize {
            cb[obase + tile_row(i) * cb.stride(3) + tile_col(j) * cb.stride(4)] = acc[i * 4 + j];
        }
    }
}

/// Position pair `(i, j)` of lane `e` of this thread's vector of the mixing-matrix slab at `k0`:
/// slab row `r = i`, `k = j` for `M · x`, or, when `transposed`, `r = j`, `k = i` for `Mᵀ · dy`.
#[cube]
fn mix_pos(k0: usize, e: usize, #[comptime] transposed: bool) -> (usize, usize) {
    let k_contig = comptime!(!transposed);
    let r = slab_v(k_contig) * 4 + e;
    let kk = k0 + slab_k(k_contig);
    let mut i = r;
    let mut j = kk;
    if transposed {
        i = kk;
        j = r;
    }
    (i, j)
}

/// This thread's vector of slab `k0 .. k0 + KT` of `CB` as the mixing matrix's operand (see
/// [`mix_pos`]), zero outside `j ≤ i < qlim`: the global part of staging `M`.
#[cube]
fn fetch_cb(
    cb: &Tensor<f32>,
    base: usize,
    k0: usize,
    qlim: usize,
    #[comptime] transposed: bool,
) -> V4 {
    let mut vec = V4::empty();
    #[unroll]
    for e in 0..4usize {
        let (i, j) = mix_pos(k0, e, transposed);
        let mut m = 0.0f32;
        if i < qlim && j <= i {
            m = cb[base + i * cb.stride(3) + j * cb.stride(4)];
        }
        vec[e] = m;
    }
    vec
}

/// `M[i, j] = CB[i, j] exp(cs_i − cs_j) dt_j` from [`fetch_cb`]'s vector (zero stays zero: the
/// decay is only evaluated for `j ≤ i`, where it cannot overflow).
#[cube]
fn mix_scale(
    v: V4,
    cs_s: &SharedMemory<f32>,
    dt_s: &SharedMemory<f32>,
    k0: usize,
    #[comptime] transposed: bool,
) -> V4 {
    let mut out = v;
    #[unroll]
    for e in 0..4usize {
        let (i, j) = mix_pos(k0, e, transposed);
        if j <= i {
            out[e] = v[e] * (cs_s[i] - cs_s[j]).exp() * dt_s[j];
        }
    }
    out
}

/// Stages slab `s` of the scan kernel's within-chunk operands: the mixing matrix `M` (or `Mᵀ`)
/// from `CB`, `cs` and `dt` (left) and `x` (right, rows contiguous). Not synced.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_mix_slab<F: Float, S: Float>(
    cb: &Tensor<f32>,
    cbbase: usize,
    cs_s: &SharedMemory<f32>,
    dt_s: &SharedMemory<f32>,
    xin: &Tensor<F>,
    xbase: usize,
    xs1: usize,
    xs3: usize,
    blim: usize,
    qlim: usize,
    s: usize,
    a_s: &mut Slab<S>,
    b_s: &mut Slab<S>,
    #[comptime] transposed: bool,
    #[comptime] slabs: Slabs,
) {
    #[unroll]
    for part in 0..slabs.parts {
        let k0 = s * comptime!(slabs.kb()) + part * KT;
        let av = fetch_cb(cb, cbbase, k0, qlim, transposed);
        let bv = fetch_slab::<F>(xin, xbase, xs1, xs3, k0, qlim, blim, false);
        let mv = mix_scale(av, cs_s, dt_s, k0, transposed);
        store_slab::<S>(a_s, mv, part, comptime!(!transposed), slabs);
        store_slab::<S>(b_s, bv, part, false, slabs);
    }
}

/// Stages slab `s` of the scan kernel's through-the-state operands (`K` = the state index `n`,
/// contiguous in both): `um[t_q, g, n]` with row `q` scaled by `rs_s[q]` (left) and the state
/// `st[c, h, p, n]` (right). Not synced.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_state_term_slab<F: Float, S: Float>(
    um: &Tensor<F>,
    ubase: usize,
    qlim: usize,
    st: &Tensor<f32>,
    sbase: usize,
    plim: usize,
    dstate: usize,
    s: usize,
    rs_s: &SharedMemory<f32>,
    a_s: &mut Slab<S>,
    b_s: &mut Slab<S>,
    #[comptime] slabs: Slabs,
) {
    let (us1, us3) = (um.stride(1), um.stride(3));
    let (ss3, ss4) = (st.stride(3), st.stride(4));
    let v = slab_v(true);
    let mut sc = V4::empty();
    #[unroll]
    for i in 0..4usize {
        sc[i] = rs_s[v * 4 + i];
    }
    #[unroll]
    for part in 0..slabs.parts {
        let k0 = s * comptime!(slabs.kb()) + part * KT;
        let av = fetch_slab::<F>(um, ubase, us3, us1, k0, dstate, qlim, true);
        let bv = fetch_slab::<f32>(st, sbase, ss4, ss3, k0, dstate, plim, true);
        store_slab::<S>(a_s, av * sc, part, true, slabs);
        store_slab::<S>(b_s, bv, part, true, slabs);
    }
}

/// Kernel 5 (and the backward's `dx`), one cube per `(b·chunk, h, 64 columns of p)`:
/// `out[t_q, h, p] = s_q Σ_n um[t_q, g, n] st[c, h, p, n] + Σ_j M[q, j] xin[t_j, h, p] + D xin`,
/// with `s_q = exp(cs_q)`; the forward's `y` from `C`, `prev` and `x`. When `transposed`,
/// `Mᵀ` replaces `M` and `s_q = exp(L − cs_q) dt_q`: the input gradient `dx` from `B`,
/// `dstates` and `dy`.
#[cube(launch)]
fn ssd_scan_tile_kernel<F: Float, S: Float>(
    um: &Tensor<F>,      // [batch, seq, groups, state]
    st: &Tensor<f32>,    // [batch, chunks, heads, head_dim, state]
    xin: &Tensor<F>,     // [batch, seq, heads, head_dim]
    cb: &Tensor<f32>,    // [batch, chunks, groups, chunk, chunk]
    dt_c: &Tensor<f32>,  // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>, // [batch, heads, chunks, chunk]
    d: &Tensor<f32>,     // [heads]
    out: &mut Tensor<F>, // [batch, seq, heads, head_dim]
    #[comptime] transposed: bool,
    #[comptime] slabs: Slabs,
    #[define(F, S)] _dtypes: [StorageType; 2],
) {
    let seqlen = out.shape(1);
    let heads = out.shape(2);
    let head_dim = out.shape(3);
    let dstate = um.shape(3);
    let nchunks = st.shape(1);
    let c = CUBE_POS_X as usize % nchunks;
    let b = CUBE_POS_X as usize / nchunks;
    let h = CUBE_POS_Y as usize;
    let g = h / (heads / um.shape(2));
    let p0 = CUBE_POS_Z as usize * TILE;
    let t0 = c * TILE;
    let qlim = chunk_len(seqlen, t0);

    let mut cs_s = SharedMemory::<f32>::new(comptime!(TILE + 1));
    let mut dt_s = SharedMemory::<f32>::new(TILE);
    let mut rs_s = SharedMemory::<f32>::new(TILE);
    stage_chunk(dt_c, da_cs, b, h, c, &mut cs_s, &mut dt_s);
    row_scales(&cs_s, &dt_s, &mut rs_s, transposed);

    let mut a_s = slab_smem::<S>(slabs);
    let mut b_s = slab_smem::<S>(slabs);
    let mut o_s = out_smem(slabs);
    let mut acc = zero_acc();

    // Both contractions accumulate into one accumulator (on the tensor cores, one set of
    // fragments with one output stage at the end): through the state (K = n), the row scale
    // `s_q` applied to `um` as it is staged, then within the chunk (K = positions), the left
    // operand M staged from CB, `cs` and `dt`. (Scaling the first contraction's results
    // afterwards kept them in registers through the second's fragments: 99 registers on the bf16
    // tensor cores, two cubes a multiprocessor, Nsight Compute in call K.)
    let ubase = b * um.stride(0) + t0 * um.stride(1) + g * um.stride(2);
    let sbase = b * st.stride(0) + c * st.stride(1) + h * st.stride(2) + p0 * st.stride(3);
    let cbbase = b * cb.stride(0) + c * cb.stride(1) + g * cb.stride(2);
    let xbase = b * xin.stride(0) + t0 * xin.stride(1) + h * xin.stride(2) + p0 * xin.stride(3);
    let (xs1, xs3) = (xin.stride(1), xin.stride(3));
    let kb = comptime!(slabs.kb());
    let n_slabs = (dstate + kb - 1) / kb;
    let q_slabs = (qlim + kb - 1) / kb;
    let blim = head_dim - p0;
    if comptime!(slabs.tensor_cores()) {
        let frags = tc_zero(slabs);
        for s in 0..n_slabs {
            stage_state_term_slab::<F, S>(
                um, ubase, qlim, st, sbase, blim, dstate, s, &rs_s, &mut a_s, &mut b_s, slabs,
            );
            sync_cube();
            tc_mma_slab::<S>(&a_s, &b_s, &frags, slabs);
            sync_cube();
        }
        for s in 0..q_slabs {
            stage_mix_slab::<F, S>(
                cb, cbbase, &cs_s, &dt_s, xin, xbase, xs1, xs3, blim, qlim, s, &mut a_s, &mut b_s,
                transposed, slabs,
            );
            sync_cube();
            tc_mma_slab::<S>(&a_s, &b_s, &frags, slabs);
            sync_cube();
        }
        tc_finish::<S>(&frags, &mut a_s, &mut o_s, &mut acc, slabs);
    } else {
        for s in 0..n_slabs {
            stage_state_term_slab::<F, S>(
                um, ubase, qlim, st, sbase, blim, dstate, s, &rs_s, &mut a_s, &mut b_s, slabs,
            );
            sync_cube();
            mma_slab::<S>(&a_s, &b_s, &mut acc, slabs);
            sync_cube();
        }
        for s in 0..q_slabs {
            stage_mix_slab::<F, S>(
                cb, cbbase, &cs_s, &dt_s, xin, xbase, xs1, xs3, blim, qlim, s, &mut a_s, &mut b_s,
                transposed, slabs,
            );
            sync_cube();
            mma_slab::<S>(&a_s, &b_s, &mut acc, slabs);
            sync_cube();
        }
    }

    let dv = f32::cast_from(d[h * d.stride(0)]);
    #[unroll]
    for i in 0..4usize {
        let q = tile_row(i);
        #[unroll]
        for j in 0..4usize {
            let p = p0 + tile_col(j);
            if q < qlim && p < head_dim {
                let t = t0 + q;
                let xv = f32::cast_from(
                    xin[b * xin.stride(0)
                        + t * xin.stride(1)
                        + h * xin.stride(2)
                        + p * xin.stride(3)],
                );
                out[b * out.stride(0)
                    + t * out.stride(1)
                    + h * out.stride(2)
                    + p * out.stride(3)] = F::cast_from(acc[i * 4 + j] + dv * xv);
            }
        }
    }
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
    // The per-head parameters (`a`, `d`, `dt_bias`) may be in any float dtype: the kernels
    // read them as f32 (f32 masters under bf16-mixed).
    let same = [input.dt.dtype(), input.b.dtype(), input.c.dtype()]
        .iter()
        .all(|&d| d == dtype)
        && input
            .initial_state
            .as_ref()
            .is_none_or(|s| s.dtype() == dtype);
    same && groups != 0 && heads % groups == 0 && input.chunk_size != 0
}

/// The SSD inputs as device primitives, the sequence cut into `nchunks` chunks of [`TILE`].
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
    pub nchunks: usize,
    pub dtype: DType,
    /// The dtypes `a`, `d` and `dt_bias` came in (their gradients go back in them); the prims
    /// above hold them as f32.
    pub param_dtypes: [DType; 3],
}

impl<R: CubeRuntime> Prims<R> {
    pub fn new<F: FloatElement, I: IntElement, BT: BoolElement>(
        input: SsdInput<CubeBackend<R, F, I, BT>>,
    ) -> Self {
        let seqlen = input.x.dims()[1];
        let param_dtypes = [input.a.dtype(), input.d.dtype(), input.dt_bias.dtype()];
        Self {
            dtype: input.x.dtype(),
            param_dtypes,
            x: prim(input.x),
            dt: prim(input.dt),
            a: prim(f32_of(input.a)),
            bm: prim(input.b),
            cm: prim(input.c),
            d: prim(f32_of(input.d)),
            dt_bias: prim(f32_of(input.dt_bias)),
            init: input.initial_state.map(prim),
            dt_limit: input.dt_limit,
            nchunks: seqlen.div_ceil(TILE).max(1),
        }
    }

    pub fn dims(&self) -> [usize; 6] {
        let s = &self.x.meta.shape;
        let sb = &self.bm.meta.shape;
        [s[0], s[1], s[2], s[3], sb[2], sb[3]]
    }
}

/// `t` as f32 (no op when it is).
pub(crate) fn f32_of<B: Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> burn::tensor::Tensor<B, D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// Launch shape of the tiled kernels: one cube of [`THREADS`] per `(b·chunk, y, z)`.
pub(crate) fn tiles(bc: usize, y: usize, z: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(bc as u32, y as u32, z as u32),
        CubeDim::new_1d(THREADS),
    )
}

/// Kernel 2's launch: `out[b, c, h, p, n] = Σ_q xin ⊗ ym · s_q` (see the kernel).
pub(crate) fn state_tiles<R: CubeRuntime>(
    p: &Prims<R>,
    xin: &CubeTensor<R>,
    ym: &CubeTensor<R>,
    dt_c: &CubeTensor<R>,
    da_cs: &CubeTensor<R>,
    to_end: bool,
) -> CubeTensor<R> {
    let [batch, _seqlen, heads, head_dim, _groups, dstate] = p.dims();
    let nchunks = p.nchunks;
    let out = empty_like_device(
        &p.x,
        vec![batch, nchunks, heads, head_dim, dstate],
        DType::F32,
    );
    let z = head_dim.div_ceil(TILE) * dstate.div_ceil(TILE);
    if batch * heads * z > 0 {
        let (count, dim) = tiles(batch * nchunks * z, heads, 1);
        let (slabs, slab_elem) = slabs_for(&xin.client, p.dtype, CHUNK_SMEM);
        ssd_state_tile_kernel::launch::<R>(
            &xin.client,
            count,
            dim,
            xin.clone().into_tensor_arg(),
            ym.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            to_end,
            slabs,
            [p.dtype.into(), slab_elem],
        );
    }
    out
}

/// Kernel 5's launch (see the kernel): `y` from `(C, prev, x)`, or, `transposed`, `dx` from
/// `(B, dstates, dy)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_tiles<R: CubeRuntime>(
    p: &Prims<R>,
    um: &CubeTensor<R>,
    st: &CubeTensor<R>,
    xin: &CubeTensor<R>,
    cb: &CubeTensor<R>,
    dt_c: &CubeTensor<R>,
    da_cs: &CubeTensor<R>,
    transposed: bool,
) -> CubeTensor<R> {
    let [batch, seqlen, heads, head_dim, _groups, _dstate] = p.dims();
    let out = empty_like_device(&p.x, vec![batch, seqlen, heads, head_dim], p.dtype);
    if batch * seqlen * heads * head_dim > 0 {
        let (count, dim) = tiles(batch * p.nchunks, heads, head_dim.div_ceil(TILE));
        let (slabs, slab_elem) = slabs_for(&xin.client, p.dtype, CHUNK_SMEM);
        ssd_scan_tile_kernel::launch::<R>(
            &xin.client,
            count,
            dim,
            um.clone().into_tensor_arg(),
            st.clone().into_tensor_arg(),
            xin.clone().into_tensor_arg(),
            cb.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            p.d.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            transposed,
            slabs,
            [p.dtype.into(), slab_elem],
        );
    }
    out
}

/// What kernels 1-4 compute, shared by the forward's kernel 5 and by the backward.
pub(crate) struct Parts<R: CubeRuntime> {
    /// `[batch, heads, chunks, chunk]` f32: dt after softplus and clamp (0 past the end).
    pub dt_c: CubeTensor<R>,
    /// `[batch, heads, chunks, chunk]` f32: within-chunk cumsum of dt · A.
    pub da_cs: CubeTensor<R>,
    /// `[batch, chunks, heads, head_dim, state]` f32: the state entering each chunk.
    pub prev: CubeTensor<R>,
    /// `[batch, chunks, groups, chunk, chunk]` f32: C · Bᵀ within chunks (zero past the end).
    pub cb: CubeTensor<R>,
    /// `[batch, heads, head_dim, state]` in the input dtype.
    pub final_state: CubeTensor<R>,
}

/// Kernels 1-4.
pub(crate) fn parts<R: CubeRuntime>(p: &Prims<R>) -> Parts<R> {
    let [batch, _seqlen, heads, head_dim, groups, dstate] = p.dims();
    let (q, nchunks, dtype) = (TILE, p.nchunks, p.dtype);
    let client = p.x.client.clone();
    let empty = |shape: Vec<usize>, dtype: DType| empty_like_device(&p.x, shape, dtype);

    // 1. dt and the within-chunk cumsum of dt · A: [batch, heads, chunks, chunk]
    let dt_c = empty(vec![batch, heads, nchunks, q], DType::F32);
    let da_cs = empty(vec![batch, heads, nchunks, q], DType::F32);
    let (lo, hi) = p.dt_limit;
    let n = batch * heads * nchunks;
    if n > 0 {
        let (count, dim) = spread(n);
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

    // 2. Per-chunk states: [batch, chunks, heads, head_dim, state]
    let states = state_tiles(p, &p.x, &p.bm, &dt_c, &da_cs, true);

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
    if batch * groups > 0 {
        let (count, dim) = tiles(batch * nchunks, groups, 1);
        let (slabs, slab_elem) = slabs_for(&client, dtype, 0);
        ssd_cb_tile_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.cm.clone().into_tensor_arg(),
            p.bm.clone().into_tensor_arg(),
            cb.clone().into_tensor_arg(),
            slabs,
            [dtype.into(), slab_elem],
        );
    }

    Parts {
        dt_c,
        da_cs,
        prev,
        cb,
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
    ssd_chunk_scan_keeping(input).0
}

/// [`ssd_chunk_scan`], handing back kernels 1-4's results for the backward
/// ([`crate::MambaBackend::ssd_chunk_scan_keeping`]); `None` where the reference ran.
#[allow(clippy::type_complexity)]
pub fn ssd_chunk_scan_keeping<R, F, I, BT>(
    input: SsdInput<CubeBackend<R, F, I, BT>>,
) -> (
    SsdOutput<CubeBackend<R, F, I, BT>>,
    Option<SsdKept<CubeBackend<R, F, I, BT>>>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !kernels_apply(&input) {
        return (crate::reference::ssd_chunk_scan(input), None);
    }
    let p = Prims::new(input);
    let Parts {
        dt_c,
        da_cs,
        prev,
        cb,
        final_state,
    } = parts(&p);

    // 5. Outputs: [batch, seq, heads, head_dim]
    let y = scan_tiles(&p, &p.cm, &prev, &p.x, &cb, &dt_c, &da_cs, false);

    let kept = SsdKept {
        dt: wrap(dt_c),
        da_cumsum: wrap(da_cs),
        prev_states: wrap(prev),
        cb: wrap(cb),
    };
    (
        SsdOutput {
            y: wrap(y),
            final_state: wrap(final_state),
        },
        Some(kept),
    )
}

/// The SSD forward's tiled kernels as CUDA C++ (`super::offline`): the `C·Bᵀ` tiles, the chunk
/// states and the output, in bf16, CUDA cores and tensor cores, four parts.
#[cfg(all(test, feature = "cuda", feature = "wgpu"))]
mod cuda_source {
    use super::super::offline::{client, emit, settings, tensor};
    use super::super::tile::{Slabs, Tc};
    use super::ssd_cb_tile_kernel::SsdCbTileKernel;
    use super::ssd_scan_tile_kernel::SsdScanTileKernel;
    use super::ssd_state_tile_kernel::SsdStateTileKernel;
    use cubecl::prelude::*;

    #[test]
    #[ignore]
    fn emit_ssd_tiles() {
        let client = client();
        let bf16: StorageType = burn::tensor::DType::BF16.into();
        let f32t: StorageType = burn::tensor::DType::F32.into();
        for (tag, tc) in [("cc", Tc::Off), ("tc", Tc::Tf32), ("bf", Tc::Bf16)] {
            let slabs = Slabs { parts: 4, tc };
            let dt = [bf16, if tc == Tc::Bf16 { bf16 } else { f32t }];
            let cb = SsdCbTileKernel::<cubecl::wgpu::WgpuRuntime>::new(
                settings(super::THREADS),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                slabs,
                dt,
            );
            emit(&format!("ssd_cb_tile_{tag}"), cb, ExecutionMode::Checked);
            let st = SsdStateTileKernel::<cubecl::wgpu::WgpuRuntime>::new(
                settings(super::THREADS),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                false,
                slabs,
                dt,
            );
            emit(&format!("ssd_state_tile_{tag}"), st, ExecutionMode::Checked);
            let scan = SsdScanTileKernel::<cubecl::wgpu::WgpuRuntime>::new(
                settings(super::THREADS),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                false,
                slabs,
                dt,
            );
            emit(
                &format!("ssd_scan_tile_{tag}"),
                scan,
                ExecutionMode::Checked,
            );
        }
    }
}

//! The SSD chunked scan (Mamba2) backward as cubecl kernels.
//!
//! Nothing of the forward is stored: kernels 1-4 of [`super::ssd`] run again (dt, cumsums,
//! states entering each chunk, C·Bᵀ), then:
//!
//! 1. `dprev_loc`: what each chunk's outputs say about the state entering it,
//!    `Σ_q exp(cs_q) C_q ⊗ dy_q`;
//! 2. reverse state passing (sequential over chunks, last to first): the gradient of each
//!    chunk's own state contribution (`dstates`), of the initial state, and of each chunk's total
//!    decay;
//! 3. `W[i, j] = exp(cs_i − cs_j) dy_i · x_j` (`j ≤ i`, per head): the within-chunk quadratic
//!    form every other gradient reads;
//!    and `Wg`, its dt-weighted sum over the heads of each group;
//! 4. `dx`; 5. `dC`; 6. `dB` (summed over the heads of a group);
//! 7. per position: `d dt` and `d cs` (the gradient of the cumulative sum of `dt · A`);
//! 8. per chunk, sequential: the reverse cumsum of `d cs` into `d(dt · A)`, then `dt` through
//!    the clamp and softplus to the raw `dt`, and partial sums for `dA` and `d dt_bias`.
//!
//! Notation: `t = c·Q + q` is position `q` of chunk `c`; `cs` the within-chunk cumsum of
//! `dt · A`, `L_c` its value at the chunk's end. All intermediates are f32.

use burn::tensor::{DType, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, tensor::CubeTensor, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::ssd::{empty_like_device, kernels_apply, parts, Parts, Prims};
use super::{elemwise, prim, wrap};
use crate::{SsdGrads, SsdInput};

/// Kernel 1, one thread per `(b, c, h, p, n)`:
/// `dprev_loc[b, c, h, p, n] = Σ_q exp(cs_q) C[t, g, n] dy[t, h, p]`.
#[cube(launch)]
fn ssd_bwd_dprev_kernel<F: Float>(
    dy: &Tensor<F>,        // [batch, seq, heads, head_dim]
    cm: &Tensor<F>,        // [batch, seq, groups, state]
    e_cs: &Tensor<f32>,    // [batch, heads, chunks, chunk]
    out: &mut Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    #[define(F)] _dtype: StorageType,
) {
    let nchunks = out.shape(1);
    let heads = out.shape(2);
    let head_dim = out.shape(3);
    let dstate = out.shape(4);
    let seqlen = dy.shape(1);
    let q_len = e_cs.shape(3);
    let heads_per_group = heads / cm.shape(2);
    if ABSOLUTE_POS >= out.shape(0) * nchunks * heads * head_dim * dstate {
        terminate!();
    }
    let n = ABSOLUTE_POS % dstate;
    let p = (ABSOLUTE_POS / dstate) % head_dim;
    let h = (ABSOLUTE_POS / (dstate * head_dim)) % heads;
    let c = (ABSOLUTE_POS / (dstate * head_dim * heads)) % nchunks;
    let b = ABSOLUTE_POS / (dstate * head_dim * heads * nchunks);
    let g = h / heads_per_group;

    let ebase = b * e_cs.stride(0) + h * e_cs.stride(1) + c * e_cs.stride(2);
    let cbase = b * cm.stride(0) + g * cm.stride(2) + n * cm.stride(3);
    let ybase = b * dy.stride(0) + h * dy.stride(2) + p * dy.stride(3);
    let mut q_end = q_len;
    if c * q_len + q_len > seqlen {
        q_end = seqlen - c * q_len;
    }
    let mut acc = 0.0f32;
    for q in 0..q_end {
        let t = c * q_len + q;
        acc += e_cs[ebase + q * e_cs.stride(3)]
            * f32::cast_from(cm[cbase + t * cm.stride(1)])
            * f32::cast_from(dy[ybase + t * dy.stride(1)]);
    }
    out[b * out.stride(0)
        + c * out.stride(1)
        + h * out.stride(2)
        + p * out.stride(3)
        + n * out.stride(4)] = acc;
}

/// Kernel 2, one thread per `(b, h, p, n)`, chunks last to first. With `G` the gradient of the
/// state leaving chunk `c` (the final state's gradient for the last chunk):
/// `dstates_c = G`, `dlast_c = G · exp(L_c) · prev_c` (summed over `p, n` later: the gradient of
/// `L_c`), then `G ← exp(L_c) G + dprev_loc_c`; what is left at the start is the initial
/// state's gradient.
#[cube(launch)]
fn ssd_bwd_state_passing_kernel<F: Float>(
    dprev_loc: &Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    prev: &Tensor<f32>,      // [batch, chunks, heads, head_dim, state]
    da_cs: &Tensor<f32>,     // [batch, heads, chunks, chunk]
    d_final: &ComptimeOption<Tensor<F>>, // [batch, heads, head_dim, state]
    dstates: &mut Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    dlast: &mut Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    dinit: &mut Tensor<F>,   // [batch, heads, head_dim, state]
    #[define(F)] _dtype: StorageType,
) {
    let heads = dinit.shape(1);
    let head_dim = dinit.shape(2);
    let dstate = dinit.shape(3);
    let nchunks = prev.shape(1);
    let q_len = da_cs.shape(3);
    if ABSOLUTE_POS >= dinit.shape(0) * heads * head_dim * dstate {
        terminate!();
    }
    let n = ABSOLUTE_POS % dstate;
    let p = (ABSOLUTE_POS / dstate) % head_dim;
    let h = (ABSOLUTE_POS / (dstate * head_dim)) % heads;
    let b = ABSOLUTE_POS / (dstate * head_dim * heads);

    let mut g = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(df) = d_final {
        g = f32::cast_from(
            df[b * df.stride(0) + h * df.stride(1) + p * df.stride(2) + n * df.stride(3)],
        );
    }
    for k in 0..nchunks {
        let c = nchunks - 1 - k;
        let idx = b * prev.stride(0)
            + c * prev.stride(1)
            + h * prev.stride(2)
            + p * prev.stride(3)
            + n * prev.stride(4);
        let oidx = b * dstates.stride(0)
            + c * dstates.stride(1)
            + h * dstates.stride(2)
            + p * dstates.stride(3)
            + n * dstates.stride(4);
        let decay = da_cs[b * da_cs.stride(0)
            + h * da_cs.stride(1)
            + c * da_cs.stride(2)
            + (q_len - 1) * da_cs.stride(3)]
        .exp();
        dstates[oidx] = g;
        dlast[oidx] = g * decay * prev[idx];
        g = decay * g
            + dprev_loc[b * dprev_loc.stride(0)
                + c * dprev_loc.stride(1)
                + h * dprev_loc.stride(2)
                + p * dprev_loc.stride(3)
                + n * dprev_loc.stride(4)];
    }
    dinit[b * dinit.stride(0) + h * dinit.stride(1) + p * dinit.stride(2) + n * dinit.stride(3)] =
        F::cast_from(g);
}

/// Kernel 3, one thread per `(b, c, h, i, j)`:
/// `W[i, j] = exp(cs_i − cs_j) Σ_p dy[t_i, h, p] x[t_j, h, p]` for `j ≤ i < len`, else 0.
#[cube(launch)]
fn ssd_bwd_w_kernel<F: Float>(
    dy: &Tensor<F>,      // [batch, seq, heads, head_dim]
    x: &Tensor<F>,       // [batch, seq, heads, head_dim]
    da_cs: &Tensor<f32>, // [batch, heads, chunks, chunk]
    w: &mut Tensor<f32>, // [batch, chunks, heads, chunk, chunk]
    #[define(F)] _dtype: StorageType,
) {
    let nchunks = w.shape(1);
    let heads = w.shape(2);
    let q_len = w.shape(3);
    let seqlen = x.shape(1);
    let head_dim = x.shape(3);
    if ABSOLUTE_POS >= w.shape(0) * nchunks * heads * q_len * q_len {
        terminate!();
    }
    let j = ABSOLUTE_POS % q_len;
    let i = (ABSOLUTE_POS / q_len) % q_len;
    let h = (ABSOLUTE_POS / (q_len * q_len)) % heads;
    let c = (ABSOLUTE_POS / (q_len * q_len * heads)) % nchunks;
    let b = ABSOLUTE_POS / (q_len * q_len * heads * nchunks);
    let ti = c * q_len + i;
    let tj = c * q_len + j;

    let mut acc = 0.0f32;
    if j <= i && ti < seqlen {
        let yi = b * dy.stride(0) + ti * dy.stride(1) + h * dy.stride(2);
        let xj = b * x.stride(0) + tj * x.stride(1) + h * x.stride(2);
        for p in 0..head_dim {
            acc +=
                f32::cast_from(dy[yi + p * dy.stride(3)]) * f32::cast_from(x[xj + p * x.stride(3)]);
        }
        let cbase = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
        acc *= (da_cs[cbase + i * da_cs.stride(3)] - da_cs[cbase + j * da_cs.stride(3)]).exp();
    }
    w[b * w.stride(0) + c * w.stride(1) + h * w.stride(2) + i * w.stride(3) + j * w.stride(4)] =
        acc;
}

/// Kernel 3b, one thread per `(b, c, g, i, j)`: `Wg[i, j] = Σ_{h ∈ g} W_h[i, j] dt_h[j]`, what
/// the within-chunk parts of `dB` and `dC` read (summing the heads once here rather than in
/// every `(t, n)` thread).
#[cube(launch)]
fn ssd_bwd_wsum_kernel(
    w: &Tensor<f32>,      // [batch, chunks, heads, chunk, chunk]
    dt_c: &Tensor<f32>,   // [batch, heads, chunks, chunk]
    wg: &mut Tensor<f32>, // [batch, chunks, groups, chunk, chunk]
) {
    let nchunks = wg.shape(1);
    let groups = wg.shape(2);
    let q_len = wg.shape(3);
    let heads_per_group = w.shape(2) / groups;
    if ABSOLUTE_POS >= wg.shape(0) * nchunks * groups * q_len * q_len {
        terminate!();
    }
    let j = ABSOLUTE_POS % q_len;
    let i = (ABSOLUTE_POS / q_len) % q_len;
    let g = (ABSOLUTE_POS / (q_len * q_len)) % groups;
    let c = (ABSOLUTE_POS / (q_len * q_len * groups)) % nchunks;
    let b = ABSOLUTE_POS / (q_len * q_len * groups * nchunks);
    let mut acc = 0.0f32;
    if j <= i {
        for hh in 0..heads_per_group {
            let h = g * heads_per_group + hh;
            acc += w[b * w.stride(0)
                + c * w.stride(1)
                + h * w.stride(2)
                + i * w.stride(3)
                + j * w.stride(4)]
                * dt_c[b * dt_c.stride(0)
                    + h * dt_c.stride(1)
                    + c * dt_c.stride(2)
                    + j * dt_c.stride(3)];
        }
    }
    wg[b * wg.stride(0)
        + c * wg.stride(1)
        + g * wg.stride(2)
        + i * wg.stride(3)
        + j * wg.stride(4)] = acc;
}

/// Kernel 4, one thread per `(b, t, h, p)`:
/// `dx = D dy_t + Σ_{i ≥ q} M[i, q] dy_i
/// + dt_q exp(L_c − cs_q) Σ_n B[t, n] dstates_c[p, n]`.
#[cube(launch)]
fn ssd_bwd_dx_kernel<F: Float>(
    dy: &Tensor<F>,        // [batch, seq, heads, head_dim]
    bm: &Tensor<F>,        // [batch, seq, groups, state]
    d: &Tensor<F>,         // [heads]
    dt_c: &Tensor<f32>,    // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>,   // [batch, heads, chunks, chunk]
    m: &Tensor<f32>,       // [batch, chunks, heads, chunk, chunk]
    dstates: &Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    x: &Tensor<F>,         // [batch, seq, heads, head_dim]
    cm: &Tensor<F>,        // [batch, seq, groups, state]
    prev: &Tensor<f32>,    // [batch, chunks, heads, head_dim, state]
    dx: &mut Tensor<F>,    // [batch, seq, heads, head_dim]
    sx: &mut Tensor<f32>,  // [batch, seq, heads, head_dim]
    oy: &mut Tensor<f32>,  // [batch, seq, heads, head_dim]
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = dx.shape(1);
    let heads = dx.shape(2);
    let head_dim = dx.shape(3);
    let q_len = dt_c.shape(3);
    let dstate = bm.shape(3);
    let heads_per_group = heads / bm.shape(2);
    if ABSOLUTE_POS >= dx.shape(0) * seqlen * heads * head_dim {
        terminate!();
    }
    let p = ABSOLUTE_POS % head_dim;
    let h = (ABSOLUTE_POS / head_dim) % heads;
    let t = (ABSOLUTE_POS / (head_dim * heads)) % seqlen;
    let b = ABSOLUTE_POS / (head_dim * heads * seqlen);
    let g = h / heads_per_group;
    let c = t / q_len;
    let q = t % q_len;

    let cbase = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
    let cs_q = da_cs[cbase + q * da_cs.stride(3)];
    let last = da_cs[cbase + (q_len - 1) * da_cs.stride(3)];
    let dt_q =
        dt_c[b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2) + q * dt_c.stride(3)];
    let ybase = b * dy.stride(0) + h * dy.stride(2) + p * dy.stride(3);

    // Within the chunk: outputs at i ≥ q read x_q, through M[i, q] (which holds dt_q).
    let mcol = b * m.stride(0) + c * m.stride(1) + h * m.stride(2) + q * m.stride(4);
    let mut i_end = q_len;
    if c * q_len + q_len > seqlen {
        i_end = seqlen - c * q_len;
    }
    let mut intra = 0.0f32;
    for i in q..i_end {
        intra +=
            m[mcol + i * m.stride(3)] * f32::cast_from(dy[ybase + (c * q_len + i) * dy.stride(1)]);
    }

    // Through the chunk's state; and, for kernel 7, `B_t · dstates_c[p]` and `C_t · prev_c[p]`.
    let bt = b * bm.stride(0) + t * bm.stride(1) + g * bm.stride(2);
    let ct = b * cm.stride(0) + t * cm.stride(1) + g * cm.stride(2);
    let sbase = b * dstates.stride(0)
        + c * dstates.stride(1)
        + h * dstates.stride(2)
        + p * dstates.stride(3);
    let pbase = b * prev.stride(0) + c * prev.stride(1) + h * prev.stride(2) + p * prev.stride(3);
    let mut st = 0.0f32;
    let mut off = 0.0f32;
    for n in 0..dstate {
        st += f32::cast_from(bm[bt + n * bm.stride(3)]) * dstates[sbase + n * dstates.stride(4)];
        off += f32::cast_from(cm[ct + n * cm.stride(3)]) * prev[pbase + n * prev.stride(4)];
    }

    let dy_t = f32::cast_from(dy[ybase + t * dy.stride(1)]);
    let e_l = (last - cs_q).exp();
    let acc = f32::cast_from(d[h * d.stride(0)]) * dy_t + intra + dt_q * e_l * st;
    let o = b * dx.stride(0) + t * dx.stride(1) + h * dx.stride(2) + p * dx.stride(3);
    dx[o] = F::cast_from(acc);
    let x_t =
        f32::cast_from(x[b * x.stride(0) + t * x.stride(1) + h * x.stride(2) + p * x.stride(3)]);
    sx[o] = x_t * st * e_l;
    oy[o] = dy_t * off * cs_q.exp();
}

/// Kernel 5, one thread per `(b, t, g, n)`:
/// `dC[t, n] = Σ_{h ∈ g} exp(cs_q) Σ_p dy[t, h, p] prev_c[h, p, n] + Σ_{j ≤ q} Wg[q, j] B[j, n]`.
#[cube(launch)]
fn ssd_bwd_dc_kernel<F: Float>(
    dy: &Tensor<F>,      // [batch, seq, heads, head_dim]
    bm: &Tensor<F>,      // [batch, seq, groups, state]
    da_cs: &Tensor<f32>, // [batch, heads, chunks, chunk]
    prev: &Tensor<f32>,  // [batch, chunks, heads, head_dim, state]
    wg: &Tensor<f32>,    // [batch, chunks, groups, chunk, chunk]
    dc: &mut Tensor<F>,  // [batch, seq, groups, state]
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = dc.shape(1);
    let groups = dc.shape(2);
    let dstate = dc.shape(3);
    let heads = dy.shape(2);
    let head_dim = dy.shape(3);
    let q_len = da_cs.shape(3);
    let heads_per_group = heads / groups;
    if ABSOLUTE_POS >= dc.shape(0) * seqlen * groups * dstate {
        terminate!();
    }
    let n = ABSOLUTE_POS % dstate;
    let g = (ABSOLUTE_POS / dstate) % groups;
    let t = (ABSOLUTE_POS / (dstate * groups)) % seqlen;
    let b = ABSOLUTE_POS / (dstate * groups * seqlen);
    let c = t / q_len;
    let q = t % q_len;

    // Through the state entering the chunk, head by head.
    let mut acc = 0.0f32;
    for hh in 0..heads_per_group {
        let h = g * heads_per_group + hh;
        let ybase = b * dy.stride(0) + t * dy.stride(1) + h * dy.stride(2);
        let pbase =
            b * prev.stride(0) + c * prev.stride(1) + h * prev.stride(2) + n * prev.stride(4);
        let mut s = 0.0f32;
        for p in 0..head_dim {
            s += f32::cast_from(dy[ybase + p * dy.stride(3)]) * prev[pbase + p * prev.stride(3)];
        }
        let cs_q = da_cs
            [b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2) + q * da_cs.stride(3)];
        acc += cs_q.exp() * s;
    }
    // Within the chunk.
    let wrow = b * wg.stride(0) + c * wg.stride(1) + g * wg.stride(2) + q * wg.stride(3);
    for j in 0..q + 1 {
        let tj = c * q_len + j;
        acc += wg[wrow + j * wg.stride(4)]
            * f32::cast_from(
                bm[b * bm.stride(0) + tj * bm.stride(1) + g * bm.stride(2) + n * bm.stride(3)],
            );
    }
    dc[b * dc.stride(0) + t * dc.stride(1) + g * dc.stride(2) + n * dc.stride(3)] =
        F::cast_from(acc);
}

/// Kernel 6, one thread per `(b, t, g, n)`:
/// `dB[t, n] = Σ_{h ∈ g} dt_q exp(L_c − cs_q) Σ_p dstates_c[h, p, n] x[t, h, p]
/// + Σ_{i ≥ q} Wg[i, q] C[i, n]`.
#[cube(launch)]
fn ssd_bwd_db_kernel<F: Float>(
    x: &Tensor<F>,         // [batch, seq, heads, head_dim]
    cm: &Tensor<F>,        // [batch, seq, groups, state]
    dt_c: &Tensor<f32>,    // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>,   // [batch, heads, chunks, chunk]
    dstates: &Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    wg: &Tensor<f32>,      // [batch, chunks, groups, chunk, chunk]
    db: &mut Tensor<F>,    // [batch, seq, groups, state]
    #[define(F)] _dtype: StorageType,
) {
    let seqlen = db.shape(1);
    let groups = db.shape(2);
    let dstate = db.shape(3);
    let heads = x.shape(2);
    let head_dim = x.shape(3);
    let q_len = dt_c.shape(3);
    let heads_per_group = heads / groups;
    if ABSOLUTE_POS >= db.shape(0) * seqlen * groups * dstate {
        terminate!();
    }
    let n = ABSOLUTE_POS % dstate;
    let g = (ABSOLUTE_POS / dstate) % groups;
    let t = (ABSOLUTE_POS / (dstate * groups)) % seqlen;
    let b = ABSOLUTE_POS / (dstate * groups * seqlen);
    let c = t / q_len;
    let q = t % q_len;

    // Through the chunk's state, head by head.
    let mut acc = 0.0f32;
    for hh in 0..heads_per_group {
        let h = g * heads_per_group + hh;
        let cbase = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
        let cs_q = da_cs[cbase + q * da_cs.stride(3)];
        let last = da_cs[cbase + (q_len - 1) * da_cs.stride(3)];
        let dt_q =
            dt_c[b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2) + q * dt_c.stride(3)];
        let xbase = b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
        let sbase = b * dstates.stride(0)
            + c * dstates.stride(1)
            + h * dstates.stride(2)
            + n * dstates.stride(4);
        let mut s = 0.0f32;
        for p in 0..head_dim {
            s +=
                f32::cast_from(x[xbase + p * x.stride(3)]) * dstates[sbase + p * dstates.stride(3)];
        }
        acc += dt_q * (last - cs_q).exp() * s;
    }
    // Within the chunk: outputs at i ≥ q.
    let wcol = b * wg.stride(0) + c * wg.stride(1) + g * wg.stride(2) + q * wg.stride(4);
    for i in q..q_len {
        let ti = c * q_len + i;
        if ti < seqlen {
            acc += wg[wcol + i * wg.stride(3)]
                * f32::cast_from(
                    cm[b * cm.stride(0) + ti * cm.stride(1) + g * cm.stride(2) + n * cm.stride(3)],
                );
        }
    }
    db[b * db.stride(0) + t * db.stride(1) + g * db.stride(2) + n * db.stride(3)] =
        F::cast_from(acc);
}

/// Kernel 7, one thread per `(b, h, c, q)`: the gradients of `dt_q` (holding `cs` fixed) and of
/// `cs_q`, and `N_q`, the part of `cs_q`'s gradient that also reaches `L_c` (through the chunk's
/// state). `sx = exp(L_c − cs_q) x_t · dstates_c · B_t` and `oy = exp(cs_q) dy_t · prev_c · C_t`
/// come from kernel 4, summed over `p`. Zero past the end of the sequence.
#[cube(launch)]
fn ssd_bwd_dcs_kernel(
    sx: &Tensor<f32>,         // [batch, seq, heads]
    oy: &Tensor<f32>,         // [batch, seq, heads]
    dt_c: &Tensor<f32>,       // [batch, heads, chunks, chunk]
    cb: &Tensor<f32>,         // [batch, chunks, groups, chunk, chunk]
    w: &Tensor<f32>,          // [batch, chunks, heads, chunk, chunk]
    ddt: &mut Tensor<f32>,    // [batch, heads, chunks, chunk]
    dcs: &mut Tensor<f32>,    // [batch, heads, chunks, chunk]
    nq_out: &mut Tensor<f32>, // [batch, heads, chunks, chunk]
) {
    let heads = dt_c.shape(1);
    let nchunks = dt_c.shape(2);
    let q_len = dt_c.shape(3);
    let seqlen = sx.shape(1);
    let heads_per_group = heads / cb.shape(2);
    if ABSOLUTE_POS >= dt_c.shape(0) * heads * nchunks * q_len {
        terminate!();
    }
    let q = ABSOLUTE_POS % q_len;
    let c = (ABSOLUTE_POS / q_len) % nchunks;
    let h = (ABSOLUTE_POS / (q_len * nchunks)) % heads;
    let b = ABSOLUTE_POS / (q_len * nchunks * heads);
    let g = h / heads_per_group;
    let t = c * q_len + q;

    let mut g_dt = 0.0f32;
    let mut g_cs = 0.0f32;
    let mut nq = 0.0f32;
    if t < seqlen {
        let dbase = b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2);
        let dt_q = dt_c[dbase + q * dt_c.stride(3)];
        let s = sx[b * sx.stride(0) + t * sx.stride(1) + h * sx.stride(2)];
        g_dt = s;
        nq = dt_q * s;
        g_cs = oy[b * oy.stride(0) + t * oy.stride(1) + h * oy.stride(2)] - nq;

        let cbrow = b * cb.stride(0) + c * cb.stride(1) + g * cb.stride(2);
        let wrow = b * w.stride(0) + c * w.stride(1) + h * w.stride(2);
        // As the output position: + Σ_{j ≤ q} CB[q, j] dt_j W[q, j]
        for j in 0..q + 1 {
            g_cs += cb[cbrow + q * cb.stride(3) + j * cb.stride(4)]
                * dt_c[dbase + j * dt_c.stride(3)]
                * w[wrow + q * w.stride(3) + j * w.stride(4)];
        }
        // As the input position: the dt_q factor and − Σ_{i ≥ q} CB[i, q] dt_q W[i, q]
        for i in q..q_len {
            let m = cb[cbrow + i * cb.stride(3) + q * cb.stride(4)]
                * w[wrow + i * w.stride(3) + q * w.stride(4)];
            g_dt += m;
            g_cs -= m * dt_q;
        }
    }
    let o = b * ddt.stride(0) + h * ddt.stride(1) + c * ddt.stride(2) + q * ddt.stride(3);
    ddt[o] = g_dt;
    dcs[b * dcs.stride(0) + h * dcs.stride(1) + c * dcs.stride(2) + q * dcs.stride(3)] = g_cs;
    nq_out[b * nq_out.stride(0)
        + h * nq_out.stride(1)
        + c * nq_out.stride(2)
        + q * nq_out.stride(3)] = nq;
}

/// Kernel 8, one thread per `(b, h, c)`, positions last to first: `L_c`'s gradient joins the
/// last position's, the reverse cumsum gives `d(dt · A)`, which splits into `dt` (times `A`) and
/// `A` (times `dt`); `dt` goes back through the clamp and softplus. Writes the raw `dt`'s
/// gradient and per-chunk partial sums of `dA` and `d dt_bias`.
#[cube(launch)]
fn ssd_bwd_dt_kernel<F: Float>(
    dt: &Tensor<F>,            // [batch, seq, heads], raw
    a: &Tensor<F>,             // [heads]
    dt_bias: &Tensor<F>,       // [heads]
    dt_c: &Tensor<f32>,        // [batch, heads, chunks, chunk]
    ddt: &Tensor<f32>,         // [batch, heads, chunks, chunk]
    dcs: &Tensor<f32>,         // [batch, heads, chunks, chunk]
    nq: &Tensor<f32>,          // [batch, heads, chunks, chunk]
    dlast: &Tensor<f32>,       // [batch, chunks, heads]
    ddt_raw: &mut Tensor<F>,   // [batch, seq, heads]
    da_part: &mut Tensor<f32>, // [batch, heads, chunks]
    db_part: &mut Tensor<f32>, // [batch, heads, chunks]
    dt_min: f32,
    dt_max: f32,
    #[comptime] clamp_min: bool,
    #[comptime] clamp_max: bool,
    #[define(F)] _dtype: StorageType,
) {
    let heads = dt_c.shape(1);
    let nchunks = dt_c.shape(2);
    let q_len = dt_c.shape(3);
    let seqlen = dt.shape(1);
    if ABSOLUTE_POS >= dt_c.shape(0) * heads * nchunks {
        terminate!();
    }
    let c = ABSOLUTE_POS % nchunks;
    let h = (ABSOLUTE_POS / nchunks) % heads;
    let b = ABSOLUTE_POS / (nchunks * heads);
    let base = b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2);

    let mut d_last = dlast[b * dlast.stride(0) + c * dlast.stride(1) + h * dlast.stride(2)];
    for q in 0..q_len {
        d_last += nq[base + q * nq.stride(3)];
    }
    let a_h = f32::cast_from(a[h * a.stride(0)]);
    let bias = f32::cast_from(dt_bias[h * dt_bias.stride(0)]);
    let mut run = d_last;
    let mut da = 0.0f32;
    let mut dbias = 0.0f32;
    for k in 0..q_len {
        let q = q_len - 1 - k;
        run += dcs[base + q * dcs.stride(3)];
        let dt_q = dt_c[base + q * dt_c.stride(3)];
        da += dt_q * run;
        let t = c * q_len + q;
        if t < seqlen {
            let g_dt = ddt[base + q * ddt.stride(3)] + a_h * run;
            let v =
                f32::cast_from(dt[b * dt.stride(0) + t * dt.stride(1) + h * dt.stride(2)]) + bias;
            let mut sp = v;
            if v <= 20.0f32 {
                sp = (1.0f32 + v.exp()).ln();
            }
            let mut pass = true;
            if clamp_min && sp < dt_min {
                pass = false;
            }
            if clamp_max && sp > dt_max {
                pass = false;
            }
            let mut g_raw = 0.0f32;
            if pass {
                g_raw = g_dt / (1.0f32 + (-v).exp());
            }
            dbias += g_raw;
            ddt_raw[b * ddt_raw.stride(0) + t * ddt_raw.stride(1) + h * ddt_raw.stride(2)] =
                F::cast_from(g_raw);
        }
    }
    let o = b * da_part.stride(0) + h * da_part.stride(1) + c * da_part.stride(2);
    da_part[o] = da;
    db_part[b * db_part.stride(0) + h * db_part.stride(1) + c * db_part.stride(2)] = dbias;
}

/// Kernel backward of [`crate::MambaBackend::ssd_chunk_scan`]: the gradients of
/// `Σ y · dy + Σ final_state · d_final` with respect to every input. Falls back to the reference
/// where the forward kernels would.
pub fn ssd_chunk_scan_backward<R, F, I, BT>(
    input: SsdInput<CubeBackend<R, F, I, BT>>,
    dy: BTensor<CubeBackend<R, F, I, BT>, 4>,
    d_final: Option<BTensor<CubeBackend<R, F, I, BT>, 4>>,
) -> SsdGrads<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    if !kernels_apply(&input)
        || dy.dtype() != dtype
        || d_final.as_ref().is_some_and(|t| t.dtype() != dtype)
    {
        return crate::reference::ssd_chunk_scan_backward(input, dy, d_final);
    }
    type T<R, F, I, BT, const D: usize> = BTensor<CubeBackend<R, F, I, BT>, D>;
    let has_init = input.initial_state.is_some();
    let x_t: T<R, F, I, BT, 4> = input.x.clone();
    let p = Prims::new(input);
    let [batch, seqlen, heads, head_dim, groups, dstate] = p.dims();
    let (q, nchunks) = (p.q, p.nchunks);
    let client = p.x.client.clone();
    let empty = |shape: Vec<usize>, dtype: DType| empty_like_device(&p.x, shape, dtype);
    let Parts {
        dt_c,
        da_cs,
        prev,
        cb,
        e_cs,
        m,
        ..
    } = parts(&p);
    let dy_t = dy;
    let dy = prim(dy_t.clone());
    let launch = |n: usize| elemwise(&client, n.max(1));

    // 1. dprev_loc
    let state_shape = vec![batch, nchunks, heads, head_dim, dstate];
    let dprev_loc = empty(state_shape.clone(), DType::F32);
    let n = batch * nchunks * heads * head_dim * dstate;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_dprev_kernel::launch::<R>(
            &client,
            count,
            dim,
            dy.clone().into_tensor_arg(),
            p.cm.clone().into_tensor_arg(),
            e_cs.clone().into_tensor_arg(),
            dprev_loc.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    // 2. Reverse state passing.
    let dstates = empty(state_shape.clone(), DType::F32);
    let dlast = empty(state_shape, DType::F32);
    let dinit = empty(vec![batch, heads, head_dim, dstate], dtype);
    let n = batch * heads * head_dim * dstate;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_state_passing_kernel::launch::<R>(
            &client,
            count,
            dim,
            dprev_loc.into_tensor_arg(),
            prev.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            d_final.map(|t| prim(t).into_tensor_arg()).into(),
            dstates.clone().into_tensor_arg(),
            dlast.clone().into_tensor_arg(),
            dinit.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    // Σ_{p, n}: [batch, chunks, heads]
    let dlast: T<R, F, I, BT, 5> = wrap(dlast);
    let dlast = prim(dlast.sum_dim(4).sum_dim(3).reshape([batch, nchunks, heads]));

    // 3. W
    let w = empty(vec![batch, nchunks, heads, q, q], DType::F32);
    let n = batch * nchunks * heads * q * q;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_w_kernel::launch::<R>(
            &client,
            count,
            dim,
            dy.clone().into_tensor_arg(),
            p.x.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            w.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    // 4. dx, and the per-(t, h, p) terms of kernel 7.
    let dx = empty(vec![batch, seqlen, heads, head_dim], dtype);
    let sx = empty(vec![batch, seqlen, heads, head_dim], DType::F32);
    let oy = empty(vec![batch, seqlen, heads, head_dim], DType::F32);
    let n = batch * seqlen * heads * head_dim;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_dx_kernel::launch::<R>(
            &client,
            count,
            dim,
            dy.clone().into_tensor_arg(),
            p.bm.clone().into_tensor_arg(),
            p.d.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            m.into_tensor_arg(),
            dstates.clone().into_tensor_arg(),
            p.x.clone().into_tensor_arg(),
            p.cm.clone().into_tensor_arg(),
            prev.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            sx.clone().into_tensor_arg(),
            oy.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    // Σ_p: [batch, seq, heads]
    let sum_p = |t| -> CubeTensor<R> {
        let t: T<R, F, I, BT, 4> = wrap(t);
        prim(t.sum_dim(3).reshape([batch, seqlen, heads]))
    };
    let sx = sum_p(sx);
    let oy = sum_p(oy);

    // 3b. W summed over each group's heads, weighted by dt at the column.
    let wg = empty(vec![batch, nchunks, groups, q, q], DType::F32);
    let n = batch * nchunks * groups * q * q;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_wsum_kernel::launch::<R>(
            &client,
            count,
            dim,
            w.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            wg.clone().into_tensor_arg(),
        );
    }

    // 5, 6. dC, dB
    let dc = empty(vec![batch, seqlen, groups, dstate], dtype);
    let db = empty(vec![batch, seqlen, groups, dstate], dtype);
    let n = batch * seqlen * groups * dstate;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_dc_kernel::launch::<R>(
            &client,
            count.clone(),
            dim,
            dy.clone().into_tensor_arg(),
            p.bm.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            prev.clone().into_tensor_arg(),
            wg.clone().into_tensor_arg(),
            dc.clone().into_tensor_arg(),
            dtype.into(),
        );
        ssd_bwd_db_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.x.clone().into_tensor_arg(),
            p.cm.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            dstates.clone().into_tensor_arg(),
            wg.into_tensor_arg(),
            db.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    // 7. Per-position gradients of dt and of the cumsum.
    let pos_shape = vec![batch, heads, nchunks, q];
    let ddt = empty(pos_shape.clone(), DType::F32);
    let dcs = empty(pos_shape.clone(), DType::F32);
    let nq = empty(pos_shape, DType::F32);
    let n = batch * heads * nchunks * q;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_dcs_kernel::launch::<R>(
            &client,
            count,
            dim,
            sx.into_tensor_arg(),
            oy.into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            cb.into_tensor_arg(),
            w.into_tensor_arg(),
            ddt.clone().into_tensor_arg(),
            dcs.clone().into_tensor_arg(),
            nq.clone().into_tensor_arg(),
        );
    }

    // 8. Per chunk: reverse cumsum, dt through clamp and softplus, partial dA and d dt_bias.
    let ddt_raw = empty(vec![batch, seqlen, heads], dtype);
    let da_part = empty(vec![batch, heads, nchunks], DType::F32);
    let dbias_part = empty(vec![batch, heads, nchunks], DType::F32);
    let (lo, hi) = p.dt_limit;
    let n = batch * heads * nchunks;
    if n > 0 {
        let (count, dim) = launch(n);
        ssd_bwd_dt_kernel::launch::<R>(
            &client,
            count,
            dim,
            p.dt.clone().into_tensor_arg(),
            p.a.clone().into_tensor_arg(),
            p.dt_bias.clone().into_tensor_arg(),
            dt_c.into_tensor_arg(),
            ddt.into_tensor_arg(),
            dcs.into_tensor_arg(),
            nq.into_tensor_arg(),
            dlast.into_tensor_arg(),
            ddt_raw.clone().into_tensor_arg(),
            da_part.clone().into_tensor_arg(),
            dbias_part.clone().into_tensor_arg(),
            lo as f32,
            if hi.is_finite() { hi as f32 } else { 0.0 },
            lo > 0.0,
            hi.is_finite(),
            dtype.into(),
        );
    }

    let per_head = |t| -> T<R, F, I, BT, 1> {
        let t: T<R, F, I, BT, 3> = wrap(t);
        t.sum_dim(2).sum_dim(0).reshape([heads]).cast(dtype)
    };
    let dd: T<R, F, I, BT, 1> = (dy_t * x_t)
        .sum_dim(3)
        .sum_dim(1)
        .sum_dim(0)
        .reshape([heads]);
    SsdGrads {
        x: wrap(dx),
        dt: wrap(ddt_raw),
        a: per_head(da_part),
        b: wrap(db),
        c: wrap(dc),
        d: dd,
        dt_bias: per_head(dbias_part),
        initial_state: has_init.then(|| wrap(dinit)),
    }
}

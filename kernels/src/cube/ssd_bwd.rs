//! The SSD chunked scan (Mamba2) backward as cubecl kernels.
//!
//! Nothing of the forward is stored: kernels 1-4 of [`super::ssd`] run again (dt, cumsums,
//! states entering each chunk, C·Bᵀ), then, the contractions tiled as in the forward
//! ([`super::tile`]):
//!
//! 1. `dprev_loc = Σ_q exp(cs_q) dy_q ⊗ C_q`: what each chunk's outputs say about the state
//!    entering it (the forward's chunk-state kernel with other operands);
//! 2. reverse state passing (sequential over chunks, last to first): the gradient of each
//!    chunk's own state contribution (`dstates`), of the initial state, and of each chunk's total
//!    decay;
//! 3. per `(b, chunk, group)`, head by head: `W = exp(cs_i − cs_j) dy_i · x_j` (`j ≤ i`), kept
//!    only as `Wg = Σ_h W_h dt_h[j]` (what `dB` and `dC` read), as the two sums over `CB ∘ W`
//!    that the gradient of `cs` needs (`Σ_j CB[q, j] dt_j W[q, j]`, `Σ_i CB[i, q] W[i, q]`), and
//!    as its diagonal `dy_q · x_q`, whose sum is `D`'s gradient;
//! 4. `dx = exp(L − cs) dt ∘ (B · dstatesᵀ) + Mᵀ · dy + D dy` (the forward's chunk-scan kernel,
//!    transposed);
//! 5. `dC = Σ_h exp(cs) ∘ (dy_h · prev_h) + Wg · B` and `dB = Σ_h exp(L − cs) dt ∘
//!    (x_h · dstates_h) + Wgᵀ · C`, per group; on the way, per head and position,
//!    `oy = exp(cs_q) dy_q · prev · C_q` and `sx = exp(L − cs_q) x_q · dstates · B_q`;
//! 6. per `(b, h, chunk)`, sequential: the gradients of `dt` and of `cs` per position, the
//!    reverse cumsum into `d(dt · A)`, then `dt` through the clamp and softplus to the raw `dt`,
//!    and partial sums for `dA` and `d dt_bias`.
//!
//! Notation: `t = c·Q + q` is position `q` of chunk `c`; `cs` the within-chunk cumsum of
//! `dt · A`, `L_c` its value at the chunk's end. All intermediates are f32.

// Kernel code spells ceil-division and ranges out: `usize::div_ceil` and `Range::contains` are
// not cube functions.
#![allow(clippy::manual_div_ceil, clippy::manual_range_contains)]

use burn::tensor::{DType, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, tensor::CubeTensor, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use super::ssd::{
    chunk_len, empty_like_device, kernels_apply, parts, scan_tiles, state_tiles, tiles, Parts,
    Prims,
};
use super::tile::{
    contract, out_smem, slab_smem, slabs_for, stage_tile, tile_col, tile_get, tile_row, zero_acc,
    Slabs, THREADS, TILE, V4,
};
use super::{elemwise, prim, wrap};
use crate::{SsdGrads, SsdInput, SsdKept};

/// State entries (`n`) one thread of kernel 2 carries, so that it sums its share of `dlast`
/// before writing it.
pub const NQ: usize = 8;

/// Kernel 2, one thread per `(b, h, p, j)`, carrying the [`NQ`] state entries
/// `n = j + e · nq` (`nq = ⌈state / NQ⌉`, so a warp reads consecutive `n`), chunks last to
/// first. With `G` the gradient of the state leaving chunk `c` (the final state's gradient for
/// the last chunk): `dstates_c = G`, `G ← exp(L_c) G + dprev_loc_c`; what is left at the start is
/// the initial state's gradient. The gradient of `L_c` is `Σ_{p, n} G · exp(L_c) · prev_c`; the
/// thread writes its share (over its entries) to `dlast[b, c, h, p · nq + j]`.
#[cube(launch)]
fn ssd_bwd_state_passing_kernel<F: Float>(
    dprev_loc: &Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    prev: &Tensor<f32>,      // [batch, chunks, heads, head_dim, state]
    da_cs: &Tensor<f32>,     // [batch, heads, chunks, chunk]
    d_final: &ComptimeOption<Tensor<F>>, // [batch, heads, head_dim, state]
    dstates: &mut Tensor<f32>, // [batch, chunks, heads, head_dim, state]
    dlast: &mut Tensor<f32>, // [batch, chunks, heads, head_dim · nq]
    dinit: &mut Tensor<F>,   // [batch, heads, head_dim, state]
    #[define(F)] _dtype: StorageType,
) {
    let heads = dinit.shape(1);
    let head_dim = dinit.shape(2);
    let dstate = dinit.shape(3);
    let nchunks = prev.shape(1);
    let q_len = da_cs.shape(3);
    let nq = (dstate + NQ - 1) / NQ;
    if ABSOLUTE_POS >= dinit.shape(0) * heads * head_dim * nq {
        terminate!();
    }
    let j = ABSOLUTE_POS % nq;
    let p = (ABSOLUTE_POS / nq) % head_dim;
    let h = (ABSOLUTE_POS / (nq * head_dim)) % heads;
    let b = ABSOLUTE_POS / (nq * head_dim * heads);

    let mut g = Array::<f32>::new(NQ);
    #[unroll]
    for e in 0..NQ {
        let n = j + e * nq;
        let mut v = 0.0f32;
        #[comptime]
        if let ComptimeOption::Some(df) = d_final {
            if n < dstate {
                v = f32::cast_from(
                    df[b * df.stride(0) + h * df.stride(1) + p * df.stride(2) + n * df.stride(3)],
                );
            }
        }
        g[e] = v;
    }
    for k in 0..nchunks {
        let c = nchunks - 1 - k;
        let base =
            b * prev.stride(0) + c * prev.stride(1) + h * prev.stride(2) + p * prev.stride(3);
        let obase = b * dstates.stride(0)
            + c * dstates.stride(1)
            + h * dstates.stride(2)
            + p * dstates.stride(3);
        let lbase = b * dprev_loc.stride(0)
            + c * dprev_loc.stride(1)
            + h * dprev_loc.stride(2)
            + p * dprev_loc.stride(3);
        let decay = da_cs[b * da_cs.stride(0)
            + h * da_cs.stride(1)
            + c * da_cs.stride(2)
            + (q_len - 1) * da_cs.stride(3)]
        .exp();
        let mut dl = 0.0f32;
        #[unroll]
        for e in 0..NQ {
            let n = j + e * nq;
            if n < dstate {
                let ge = g[e];
                dstates[obase + n * dstates.stride(4)] = ge;
                dl += ge * prev[base + n * prev.stride(4)];
                g[e] = decay * ge + dprev_loc[lbase + n * dprev_loc.stride(4)];
            }
        }
        dlast[b * dlast.stride(0)
            + c * dlast.stride(1)
            + h * dlast.stride(2)
            + (p * nq + j) * dlast.stride(3)] = dl * decay;
    }
    #[unroll]
    for e in 0..NQ {
        let n = j + e * nq;
        if n < dstate {
            dinit[b * dinit.stride(0)
                + h * dinit.stride(1)
                + p * dinit.stride(2)
                + n * dinit.stride(3)] = F::cast_from(g[e]);
        }
    }
}

/// Per row of a tile, the 16 threads that hold parts of it each leave one share in shared memory
/// at `row * PITCH_SHARES + k`; a thread per row sums them ([`sum_shares`]).
const PITCH_SHARES: usize = 17;
/// Shared memory for one tile's shares.
const SHARES: usize = TILE * PITCH_SHARES;

/// Thread `first + r` (`r < TILE`) writes the sum of row `r`'s 16 shares to
/// `out[base + r * stride]`. The shares must be synced.
#[cube]
fn sum_shares(
    shares: &SharedMemory<f32>,
    out: &mut Tensor<f32>,
    base: usize,
    stride: usize,
    #[comptime] first: usize,
) {
    let u = UNIT_POS as usize;
    if u >= first && u < first + TILE {
        let r = u - first;
        let mut sum = 0.0f32;
        #[unroll]
        for k in 0..16usize {
            sum += shares[r * PITCH_SHARES + k];
        }
        out[base + r * stride] = sum;
    }
}

/// Most heads one cube of kernels 3 and 5 takes (kernel 3 stages their `cs` and `dt` at once).
pub const HEADS_PER_CUBE: usize = 8;

/// Stages `cs` (pitch `TILE + 1`, `L` last) and `dt` (pitch `TILE`) of heads
/// `h_lo .. h_lo + nh` (`nh ≤ HEADS_PER_CUBE`) of chunk `c`. Ends synced.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_heads(
    dt_c: &Tensor<f32>,
    da_cs: &Tensor<f32>,
    b: usize,
    c: usize,
    h_lo: usize,
    nh: usize,
    cs_s: &mut SharedMemory<f32>,
    dt_s: &mut SharedMemory<f32>,
) {
    let u = UNIT_POS as usize;
    let rounds = (nh * TILE + THREADS as usize - 1) / THREADS as usize;
    for r in 0..rounds {
        let idx = r * THREADS as usize + u;
        if idx < nh * TILE {
            let hh = idx / TILE;
            let q = idx % TILE;
            let h = h_lo + hh;
            let base = b * da_cs.stride(0) + h * da_cs.stride(1) + c * da_cs.stride(2);
            cs_s[hh * (TILE + 1) + q] = da_cs[base + q * da_cs.stride(3)];
            dt_s[hh * TILE + q] = dt_c
                [b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2) + q * dt_c.stride(3)];
            if q == TILE - 1 {
                cs_s[hh * (TILE + 1) + TILE] = da_cs[base + q * da_cs.stride(3)];
            }
        }
    }
    sync_cube();
}

/// The heads `[lo, hi)` that split `split` of `splits` takes of group `g`.
#[cube]
fn split_heads(g: usize, hpg: usize, split: usize, splits: usize) -> (usize, usize) {
    let hs = (hpg + splits - 1) / splits;
    let lo = split * hs;
    let mut hi = lo + hs;
    if hi > hpg {
        hi = hpg;
    }
    (g * hpg + lo, g * hpg + hi)
}

/// Kernel 3, one cube per `(b·chunk, g, split)`, looping over its share of the group's heads:
/// with `W_h[i, j] = exp(cs_i − cs_j) Σ_p dy[t_i, h, p] x[t_j, h, p]` (`j ≤ i < len`, else 0),
/// writes the split's part of `wg = Σ_h W_h dt_h[j]`, and per thread column (row) its share of
/// `rowsum[b, h, c, i] = Σ_j CB[i, j] dt_j W_h[i, j]` (`colsum[b, h, c, j] = Σ_i CB[i, j]
/// W_h[i, j]`); the caller sums the splits and the shares.
#[cube(launch)]
fn ssd_bwd_w_tile_kernel<F: Float, S: Float>(
    dy: &Tensor<F>,           // [batch, seq, heads, head_dim]
    x: &Tensor<F>,            // [batch, seq, heads, head_dim]
    cb: &Tensor<f32>,         // [batch, chunks, groups, chunk, chunk]
    dt_c: &Tensor<f32>,       // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>,      // [batch, heads, chunks, chunk]
    wg: &mut Tensor<f32>,     // [splits, batch, chunks, groups, chunk, chunk]
    rowsum: &mut Tensor<f32>, // [batch, heads, chunks, chunk]
    colsum: &mut Tensor<f32>, // [batch, heads, chunks, chunk]
    ddiag: &mut Tensor<f32>,  // [batch, heads, chunks, 16]
    #[comptime] slabs: Slabs,
    #[define(F, S)] _dtypes: [StorageType; 2],
) {
    let splits = wg.shape(0);
    let nchunks = wg.shape(2);
    let groups = wg.shape(3);
    let seqlen = x.shape(1);
    let heads = x.shape(2);
    let head_dim = x.shape(3);
    let hpg = heads / groups;
    let c = CUBE_POS_X as usize % nchunks;
    let b = CUBE_POS_X as usize / nchunks;
    let g = CUBE_POS_Y as usize;
    let split = CUBE_POS_Z as usize;
    let t0 = c * TILE;
    let qlim = chunk_len(seqlen, t0);
    let (h_lo, h_hi) = split_heads(g, hpg, split, splits);
    let tr = UNIT_POS as usize / 16;
    let tc = UNIT_POS as usize % 16;

    let cbbase = b * cb.stride(0) + c * cb.stride(1) + g * cb.stride(2);
    let mut cbv = Array::<f32>::new(16usize);
    let mut wacc = zero_acc();
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..4usize {
            cbv[i * 4 + j] = cb[cbbase + tile_row(i) * cb.stride(3) + tile_col(j) * cb.stride(4)];
        }
    }

    let mut cs_s = SharedMemory::<f32>::new(comptime!(HEADS_PER_CUBE * (TILE + 1)));
    let mut dt_s = SharedMemory::<f32>::new(comptime!(HEADS_PER_CUBE * TILE));
    let mut row_s = SharedMemory::<f32>::new(SHARES);
    let mut col_s = SharedMemory::<f32>::new(SHARES);
    let mut a_s = slab_smem::<S>(slabs);
    let mut b_s = slab_smem::<S>(slabs);
    let mut o_s = out_smem(slabs);
    stage_heads(dt_c, da_cs, b, c, h_lo, h_hi - h_lo, &mut cs_s, &mut dt_s);
    for h in h_lo..h_hi {
        let cso = (h - h_lo) * (TILE + 1);
        let dto = (h - h_lo) * TILE;
        let mut acc = zero_acc();
        let ybase = b * dy.stride(0) + t0 * dy.stride(1) + h * dy.stride(2);
        let xbase = b * x.stride(0) + t0 * x.stride(1) + h * x.stride(2);
        contract::<F, F, S>(
            dy,
            ybase,
            dy.stride(3),
            dy.stride(1),
            qlim,
            x,
            xbase,
            x.stride(3),
            x.stride(1),
            qlim,
            head_dim,
            &mut a_s,
            &mut b_s,
            &mut o_s,
            &mut acc,
            true,
            true,
            slabs,
        );
        // W's diagonal before the decay, Σ_p dy_q · x_q: shares of D's gradient.
        if tr == tc {
            let mut dsum = 0.0f32;
            #[unroll]
            for i in 0..4usize {
                dsum += acc[i * 4 + i];
            }
            ddiag[b * ddiag.stride(0)
                + h * ddiag.stride(1)
                + c * ddiag.stride(2)
                + tr * ddiag.stride(3)] = dsum;
        }
        let mut cpart = Array::<f32>::new(4usize);
        #[unroll]
        for j in 0..4usize {
            cpart[j] = 0.0f32;
        }
        let rbase = b * rowsum.stride(0) + h * rowsum.stride(1) + c * rowsum.stride(2);
        #[unroll]
        for i in 0..4usize {
            let ii = tile_row(i);
            let mut rpart = 0.0f32;
            #[unroll]
            for j in 0..4usize {
                let jj = tile_col(j);
                let mut w = 0.0f32;
                if jj <= ii && ii < qlim {
                    w = (cs_s[cso + ii] - cs_s[cso + jj]).exp() * acc[i * 4 + j];
                }
                let dtj = dt_s[dto + jj];
                wacc[i * 4 + j] += w * dtj;
                let m = cbv[i * 4 + j] * w;
                rpart += m * dtj;
                cpart[j] += m;
            }
            row_s[ii * PITCH_SHARES + tc] = rpart;
        }
        #[unroll]
        for j in 0..4usize {
            col_s[tile_col(j) * PITCH_SHARES + tr] = cpart[j];
        }
        sync_cube();
        // Each row's and column's 16 shares summed in the cube (threads 0-63 the rows, 64-127
        // the columns). The next head rewrites the shares only after `contract`'s syncs.
        let cbase = b * colsum.stride(0) + h * colsum.stride(1) + c * colsum.stride(2);
        sum_shares(&row_s, rowsum, rbase, rowsum.stride(3), 0usize);
        sum_shares(&col_s, colsum, cbase, colsum.stride(3), TILE);
    }
    let obase = split * wg.stride(0) + b * wg.stride(1) + c * wg.stride(2) + g * wg.stride(3);
    #[unroll]
    for i in 0..4usize {
        #[unroll]
        for j in 0..4usize {
            wg[obase + tile_row(i) * wg.stride(4) + tile_col(j) * wg.stride(5)] = wacc[i * 4 + j];
        }
    }
}

/// Bytes of shared memory kernel 5 holds beside its slabs: the staged `um` tile, one head's `cs`
/// and `dt`, the shares.
pub const DBC_SMEM: usize = TILE * TILE * 4 + (2 * TILE + 1) * 4 + SHARES * 4;

/// Kernel 5, one cube per `(b·chunk, g, split, 64 columns of n)`, looping over its share of
/// the group's heads; the caller sums the splits (`out`) and the `n` tiles (`part`).
/// `dC` (`for_b` false): `out[t_q, g, n] = Σ_h exp(cs_q) Σ_p dy[t_q, h, p] prev[h, p, n]
/// + Σ_j Wg[q, j] B[t_j, n]`, and per head
/// `part[t_q, h, tile] = exp(cs_q) Σ_n C[t_q, n] (…)[q, n]` (the tile's part of `oy`).
/// `dB` (`for_b`): `out[t_j, g, n] = Σ_h exp(L − cs_j) dt_j Σ_p x[t_j, h, p] dstates[h, p, n]
/// + Σ_i Wg[i, j] C[t_i, n]`, and the parts of `sx`, `exp(L − cs_j) Σ_n B[t_j, n] (…)[j, n]`.
/// The `Wg` term goes to split 0.
#[cube(launch)]
fn ssd_bwd_dbc_tile_kernel<F: Float, S: Float>(
    xin: &Tensor<F>,        // [batch, seq, heads, head_dim]: dy (dC) or x (dB)
    st: &Tensor<f32>,       // [batch, chunks, heads, head_dim, state]: prev or dstates
    um: &Tensor<F>,         // [batch, seq, groups, state]: C (dC) or B (dB)
    vm: &Tensor<F>,         // [batch, seq, groups, state]: B (dC) or C (dB)
    wg: &Tensor<f32>,       // [batch, chunks, groups, chunk, chunk]
    dt_c: &Tensor<f32>,     // [batch, heads, chunks, chunk]
    da_cs: &Tensor<f32>,    // [batch, heads, chunks, chunk]
    out: &mut Tensor<f32>,  // [splits, batch, seq, groups, state]
    part: &mut Tensor<f32>, // [batch, seq, heads, n tiles]
    #[comptime] for_b: bool,
    #[comptime] slabs: Slabs,
    #[define(F, S)] _dtypes: [StorageType; 2],
) {
    let nchunks = st.shape(1);
    let splits = out.shape(0);
    let seqlen = out.shape(2);
    let groups = out.shape(3);
    let dstate = out.shape(4);
    let heads = xin.shape(2);
    let head_dim = xin.shape(3);
    let hpg = heads / groups;
    let ntiles = (dstate + TILE - 1) / TILE;
    // One flat index, `n` tile fastest, then split, group, chunk: the cubes that read one
    // head's `xin` tile, or one group's `um`/`vm`/`Wg`, run together and share them in L2.
    let pos = CUBE_POS_X as usize;
    let nt = pos % ntiles;
    let split = (pos / ntiles) % splits;
    let g = (pos / (ntiles * splits)) % groups;
    let bc = pos / (ntiles * splits * groups);
    let c = bc % nchunks;
    let b = bc / nchunks;
    let n0 = nt * TILE;
    let t0 = c * TILE;
    let qlim = chunk_len(seqlen, t0);
    let (h_lo, h_hi) = split_heads(g, hpg, split, splits);
    let tc = UNIT_POS as usize % 16;

    // um[t_q, g, n] at the cube's output positions, in shared memory. Held in registers beside
    // the running total and the per-head accumulator, it took the kernel to 123-127 registers
    // and two cubes per multiprocessor; staged here, 77-80 registers and three.
    let ubase = b * um.stride(0) + t0 * um.stride(1) + g * um.stride(2) + n0 * um.stride(3);
    let mut u_s = SharedMemory::<V4>::new(comptime!(TILE * TILE / 4));
    stage_tile::<F>(
        um,
        ubase,
        um.stride(1),
        um.stride(3),
        qlim,
        dstate - n0,
        &mut u_s,
    );

    // One head's `cs` and `dt` at a time: with the staged `um` tile and the shares, all heads'
    // at once would take the cube past 32 KiB of shared memory, more than some devices (Mesa's
    // lavapipe among them) give a workgroup.
    let mut cs_s = SharedMemory::<f32>::new(comptime!(TILE + 1));
    let mut dt_s = SharedMemory::<f32>::new(TILE);
    let mut a_s = slab_smem::<S>(slabs);
    let mut b_s = slab_smem::<S>(slabs);
    let mut o_s = out_smem(slabs);
    let mut part_s = SharedMemory::<f32>::new(SHARES);
    let mut total = zero_acc();
    for h in h_lo..h_hi {
        // Rewriting `cs_s` is safe: every thread read the previous head's values before the
        // sync that precedes its shares' sum.
        stage_heads(dt_c, da_cs, b, c, h, 1, &mut cs_s, &mut dt_s);
        let mut acc = zero_acc();
        let xbase = b * xin.stride(0) + t0 * xin.stride(1) + h * xin.stride(2);
        let sbase = b * st.stride(0) + c * st.stride(1) + h * st.stride(2) + n0 * st.stride(4);
        contract::<F, f32, S>(
            xin,
            xbase,
            xin.stride(3),
            xin.stride(1),
            qlim,
            st,
            sbase,
            st.stride(3),
            st.stride(4),
            dstate - n0,
            head_dim,
            &mut a_s,
            &mut b_s,
            &mut o_s,
            &mut acc,
            true,
            false,
            slabs,
        );
        #[unroll]
        for i in 0..4usize {
            let q = tile_row(i);
            let mut e = cs_s[q].exp();
            if for_b {
                e = (cs_s[TILE] - cs_s[q]).exp();
            }
            let mut sc = e;
            if for_b {
                sc = e * dt_s[q];
            }
            let u4 = tile_get(&u_s, i);
            let mut r = 0.0f32;
            #[unroll]
            for j in 0..4usize {
                total[i * 4 + j] += sc * acc[i * 4 + j];
                r += u4[j] * acc[i * 4 + j];
            }
            part_s[q * PITCH_SHARES + tc] = e * r;
        }
        sync_cube();
        // Each head's shares are summed in the cube, not left to a reduction over a
        // `[batch, seq, heads, 16 n tiles]` tensor. Positions past the sequence's end are not
        // written. The next head rewrites `part_s` only after `contract`'s syncs, which every
        // thread reaches after this.
        if (UNIT_POS as usize) < qlim {
            let pbase = b * part.stride(0) + t0 * part.stride(1) + h * part.stride(2);
            sum_shares(
                &part_s,
                part,
                pbase + nt * part.stride(3),
                part.stride(1),
                0usize,
            );
        }
    }

    // Within the chunk (split 0): K = positions.
    if split == 0 {
        let wbase = b * wg.stride(0) + c * wg.stride(1) + g * wg.stride(2);
        let vbase = b * vm.stride(0) + t0 * vm.stride(1) + g * vm.stride(2) + n0 * vm.stride(3);
        let mut wsk = wg.stride(4);
        let mut wsr = wg.stride(3);
        if for_b {
            wsk = wg.stride(3);
            wsr = wg.stride(4);
        }
        contract::<f32, F, S>(
            wg,
            wbase,
            wsk,
            wsr,
            qlim,
            vm,
            vbase,
            vm.stride(1),
            vm.stride(3),
            dstate - n0,
            qlim,
            &mut a_s,
            &mut b_s,
            &mut o_s,
            &mut total,
            comptime!(!for_b),
            false,
            slabs,
        );
    }

    let obase = split * out.stride(0) + b * out.stride(1) + t0 * out.stride(2) + g * out.stride(3);
    #[unroll]
    for i in 0..4usize {
        let q = tile_row(i);
        #[unroll]
        for j in 0..4usize {
            let n = n0 + tile_col(j);
            if q < qlim && n < dstate {
                out[obase + q * out.stride(2) + n * out.stride(4)] = total[i * 4 + j];
            }
        }
    }
}

/// `Σ_j t[base + j · stride(3)]` over the last axis of `t` (kernel 5's `n` tiles).
#[cube]
fn tile_sum(t: &Tensor<f32>, base: usize) -> f32 {
    let mut sum = 0.0f32;
    for j in 0..t.shape(3) {
        sum += t[base + j * t.stride(3)];
    }
    sum
}

/// The per-head parameters' gradients, one cube per head: `dA[h] = Σ_{b,c} da_part[b, h, c]`,
/// `d dt_bias[h]` likewise from `db_part`, and `dD[h] = Σ_{b,c,k} ddiag[b, h, c, k]` (the W
/// kernel's 16 shares a chunk), each thread a strided share, then a tree in shared memory. One
/// launch where burn's reductions took seven.
#[cube(launch)]
fn ssd_bwd_head_sums_kernel(
    da_part: &Tensor<f32>,   // [batch, heads, chunks]
    db_part: &Tensor<f32>,   // [batch, heads, chunks]
    ddiag: &Tensor<f32>,     // [batch, heads, chunks, 16]
    da: &mut Tensor<f32>,    // [heads]
    dbias: &mut Tensor<f32>, // [heads]
    dd: &mut Tensor<f32>,    // [heads]
) {
    let h = CUBE_POS_X as usize;
    let u = UNIT_POS as usize;
    let threads = THREADS as usize;
    let nchunks = da_part.shape(2);
    let pairs = da_part.shape(0) * nchunks;
    let shares = ddiag.shape(3);
    let mut sa = 0.0f32;
    let mut sb = 0.0f32;
    let mut sd = 0.0f32;
    for i in 0..(pairs + threads - 1) / threads {
        let e = i * threads + u;
        if e < pairs {
            let b = e / nchunks;
            let c = e % nchunks;
            sa += da_part[b * da_part.stride(0) + h * da_part.stride(1) + c * da_part.stride(2)];
            sb += db_part[b * db_part.stride(0) + h * db_part.stride(1) + c * db_part.stride(2)];
        }
    }
    for i in 0..(pairs * shares + threads - 1) / threads {
        let e = i * threads + u;
        if e < pairs * shares {
            let k = e % shares;
            let bc = e / shares;
            let b = bc / nchunks;
            let c = bc % nchunks;
            sd += ddiag[b * ddiag.stride(0)
                + h * ddiag.stride(1)
                + c * ddiag.stride(2)
                + k * ddiag.stride(3)];
        }
    }
    let mut red = SharedMemory::<f32>::new(comptime!(3 * THREADS as usize));
    red[u] = sa;
    red[threads + u] = sb;
    red[2 * threads + u] = sd;
    sync_cube();
    #[unroll]
    for level in 0..comptime!(THREADS.trailing_zeros() as usize) {
        let stride = threads >> (level + 1);
        if u < stride {
            red[u] += red[u + stride];
            red[threads + u] += red[threads + u + stride];
            red[2 * threads + u] += red[2 * threads + u + stride];
        }
        sync_cube();
    }
    if u == 0 {
        da[h * da.stride(0)] = red[0];
        dbias[h * dbias.stride(0)] = red[threads];
        dd[h * dd.stride(0)] = red[2 * threads];
    }
}

/// `Σ v` over a cube of [`TILE`] threads, returned to every thread (`s`: [`TILE`] slots).
#[cube]
fn chunk_sum(v: f32, s: &mut SharedMemory<f32>) -> f32 {
    let u = UNIT_POS as usize;
    s[u] = v;
    sync_cube();
    #[unroll]
    for level in 0..comptime!(TILE.trailing_zeros() as usize) {
        let stride = TILE >> (level + 1);
        if u < stride {
            s[u] += s[u + stride];
        }
        sync_cube();
    }
    let total = s[0];
    sync_cube();
    total
}

/// Kernel 6, one cube of [`TILE`] threads per `(b, h, chunk)`, a thread per position. Per
/// position, with `sx = exp(L − cs_q) x_q · dstates · B_q` and `oy = exp(cs_q) dy_q · prev · C_q`:
/// `dt_q`'s gradient holding `cs` fixed is `sx + colsum_q`; `cs_q`'s is
/// `oy − dt_q sx + rowsum_q − dt_q colsum_q`; and `dt_q sx` also reaches `L_c` (through the
/// chunk's state), as does the reverse state passing's `dlast`. The reverse cumsum of the `cs`
/// gradients (a suffix scan in shared memory, on top of `L_c`'s) gives `d(dt · A)` at each
/// position, which splits into `dt` (times `A`) and `A` (times `dt`); `dt` goes back through the
/// clamp and softplus. Writes the raw `dt`'s gradient and per-chunk partial sums of `dA` and
/// `d dt_bias`. (One thread a chunk walking its positions twice left 3,072 threads at the 130m
/// shape, each a chain of dependent loads: 0.19 ms a layer in call M's profile.)
#[cube(launch)]
fn ssd_bwd_dt_kernel<F: Float>(
    dt: &Tensor<F>,            // [batch, seq, heads], raw
    a: &Tensor<f32>,           // [heads]
    dt_bias: &Tensor<f32>,     // [heads]
    dt_c: &Tensor<f32>,        // [batch, heads, chunks, chunk]
    sx: &Tensor<f32>,          // [batch, seq, heads, n tiles]: summed over the tiles here
    oy: &Tensor<f32>,          // [batch, seq, heads, n tiles]
    rowsum: &Tensor<f32>,      // [batch, heads, chunks, chunk]
    colsum: &Tensor<f32>,      // [batch, heads, chunks, chunk]
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
    let seqlen = dt.shape(1);
    let cube = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    if cube >= dt_c.shape(0) * heads * nchunks {
        terminate!();
    }
    let h = cube % heads;
    let c = (cube / heads) % nchunks;
    let b = cube / (nchunks * heads);
    let base = b * dt_c.stride(0) + h * dt_c.stride(1) + c * dt_c.stride(2);
    let qlim = chunk_len(seqlen, c * TILE);
    let u = UNIT_POS as usize;
    let ok = u < qlim;
    // Past the sequence's end a thread reads position 0 and contributes nothing.
    let q = select(ok, u, 0);
    let t = c * TILE + q;
    let mut s = SharedMemory::<f32>::new(TILE);

    let dt_q = dt_c[base + q * dt_c.stride(3)];
    let sxv = tile_sum(sx, b * sx.stride(0) + t * sx.stride(1) + h * sx.stride(2));
    let oyv = tile_sum(oy, b * oy.stride(0) + t * oy.stride(1) + h * oy.stride(2));
    let col = colsum
        [b * colsum.stride(0) + h * colsum.stride(1) + c * colsum.stride(2) + q * colsum.stride(3)];
    let row = rowsum
        [b * rowsum.stride(0) + h * rowsum.stride(1) + c * rowsum.stride(2) + q * rowsum.stride(3)];
    let raw = f32::cast_from(dt[b * dt.stride(0) + t * dt.stride(1) + h * dt.stride(2)]);

    let d_last = dlast[b * dlast.stride(0) + c * dlast.stride(1) + h * dlast.stride(2)]
        + chunk_sum(select(ok, dt_q * sxv, 0.0f32), &mut s);
    // Suffix sum of the `cs` gradients: after it, s[q] = Σ_{q' ≥ q} term_{q'}.
    s[u] = select(ok, oyv - dt_q * sxv + row - dt_q * col, 0.0f32);
    sync_cube();
    #[unroll]
    for level in 0..comptime!(TILE.trailing_zeros() as usize) {
        let off = 1usize << level;
        let mut v = s[u];
        if u + off < TILE {
            v += s[u + off];
        }
        sync_cube();
        s[u] = v;
        sync_cube();
    }
    let run = d_last + s[u];
    sync_cube();

    let a_h = a[h * a.stride(0)];
    let g_dt = sxv + col + a_h * run;
    let v = raw + dt_bias[h * dt_bias.stride(0)];
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
    if ok {
        ddt_raw[b * ddt_raw.stride(0) + t * ddt_raw.stride(1) + h * ddt_raw.stride(2)] =
            F::cast_from(g_raw);
    }
    let da = chunk_sum(select(ok, dt_q * run, 0.0f32), &mut s);
    let dbias = chunk_sum(select(ok, g_raw, 0.0f32), &mut s);
    if u == 0 {
        da_part[b * da_part.stride(0) + h * da_part.stride(1) + c * da_part.stride(2)] = da;
        db_part[b * db_part.stride(0) + h * db_part.stride(1) + c * db_part.stride(2)] = dbias;
    }
}

/// How many cubes share a group's `hpg` heads in kernels 3 and 5, given `base` cubes per split:
/// enough that a cube takes at most [`HEADS_PER_CUBE`] heads, and that there are about eight
/// cubes per multiprocessor when the heads allow (one per cube where the runtime does not say
/// how many it has).
fn head_splits<R: CubeRuntime>(client: &ComputeClient<R>, base: usize, hpg: usize) -> usize {
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(1) as usize;
    let hpg = hpg.max(1);
    let by_stage = hpg.div_ceil(HEADS_PER_CUBE);
    let by_fill = (8 * sms).div_ceil(base.max(1));
    let splits = by_stage.max(by_fill).min(hpg);
    // As split_heads cuts: ceil(hpg / splits) heads each, so no split is left empty.
    hpg.div_ceil(hpg.div_ceil(splits))
}

/// Kernel backward of [`crate::MambaBackend::ssd_chunk_scan`]: the gradients of
/// `Σ y · dy + Σ final_state · d_final` with respect to every input. Kernels 1-4 run again
/// unless the forward `kept` their results. Falls back to the reference where the forward
/// kernels would.
pub fn ssd_chunk_scan_backward<R, F, I, BT>(
    input: SsdInput<CubeBackend<R, F, I, BT>>,
    kept: Option<SsdKept<CubeBackend<R, F, I, BT>>>,
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
    let p = Prims::new(input);
    let [batch, seqlen, heads, head_dim, groups, dstate] = p.dims();
    let nchunks = p.nchunks;
    let client = p.x.client.clone();
    let empty = |shape: Vec<usize>, dtype: DType| empty_like_device(&p.x, shape, dtype);
    let q = TILE;
    let fits = |k: &SsdKept<CubeBackend<R, F, I, BT>>| {
        k.dt.dims() == [batch, heads, nchunks, q]
            && k.da_cumsum.dims() == [batch, heads, nchunks, q]
            && k.prev_states.dims() == [batch, nchunks, heads, head_dim, dstate]
            && k.cb.dims() == [batch, nchunks, groups, q, q]
    };
    let (dt_c, da_cs, prev, cb) = match kept.filter(fits) {
        Some(k) => (
            prim(k.dt),
            prim(k.da_cumsum),
            prim(k.prev_states),
            prim(k.cb),
        ),
        None => {
            let Parts {
                dt_c,
                da_cs,
                prev,
                cb,
                ..
            } = parts(&p);
            (dt_c, da_cs, prev, cb)
        }
    };
    let dy = prim(dy);

    // 1. dprev_loc
    let dprev_loc = state_tiles(&p, &dy, &p.cm, &dt_c, &da_cs, false);

    // 2. Reverse state passing.
    let nq = dstate.div_ceil(NQ);
    let dstates = empty(vec![batch, nchunks, heads, head_dim, dstate], DType::F32);
    let dlast = empty(vec![batch, nchunks, heads, head_dim * nq], DType::F32);
    let dinit = empty(vec![batch, heads, head_dim, dstate], dtype);
    let n = batch * heads * head_dim * nq;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
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
    let dlast: T<R, F, I, BT, 4> = wrap(dlast);
    let dlast = prim(dlast.sum_dim(3).reshape([batch, nchunks, heads]));

    // 3. Wg and the two CB ∘ W sums.
    let splits = head_splits(&client, batch * nchunks * groups, heads / groups);
    let pos_shape = vec![batch, heads, nchunks, TILE];
    let wg_parts = empty(vec![splits, batch, nchunks, groups, TILE, TILE], DType::F32);
    let rowsum = empty(pos_shape.clone(), DType::F32);
    let colsum = empty(pos_shape, DType::F32);
    let ddiag = empty(vec![batch, heads, nchunks, 16], DType::F32);
    if batch * groups > 0 {
        let (count, dim) = tiles(batch * nchunks, groups, splits);
        let (slabs, slab_elem) = slabs_for(
            &client,
            dtype,
            HEADS_PER_CUBE * (2 * TILE + 1) * 4 + 2 * SHARES * 4,
        );
        ssd_bwd_w_tile_kernel::launch::<R>(
            &client,
            count,
            dim,
            dy.clone().into_tensor_arg(),
            p.x.clone().into_tensor_arg(),
            cb.clone().into_tensor_arg(),
            dt_c.clone().into_tensor_arg(),
            da_cs.clone().into_tensor_arg(),
            wg_parts.clone().into_tensor_arg(),
            rowsum.clone().into_tensor_arg(),
            colsum.clone().into_tensor_arg(),
            ddiag.clone().into_tensor_arg(),
            slabs,
            [dtype.into(), slab_elem],
        );
    }
    let wg: T<R, F, I, BT, 6> = wrap(wg_parts);
    let wg = prim(wg.sum_dim(0).reshape([batch, nchunks, groups, TILE, TILE]));

    // 4. dx
    let dx = scan_tiles(&p, &p.bm, &dstates, &dy, &cb, &dt_c, &da_cs, true);

    // 5. dC and oy, dB and sx.
    let ntiles = dstate.div_ceil(TILE);
    let splits = head_splits(&client, batch * nchunks * groups * ntiles, heads / groups);
    let dbc = |xin: &CubeTensor<R>,
               st: &CubeTensor<R>,
               um: &CubeTensor<R>,
               vm: &CubeTensor<R>,
               for_b: bool| {
        let out = empty(vec![splits, batch, seqlen, groups, dstate], DType::F32);
        let part = empty(vec![batch, seqlen, heads, ntiles.max(1)], DType::F32);
        if batch * seqlen * groups * dstate > 0 {
            let (count, dim) = tiles(batch * nchunks * groups * splits * ntiles, 1, 1);
            let (slabs, slab_elem) = slabs_for(&client, dtype, DBC_SMEM);
            ssd_bwd_dbc_tile_kernel::launch::<R>(
                &client,
                count,
                dim,
                xin.clone().into_tensor_arg(),
                st.clone().into_tensor_arg(),
                um.clone().into_tensor_arg(),
                vm.clone().into_tensor_arg(),
                wg.clone().into_tensor_arg(),
                dt_c.clone().into_tensor_arg(),
                da_cs.clone().into_tensor_arg(),
                out.clone().into_tensor_arg(),
                part.clone().into_tensor_arg(),
                for_b,
                slabs,
                [dtype.into(), slab_elem],
            );
        }
        let out: T<R, F, I, BT, 5> = wrap(out);
        let out = out
            .sum_dim(0)
            .reshape([batch, seqlen, groups, dstate])
            .cast(dtype);
        // `part` stays per `n` tile: kernel 6 sums the tiles as it reads them.
        (prim(out), part)
    };
    let (dc, oy) = dbc(&dy, &prev, &p.cm, &p.bm, false);
    let (db, sx) = dbc(&p.x, &dstates, &p.bm, &p.cm, true);

    // 6. Per chunk: dt and cs gradients, reverse cumsum, dt through clamp and softplus,
    // partial dA and d dt_bias.
    let ddt_raw = empty(vec![batch, seqlen, heads], dtype);
    let da_part = empty(vec![batch, heads, nchunks], DType::F32);
    let dbias_part = empty(vec![batch, heads, nchunks], DType::F32);
    let (lo, hi) = p.dt_limit;
    let n = batch * heads * nchunks;
    if n > 0 {
        // One cube a chunk (2-D past the grid's 65,535 limit; spare cubes return at once).
        let x = n.min(65_535);
        ssd_bwd_dt_kernel::launch::<R>(
            &client,
            CubeCount::Static(x as u32, n.div_ceil(x) as u32, 1),
            CubeDim::new_1d(TILE as u32),
            p.dt.clone().into_tensor_arg(),
            p.a.clone().into_tensor_arg(),
            p.dt_bias.clone().into_tensor_arg(),
            dt_c.into_tensor_arg(),
            sx.into_tensor_arg(),
            oy.into_tensor_arg(),
            rowsum.into_tensor_arg(),
            colsum.into_tensor_arg(),
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

    // Per-head gradients, summed in f32 in one launch, in the dtype their parameter came in.
    let da = empty(vec![heads], DType::F32);
    let dbias = empty(vec![heads], DType::F32);
    let dd = empty(vec![heads], DType::F32);
    if heads > 0 {
        ssd_bwd_head_sums_kernel::launch::<R>(
            &client,
            CubeCount::Static(heads as u32, 1, 1),
            CubeDim::new_1d(THREADS),
            da_part.into_tensor_arg(),
            dbias_part.into_tensor_arg(),
            ddiag.into_tensor_arg(),
            da.clone().into_tensor_arg(),
            dbias.clone().into_tensor_arg(),
            dd.clone().into_tensor_arg(),
        );
    }
    let per_head = |t, dtype: DType| -> T<R, F, I, BT, 1> {
        let g: T<R, F, I, BT, 1> = wrap(t);
        if dtype == DType::F32 {
            g
        } else {
            g.cast(dtype)
        }
    };
    let [a_dtype, d_dtype, bias_dtype] = p.param_dtypes;
    SsdGrads {
        x: wrap(dx),
        dt: wrap(ddt_raw),
        a: per_head(da, a_dtype),
        b: wrap(db),
        c: wrap(dc),
        d: per_head(dd, d_dtype),
        dt_bias: per_head(dbias, bias_dtype),
        initial_state: has_init.then(|| wrap(dinit)),
    }
}

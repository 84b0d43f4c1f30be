//! The shared-memory tiling every SSD contraction uses: a cube of [`THREADS`] threads computes a
//! [`TILE`] × [`TILE`] output tile, each thread a 4 × 4 block of it, reading `K` in slabs of
//! [`KT`] staged in shared memory.
//!
//! Thread `u` (`UNIT_POS`) owns rows `4 (u / 16) + a` and columns `4 (u % 16) + b` (`a, b < 4`).
//! A slab holds `K`-index `k` and rows `4 v .. 4 v + 4` as one 4-vector at `k * PITCH4 + v`, so
//! per `k` a thread reads its four rows of the left operand and its four columns of the right one
//! with two 128-bit shared loads, against 16 FMAs (a scalar layout needs eight loads). The
//! pitch of [`PITCH4`] = 17 vectors (68 floats) keeps
//! both the vector reads and the loader's stores free of bank conflicts, whichever index of the
//! global operand is contiguous.
//!
//! Operands are read straight from strided global tensors ([`fetch_slab`]): `base` plus
//! `k * sk + r * sr`, zero outside `k < klim` and `r < rlim`, so ragged edges (a sequence that
//! ends inside a chunk, a head size that is not a multiple of the tile) need no padding copies.
//! Each thread loads exactly one 4-vector of each slab. (Fetching the next slab into registers
//! while multiplying the current one was tried: on the H100 it made no kernel faster and the
//! per-head W kernel 2.3× slower, from register pressure.)

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use cubecl::prelude::*;

/// Side of an output tile, and the SSD kernels' chunk length.
pub const TILE: usize = 64;
/// `K` per shared-memory slab.
pub const KT: usize = 16;
/// Row pitch of a slab in shared memory, in 4-vectors (`TILE / 4` plus one of padding).
pub const PITCH4: usize = TILE / 4 + 1;
/// Threads per cube (16 × 16, each owning 4 × 4 outputs).
pub const THREADS: u32 = 256;
/// 4-vectors of one slab.
pub const SLAB: usize = KT * PITCH4;

/// Four f32 lanes: one shared-memory slab entry.
pub type V4 = Vector<f32, Const<4>>;

/// Row of a thread's `a`-th output row within the tile.
#[cube]
pub fn tile_row(a: usize) -> usize {
    (UNIT_POS as usize / 16) * 4 + a
}

/// Column of a thread's `b`-th output column within the tile.
#[cube]
pub fn tile_col(b: usize) -> usize {
    (UNIT_POS as usize % 16) * 4 + b
}

/// `K` index of the slab vector this thread loads: consecutive threads take consecutive `k`
/// when `k` is the contiguous index of the global operand, else consecutive row quads.
#[cube]
pub fn slab_k(#[comptime] k_contig: bool) -> usize {
    let u = UNIT_POS as usize;
    let mut k = u / 16;
    if k_contig {
        k = u % KT;
    }
    k
}

/// Row quad (rows `4 v .. 4 v + 4`) of the slab vector this thread loads.
#[cube]
pub fn slab_v(#[comptime] k_contig: bool) -> usize {
    let u = UNIT_POS as usize;
    let mut v = u % 16;
    if k_contig {
        v = u / KT;
    }
    v
}

/// The vector of slab `k0 .. k0 + KT` of a strided operand this thread loads: lane `i` is row
/// `r = 4 v + i` at index `k` (`slab_k`, `slab_v`), `g[base + (k0 + k) sk + r sr]` as f32, zero
/// where `k0 + k >= klim` or `r >= rlim`. `k_contig` says which index is contiguous in memory,
/// so that consecutive threads read consecutive addresses.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fetch_slab<F: Float>(
    g: &Tensor<F>,
    base: usize,
    sk: usize,
    sr: usize,
    k0: usize,
    klim: usize,
    rlim: usize,
    #[comptime] k_contig: bool,
) -> V4 {
    let k = slab_k(k_contig);
    let v = slab_v(k_contig);
    let mut vec = V4::empty();
    #[unroll]
    for i in 0..4usize {
        let r = v * 4 + i;
        let mut x = 0.0f32;
        if k0 + k < klim && r < rlim {
            x = f32::cast_from(g[base + (k0 + k) * sk + r * sr]);
        }
        vec[i] = x;
    }
    vec
}

/// Stores this thread's vector of a slab (from [`fetch_slab`]) in shared memory.
#[cube]
pub fn store_slab(smem: &mut SharedMemory<V4>, vec: V4, #[comptime] k_contig: bool) {
    smem[slab_k(k_contig) * PITCH4 + slab_v(k_contig)] = vec;
}

/// `acc[a][b] += Σ_k a_s[k][row a] · b_s[k][col b]` over one slab.
#[cube]
pub fn mma_slab(a_s: &SharedMemory<V4>, b_s: &SharedMemory<V4>, acc: &mut Array<f32>) {
    let tr = UNIT_POS as usize / 16;
    let tc = UNIT_POS as usize % 16;
    #[unroll]
    for k in 0..KT {
        let av = a_s[k * PITCH4 + tr];
        let bv = b_s[k * PITCH4 + tc];
        #[unroll]
        for i in 0..4usize {
            #[unroll]
            for j in 0..4usize {
                acc[i * 4 + j] += av[i] * bv[j];
            }
        }
    }
}

/// A zeroed 4 × 4 accumulator.
#[cube]
pub fn zero_acc() -> Array<f32> {
    let mut acc = Array::<f32>::new(16usize);
    #[unroll]
    for i in 0..16usize {
        acc[i] = 0.0f32;
    }
    acc
}

/// `acc[a][b] += Σ_{k < klim} A[k][row a] · B[k][col b]` for two strided operands read through
/// [`fetch_slab`] (`A[k][r] = a[abase + k ask + r asr]`, zero for `r >= arlim`; `B` likewise):
/// the slab loop of every plain tiled contraction.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn contract<FA: Float, FB: Float>(
    a: &Tensor<FA>,
    abase: usize,
    ask: usize,
    asr: usize,
    arlim: usize,
    b: &Tensor<FB>,
    bbase: usize,
    bsk: usize,
    bsr: usize,
    brlim: usize,
    klim: usize,
    a_s: &mut SharedMemory<V4>,
    b_s: &mut SharedMemory<V4>,
    acc: &mut Array<f32>,
    #[comptime] a_kc: bool,
    #[comptime] b_kc: bool,
) {
    for s in 0..(klim + KT - 1) / KT {
        let k0 = s * KT;
        store_slab(
            a_s,
            fetch_slab::<FA>(a, abase, ask, asr, k0, klim, arlim, a_kc),
            a_kc,
        );
        store_slab(
            b_s,
            fetch_slab::<FB>(b, bbase, bsk, bsr, k0, klim, brlim, b_kc),
            b_kc,
        );
        sync_cube();
        mma_slab(a_s, b_s, acc);
        sync_cube();
    }
}

/// Stages a whole `TILE × TILE` tile of a strided operand in shared memory, row-major by
/// 4-vectors (`smem[row * TILE / 4 + col / 4][col % 4]`): element `(row, col)` is
/// `g[base + row * s_row + col * s_col]` as f32, zero outside `row < rlim` and `col < clim`.
/// It holds per-element values a kernel reads at its output positions ([`tile_get`]) outside
/// registers. Not synced.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn stage_tile<F: Float>(
    g: &Tensor<F>,
    base: usize,
    s_row: usize,
    s_col: usize,
    rlim: usize,
    clim: usize,
    smem: &mut SharedMemory<V4>,
) {
    let quads = TILE / 4;
    #[unroll]
    for m in 0..comptime!(TILE * TILE / 4 / THREADS as usize) {
        let w = m * THREADS as usize + UNIT_POS as usize;
        let row = w / quads;
        let quad = w % quads;
        let mut vec = V4::empty();
        #[unroll]
        for i in 0..4usize {
            let col = quad * 4 + i;
            let mut x = 0.0f32;
            if row < rlim && col < clim {
                x = f32::cast_from(g[base + row * s_row + col * s_col]);
            }
            vec[i] = x;
        }
        smem[w] = vec;
    }
}

/// This thread's output row `a` of a tile staged by [`stage_tile`]: lane `b` is column
/// `tile_col(b)`.
#[cube]
pub fn tile_get(smem: &SharedMemory<V4>, a: usize) -> V4 {
    smem[tile_row(a) * (TILE / 4) + UNIT_POS as usize % 16]
}

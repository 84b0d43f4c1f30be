//! The shared-memory tiling every SSD contraction uses: a cube of [`THREADS`] threads computes a
//! [`TILE`] × [`TILE`] output tile, each thread a 4 × 4 block of it, reading `K` in slabs of
//! [`KT`] staged in shared memory.
//!
//! Thread `u` (`UNIT_POS`) owns rows `u / 16 + 16 a` and columns `u % 16 + 16 b` (`a, b < 4`),
//! so a warp reads consecutive shared addresses and writes consecutive output columns. A slab
//! holds `K`-index `k` and row `r` at `k * PITCH + r`; the pitch of `TILE + 1` keeps a
//! `K`-contiguous load (consecutive threads on consecutive `k`) free of bank conflicts.
//!
//! Operands are read straight from strided global tensors ([`load_slab`]): `base` plus
//! `k * sk + r * sr`, zero outside `k < klim` and `r < rlim`, so ragged edges (a sequence that
//! ends inside a chunk, a head size that is not a multiple of the tile) need no padding copies.

use cubecl::prelude::*;

/// Side of an output tile, and the SSD kernels' chunk length.
pub const TILE: usize = 64;
/// `K` per shared-memory slab.
pub const KT: usize = 16;
/// Row pitch of a slab in shared memory.
pub const PITCH: usize = TILE + 1;
/// Threads per cube (16 × 16, each owning 4 × 4 outputs).
pub const THREADS: u32 = 256;
/// Floats of one slab.
pub const SLAB: usize = KT * PITCH;

/// Row of a thread's `a`-th output row within the tile.
#[cube]
pub fn tile_row(a: usize) -> usize {
    UNIT_POS as usize / 16 + 16 * a
}

/// Column of a thread's `b`-th output column within the tile.
#[cube]
pub fn tile_col(b: usize) -> usize {
    UNIT_POS as usize % 16 + 16 * b
}

/// `K` index of the `e`-th element this thread loads into a slab.
#[cube]
pub fn slab_k(e: usize, #[comptime] k_contig: bool) -> usize {
    let idx = UNIT_POS as usize + e * THREADS as usize;
    let mut k = idx / TILE;
    if k_contig {
        k = idx % KT;
    }
    k
}

/// Row index of the `e`-th element this thread loads into a slab.
#[cube]
pub fn slab_r(e: usize, #[comptime] k_contig: bool) -> usize {
    let idx = UNIT_POS as usize + e * THREADS as usize;
    let mut r = idx % TILE;
    if k_contig {
        r = idx / KT;
    }
    r
}

/// Loads slab `k0 .. k0 + KT` of a strided operand: `smem[k][r] = g[base + (k0 + k) sk + r sr]`
/// as f32, zero where `k0 + k >= klim` or `r >= rlim`. `k_contig` says which index is
/// contiguous in memory, so that consecutive threads read consecutive addresses.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_slab<F: Float>(
    g: &Tensor<F>,
    base: usize,
    sk: usize,
    sr: usize,
    k0: usize,
    klim: usize,
    rlim: usize,
    smem: &mut SharedMemory<f32>,
    #[comptime] k_contig: bool,
) {
    #[unroll]
    for e in 0..4usize {
        let k = slab_k(e, k_contig);
        let r = slab_r(e, k_contig);
        let mut v = 0.0f32;
        if k0 + k < klim && r < rlim {
            v = f32::cast_from(g[base + (k0 + k) * sk + r * sr]);
        }
        smem[k * PITCH + r] = v;
    }
}

/// Multiplies the elements this thread loaded by [`load_slab`] by `scale[k0 + k]`.
#[cube]
pub fn scale_slab_k(
    smem: &mut SharedMemory<f32>,
    scale: &SharedMemory<f32>,
    k0: usize,
    #[comptime] k_contig: bool,
) {
    #[unroll]
    for e in 0..4usize {
        let k = slab_k(e, k_contig);
        let r = slab_r(e, k_contig);
        smem[k * PITCH + r] *= scale[k0 + k];
    }
}

/// `acc[a][b] += Σ_k a_s[k][row a] · b_s[k][col b]` over one slab.
#[cube]
pub fn mma_slab(a_s: &SharedMemory<f32>, b_s: &SharedMemory<f32>, acc: &mut Array<f32>) {
    let tr = UNIT_POS as usize / 16;
    let tc = UNIT_POS as usize % 16;
    #[unroll]
    for k in 0..KT {
        let mut av = Array::<f32>::new(4usize);
        let mut bv = Array::<f32>::new(4usize);
        #[unroll]
        for i in 0..4usize {
            av[i] = a_s[k * PITCH + tr + 16 * i];
            bv[i] = b_s[k * PITCH + tc + 16 * i];
        }
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

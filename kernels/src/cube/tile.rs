//! The shared-memory tiling every SSD contraction uses: a cube of [`THREADS`] threads computes a
//! [`TILE`] × [`TILE`] output tile, each thread a 4 × 4 block of it, reading `K` in slabs staged
//! in shared memory, each slab `parts` parts of [`KT`] (a kernel's comptime choice, the most
//! that fits its shared memory: [`slab_parts`]).
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
//! Each thread loads one 4-vector of each part of a slab, all parts before the sync, so that
//! `parts` loads per operand are in flight at once and a `K` of 64 takes one pair of syncs
//! instead of four. (Fetching the next slab into registers while multiplying the current one
//! was tried: on the H100 it made no kernel faster and the per-head W kernel 2.3× slower, from
//! register pressure.)
//!
//! How a kernel stages and multiplies is one comptime value, [`Slabs`]: the parts a slab holds
//! and where the products run ([`Tc`]): CUDA cores (f32 slabs), TF32 tensor cores (f32 slabs
//! rounded to TF32) or bf16 tensor cores (bf16 slabs, `wmma` 16 × 16 × 16, f32 accumulation:
//! what mamba_ssm's Triton kernels do with bf16 inputs, `tl.dot` on operands cast to the input
//! dtype). The slab's element type `S` is a kernel's second defined dtype ([`slabs_for`] gives
//! both).

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use cubecl::cmma;
use cubecl::prelude::*;
use cubecl::tf32;

/// Side of an output tile, and the SSD kernels' chunk length.
pub const TILE: usize = crate::SSD_KERNEL_CHUNK;
/// `K` of one part of a slab: what the cube's threads load with one 4-vector each. A slab
/// (what is staged between two syncs) is `parts` of them, a kernel's comptime choice
/// ([`slab_parts`]).
pub const KT: usize = 16;
/// Row pitch of an f32 slab and of the tensor cores' output stage, in 4-vectors (`TILE / 4`
/// plus one of padding).
pub const PITCH4: usize = TILE / 4 + 1;
/// Row pitch of a bf16 slab in 4-vectors: `wmma` wants the leading dimension of 16-bit operands
/// a multiple of 8 elements (72 = 18 · 4), so the padding is two vectors.
pub const PITCH4_BF16: usize = TILE / 4 + 2;
/// Threads per cube (16 × 16, each owning 4 × 4 outputs).
pub const THREADS: u32 = 256;
/// 4-vectors of one part of an f32 slab.
pub const PART: usize = KT * PITCH4;

/// Where a tiled kernel's products run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tc {
    /// CUDA cores (every device): f32 slabs, a thread's 4 × 4 outputs by FMA.
    Off,
    /// TF32 `wmma` 16 × 16 × 8 on f32 slabs rounded to TF32.
    Tf32,
    /// bf16 `wmma` 16 × 16 × 16 on bf16 slabs.
    Bf16,
}

/// A tiled kernel's staging and products, a comptime value: `parts` parts of [`KT`] a slab,
/// the products on `tc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slabs {
    pub parts: usize,
    pub tc: Tc,
}

impl Slabs {
    /// Whether the products run on tensor cores.
    pub const fn tensor_cores(&self) -> bool {
        !matches!(self.tc, Tc::Off)
    }
    /// Whether the slabs hold bf16.
    pub const fn bf16(&self) -> bool {
        matches!(self.tc, Tc::Bf16)
    }
    /// Row pitch of a slab in 4-vectors.
    pub const fn pitch(&self) -> usize {
        if self.bf16() {
            PITCH4_BF16
        } else {
            PITCH4
        }
    }
    /// 4-vectors of one part of a slab.
    pub const fn part(&self) -> usize {
        KT * self.pitch()
    }
    /// `K` of one slab.
    pub const fn kb(&self) -> usize {
        self.parts * KT
    }
    /// Bytes of one slab.
    pub const fn slab_bytes(&self) -> usize {
        self.parts * self.part() * if self.bf16() { 8 } else { 16 }
    }
    /// Whether the tensor cores' output stage needs an array of its own: on the tensor cores,
    /// unless the left slab is an f32 tile's size (four parts: [`tc_finish`] stages through it;
    /// a bf16 slab is never big enough).
    pub const fn own_stage(&self) -> bool {
        self.tensor_cores() && (self.bf16() || self.parts * PART < OUT)
    }
}

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

/// A slab in shared memory: 4-vectors of the slab element `S` (f32, or bf16 for [`Tc::Bf16`]).
pub type Slab<S> = SharedMemory<Vector<S, Const<4>>>;

/// Stores this thread's vector of part `part` of a slab (from [`fetch_slab`] at
/// `k0 = slab start + part · KT`) in shared memory, converted to the slab's element; for the
/// TF32 tensor cores the lanes rounded to TF32 first (round to nearest, as cuBLAS and Triton do;
/// the tensor cores would otherwise drop the low 13 bits), for the bf16 ones rounded to bf16 by
/// the conversion.
#[cube]
pub fn store_slab<S: Float>(
    smem: &mut Slab<S>,
    vec: V4,
    part: usize,
    #[comptime] k_contig: bool,
    #[comptime] slabs: Slabs,
) {
    let mut v = vec;
    if comptime!(slabs.tc == Tc::Tf32) {
        v = V4::cast_from(Vector::<tf32, Const<4>>::cast_from(vec));
    }
    let pitch = comptime!(slabs.pitch());
    smem[(part * KT + slab_k(k_contig)) * pitch + slab_v(k_contig)] =
        Vector::<S, Const<4>>::cast_from(v);
}

/// Stages slab `s` (`parts` parts of [`KT`]) of two strided operands read through
/// [`fetch_slab`]: every part's loads are issued before the barrier that follows. Not synced.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_slab<FA: Float, FB: Float, S: Float>(
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
    s: usize,
    a_s: &mut Slab<S>,
    b_s: &mut Slab<S>,
    #[comptime] a_kc: bool,
    #[comptime] b_kc: bool,
    #[comptime] slabs: Slabs,
) {
    #[unroll]
    for part in 0..slabs.parts {
        let k0 = s * comptime!(slabs.kb()) + part * KT;
        let av = fetch_slab::<FA>(a, abase, ask, asr, k0, klim, arlim, a_kc);
        let bv = fetch_slab::<FB>(b, bbase, bsk, bsr, k0, klim, brlim, b_kc);
        store_slab::<S>(a_s, av, part, a_kc, slabs);
        store_slab::<S>(b_s, bv, part, b_kc, slabs);
    }
}

/// `acc[a][b] += Σ_k a_s[k][row a] · b_s[k][col b]` over one slab (`parts · KT` values of `k`)
/// on the CUDA cores.
#[cube]
pub fn mma_slab<S: Float>(
    a_s: &Slab<S>,
    b_s: &Slab<S>,
    acc: &mut Array<f32>,
    #[comptime] slabs: Slabs,
) {
    let tr = UNIT_POS as usize / 16;
    let tc = UNIT_POS as usize % 16;
    let pitch = comptime!(slabs.pitch());
    #[unroll]
    for k in 0..comptime!(slabs.kb()) {
        let av = V4::cast_from(a_s[k * pitch + tr]);
        let bv = V4::cast_from(b_s[k * pitch + tc]);
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
pub fn contract<FA: Float, FB: Float, S: Float>(
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
    a_s: &mut Slab<S>,
    b_s: &mut Slab<S>,
    o_s: &mut SharedMemory<V4>,
    acc: &mut Array<f32>,
    #[comptime] a_kc: bool,
    #[comptime] b_kc: bool,
    #[comptime] slabs: Slabs,
) {
    let kb = comptime!(slabs.kb());
    let slabs_k = (klim + kb - 1) / kb;
    if comptime!(slabs.tensor_cores()) {
        let frags = tc_zero(slabs);
        for s in 0..slabs_k {
            stage_slab::<FA, FB, S>(
                a, abase, ask, asr, arlim, b, bbase, bsk, bsr, brlim, klim, s, a_s, b_s, a_kc,
                b_kc, slabs,
            );
            sync_cube();
            tc_mma_slab::<S>(a_s, b_s, &frags, slabs);
            sync_cube();
        }
        tc_finish::<S>(&frags, a_s, o_s, acc, slabs);
    } else {
        for s in 0..slabs_k {
            stage_slab::<FA, FB, S>(
                a, abase, ask, asr, arlim, b, bbase, bsk, bsr, brlim, klim, s, a_s, b_s, a_kc,
                b_kc, slabs,
            );
            sync_cube();
            mma_slab::<S>(a_s, b_s, acc, slabs);
            sync_cube();
        }
    }
}

// Tensor cores (CUDA `wmma`, f32 accumulation): TF32 16 × 16 × 8 on f32 slabs, or bf16
// 16 × 16 × 16 on bf16 slabs. The cube's eight warps split the 64 × 64 tile into 16 × 32
// strips: warp `w` owns rows `16 (w / 2) ..` and columns `32 (w % 2) ..` as two 16 × 16
// accumulators. They read the same shared slabs as [`mma_slab`]: `A[k][m]` at element
// `k · ld + m` is `A` column-major and `B[k][n]` row-major, both with the slab's leading
// dimension (`4 ·` [`Slabs::pitch`]: 68 floats, or 72 bf16, a multiple of 8 as `wmma` wants
// for 16-bit operands); every fragment starts 32-byte aligned (slabs and the output stage are
// declared so by [`slab_smem`] and [`out_smem`]). At the end the fragments go through a shared
// f32 stage into the per-thread 4 × 4 layout the kernels' epilogues use ([`tc_add_into`]), so
// every path shares every epilogue.

/// Leading dimension, in floats, of the f32 output stage as the tensor cores write it.
const LD: u32 = (PITCH4 * 4) as u32;

/// A warp's two 16 × 16 accumulators.
#[derive(CubeType)]
pub struct TcAcc {
    m0: cmma::Matrix<f32>,
    m1: cmma::Matrix<f32>,
}

/// Zeroed accumulators (their `k` that of the slabs' products: 8 for TF32, 16 for bf16).
#[cube]
pub fn tc_zero(#[comptime] slabs: Slabs) -> TcAcc {
    let k = comptime!(if slabs.bf16() { 16usize } else { 8usize });
    TcAcc {
        m0: cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            k,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        ),
        m1: cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            k,
            cmma::MatrixLayout::Undefined,
            0.0f32,
        ),
    }
}

/// `acc += A · B` over one slab of `parts` parts on the tensor cores (the slabs staged by
/// [`store_slab`], so already TF32 or bf16 values).
#[cube]
pub fn tc_mma_slab<S: Float>(a_s: &Slab<S>, b_s: &Slab<S>, acc: &TcAcc, #[comptime] slabs: Slabs) {
    if comptime!(slabs.bf16()) {
        tc_mma_steps::<S, S>(a_s, b_s, acc, slabs, 16usize);
    } else {
        tc_mma_steps::<tf32, S>(a_s, b_s, acc, slabs, 8usize);
    }
}

/// [`tc_mma_slab`]'s steps of `k` (16 × 16 × `k` products, operands of type `E`).
#[cube]
fn tc_mma_steps<E: Float, S: Float>(
    a_s: &Slab<S>,
    b_s: &Slab<S>,
    acc: &TcAcc,
    #[comptime] slabs: Slabs,
    #[comptime] k: usize,
) {
    let w = UNIT_POS as usize / 32;
    let wr = w / 2;
    let wc = w % 2;
    let pitch = comptime!(slabs.pitch());
    let len = comptime!(slabs.parts * slabs.part());
    let ld = comptime!((slabs.pitch() * 4) as u32);
    #[unroll]
    for kk in 0..comptime!(slabs.kb() / k) {
        let k_off = kk * k * pitch;
        let a = unsafe {
            cmma::Matrix::<E>::uninitialized(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                k,
                cmma::MatrixLayout::ColMajor,
            )
        };
        let b0 = unsafe {
            cmma::Matrix::<E>::uninitialized(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                k,
                cmma::MatrixLayout::RowMajor,
            )
        };
        let b1 = unsafe {
            cmma::Matrix::<E>::uninitialized(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                k,
                cmma::MatrixLayout::RowMajor,
            )
        };
        cmma::load(&a, &a_s.slice(k_off + wr * 4, len), ld);
        cmma::load(&b0, &b_s.slice(k_off + wc * 8, len), ld);
        cmma::load(&b1, &b_s.slice(k_off + wc * 8 + 4, len), ld);
        cmma::execute::<E, E, f32, f32>(&a, &b0, &acc.m0, &acc.m0);
        cmma::execute::<E, E, f32, f32>(&a, &b1, &acc.m1, &acc.m1);
    }
}

/// `regs[a * 4 + b] += ` the accumulated tile at this thread's output positions
/// (`tile_row(a)`, `tile_col(b)`), staged through `o_s` (f32: the output stage, or an f32 slab
/// of a whole tile's size). Begins and ends synced.
#[cube]
pub fn tc_add_into<T: Float>(
    acc: &TcAcc,
    o_s: &mut SharedMemory<Vector<T, Const<4>>>,
    regs: &mut Array<f32>,
) {
    let w = UNIT_POS as usize / 32;
    let base = (w / 2) * 16 * PITCH4 + (w % 2) * 8;
    cmma::store(
        &mut o_s.slice_mut(base, OUT),
        &acc.m0,
        LD,
        cmma::MatrixLayout::RowMajor,
    );
    cmma::store(
        &mut o_s.slice_mut(base + 4, OUT),
        &acc.m1,
        LD,
        cmma::MatrixLayout::RowMajor,
    );
    sync_cube();
    #[unroll]
    for i in 0..4usize {
        let v = V4::cast_from(o_s[tile_row(i) * PITCH4 + UNIT_POS as usize % 16]);
        #[unroll]
        for j in 0..4usize {
            regs[i * 4 + j] += v[j];
        }
    }
    sync_cube();
}

/// [`tc_add_into`] through the output stage the kernel has: the left slab itself where it is
/// an f32 slab of a whole tile's size (four parts: `4 · PART = OUT`; the slabs are free once
/// the slab loop's last sync has passed), else the separate stage of [`out_smem`].
#[cube]
pub fn tc_finish<S: Float>(
    acc: &TcAcc,
    a_s: &mut Slab<S>,
    o_s: &mut SharedMemory<V4>,
    regs: &mut Array<f32>,
    #[comptime] slabs: Slabs,
) {
    if comptime!(!slabs.own_stage()) {
        tc_add_into::<S>(acc, a_s, regs);
    } else {
        tc_add_into::<f32>(acc, o_s, regs);
    }
}

/// Where the SSD contractions of inputs of `dtype` run on `client`'s device. Tensor cores are
/// asked for with `MAMBA_SSD_TENSOR_CORES=1` (off by default: on an H100 the TF32 path ran every
/// tiled kernel 1.3-1.7× slower, BENCHMARKS.md 12-06, and the whole step 17-26% slower in call J
/// of 12-07; the bf16 path is not measured yet). Asked for, bf16 inputs take the bf16 tensor
/// cores (`wmma` 16 × 16 × 16 with f32 accumulation on the device), f32 inputs the TF32 ones
/// where f32 products may be TF32 ([`crate::linear::f32_matmul`], `MAMBA_F32_MATMUL`, default
/// `high`) and the device has TF32 `wmma` (16 × 16 × 8); both need 32-lane warps. Anything else
/// runs on the CUDA cores. The environment is read once per process; the device check is cheap.
pub fn tc_kind<R: burn_cubecl::CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: burn::tensor::DType,
) -> Tc {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let asked = *ENV.get_or_init(|| {
        match std::env::var("MAMBA_SSD_TENSOR_CORES")
            .as_deref()
            .map(str::trim)
        {
            Err(_) | Ok("") | Ok("0") | Ok("off") => false,
            Ok("1") | Ok("on") => true,
            Ok(other) => {
                eprintln!(
                    "warning: MAMBA_SSD_TENSOR_CORES=`{other}` is not 0, off, 1 or on; using off"
                );
                false
            }
        }
    });
    if !asked {
        return Tc::Off;
    }
    let props = client.properties();
    if props.hardware.plane_size_min != 32 || props.hardware.plane_size_max != 32 {
        return Tc::Off;
    }
    let f32t: StorageType = burn::tensor::DType::F32.into();
    let has = |operand: StorageType, k: u32| {
        props
            .features
            .matmul
            .cmma
            .contains(&cubecl::features::MmaConfig {
                a_type: operand,
                b_type: operand,
                cd_type: f32t,
                m: 16,
                n: 16,
                k,
            })
    };
    match dtype {
        burn::tensor::DType::BF16 if has(burn::tensor::DType::BF16.into(), 16) => Tc::Bf16,
        burn::tensor::DType::F32
            if crate::linear::f32_matmul() == crate::linear::F32Matmul::High
                && has(tf32::as_type_native_unchecked().storage_type(), 8) =>
        {
            Tc::Tf32
        }
        _ => Tc::Off,
    }
}

/// The [`Slabs`] of a tiled kernel for inputs of `dtype` on `client`'s device, holding
/// `other_bytes` of shared memory beside its slabs ([`tc_kind`], [`slab_parts`]), and the
/// slabs' element type, the kernel's second defined dtype.
pub fn slabs_for<R: burn_cubecl::CubeRuntime>(
    client: &ComputeClient<R>,
    dtype: burn::tensor::DType,
    other_bytes: usize,
) -> (Slabs, StorageType) {
    let tc = tc_kind(client, dtype);
    let parts = slab_parts(client, other_bytes, tc);
    let elem = if tc == Tc::Bf16 {
        burn::tensor::DType::BF16
    } else {
        burn::tensor::DType::F32
    };
    (Slabs { parts, tc }, elem.into())
}

/// 4-vectors of the output stage: `TILE` rows at a pitch of [`PITCH4`].
pub const OUT: usize = TILE * PITCH4;

/// A slab of `parts` parts in shared memory, aligned for the tensor cores' loads.
#[cube]
pub fn slab_smem<S: Float>(#[comptime] slabs: Slabs) -> Slab<S> {
    SharedMemory::<Vector<S, Const<4>>>::new_aligned(comptime!(slabs.parts * slabs.part()), 32usize)
}

/// Bytes [`slab_parts`] leaves for the alignment padding of the shared arrays.
const ALIGN_SLACK: usize = 256;

/// Bytes of shared memory a cube may use for the SSD kernels: the device's limit, at most the
/// 48 KiB CUDA gives a block's static shared memory.
fn smem_budget<R: burn_cubecl::CubeRuntime>(client: &ComputeClient<R>) -> usize {
    client
        .properties()
        .hardware
        .max_shared_memory_size
        .min(48 << 10)
}

/// Parts per slab ([`KT`] values of `K` each) a tiled kernel stages between two syncs: the
/// most of 4, 2, 1 whose two slabs fit the device's shared memory beside the kernel's
/// `other_bytes` (and the tensor cores' output stage where it has its own). More parts put
/// more global loads in flight per sync and halve or quarter the syncs.
/// `MAMBA_SSD_SLAB_PARTS=1|2|4` caps it (read once), for measuring one against another.
pub fn slab_parts<R: burn_cubecl::CubeRuntime>(
    client: &ComputeClient<R>,
    other_bytes: usize,
    tc: Tc,
) -> usize {
    static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cap = *CAP.get_or_init(|| {
        match std::env::var("MAMBA_SSD_SLAB_PARTS")
            .as_deref()
            .map(str::trim)
        {
            Err(_) | Ok("") => 4,
            Ok("1") => 1,
            Ok("2") => 2,
            Ok("4") => 4,
            Ok(other) => {
                eprintln!("warning: MAMBA_SSD_SLAB_PARTS=`{other}` is not 1, 2 or 4; using 4");
                4
            }
        }
    });
    parts_within(smem_budget(client), other_bytes, tc, cap)
}

/// [`slab_parts`] for a shared-memory `budget` in bytes and a cap on the parts.
pub fn parts_within(budget: usize, other_bytes: usize, tc: Tc, cap: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .filter(|&p| p <= cap)
        .find(|&parts| {
            let slabs = Slabs { parts, tc };
            let stage = if slabs.own_stage() { OUT * 16 } else { 16 };
            2 * slabs.slab_bytes() + stage + other_bytes + ALIGN_SLACK <= budget
        })
        .unwrap_or(1)
}

/// The output stage of [`tc_add_into`]: a whole tile where [`Slabs::own_stage`], a single
/// vector (unused) otherwise.
#[cube]
pub fn out_smem(#[comptime] slabs: Slabs) -> SharedMemory<V4> {
    SharedMemory::<V4>::new_aligned(comptime!(if slabs.own_stage() { OUT } else { 1 }), 32usize)
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cube::{ssd::CHUNK_SMEM, ssd_bwd::DBC_SMEM};

    #[test]
    fn parts_fit_cuda_and_lavapipe_budgets() {
        // CUDA's 48 KiB: four parts in the chunk kernels on either path (the tensor cores'
        // output stage is the left slab at four parts), two in `dB`/`dC` on CUDA cores and one
        // on the tensor cores, whose own 17 KiB stage does not fit beside two.
        assert_eq!(parts_within(48 << 10, CHUNK_SMEM, Tc::Off, 4), 4);
        assert_eq!(parts_within(48 << 10, CHUNK_SMEM, Tc::Tf32, 4), 4);
        assert_eq!(parts_within(48 << 10, DBC_SMEM, Tc::Off, 4), 2);
        assert_eq!(parts_within(48 << 10, DBC_SMEM, Tc::Tf32, 4), 1);
        // bf16 slabs are half the bytes, beside an own 17 KiB stage: four parts in the chunk
        // kernels (2 · 9 KiB + 17 KiB), two in `dB`/`dC` (2 · 4.5 KiB + 17 KiB + its 20.8 KiB;
        // four would need 56 KiB).
        assert_eq!(parts_within(48 << 10, CHUNK_SMEM, Tc::Bf16, 4), 4);
        assert_eq!(parts_within(48 << 10, DBC_SMEM, Tc::Bf16, 4), 2);
        // lavapipe's 32 KiB.
        assert_eq!(parts_within(32 << 10, CHUNK_SMEM, Tc::Off, 4), 2);
        assert_eq!(parts_within(32 << 10, DBC_SMEM, Tc::Off, 4), 1);
        // The cap (MAMBA_SSD_SLAB_PARTS).
        assert_eq!(parts_within(48 << 10, CHUNK_SMEM, Tc::Off, 1), 1);
        assert_eq!(parts_within(48 << 10, CHUNK_SMEM, Tc::Tf32, 2), 2);
    }

    #[test]
    fn output_stage_aliases_only_a_whole_tile_slab() {
        let sl = |parts, tc| Slabs { parts, tc };
        assert_eq!(4 * PART, OUT);
        assert!(!sl(4, Tc::Tf32).own_stage());
        assert!(sl(2, Tc::Tf32).own_stage() && sl(1, Tc::Tf32).own_stage());
        assert!(!sl(1, Tc::Off).own_stage());
        // A bf16 slab is never a whole f32 tile.
        assert!(sl(4, Tc::Bf16).own_stage());
        // wmma's 16-bit operands: a leading dimension a multiple of 8 elements, fragments
        // 32-byte aligned (16 rows of k, 16 columns).
        let ld = 4 * sl(4, Tc::Bf16).pitch();
        assert_eq!(ld % 8, 0);
        assert_eq!((16 * ld * 2) % 32, 0);
        assert_eq!(sl(4, Tc::Bf16).slab_bytes(), 4 * 16 * 18 * 8);
    }
}

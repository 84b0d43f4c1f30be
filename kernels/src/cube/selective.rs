//! Mamba1's selective scan as cubecl kernels: the forward (`y` and the final state) and the
//! backward (gradients of every input), both chunked over the sequence so that threads run in
//! parallel over `(batch, chunk, channel)` rather than only `(batch, channel)`.
//!
//! Notation: `dt = softplus(delta + delta_bias)` (or `delta + delta_bias`), `a_t = exp(dt_t A)`
//! (per state index `i`), `h_t = a_t ∘ h_{t-1} + dt_t B_t u_t`, `y_t = C_t · h_t + D u_t`, then
//! `y_t · silu(z_t)`. The sequence is cut into chunks of `chunk` positions (the last one may be
//! shorter). The recurrence is linear in `h`, so a chunk maps its entering state `s` to
//! `exp(A Σ_chunk dt) ∘ s + S_loc`, where `S_loc` is the chunk's state from a zero start:
//!
//! 1. **chunk-local** ([`scan_chunk_local_kernel`], one thread per `(b, chunk, channel)`): `S_loc`
//!    and `Σ dt` of each chunk; for the backward also the chunk-local adjoint `R_loc` (below);
//! 2. **passing** ([`scan_chunk_passing_kernel`], one thread per `(b, state, channel)`, sequential
//!    over chunks): the state entering each chunk (and, backward, the adjoint leaving it);
//! 3. forward **output** ([`scan_fwd_kernel`], one thread per `(b, chunk, channel)`): the chunk
//!    again from its entering state, writing `y` (and the final state from the last chunk); or
//!    the **backward** ([`scan_bwd_kernel`], one cube per `(b, chunk, channel block)`).
//!
//! Backward. With `g_t = dy_t silu(z_t)` the gradient of the pre-gate output, the adjoint of the
//! state is `λ_t = g_t C_t + a_{t+1} ∘ λ_{t+1}` (`λ_L` gets `d_final` added). Per step:
//! `dB_t += λ_t dt_t u_t`, `dC_t += g_t h_t` (both summed over channels), `du_t = g_t D + dt_t
//! Σ λ_t B_t`, `d dt_t = Σ λ_t ∘ (A ∘ a_t ∘ h_{t-1} + B_t u_t)`, `dA += dt_t λ_t ∘ a_t ∘
//! h_{t-1}`; `d_init = a_1 ∘ λ_1`. The adjoint leaving a chunk to the left, `a_start ∘
//! λ_start`, is `R_loc + exp(A Σ dt) ∘ μ` with `μ` the adjoint entering it from the right and
//! `R_loc` the same from `μ = 0`; the passing kernel chains those right to left. The backward
//! kernel then walks each chunk from the right, with `h_{t-1}` recomputed forward from the chunk's
//! entering state into a per-thread array (`chunk × state` floats), so nothing of size
//! `seq × channels × state` is ever stored. Sums over channels (`dB`, `dC`) go through shared
//! memory within the cube and then through partial sums per channel block, summed with a
//! tensor op (no float atomics); sums over batch and chunks (`dA`, `dD`, `d delta_bias`) are
//! partial tensors summed likewise.
//!
//! Layouts: `u`, `delta`, `z`, `y` are `[batch, seq, channels]` with the channel fastest, and
//! threads are laid out channel-fastest, so those reads and writes coalesce; `B`, `C` rows are
//! shared by every thread of a `(b, t)`. The chunk-boundary buffers are `[batch, chunks, state,
//! channels]` (channel fastest, coalesced). Every tensor is indexed through its strides (the
//! model passes narrowed views), every sum is accumulated in f32, and the state lives in
//! per-thread arrays of comptime size `state` (unrolled for small states, so in registers).

use super::{elemwise, prim, wrap};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::{SelectiveScanGrads, SelectiveScanInput, SelectiveScanOutput};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// The largest state size the kernels take (the reference runs beyond).
pub const MAX_STATE: usize = 256;

/// Loops over the state index are unrolled up to this size (the state then sits in registers).
const UNROLL_STATE: usize = 32;

/// Chunk length of the backward: each backward thread keeps `BWD_CHUNK × state` floats of
/// recomputed states.
const BWD_CHUNK: usize = 16;

/// The forward aims for about this many threads (`batch × chunks × channels`): it splits the
/// sequence into chunks only as far as needed to fill the GPU, since every split costs one more
/// pass over the chunk.
const FWD_TARGET_THREADS: usize = 1 << 17;

/// The forward's shortest chunk.
const FWD_MIN_CHUNK: usize = 16;

/// Shared memory the backward's channel reduction aims to use per cube, in bytes.
const BWD_SHARED_BYTES: usize = 16 * 1024;

/// Threads per cube of the backward, along the channels (at most; fewer for large states).
const BWD_CUBE: usize = 64;

/// `delta + delta_bias` at `(b, t, ch)`, in f32.
#[cube]
fn delta_value<F: Float>(
    delta: &Tensor<F>,                // [batch, seq, channels]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    b: usize,
    t: usize,
    ch: usize,
) -> f32 {
    let mut v =
        f32::cast_from(delta[b * delta.stride(0) + t * delta.stride(1) + ch * delta.stride(2)]);
    #[comptime]
    if let ComptimeOption::Some(bias) = bias {
        v += f32::cast_from(bias[ch * bias.stride(0)]);
    }
    v
}

/// `softplus(v) = ln(1 + e^v)`, exact to f32 past 20 (where `e^v` would lose it).
#[cube]
fn softplus_f32(v: f32) -> f32 {
    let mut r = v;
    if v <= 20.0f32 {
        r = (1.0f32 + v.exp()).ln();
    }
    r
}

/// `dt` from `v = delta + delta_bias`: `softplus(v)`, or `v` itself.
#[cube]
fn dt_of(v: f32, #[comptime] softplus: bool) -> f32 {
    let mut dt = v;
    if softplus {
        dt = softplus_f32(v);
    }
    dt
}

/// `sigmoid(v)` in f32.
#[cube]
fn sigmoid_f32(v: f32) -> f32 {
    1.0f32 / (1.0f32 + (-v).exp())
}

/// The gate factor `silu(z)` at `(b, t, ch)`, or 1 without `z`.
#[cube]
fn gate<F: Float>(z: &ComptimeOption<Tensor<F>>, b: usize, t: usize, ch: usize) -> f32 {
    let mut gt = 1.0f32;
    #[comptime]
    if let ComptimeOption::Some(z) = z {
        let zv = f32::cast_from(z[b * z.stride(0) + t * z.stride(1) + ch * z.stride(2)]);
        gt = zv * sigmoid_f32(zv);
    }
    gt
}

/// Step 1, one thread per `(b, chunk, channel)`, channel fastest: the chunk from a zero state.
///
/// Writes `states[b, c, i, ch]` (the chunk's final state from zero, `S_loc`) and `dt_sum[b, c,
/// ch]`; with `dy` (the backward) also `adjoints[b, c, i, ch]`, the adjoint leaving the chunk to
/// the left from a zero adjoint at its end (`R_loc`). Without `dy`, `adjoints` is not touched.
#[cube(launch)]
fn scan_chunk_local_kernel<F: Float>(
    u: &Tensor<F>,                    // [batch, seq, channels]
    delta: &Tensor<F>,                // [batch, seq, channels]
    a: &Tensor<F>,                    // [channels, state]
    bm: &Tensor<F>,                   // [batch, seq, state]
    cm: &Tensor<F>,                   // [batch, seq, state]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    z: &ComptimeOption<Tensor<F>>,    // [batch, seq, channels]
    dy: &ComptimeOption<Tensor<F>>,   // [batch, seq, channels]
    states: &mut Tensor<f32>,         // [batch, chunks, state, channels]
    adjoints: &mut Tensor<f32>,       // [batch, chunks, state, channels]
    dt_sum: &mut Tensor<f32>,         // [batch, chunks, channels]
    chunk: u32,
    #[comptime] n: usize,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = u.shape(2);
    let seqlen = u.shape(1);
    let nchunks = states.shape(1);
    if ABSOLUTE_POS >= u.shape(0) * nchunks * channels {
        terminate!();
    }
    let ch = ABSOLUTE_POS % channels;
    let c = (ABSOLUTE_POS / channels) % nchunks;
    let b = ABSOLUTE_POS / (channels * nchunks);
    let chunk = chunk as usize;
    let t0 = c * chunk;
    let mut t1 = t0 + chunk;
    if t1 > seqlen {
        t1 = seqlen;
    }

    let mut arow = Array::<f32>::new(n);
    let mut h = Array::<f32>::new(n);
    #[unroll(n <= UNROLL_STATE)]
    for i in 0..n {
        arow[i] = f32::cast_from(a[ch * a.stride(0) + i * a.stride(1)]);
        h[i] = 0.0f32;
    }
    let mut dsum = 0.0f32;
    for t in t0..t1 {
        let dt = dt_of(delta_value::<F>(delta, bias, b, t, ch), softplus);
        let dtu = dt * f32::cast_from(u[b * u.stride(0) + t * u.stride(1) + ch * u.stride(2)]);
        let brow = b * bm.stride(0) + t * bm.stride(1);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            h[i] = (dt * arow[i]).exp() * h[i] + dtu * f32::cast_from(bm[brow + i * bm.stride(2)]);
        }
        dsum += dt;
    }
    let sbase = b * states.stride(0) + c * states.stride(1) + ch * states.stride(3);
    #[unroll(n <= UNROLL_STATE)]
    for i in 0..n {
        states[sbase + i * states.stride(2)] = h[i];
    }
    dt_sum[b * dt_sum.stride(0) + c * dt_sum.stride(1) + ch * dt_sum.stride(2)] = dsum;

    #[comptime]
    if let ComptimeOption::Some(dy) = dy {
        // λ_t = g_t C_t + a_{t+1} λ_{t+1}, from zero at the chunk's end; `carry` = a_t λ_t.
        let mut carry = Array::<f32>::new(n);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            carry[i] = 0.0f32;
        }
        for k in 0..t1 - t0 {
            let t = t1 - 1 - k;
            let dt = dt_of(delta_value::<F>(delta, bias, b, t, ch), softplus);
            let g = f32::cast_from(dy[b * dy.stride(0) + t * dy.stride(1) + ch * dy.stride(2)])
                * gate::<F>(z, b, t, ch);
            let crow = b * cm.stride(0) + t * cm.stride(1);
            #[unroll(n <= UNROLL_STATE)]
            for i in 0..n {
                let lam = g * f32::cast_from(cm[crow + i * cm.stride(2)]) + carry[i];
                carry[i] = (dt * arow[i]).exp() * lam;
            }
        }
        let abase = b * adjoints.stride(0) + c * adjoints.stride(1) + ch * adjoints.stride(3);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            adjoints[abase + i * adjoints.stride(2)] = carry[i];
        }
    }
}

/// Step 2, one thread per `(b, i, channel)`, channel fastest, sequential over chunks.
///
/// In place: `states` goes from each chunk's `S_loc` to the state entering it (the initial state
/// or zero for the first). With `backward`, `adjoints` goes from `R_loc` to `μ`, the adjoint
/// entering each chunk from the right (`d_final` or zero for the last), and `d_init` gets the
/// adjoint leaving the first chunk, the initial state's gradient (`d_init` is not touched
/// otherwise).
#[cube(launch)]
fn scan_chunk_passing_kernel<F: Float>(
    a: &Tensor<F>,                       // [channels, state]
    dt_sum: &Tensor<f32>,                // [batch, chunks, channels]
    init: &ComptimeOption<Tensor<F>>,    // [batch, channels, state]
    d_final: &ComptimeOption<Tensor<F>>, // [batch, channels, state]
    states: &mut Tensor<f32>,            // [batch, chunks, state, channels]
    adjoints: &mut Tensor<f32>,          // [batch, chunks, state, channels]
    d_init: &mut Tensor<F>,              // [batch, channels, state]
    #[comptime] backward: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = states.shape(3);
    let dstate = states.shape(2);
    let nchunks = states.shape(1);
    if ABSOLUTE_POS >= states.shape(0) * dstate * channels {
        terminate!();
    }
    let ch = ABSOLUTE_POS % channels;
    let i = (ABSOLUTE_POS / channels) % dstate;
    let b = ABSOLUTE_POS / (channels * dstate);
    let ai = f32::cast_from(a[ch * a.stride(0) + i * a.stride(1)]);
    let sbase = b * states.stride(0) + i * states.stride(2) + ch * states.stride(3);
    let dbase = b * dt_sum.stride(0) + ch * dt_sum.stride(2);

    let mut s = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(init) = init {
        s = f32::cast_from(init[b * init.stride(0) + ch * init.stride(1) + i * init.stride(2)]);
    }
    for c in 0..nchunks {
        let idx = sbase + c * states.stride(1);
        let local = states[idx];
        states[idx] = s;
        s = (ai * dt_sum[dbase + c * dt_sum.stride(1)]).exp() * s + local;
    }

    if backward {
        let abase = b * adjoints.stride(0) + i * adjoints.stride(2) + ch * adjoints.stride(3);
        let mut mu = 0.0f32;
        #[comptime]
        if let ComptimeOption::Some(d_final) = d_final {
            mu = f32::cast_from(
                d_final[b * d_final.stride(0) + ch * d_final.stride(1) + i * d_final.stride(2)],
            );
        }
        for k in 0..nchunks {
            let c = nchunks - 1 - k;
            let idx = abase + c * adjoints.stride(1);
            let local = adjoints[idx];
            adjoints[idx] = mu;
            mu = (ai * dt_sum[dbase + c * dt_sum.stride(1)]).exp() * mu + local;
        }
        d_init[b * d_init.stride(0) + ch * d_init.stride(1) + i * d_init.stride(2)] =
            F::cast_from(mu);
    }
}

/// Step 3 of the forward, one thread per `(b, chunk, channel)`, channel fastest: the chunk from
/// its entering state (`prev` when chunked, else `init` or zero), writing `y` and, from the last
/// chunk, the final state.
#[cube(launch)]
fn scan_fwd_kernel<F: Float>(
    u: &Tensor<F>,                      // [batch, seq, channels]
    delta: &Tensor<F>,                  // [batch, seq, channels]
    a: &Tensor<F>,                      // [channels, state]
    bm: &Tensor<F>,                     // [batch, seq, state]
    cm: &Tensor<F>,                     // [batch, seq, state]
    d: &Tensor<F>,                      // [channels]
    z: &ComptimeOption<Tensor<F>>,      // [batch, seq, channels]
    bias: &ComptimeOption<Tensor<F>>,   // [channels]
    init: &ComptimeOption<Tensor<F>>,   // [batch, channels, state]
    prev: &ComptimeOption<Tensor<f32>>, // [batch, chunks, state, channels]
    y: &mut Tensor<F>,                  // [batch, seq, channels]
    final_state: &mut Tensor<F>,        // [batch, channels, state]
    chunk: u32,
    #[comptime] n: usize,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = u.shape(2);
    let seqlen = u.shape(1);
    let chunk = chunk as usize;
    let nchunks = (seqlen - 1) / chunk + 1; // seq >= 1
    if ABSOLUTE_POS >= u.shape(0) * nchunks * channels {
        terminate!();
    }
    let ch = ABSOLUTE_POS % channels;
    let c = (ABSOLUTE_POS / channels) % nchunks;
    let b = ABSOLUTE_POS / (channels * nchunks);
    let t0 = c * chunk;
    let mut t1 = t0 + chunk;
    if t1 > seqlen {
        t1 = seqlen;
    }

    let mut arow = Array::<f32>::new(n);
    let mut h = Array::<f32>::new(n);
    #[unroll(n <= UNROLL_STATE)]
    for i in 0..n {
        arow[i] = f32::cast_from(a[ch * a.stride(0) + i * a.stride(1)]);
        h[i] = 0.0f32;
    }
    #[comptime]
    if let ComptimeOption::Some(init) = init {
        let ibase = b * init.stride(0) + ch * init.stride(1);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            h[i] = f32::cast_from(init[ibase + i * init.stride(2)]);
        }
    }
    #[comptime]
    if let ComptimeOption::Some(prev) = prev {
        let pbase = b * prev.stride(0) + c * prev.stride(1) + ch * prev.stride(3);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            h[i] = prev[pbase + i * prev.stride(2)];
        }
    }
    let dv = f32::cast_from(d[ch * d.stride(0)]);

    for t in t0..t1 {
        let dt = dt_of(delta_value::<F>(delta, bias, b, t, ch), softplus);
        let uv = f32::cast_from(u[b * u.stride(0) + t * u.stride(1) + ch * u.stride(2)]);
        let dtu = dt * uv;
        let brow = b * bm.stride(0) + t * bm.stride(1);
        let crow = b * cm.stride(0) + t * cm.stride(1);
        let mut acc = 0.0f32;
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            h[i] = (dt * arow[i]).exp() * h[i] + dtu * f32::cast_from(bm[brow + i * bm.stride(2)]);
            acc += h[i] * f32::cast_from(cm[crow + i * cm.stride(2)]);
        }
        acc += dv * uv;
        acc *= gate::<F>(z, b, t, ch);
        y[b * y.stride(0) + t * y.stride(1) + ch * y.stride(2)] = F::cast_from(acc);
    }

    if c == nchunks - 1 {
        let fbase = b * final_state.stride(0) + ch * final_state.stride(1);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            final_state[fbase + i * final_state.stride(2)] = F::cast_from(h[i]);
        }
    }
}

/// Step 3 of the backward: one cube per `(channel block, chunk, b)` (`CUBE_POS_X/Y/Z`), one
/// thread per channel of the block (`UNIT_POS_X < cube`). Threads past the last channel compute
/// on channel 0 and write nothing but zeros into the shared reduction, so every thread reaches
/// every barrier.
///
/// Each thread recomputes its chunk's states forward from `states` (the entering state) into
/// `hist` (`chunk × state` floats), then walks the chunk right to left from the adjoint `μ`
/// (`adjoints`), writing `du`, `ddelta`, `dz` and accumulating `dA`, `dD` and `d delta_bias`
/// over the chunk. At the end `states[b, c, ·, ch]` (no longer needed) is overwritten with the
/// chunk's `dA` partial, and `acc_part[b, c, 0|1, ch]` gets the `dD` and `d delta_bias` partials.
///
/// `dB` and `dC` contributions of each step go to shared memory, `slots` steps at a time
/// (`[slot][2 × state][cube + 1]`, padded against bank conflicts), then each of the `slots × 2 ×
/// state` sums is split in `parts` pieces over the cube's threads and written to `bc_part[b, t,
/// block × parts + piece, 0..state | state..2 state]` (`dB` then `dC`).
#[cube(launch)]
fn scan_bwd_kernel<F: Float>(
    u: &Tensor<F>,                    // [batch, seq, channels]
    delta: &Tensor<F>,                // [batch, seq, channels]
    a: &Tensor<F>,                    // [channels, state]
    bm: &Tensor<F>,                   // [batch, seq, state]
    cm: &Tensor<F>,                   // [batch, seq, state]
    d: &Tensor<F>,                    // [channels]
    z: &ComptimeOption<Tensor<F>>,    // [batch, seq, channels]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    dy: &Tensor<F>,                   // [batch, seq, channels]
    states: &mut Tensor<f32>,         // [batch, chunks, state, channels]
    adjoints: &Tensor<f32>,           // [batch, chunks, state, channels]
    du: &mut Tensor<F>,               // [batch, seq, channels]
    ddelta: &mut Tensor<F>,           // [batch, seq, channels]
    dz: &mut Tensor<F>,               // [batch, seq, channels] (written only with `z`)
    acc_part: &mut Tensor<f32>,       // [batch, chunks, 2, channels]
    bc_part: &mut Tensor<f32>,        // [batch, seq, blocks × parts, 2 × state]
    #[comptime] n: usize,
    #[comptime] chunk: usize,
    #[comptime] cube: usize,
    #[comptime] slots: usize,
    #[comptime] parts: usize,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = u.shape(2);
    let seqlen = u.shape(1);
    let blk = CUBE_POS_X as usize;
    let c = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let lane = UNIT_POS_X as usize;
    let ch_raw = blk * cube + lane;
    let valid = ch_raw < channels;
    let mut ch = ch_raw;
    if !valid {
        ch = 0;
    }
    let t0 = c * chunk;
    let mut t1 = t0 + chunk;
    if t1 > seqlen {
        t1 = seqlen;
    }
    let len = t1 - t0;

    let mut arow = Array::<f32>::new(n);
    let mut h = Array::<f32>::new(n);
    let sbase = b * states.stride(0) + c * states.stride(1) + ch * states.stride(3);
    #[unroll(n <= UNROLL_STATE)]
    for i in 0..n {
        arow[i] = f32::cast_from(a[ch * a.stride(0) + i * a.stride(1)]);
        h[i] = states[sbase + i * states.stride(2)];
    }
    let dv = f32::cast_from(d[ch * d.stride(0)]);

    // Forward through the chunk: hist[k] = h_{t0 + k - 1}, the state before step t0 + k.
    let mut hist = Array::<f32>::new(comptime!(chunk * n));
    for k in 0..len {
        let t = t0 + k;
        let dt = dt_of(delta_value::<F>(delta, bias, b, t, ch), softplus);
        let dtu = dt * f32::cast_from(u[b * u.stride(0) + t * u.stride(1) + ch * u.stride(2)]);
        let brow = b * bm.stride(0) + t * bm.stride(1);
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            hist[k * n + i] = h[i];
            h[i] = (dt * arow[i]).exp() * h[i] + dtu * f32::cast_from(bm[brow + i * bm.stride(2)]);
        }
    }

    // Backward through the chunk; h holds h_t, carry holds a_{t+1} λ_{t+1} (μ at the end).
    let mut carry = Array::<f32>::new(n);
    let mut da_acc = Array::<f32>::new(n);
    let abase = b * adjoints.stride(0) + c * adjoints.stride(1) + ch * adjoints.stride(3);
    #[unroll(n <= UNROLL_STATE)]
    for i in 0..n {
        carry[i] = adjoints[abase + i * adjoints.stride(2)];
        da_acc[i] = 0.0f32;
    }
    let mut dd_acc = 0.0f32;
    let mut dbias_acc = 0.0f32;

    let row = comptime!(2 * n);
    let pitch = comptime!(cube + 1);
    let mut shared = SharedMemory::<f32>::new(comptime!(slots * 2 * n * (cube + 1)));
    let lanes_per_part = comptime!(cube / parts);
    let mut slot = 0usize;

    for kk in 0..len {
        let k = len - 1 - kk;
        let t = t0 + k;
        let v = delta_value::<F>(delta, bias, b, t, ch);
        let dt = dt_of(v, softplus);
        let tok = b * u.stride(0) + t * u.stride(1) + ch * u.stride(2);
        let uv = f32::cast_from(u[tok]);
        let dyv = f32::cast_from(dy[b * dy.stride(0) + t * dy.stride(1) + ch * dy.stride(2)]);
        let mut g = dyv;
        let mut zv = 0.0f32;
        #[comptime]
        if let ComptimeOption::Some(z) = z {
            zv = f32::cast_from(z[b * z.stride(0) + t * z.stride(1) + ch * z.stride(2)]);
            g = dyv * zv * sigmoid_f32(zv);
        }
        let mut wmask = 0.0f32;
        if valid {
            wmask = 1.0f32;
        }
        let brow = b * bm.stride(0) + t * bm.stride(1);
        let crow = b * cm.stride(0) + t * cm.stride(1);
        let dtu = dt * uv;
        let mut y_pre = dv * uv;
        let mut ddt = 0.0f32;
        let mut lam_b = 0.0f32;
        let srow = slot * row * pitch + lane;
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            let bi = f32::cast_from(bm[brow + i * bm.stride(2)]);
            let ci = f32::cast_from(cm[crow + i * cm.stride(2)]);
            y_pre += ci * h[i];
            let lam = g * ci + carry[i];
            let hp = hist[k * n + i];
            let ae = (dt * arow[i]).exp();
            let q = lam * ae * hp;
            ddt += q * arow[i] + lam * bi * uv;
            da_acc[i] += dt * q;
            lam_b += lam * bi;
            shared[srow + i * pitch] = wmask * lam * dtu;
            shared[srow + (n + i) * pitch] = wmask * g * h[i];
            carry[i] = ae * lam;
            h[i] = hp;
        }
        let mut dd = ddt;
        if softplus {
            dd = ddt * sigmoid_f32(v);
        }
        dd_acc += g * uv;
        dbias_acc += dd;
        if valid {
            du[tok] = F::cast_from(g * dv + dt * lam_b);
            ddelta[b * ddelta.stride(0) + t * ddelta.stride(1) + ch * ddelta.stride(2)] =
                F::cast_from(dd);
            #[comptime]
            if let ComptimeOption::Some(_z) = z {
                // d/dz (z sigmoid(z)) = s (1 + z (1 - s))
                let s = sigmoid_f32(zv);
                dz[b * dz.stride(0) + t * dz.stride(1) + ch * dz.stride(2)] =
                    F::cast_from(dyv * y_pre * s * (1.0f32 + zv * (1.0f32 - s)));
            }
        }
        slot += 1;

        // Flush the shared dB/dC rows when full or at the chunk's start (uniform over the cube).
        if slot == slots || kk + 1 == len {
            sync_cube();
            let combos = slot * row * parts;
            let rounds = (combos - 1) / cube + 1; // combos >= 1
            for r in 0..rounds {
                let combo = r * cube + lane;
                if combo < combos {
                    let o = combo % (slot * row);
                    let piece = combo / (slot * row);
                    let mut sum = 0.0f32;
                    let obase = o * pitch + piece * lanes_per_part;
                    for l in 0..lanes_per_part {
                        sum += shared[obase + l];
                    }
                    let sl = o / row;
                    let j = o % row;
                    // slot sl holds the step slot - 1 - sl steps after t
                    let ts = t + (slot - 1 - sl);
                    bc_part[b * bc_part.stride(0)
                        + ts * bc_part.stride(1)
                        + (blk * parts + piece) * bc_part.stride(2)
                        + j * bc_part.stride(3)] = sum;
                }
            }
            sync_cube();
            slot = 0;
        }
    }

    if valid {
        #[unroll(n <= UNROLL_STATE)]
        for i in 0..n {
            states[sbase + i * states.stride(2)] = da_acc[i];
        }
        let pbase = b * acc_part.stride(0) + c * acc_part.stride(1) + ch * acc_part.stride(3);
        acc_part[pbase] = dd_acc;
        acc_part[pbase + acc_part.stride(2)] = dbias_acc;
    }
}

/// Whether the kernels take this input: one float dtype throughout (also `extra`, the upstream
/// gradients), a nonempty problem and a state of at most [`MAX_STATE`].
pub(crate) fn supported<B: Backend>(input: &SelectiveScanInput<B>, extra: &[DType]) -> bool {
    let [batch, seqlen, channels] = input.u.dims();
    let dstate = input.a.dims()[1];
    let dt = input.u.dtype();
    let same = [
        input.delta.dtype(),
        input.a.dtype(),
        input.b.dtype(),
        input.c.dtype(),
        input.d.dtype(),
    ]
    .iter()
    .chain(extra)
    .all(|&d| d == dt)
        && input.z.as_ref().is_none_or(|t| t.dtype() == dt)
        && input.delta_bias.as_ref().is_none_or(|t| t.dtype() == dt)
        && input.initial_state.as_ref().is_none_or(|t| t.dtype() == dt);
    same && batch > 0 && seqlen > 0 && channels > 0 && dstate > 0 && dstate <= MAX_STATE
}

/// The forward's chunk length: whole sequences when `batch × channels` threads fill the GPU,
/// shorter chunks (at least [`FWD_MIN_CHUNK`]) otherwise.
fn forward_chunk(batch: usize, seqlen: usize, channels: usize) -> usize {
    let want = FWD_TARGET_THREADS.div_ceil(batch * channels).max(1);
    let nchunks = want.min(seqlen.div_ceil(FWD_MIN_CHUNK)).max(1);
    seqlen.div_ceil(nchunks)
}

/// Kernel forward of [`crate::MambaBackend::selective_scan`]. Falls back to the reference when
/// the inputs do not share one float dtype, are empty, or the state exceeds [`MAX_STATE`].
pub fn selective_scan<R, F, I, BT>(
    input: SelectiveScanInput<Cb<R, F, I, BT>>,
) -> SelectiveScanOutput<Cb<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !supported(&input, &[]) {
        return crate::reference::selective_scan(input);
    }
    let [batch, seqlen, channels] = input.u.dims();
    let dstate = input.a.dims()[1];
    let dtype = input.u.dtype();
    let SelectiveScanInput {
        u,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
    } = input;
    let u = prim(u); // [batch, seq, channels]
    let delta = prim(delta); // [batch, seq, channels]
    let a = prim(a); // [channels, state]
    let bm = prim(b); // [batch, seq, state]
    let cm = prim(c); // [batch, seq, state]
    let d = prim(d); // [channels]
    let z = z.map(prim); // [batch, seq, channels]
    let bias = delta_bias.map(prim); // [channels]
    let init = initial_state.map(prim); // [batch, channels, state]
    let client = u.client.clone();
    let device = u.device.clone();
    let empty = |shape: Vec<usize>, dtype: DType| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::from(shape), dtype)
    };

    let chunk = forward_chunk(batch, seqlen, channels);
    let nchunks = seqlen.div_ceil(chunk);

    // Steps 1 and 2 (only when chunked): the state entering each chunk.
    let prev = if nchunks > 1 {
        let states = empty(vec![batch, nchunks, dstate, channels], DType::F32);
        let dt_sum = empty(vec![batch, nchunks, channels], DType::F32);
        let dummy = empty(vec![1, 1, 1, 1], DType::F32);
        let (count, dim) = elemwise(&client, batch * nchunks * channels);
        scan_chunk_local_kernel::launch::<R>(
            &client,
            count,
            dim,
            u.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            a.clone().into_tensor_arg(),
            bm.clone().into_tensor_arg(),
            cm.clone().into_tensor_arg(),
            bias.clone().map(|t| t.into_tensor_arg()).into(),
            None.into(),
            None.into(),
            states.clone().into_tensor_arg(),
            dummy.clone().into_tensor_arg(),
            dt_sum.clone().into_tensor_arg(),
            chunk as u32,
            dstate,
            delta_softplus,
            dtype.into(),
        );
        let dummy_init = empty(vec![1, 1, 1], dtype);
        let (count, dim) = elemwise(&client, batch * dstate * channels);
        scan_chunk_passing_kernel::launch::<R>(
            &client,
            count,
            dim,
            a.clone().into_tensor_arg(),
            dt_sum.into_tensor_arg(),
            init.clone().map(|t| t.into_tensor_arg()).into(),
            None.into(),
            states.clone().into_tensor_arg(),
            dummy.into_tensor_arg(),
            dummy_init.into_tensor_arg(),
            false,
            dtype.into(),
        );
        Some(states)
    } else {
        None
    };

    // Step 3: y and the final state.
    let y = empty(vec![batch, seqlen, channels], dtype);
    let final_state = empty(vec![batch, channels, dstate], dtype);
    let init = if prev.is_some() { None } else { init };
    let (count, dim) = elemwise(&client, batch * nchunks * channels);
    scan_fwd_kernel::launch::<R>(
        &client,
        count,
        dim,
        u.into_tensor_arg(),
        delta.into_tensor_arg(),
        a.into_tensor_arg(),
        bm.into_tensor_arg(),
        cm.into_tensor_arg(),
        d.into_tensor_arg(),
        z.map(|t| t.into_tensor_arg()).into(),
        bias.map(|t| t.into_tensor_arg()).into(),
        init.map(|t| t.into_tensor_arg()).into(),
        prev.map(|t| t.into_tensor_arg()).into(),
        y.clone().into_tensor_arg(),
        final_state.clone().into_tensor_arg(),
        chunk as u32,
        dstate,
        delta_softplus,
        dtype.into(),
    );

    SelectiveScanOutput {
        y: wrap(y),
        final_state: wrap(final_state),
    }
}

/// Cube shape of the backward for a state of `n`: `(cube, slots, parts)` with `cube` threads
/// along the channels, `slots` steps buffered in shared memory per reduction and each sum
/// split in `parts` pieces so that all threads share the reduction.
fn backward_layout(n: usize, max_shared: usize) -> (usize, usize, usize) {
    let budget = BWD_SHARED_BYTES.min(max_shared) / 4; // floats
    let row = 2 * n;
    let mut cube = BWD_CUBE;
    while cube > 1 && row * (cube + 1) > budget {
        cube /= 2;
    }
    let slots = (budget / (row * (cube + 1))).clamp(1, BWD_CHUNK);
    let mut parts = 1;
    while parts * 2 * slots * row <= cube {
        parts *= 2;
    }
    (cube, slots, parts)
}

/// Kernel backward of [`crate::MambaBackend::selective_scan_backward`]: the gradients of
/// `Σ y · dy + Σ final_state · d_final`. Falls back to the reference as
/// [`selective_scan`] does.
pub fn selective_scan_backward<R, F, I, BT>(
    input: SelectiveScanInput<Cb<R, F, I, BT>>,
    dy: BTensor<Cb<R, F, I, BT>, 3>,
    d_final: Option<BTensor<Cb<R, F, I, BT>, 3>>,
) -> SelectiveScanGrads<Cb<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let mut extra = vec![dy.dtype()];
    extra.extend(d_final.as_ref().map(|t| t.dtype()));
    if !supported(&input, &extra) {
        return crate::reference::selective_scan_backward(input, dy, d_final);
    }
    let [batch, seqlen, channels] = input.u.dims();
    let dstate = input.a.dims()[1];
    let dtype = input.u.dtype();
    let (has_z, has_bias, has_init) = (
        input.z.is_some(),
        input.delta_bias.is_some(),
        input.initial_state.is_some(),
    );
    let SelectiveScanInput {
        u,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
    } = input;
    let u = prim(u); // [batch, seq, channels]
    let delta = prim(delta); // [batch, seq, channels]
    let a = prim(a); // [channels, state]
    let bm = prim(b); // [batch, seq, state]
    let cm = prim(c); // [batch, seq, state]
    let d = prim(d); // [channels]
    let z = z.map(prim); // [batch, seq, channels]
    let bias = delta_bias.map(prim); // [channels]
    let init = initial_state.map(prim); // [batch, channels, state]
    let dy = prim(dy); // [batch, seq, channels]
    let d_final = d_final.map(prim); // [batch, channels, state]
    let client = u.client.clone();
    let device = u.device.clone();
    let empty = |shape: Vec<usize>, dtype: DType| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::from(shape), dtype)
    };

    let chunk = BWD_CHUNK;
    let nchunks = seqlen.div_ceil(chunk);

    // Step 1: chunk-local states and adjoints.
    let states = empty(vec![batch, nchunks, dstate, channels], DType::F32);
    let adjoints = empty(vec![batch, nchunks, dstate, channels], DType::F32);
    let dt_sum = empty(vec![batch, nchunks, channels], DType::F32);
    let (count, dim) = elemwise(&client, batch * nchunks * channels);
    scan_chunk_local_kernel::launch::<R>(
        &client,
        count,
        dim,
        u.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        a.clone().into_tensor_arg(),
        bm.clone().into_tensor_arg(),
        cm.clone().into_tensor_arg(),
        bias.clone().map(|t| t.into_tensor_arg()).into(),
        z.clone().map(|t| t.into_tensor_arg()).into(),
        Some(dy.clone().into_tensor_arg()).into(),
        states.clone().into_tensor_arg(),
        adjoints.clone().into_tensor_arg(),
        dt_sum.clone().into_tensor_arg(),
        chunk as u32,
        dstate,
        delta_softplus,
        dtype.into(),
    );

    // Step 2: entering states, adjoints from the right, and the initial state's gradient.
    let d_init = empty(vec![batch, channels, dstate], dtype);
    let (count, dim) = elemwise(&client, batch * dstate * channels);
    scan_chunk_passing_kernel::launch::<R>(
        &client,
        count,
        dim,
        a.clone().into_tensor_arg(),
        dt_sum.into_tensor_arg(),
        init.map(|t| t.into_tensor_arg()).into(),
        d_final.map(|t| t.into_tensor_arg()).into(),
        states.clone().into_tensor_arg(),
        adjoints.clone().into_tensor_arg(),
        d_init.clone().into_tensor_arg(),
        true,
        dtype.into(),
    );

    // Step 3: the per-position gradients and the partial sums.
    let (cube, slots, parts) =
        backward_layout(dstate, client.properties().hardware.max_shared_memory_size);
    let blocks = channels.div_ceil(cube);
    let du = empty(vec![batch, seqlen, channels], dtype);
    let ddelta = empty(vec![batch, seqlen, channels], dtype);
    let dz = if has_z {
        empty(vec![batch, seqlen, channels], dtype)
    } else {
        empty(vec![1, 1, 1], dtype)
    };
    let acc_part = empty(vec![batch, nchunks, 2, channels], DType::F32);
    let bc_part = empty(vec![batch, seqlen, blocks * parts, 2 * dstate], DType::F32);
    scan_bwd_kernel::launch::<R>(
        &client,
        CubeCount::Static(blocks as u32, nchunks as u32, batch as u32),
        CubeDim::new_1d(cube as u32),
        u.into_tensor_arg(),
        delta.into_tensor_arg(),
        a.into_tensor_arg(),
        bm.into_tensor_arg(),
        cm.into_tensor_arg(),
        d.into_tensor_arg(),
        z.map(|t| t.into_tensor_arg()).into(),
        bias.map(|t| t.into_tensor_arg()).into(),
        dy.into_tensor_arg(),
        states.clone().into_tensor_arg(),
        adjoints.into_tensor_arg(),
        du.clone().into_tensor_arg(),
        ddelta.clone().into_tensor_arg(),
        dz.clone().into_tensor_arg(),
        acc_part.clone().into_tensor_arg(),
        bc_part.clone().into_tensor_arg(),
        dstate,
        chunk,
        cube,
        slots,
        parts,
        delta_softplus,
        dtype.into(),
    );

    // The reductions over batch, chunks and channel blocks.
    let da: BTensor<Cb<R, F, I, BT>, 4> = wrap(states); // [batch, chunks, state, channels]
    let da = da
        .sum_dim(0)
        .sum_dim(1)
        .reshape([dstate, channels])
        .swap_dims(0, 1)
        .cast(dtype);
    let acc: BTensor<Cb<R, F, I, BT>, 4> = wrap(acc_part); // [batch, chunks, 2, channels]
    let acc = acc.sum_dim(0).sum_dim(1).reshape([2, channels]);
    let dd = acc.clone().narrow(0, 0, 1).reshape([channels]).cast(dtype);
    let dbias = acc.narrow(0, 1, 1).reshape([channels]).cast(dtype);
    let bc: BTensor<Cb<R, F, I, BT>, 4> = wrap(bc_part); // [batch, seq, blocks × parts, 2 × state]
    let bc = bc.sum_dim(2).reshape([batch, seqlen, 2 * dstate]);
    let db = bc.clone().narrow(2, 0, dstate).cast(dtype);
    let dc = bc.narrow(2, dstate, dstate).cast(dtype);

    SelectiveScanGrads {
        u: wrap(du),
        delta: wrap(ddelta),
        a: da,
        b: db,
        c: dc,
        d: dd,
        z: has_z.then(|| wrap(dz)),
        delta_bias: has_bias.then_some(dbias),
        initial_state: has_init.then(|| wrap(d_init)),
    }
}

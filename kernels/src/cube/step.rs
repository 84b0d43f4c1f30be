//! One-token decode updates as cubecl kernels: the causal conv1d step, the SSD (Mamba2) step, the
//! selective-scan (Mamba1) step, and the fused Mamba2 step that does the work of a mixer between
//! its projections in one launch ([`mamba2_step`]).
//!
//! Each is one launch with one thread per output row (the state's last axis is looped over in
//! the thread), every tensor indexed through its strides and every sum accumulated in f32. The
//! new state is written to a fresh tensor (the inputs are left untouched).

// Kernel code spells ceil-division and multiples out: `usize::div_ceil` and
// `usize::is_multiple_of` are not cube functions.
#![allow(clippy::manual_div_ceil, clippy::manual_is_multiple_of)]

use super::ssd::dt_activation;
use super::{elemwise, prim, wrap};
use burn::tensor::{Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::{Mamba2StepInput, Mamba2StepOutput, SsdStepInput};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// An output and a new state.
type Pair<R, F, I, BT, const Y: usize, const S: usize> =
    (BTensor<Cb<R, F, I, BT>, Y>, BTensor<Cb<R, F, I, BT>, S>);

/// `sigmoid(v)` in f32.
#[cube]
fn sigmoid_f32(v: f32) -> f32 {
    1.0f32 / (1.0f32 + (-v).exp())
}

/// The conv step of channel `c` of row `b`: `Σ_k w[c, k] window[k]` over the window
/// `[state[b, c, ·], xv]` (f32), and, when `write`, the window shifted by one into `new_state`.
/// `width` (≥ 2) is comptime: the window's reads are unrolled and all issued before any store
/// (a read behind a store to another tensor, or behind a branch, waits for it). Shared by the
/// conv step and the fused Mamba2 step.
#[cube]
#[allow(clippy::too_many_arguments)]
fn conv_channel<F: Float, W: Float>(
    state: &Tensor<F>,
    new_state: &mut Tensor<F>,
    weight: &Tensor<W>,
    b: usize,
    c: usize,
    xv: F,
    write: bool,
    #[comptime] width: usize,
) -> f32 {
    let wm1 = comptime!(width - 1);
    let sbase = b * state.stride(0) + c * state.stride(1);
    let wbase = c * weight.stride(0);
    let ws1 = weight.stride(1);
    let mut win = Array::<F>::new(wm1);
    #[unroll]
    for k in 0..wm1 {
        win[k] = state[sbase + k * state.stride(2)];
    }
    let mut acc = 0.0f32;
    #[unroll]
    for k in 0..wm1 {
        acc += f32::cast_from(weight[wbase + k * ws1]) * f32::cast_from(win[k]);
    }
    acc += f32::cast_from(weight[wbase + wm1 * ws1]) * f32::cast_from(xv);
    if write {
        let nbase = b * new_state.stride(0) + c * new_state.stride(1);
        let ns2 = new_state.stride(2);
        #[unroll]
        for k in 1..wm1 {
            new_state[nbase + (k - 1) * ns2] = win[k];
        }
        new_state[nbase + (wm1 - 1) * ns2] = xv;
    }
    acc
}

/// Conv step, one thread per `(b, c)`, channel fastest: `y = bias + Σ_k w[c, k] window[k]` over
/// `window = [state[b, c, ·], x[b, c]]` (then SiLU), `new_state = window[1..]`.
#[cube(launch)]
fn conv_step_kernel<F: Float>(
    x: &Tensor<F>,                    // [batch, channels]
    state: &Tensor<F>,                // [batch, channels, width - 1]
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    y: &mut Tensor<F>,                // [batch, channels]
    new_state: &mut Tensor<F>,        // [batch, channels, width - 1]
    #[comptime] width: usize,
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = y.shape(1);
    if ABSOLUTE_POS >= y.shape(0) * channels {
        terminate!();
    }
    let c = ABSOLUTE_POS % channels;
    let b = ABSOLUTE_POS / channels;

    let mut acc = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(bias) = bias {
        acc = f32::cast_from(bias[c * bias.stride(0)]);
    }
    let xv = x[b * x.stride(0) + c * x.stride(1)];
    acc += conv_channel::<F, F>(state, new_state, weight, b, c, xv, true, width);
    if silu {
        acc *= sigmoid_f32(acc);
    }
    y[b * y.stride(0) + c * y.stride(1)] = F::cast_from(acc);
}

/// SSD step, one thread per `(b, h, p)`, `p` fastest, looping over the state:
/// `dt = clamp(softplus(dt + dt_bias))`, `s' = exp(dt A) s + dt x B`, `y = C · s' + D x`.
#[cube(launch)]
fn ssd_step_kernel<F: Float>(
    x: &Tensor<F>,             // [batch, heads, head_dim]
    dt: &Tensor<F>,            // [batch, heads]
    a: &Tensor<f32>,           // [heads]
    bm: &Tensor<F>,            // [batch, groups, state]
    cm: &Tensor<F>,            // [batch, groups, state]
    d: &Tensor<f32>,           // [heads]
    dt_bias: &Tensor<f32>,     // [heads]
    state: &Tensor<F>,         // [batch, heads, head_dim, state]
    y: &mut Tensor<F>,         // [batch, heads, head_dim]
    new_state: &mut Tensor<F>, // [batch, heads, head_dim, state]
    dt_min: f32,
    dt_max: f32,
    #[comptime] clamp_min: bool,
    #[comptime] clamp_max: bool,
    #[define(F)] _dtype: StorageType,
) {
    let heads = y.shape(1);
    let head_dim = y.shape(2);
    let dstate = state.shape(3);
    if ABSOLUTE_POS >= y.shape(0) * heads * head_dim {
        terminate!();
    }
    let p = ABSOLUTE_POS % head_dim;
    let h = (ABSOLUTE_POS / head_dim) % heads;
    let b = ABSOLUTE_POS / (head_dim * heads);
    let g = h / (heads / bm.shape(1));

    let v = f32::cast_from(dt[b * dt.stride(0) + h * dt.stride(1)])
        + f32::cast_from(dt_bias[h * dt_bias.stride(0)]);
    let dtv = dt_activation(v, dt_min, dt_max, clamp_min, clamp_max);
    let da = (dtv * f32::cast_from(a[h * a.stride(0)])).exp();
    let xv = f32::cast_from(x[b * x.stride(0) + h * x.stride(1) + p * x.stride(2)]);
    let xdt = xv * dtv;

    let sbase = b * state.stride(0) + h * state.stride(1) + p * state.stride(2);
    let nbase = b * new_state.stride(0) + h * new_state.stride(1) + p * new_state.stride(2);
    let bbase = b * bm.stride(0) + g * bm.stride(1);
    let cbase = b * cm.stride(0) + g * cm.stride(1);
    let mut acc = 0.0f32;
    for i in 0..dstate {
        let s = f32::cast_from(state[sbase + i * state.stride(3)]) * da
            + xdt * f32::cast_from(bm[bbase + i * bm.stride(2)]);
        new_state[nbase + i * new_state.stride(3)] = F::cast_from(s);
        acc += s * f32::cast_from(cm[cbase + i * cm.stride(2)]);
    }
    acc += f32::cast_from(d[h * d.stride(0)]) * xv;
    y[b * y.stride(0) + h * y.stride(1) + p * y.stride(2)] = F::cast_from(acc);
}

/// Threads of a cube of the fused Mamba2 step.
const STEP_THREADS: usize = 128;
/// Rows `p` of the state a pass of the fused step's phase 2 takes.
const STEP_ROWS: usize = 16;
/// Threads that sum one row's products in the first stage (every thread takes part).
const SEGS: usize = STEP_THREADS / STEP_ROWS;
/// Row pitch of its shared products: the threads plus [`SEGS`], so that a warp's first-stage
/// reads (thread `(row, seg)` reads column `seg + SEGS j` of its row) fall in 32 different
/// banks, as do the stores (a row's consecutive columns).
const STEP_PITCH: usize = STEP_THREADS + SEGS;
/// Products each of them adds.
const SEG_LEN: usize = STEP_THREADS / SEGS;

/// The fused Mamba2 step, one cube per `(h, b)`. Phase 1: the conv step (with SiLU) for the
/// head's `head_dim` channels of `x` and its group's `2 · state` channels of `B` and `C`, read
/// from `proj` in place, into shared memory (f32); the new conv state is written by the cube that
/// owns a channel (its head for `x`, the group's first head for `B` and `C`: every cube of the
/// group reads the old state, so it goes to a fresh tensor). Thread 0 computes `dt` and
/// `exp(dt A)`. Phase 2: `s' = exp(dt A) s + dt x_p B`, `y_p = C · s' + D x_p`, written gated,
/// `y_p · silu(z_p)`, the threads across the state index `n` (coalesced; one thread a row `p`
/// walking `n` made every warp load touch 32 rows, ~9× off the bandwidth in the H100 profile of
/// batch-32 decoding), `C · s'` summed through shared memory a pass of [`STEP_ROWS`] rows.
///
/// The conv width, `head_dim` and `state` are comptime and both phases unrolled, and every global
/// read is unconditional (at a clamped index, its value dropped where it is past the end): a
/// read behind a branch waits for the branch, and in the H100 profile of the 7B shape's batch-1
/// decoding (2026-12-07) the step took 60 µs a layer, a round trip to memory per state row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn mamba2_step_kernel<F: Float, W: Float, Bs: Float>(
    proj: &Tensor<F>,                    // [batch, 2·d_mlp + I + conv_dim + heads]
    conv_state: &Tensor<F>,              // [batch, conv_dim, width - 1]
    conv_w: &Tensor<W>,                  // [conv_dim, width]
    conv_b: &ComptimeOption<Tensor<Bs>>, // [conv_dim]
    a: &Tensor<f32>,                     // [heads]
    d: &Tensor<f32>,                     // [heads]
    dt_bias: &Tensor<f32>,               // [heads]
    ssm_state: &Tensor<F>,               // [batch, heads, head_dim, state]
    y: &mut Tensor<F>,                   // [batch, I]
    new_conv: &mut Tensor<F>,            // [batch, conv_dim, width - 1]
    new_ssm: &mut Tensor<F>,             // [batch, heads, head_dim, state]
    dt_min: f32,
    dt_max: f32,
    #[comptime] head_dim: usize,
    #[comptime] dstate: usize,
    #[comptime] groups: usize,
    #[comptime] d_mlp: usize,
    #[comptime] width: usize,
    #[comptime] clamp_min: bool,
    #[comptime] clamp_max: bool,
    #[define(F, W, Bs)] _dtypes: [StorageType; 3],
) {
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let heads = ssm_state.shape(1);
    let inner = heads * head_dim;
    let gn = comptime!(groups * dstate);
    let conv_dim = inner + 2 * gn;
    let per_group = heads / groups;
    let g = h / per_group;
    let local = comptime!(head_dim + 2 * dstate);
    let u = UNIT_POS as usize;

    let mut xbc_s = SharedMemory::<f32>::new(local);
    let mut dt_s = SharedMemory::<f32>::new(2usize);
    let pbase = b * proj.stride(0);
    let ps = proj.stride(1);
    let xbc0 = 2 * d_mlp + inner;

    #[unroll]
    for it in 0..comptime!((local + STEP_THREADS - 1) / STEP_THREADS) {
        let lc = it * STEP_THREADS + u;
        let okl = lc < local;
        let lcc = select(okl, lc, 0);
        let is_x = lcc < head_dim;
        let j = select(is_x, 0, lcc - select(is_x, 0, head_dim)); // 0 .. 2·state: B, then C
        let ch = select(
            is_x,
            h * head_dim + lcc,
            inner + (j / dstate) * gn + g * dstate + (j % dstate),
        );
        let owner = okl && (is_x || h % per_group == 0);
        let mut acc = 0.0f32;
        #[comptime]
        if let ComptimeOption::Some(bias) = conv_b {
            acc = f32::cast_from(bias[ch * bias.stride(0)]);
        }
        let xv = proj[pbase + (xbc0 + ch) * ps];
        acc += conv_channel::<F, W>(conv_state, new_conv, conv_w, b, ch, xv, owner, width);
        if okl {
            xbc_s[lc] = acc * sigmoid_f32(acc);
        }
    }
    if u == 0 {
        let raw = f32::cast_from(proj[pbase + (xbc0 + conv_dim + h) * ps]);
        let dtv = dt_activation(
            raw + dt_bias[h * dt_bias.stride(0)],
            dt_min,
            dt_max,
            clamp_min,
            clamp_max,
        );
        dt_s[0] = dtv;
        dt_s[1] = (dtv * a[h * a.stride(0)]).exp();
    }
    sync_cube();

    let dtv = dt_s[0];
    let da = dt_s[1];
    let dh = d[h * d.stride(0)];
    // Phase 2 a pass of STEP_ROWS rows at a time: the threads walk the state index `n`
    // (contiguous in memory, so a warp's loads and stores are one stretch). A thread loads its
    // entries of all the pass's rows before it computes and stores any (the stores go to
    // another tensor, which the compiler cannot know, so loads issued after a store wait for
    // it): one memory latency a pass, not one a row, which is what a step at batch 1 waits on.
    // Each row's products `s'·C` are summed through shared memory in two stages: SEGS threads
    // a row add SEG_LEN partials each (columns SEGS apart), then one thread a row adds the SEGS
    // sums.
    let mut prod_s = SharedMemory::<f32>::new(comptime!(STEP_ROWS * STEP_PITCH));
    let mut seg_s = SharedMemory::<f32>::new(comptime!(STEP_ROWS * SEGS));
    let sb = b * ssm_state.stride(0) + h * ssm_state.stride(1);
    let nb = b * new_ssm.stride(0) + h * new_ssm.stride(1);
    let (s2, s3) = (ssm_state.stride(2), ssm_state.stride(3));
    let (n2, n3) = (new_ssm.stride(2), new_ssm.stride(3));
    let (ys0, ys1) = (y.stride(0), y.stride(1));
    #[unroll]
    for pass in 0..comptime!((head_dim + STEP_ROWS - 1) / STEP_ROWS) {
        let p0 = pass * STEP_ROWS;
        let mut part = Array::<f32>::new(STEP_ROWS);
        #[unroll]
        for r in 0..STEP_ROWS {
            part[r] = 0.0f32;
        }
        #[unroll]
        for k in 0..comptime!((dstate + STEP_THREADS - 1) / STEP_THREADS) {
            let n = k * STEP_THREADS + u;
            let okn = n < dstate;
            let nc = select(okn, n, 0);
            let mut old = Array::<f32>::new(STEP_ROWS);
            #[unroll]
            for r in 0..STEP_ROWS {
                let p = p0 + r;
                let ok = okn && p < head_dim;
                let v = f32::cast_from(ssm_state[sb + select(ok, p, 0) * s2 + nc * s3]);
                old[r] = select(ok, v, 0.0f32);
            }
            let bn = xbc_s[head_dim + nc] * dtv;
            let cn = xbc_s[head_dim + dstate + nc];
            #[unroll]
            for r in 0..STEP_ROWS {
                let p = p0 + r;
                let sv = old[r] * da + xbc_s[select(p < head_dim, p, 0)] * bn;
                if okn && p < head_dim {
                    new_ssm[nb + p * n2 + n * n3] = F::cast_from(sv);
                    part[r] += sv * cn;
                }
            }
        }
        #[unroll]
        for r in 0..STEP_ROWS {
            prod_s[r * STEP_PITCH + u] = part[r];
        }
        sync_cube();
        {
            let row = u / SEGS;
            let seg = u % SEGS;
            let mut t = 0.0f32;
            #[unroll]
            for j in 0..SEG_LEN {
                t += prod_s[row * STEP_PITCH + seg + j * SEGS];
            }
            seg_s[row * SEGS + seg] = t;
        }
        sync_cube();
        let p = p0 + u;
        if u < STEP_ROWS && p < head_dim {
            let mut acc = 0.0f32;
            #[unroll]
            for t in 0..SEGS {
                acc += seg_s[u * SEGS + t];
            }
            let xv = xbc_s[p];
            acc += dh * xv;
            let zv = f32::cast_from(proj[pbase + (2 * d_mlp + h * head_dim + p) * ps]);
            y[b * ys0 + (h * head_dim + p) * ys1] = F::cast_from(acc * zv * sigmoid_f32(zv));
        }
        sync_cube();
    }
}

/// Selective step, one thread per `(b, ch)`, channel fastest, looping over the state:
/// `s' = exp(dt A[ch]) s + dt u B`, `y = C · s' + D u` (`dt` already discretised).
#[cube(launch)]
fn selective_step_kernel<F: Float>(
    u: &Tensor<F>,             // [batch, channels]
    dt: &Tensor<F>,            // [batch, channels]
    a: &Tensor<F>,             // [channels, state]
    bm: &Tensor<F>,            // [batch, state]
    cm: &Tensor<F>,            // [batch, state]
    d: &Tensor<F>,             // [channels]
    state: &Tensor<F>,         // [batch, channels, state]
    y: &mut Tensor<F>,         // [batch, channels]
    new_state: &mut Tensor<F>, // [batch, channels, state]
    #[define(F)] _dtype: StorageType,
) {
    let channels = y.shape(1);
    let dstate = state.shape(2);
    if ABSOLUTE_POS >= y.shape(0) * channels {
        terminate!();
    }
    let ch = ABSOLUTE_POS % channels;
    let b = ABSOLUTE_POS / channels;

    let uv = f32::cast_from(u[b * u.stride(0) + ch * u.stride(1)]);
    let dtv = f32::cast_from(dt[b * dt.stride(0) + ch * dt.stride(1)]);
    let dtu = dtv * uv;
    let sbase = b * state.stride(0) + ch * state.stride(1);
    let nbase = b * new_state.stride(0) + ch * new_state.stride(1);
    let mut acc = 0.0f32;
    for i in 0..dstate {
        let ai = f32::cast_from(a[ch * a.stride(0) + i * a.stride(1)]);
        let s = (dtv * ai).exp() * f32::cast_from(state[sbase + i * state.stride(2)])
            + dtu * f32::cast_from(bm[b * bm.stride(0) + i * bm.stride(1)]);
        new_state[nbase + i * new_state.stride(2)] = F::cast_from(s);
        acc += s * f32::cast_from(cm[b * cm.stride(0) + i * cm.stride(1)]);
    }
    acc += f32::cast_from(d[ch * d.stride(0)]) * uv;
    y[b * y.stride(0) + ch * y.stride(1)] = F::cast_from(acc);
}

/// Kernel of [`crate::MambaBackend::causal_conv1d_step`]: `x` `[batch, channels]`, `state`
/// `[batch, channels, width - 1]`, `weight` `[channels, width]`, `bias` `[channels]`; returns `y`
/// `[batch, channels]` and the shifted state. Falls back to the reference on mixed dtypes and
/// for a width of 1 (no state).
pub fn causal_conv1d_step<R, F, I, BT>(
    x: BTensor<Cb<R, F, I, BT>, 2>,
    state: BTensor<Cb<R, F, I, BT>, 3>,
    weight: BTensor<Cb<R, F, I, BT>, 2>,
    bias: Option<BTensor<Cb<R, F, I, BT>, 1>>,
    silu: bool,
) -> Pair<R, F, I, BT, 2, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = x.dtype();
    let [batch, channels] = x.dims();
    let [_, width] = weight.dims();
    let same = state.dtype() == dtype
        && weight.dtype() == dtype
        && bias.as_ref().is_none_or(|b| b.dtype() == dtype);
    if !same || width < 2 || batch * channels == 0 {
        return crate::reference::causal_conv1d_step(x, state, weight, bias, silu);
    }
    let x = prim(x);
    let client = x.client.clone();
    let device = x.device.clone();
    let y = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([batch, channels]),
        dtype,
    );
    let new_state = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([batch, channels, width - 1]),
        dtype,
    );
    let (count, dim) = elemwise(&client, batch * channels);
    conv_step_kernel::launch::<R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        prim(state).into_tensor_arg(),
        prim(weight).into_tensor_arg(),
        bias.map(|b| prim(b).into_tensor_arg()).into(),
        y.clone().into_tensor_arg(),
        new_state.clone().into_tensor_arg(),
        width,
        silu,
        dtype.into(),
    );
    (wrap(y), wrap(new_state))
}

/// Kernel of [`crate::MambaBackend::ssd_step`]: returns `y` `[batch, heads, head_dim]` and the new
/// state `[batch, heads, head_dim, state]`. Falls back to the reference on mixed dtypes or when
/// the heads are not a multiple of the groups.
pub fn ssd_step<R, F, I, BT>(input: SsdStepInput<Cb<R, F, I, BT>>) -> Pair<R, F, I, BT, 3, 4>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.x.dtype();
    let [batch, heads, head_dim] = input.x.dims();
    let [_, groups, dstate] = input.b.dims();
    // The per-head parameters may be in any float dtype (read as f32).
    let same = [
        input.dt.dtype(),
        input.b.dtype(),
        input.c.dtype(),
        input.state.dtype(),
    ]
    .iter()
    .all(|&d| d == dtype);
    if !same || groups == 0 || heads % groups != 0 || batch * heads * head_dim == 0 {
        return crate::reference::ssd_step(input);
    }
    let SsdStepInput {
        x,
        dt,
        a,
        b,
        c,
        d,
        dt_bias,
        dt_limit: (lo, hi),
        state,
    } = input;
    let x = prim(x);
    let client = x.client.clone();
    let device = x.device.clone();
    let y = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([batch, heads, head_dim]),
        dtype,
    );
    let new_state = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([batch, heads, head_dim, dstate]),
        dtype,
    );
    let (count, dim) = elemwise(&client, batch * heads * head_dim);
    ssd_step_kernel::launch::<R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        prim(dt).into_tensor_arg(),
        prim(super::ssd::f32_of(a)).into_tensor_arg(),
        prim(b).into_tensor_arg(),
        prim(c).into_tensor_arg(),
        prim(super::ssd::f32_of(d)).into_tensor_arg(),
        prim(super::ssd::f32_of(dt_bias)).into_tensor_arg(),
        prim(state).into_tensor_arg(),
        y.clone().into_tensor_arg(),
        new_state.clone().into_tensor_arg(),
        lo as f32,
        if hi.is_finite() { hi as f32 } else { 0.0 },
        lo > 0.0,
        hi.is_finite(),
        dtype.into(),
    );
    (wrap(y), wrap(new_state))
}

/// Kernel of [`crate::MambaBackend::selective_step`]: `u`, `dt` (after bias and softplus)
/// `[batch, channels]`, `a` `[channels, state]`, `b`, `c` `[batch, state]`, `d` `[channels]`,
/// `state` `[batch, channels, state]`; returns `y` (with `D u`, before any gate) and the new
/// state. Falls back to the reference on mixed dtypes.
#[allow(clippy::too_many_arguments)]
pub fn selective_step<R, F, I, BT>(
    u: BTensor<Cb<R, F, I, BT>, 2>,
    dt: BTensor<Cb<R, F, I, BT>, 2>,
    a: BTensor<Cb<R, F, I, BT>, 2>,
    b: BTensor<Cb<R, F, I, BT>, 2>,
    c: BTensor<Cb<R, F, I, BT>, 2>,
    d: BTensor<Cb<R, F, I, BT>, 1>,
    state: BTensor<Cb<R, F, I, BT>, 3>,
) -> Pair<R, F, I, BT, 2, 3>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = u.dtype();
    let [batch, channels] = u.dims();
    let [_, dstate] = a.dims();
    let same = [
        dt.dtype(),
        a.dtype(),
        b.dtype(),
        c.dtype(),
        d.dtype(),
        state.dtype(),
    ]
    .iter()
    .all(|&t| t == dtype);
    if !same || batch * channels == 0 {
        return crate::reference::selective_step(u, dt, a, b, c, d, state);
    }
    let u = prim(u);
    let client = u.client.clone();
    let device = u.device.clone();
    let y = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([batch, channels]),
        dtype,
    );
    let new_state = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([batch, channels, dstate]),
        dtype,
    );
    let (count, dim) = elemwise(&client, batch * channels);
    selective_step_kernel::launch::<R>(
        &client,
        count,
        dim,
        u.into_tensor_arg(),
        prim(dt).into_tensor_arg(),
        prim(a).into_tensor_arg(),
        prim(b).into_tensor_arg(),
        prim(c).into_tensor_arg(),
        prim(d).into_tensor_arg(),
        prim(state).into_tensor_arg(),
        y.clone().into_tensor_arg(),
        new_state.clone().into_tensor_arg(),
        dtype.into(),
    );
    (wrap(y), wrap(new_state))
}

/// Kernel of [`crate::MambaBackend::mamba2_step`]: one launch for the conv step, the SSD step and
/// the gate, reading `z`, `xBC` and `dt` from `proj` in place. Falls back to the composed
/// reference ([`crate::reference::mamba2_step`]) when the dtypes of `proj` and the states differ,
/// the width is 1, the heads are not a multiple of the groups, or the shapes do not fit together.
/// The conv weight and bias are read in their stored dtypes, each its own.
pub fn mamba2_step<R, F, I, BT>(
    input: Mamba2StepInput<Cb<R, F, I, BT>>,
) -> Mamba2StepOutput<Cb<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.proj.dtype();
    let [batch, width_in] = input.proj.dims();
    let [_, heads, head_dim, dstate] = input.ssm_state.dims();
    let [_, conv_dim, wm1] = input.conv_state.dims();
    let [_, width] = input.conv_weight.dims();
    let groups = input.groups;
    let wdtype = input.conv_weight.dtype();
    let bdtype = input.conv_bias.as_ref().map_or(wdtype, |b| b.dtype());
    let inner = heads * head_dim;
    let fits = groups > 0
        && heads % groups == 0
        && conv_dim == inner + 2 * groups * dstate
        && width_in == 2 * input.d_mlp + inner + conv_dim + heads
        && width >= 2
        && wm1 == width - 1
        && input.conv_state.dtype() == dtype
        && input.ssm_state.dtype() == dtype
        && batch * heads > 0;
    if !fits {
        return crate::reference::mamba2_step(input);
    }
    let Mamba2StepInput {
        proj,
        d_mlp,
        groups,
        conv_state,
        conv_weight,
        conv_bias,
        a,
        d,
        dt_bias,
        dt_limit: (lo, hi),
        ssm_state,
    } = input;
    let proj = prim(proj);
    let client = proj.client.clone();
    let device = proj.device.clone();
    let empty =
        |shape: Shape| empty_device_contiguous_dtype(client.clone(), device.clone(), shape, dtype);
    let y = empty(Shape::new([batch, inner]));
    let new_conv = empty(Shape::new([batch, conv_dim, wm1]));
    let new_ssm = empty(Shape::new([batch, heads, head_dim, dstate]));
    mamba2_step_kernel::launch::<R>(
        &client,
        CubeCount::Static(heads as u32, batch as u32, 1),
        CubeDim::new_1d(STEP_THREADS as u32),
        proj.into_tensor_arg(),
        prim(conv_state).into_tensor_arg(),
        prim(conv_weight).into_tensor_arg(),
        conv_bias.map(|b| prim(b).into_tensor_arg()).into(),
        prim(super::ssd::f32_of(a)).into_tensor_arg(),
        prim(super::ssd::f32_of(d)).into_tensor_arg(),
        prim(super::ssd::f32_of(dt_bias)).into_tensor_arg(),
        prim(ssm_state).into_tensor_arg(),
        y.clone().into_tensor_arg(),
        new_conv.clone().into_tensor_arg(),
        new_ssm.clone().into_tensor_arg(),
        lo as f32,
        if hi.is_finite() { hi as f32 } else { 0.0 },
        head_dim,
        dstate,
        groups,
        d_mlp,
        width,
        lo > 0.0,
        hi.is_finite(),
        [dtype.into(), wdtype.into(), bdtype.into()],
    );
    Mamba2StepOutput {
        y: wrap(y),
        conv_state: wrap(new_conv),
        ssm_state: wrap(new_ssm),
    }
}

/// The fused Mamba2 step's CUDA C++ at the decode shapes (`super::offline`).
#[cfg(all(test, feature = "cuda", feature = "wgpu"))]
mod cuda_source {
    use super::super::offline::{client, emit, settings, tensor};
    use super::mamba2_step_kernel::Mamba2StepKernel;
    use cubecl::prelude::ComptimeOptionCompilationArg as Opt;
    use cubecl::prelude::*;

    #[test]
    #[ignore]
    fn emit_mamba2_step() {
        let client = client();
        let bf16: StorageType = burn::tensor::DType::BF16.into();
        let f32t: StorageType = burn::tensor::DType::F32.into();
        // (name, head_dim, state, groups, dtype of the activations and weights)
        for &(name, head_dim, dstate, groups, dt) in &[
            ("7b", 64usize, 128usize, 8usize, bf16),
            ("130m", 64, 128, 1, f32t),
        ] {
            let kernel = Mamba2StepKernel::<cubecl::wgpu::WgpuRuntime>::new(
                settings(super::STEP_THREADS as u32),
                client.clone(),
                tensor(),
                tensor(),
                tensor(),
                Opt::Some(tensor()),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                tensor(),
                (),
                (),
                head_dim,
                dstate,
                groups,
                0,
                4,
                false,
                false,
                [dt, dt, f32t],
            );
            emit(
                &format!("mamba2_step_{name}"),
                kernel,
                ExecutionMode::Checked,
            );
        }
    }
}

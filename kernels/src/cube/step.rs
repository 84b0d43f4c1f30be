//! One-token decode updates as cubecl kernels: the causal conv1d step, the SSD (Mamba2) step and
//! the selective-scan (Mamba1) step.
//!
//! Each is one launch with one thread per output row (the state's last axis is looped over in
//! the thread), every tensor indexed through its strides and every sum accumulated in f32. The
//! new state is written to a fresh tensor (the inputs are left untouched).

use super::ssd::dt_activation;
use super::{elemwise, prim, wrap};
use burn::tensor::{Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::SsdStepInput;

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// An output and a new state.
type Pair<R, F, I, BT, const Y: usize, const S: usize> =
    (BTensor<Cb<R, F, I, BT>, Y>, BTensor<Cb<R, F, I, BT>, S>);

/// `sigmoid(v)` in f32.
#[cube]
fn sigmoid_f32(v: f32) -> f32 {
    1.0f32 / (1.0f32 + (-v).exp())
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
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = y.shape(1);
    if ABSOLUTE_POS >= y.shape(0) * channels {
        terminate!();
    }
    let c = ABSOLUTE_POS % channels;
    let b = ABSOLUTE_POS / channels;
    let wm1 = weight.shape(1) - 1;

    let mut acc = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(bias) = bias {
        acc = f32::cast_from(bias[c * bias.stride(0)]);
    }
    let sbase = b * state.stride(0) + c * state.stride(1);
    let nbase = b * new_state.stride(0) + c * new_state.stride(1);
    for k in 0..wm1 {
        let s = state[sbase + k * state.stride(2)];
        acc +=
            f32::cast_from(weight[c * weight.stride(0) + k * weight.stride(1)]) * f32::cast_from(s);
        if k >= 1 {
            new_state[nbase + (k - 1) * new_state.stride(2)] = s;
        }
    }
    let xv = x[b * x.stride(0) + c * x.stride(1)];
    acc +=
        f32::cast_from(weight[c * weight.stride(0) + wm1 * weight.stride(1)]) * f32::cast_from(xv);
    if wm1 >= 1 {
        new_state[nbase + (wm1 - 1) * new_state.stride(2)] = xv;
    }
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

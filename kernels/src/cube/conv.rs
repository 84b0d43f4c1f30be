//! Causal depthwise conv1d as cubecl kernels: forward (with fused SiLU and the final state) and
//! backward (input, weight, bias and initial-state gradients).
//!
//! Layout: `x` is `[batch, seq, channels]` (any strides: every kernel indexes through the
//! tensor's strides, so narrowed views of the input projection are read in place), the weight
//! `[channels, width]`, the states `[batch, channels, width - 1]`. Threads are laid out with the
//! channel fastest, so neighbouring threads read neighbouring channels (coalesced for the
//! natural layout). Every sum is accumulated in f32 whatever the storage type.
//!
//! It helps to think of the "extended" input `ext = cat(initial_state, x)` along the sequence,
//! `[batch, seq + width - 1, channels]`: `y[t] = sum_k w[k] * ext[t + k]` and the final state is
//! the last `width - 1` rows of `ext`. [`ext_value`] reads `ext` without materialising it.

use super::{elemwise, prim, wrap};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::{ConvGrads, ConvInput, ConvOutput};

/// Positions each thread of the weight-gradient kernel reduces over; the partial sums of the
/// `batch * ceil(seq / WGRAD_CHUNK)` pieces are then summed with a tensor op.
const WGRAD_CHUNK: usize = 32;

/// `ext[b, j, c]` for `j` in `0..seq + width - 1`: the initial state (or zero) for
/// `j < width - 1`, else `x[b, j - (width - 1), c]`.
#[cube]
fn ext_value<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    b: usize,
    j: usize,
    c: usize,
    wm1: usize,
) -> f32 {
    let mut v = 0.0f32;
    if j >= wm1 {
        v = f32::cast_from(x[b * x.stride(0) + (j - wm1) * x.stride(1) + c * x.stride(2)]);
    } else {
        #[comptime]
        if let ComptimeOption::Some(init) = init {
            v = f32::cast_from(init[b * init.stride(0) + c * init.stride(1) + j * init.stride(2)]);
        }
    }
    v
}

/// The pre-activation `bias[c] + sum_k w[c, k] * ext[b, t + k, c]`, in f32.
#[cube]
fn pre_activation<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    b: usize,
    t: usize,
    c: usize,
) -> f32 {
    let width = weight.shape(1);
    let wm1 = width - 1;
    let mut acc = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(bias) = bias {
        acc = f32::cast_from(bias[c * bias.stride(0)]);
    }
    for k in 0..width {
        let w = f32::cast_from(weight[c * weight.stride(0) + k * weight.stride(1)]);
        acc += w * ext_value::<F>(x, init, b, t + k, c, wm1);
    }
    acc
}

/// `sigmoid(z)` in f32.
#[cube]
fn sigmoid_f32(z: f32) -> f32 {
    1.0f32 / (1.0f32 + (-z).exp())
}

/// Forward: one thread per output element `(b, t, c)`, channel fastest.
#[cube(launch)]
fn conv_forward_kernel<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    y: &mut Tensor<F>,                // [batch, seq, channels]
    #[comptime] silu: bool,
    #[define(F)] _dtype: StorageType,
) {
    let channels = y.shape(2);
    let seqlen = y.shape(1);
    let total = y.shape(0) * seqlen * channels;
    if ABSOLUTE_POS >= total {
        terminate!();
    }
    let c = ABSOLUTE_POS % channels;
    let t = (ABSOLUTE_POS / channels) % seqlen;
    let b = ABSOLUTE_POS / (channels * seqlen);

    let mut v = pre_activation::<F>(x, weight, bias, init, b, t, c);
    if silu {
        v *= sigmoid_f32(v);
    }
    y[b * y.stride(0) + t * y.stride(1) + c * y.stride(2)] = F::cast_from(v);
}

/// Final state: one thread per `(b, c, i)`, `state[b, c, i] = ext[b, seq + i, c]`.
#[cube(launch)]
fn conv_final_state_kernel<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    state: &mut Tensor<F>,            // [batch, channels, width - 1]
    #[define(F)] _dtype: StorageType,
) {
    let wm1 = state.shape(2);
    let channels = state.shape(1);
    let total = state.shape(0) * channels * wm1;
    if ABSOLUTE_POS >= total {
        terminate!();
    }
    let i = ABSOLUTE_POS % wm1;
    let c = (ABSOLUTE_POS / wm1) % channels;
    let b = ABSOLUTE_POS / (wm1 * channels);
    let v = ext_value::<F>(x, init, b, x.shape(1) + i, c, wm1);
    state[b * state.stride(0) + c * state.stride(1) + i * state.stride(2)] = F::cast_from(v);
}

/// Backward, step 1: the gradient at the pre-activation, `g = dy * silu'(pre)`, recomputing
/// `pre`. One thread per `(b, t, c)`; `g` is contiguous `[batch, seq, channels]` in f32.
#[cube(launch)]
fn conv_grad_pre_kernel<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    dy: &Tensor<F>,                   // [batch, seq, channels]
    g: &mut Tensor<f32>,              // [batch, seq, channels]
    #[define(F)] _dtype: StorageType,
) {
    let channels = g.shape(2);
    let seqlen = g.shape(1);
    let total = g.shape(0) * seqlen * channels;
    if ABSOLUTE_POS >= total {
        terminate!();
    }
    let c = ABSOLUTE_POS % channels;
    let t = (ABSOLUTE_POS / channels) % seqlen;
    let b = ABSOLUTE_POS / (channels * seqlen);

    let z = pre_activation::<F>(x, weight, bias, init, b, t, c);
    let s = sigmoid_f32(z);
    let d = f32::cast_from(dy[b * dy.stride(0) + t * dy.stride(1) + c * dy.stride(2)]);
    // d/dz (z * s(z)) = s (1 + z (1 - s))
    g[b * g.stride(0) + t * g.stride(1) + c * g.stride(2)] = d * s * (1.0f32 + z * (1.0f32 - s));
}

/// Backward, step 2: the gradient of `ext`, `dext[b, j, c] = sum_k g[b, j - k, c] w[c, k]`
/// over `0 <= j - k < seq`. One thread per `(b, j, c)` for `j` in `0..seq + width - 1`: rows
/// `j >= width - 1` go to `dx`, the first `width - 1` to `dinit` (`[batch, channels, width-1]`).
#[cube(launch)]
fn conv_grad_input_kernel<F: Float, G: Float>(
    g: &Tensor<G>,         // [batch, seq, channels]
    weight: &Tensor<F>,    // [channels, width]
    dx: &mut Tensor<F>,    // [batch, seq, channels]
    dinit: &mut Tensor<F>, // [batch, channels, width - 1]
    #[define(F, G)] _dtypes: [StorageType; 2],
) {
    let channels = dx.shape(2);
    let seqlen = dx.shape(1);
    let width = weight.shape(1);
    let wm1 = width - 1;
    let ext_len = seqlen + wm1;
    let total = dx.shape(0) * ext_len * channels;
    if ABSOLUTE_POS >= total {
        terminate!();
    }
    let c = ABSOLUTE_POS % channels;
    let j = (ABSOLUTE_POS / channels) % ext_len;
    let b = ABSOLUTE_POS / (channels * ext_len);

    let mut acc = 0.0f32;
    for k in 0..width {
        // t = j - k must lie in 0..seq
        if j >= k && j - k < seqlen {
            let t = j - k;
            let w = f32::cast_from(weight[c * weight.stride(0) + k * weight.stride(1)]);
            acc += w * f32::cast_from(g[b * g.stride(0) + t * g.stride(1) + c * g.stride(2)]);
        }
    }
    if j >= wm1 {
        dx[b * dx.stride(0) + (j - wm1) * dx.stride(1) + c * dx.stride(2)] = F::cast_from(acc);
    } else {
        dinit[b * dinit.stride(0) + c * dinit.stride(1) + j * dinit.stride(2)] = F::cast_from(acc);
    }
}

/// Backward, step 3: partial sums of the weight and bias gradients. One thread per
/// `(piece, c)`, a piece being `WGRAD_CHUNK` positions of one batch row:
/// `dw_part[piece, c, k] = sum_t g[b, t, c] ext[b, t + k, c]`, `db_part[piece, c] = sum_t g`.
#[cube(launch)]
fn conv_grad_weight_kernel<F: Float, G: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    g: &Tensor<G>,                    // [batch, seq, channels]
    dw_part: &mut Tensor<f32>,        // [pieces, channels, width]
    db_part: &mut Tensor<f32>,        // [pieces, channels]
    #[comptime] chunk: usize,
    #[define(F, G)] _dtypes: [StorageType; 2],
) {
    let channels = dw_part.shape(1);
    let width = dw_part.shape(2);
    let wm1 = width - 1;
    let pieces = dw_part.shape(0);
    let seqlen = g.shape(1);
    if ABSOLUTE_POS >= pieces * channels {
        terminate!();
    }
    let c = ABSOLUTE_POS % channels;
    let piece = ABSOLUTE_POS / channels;
    let per_row = pieces / g.shape(0); // max(ceil(seq / chunk), 1)
    let b = piece / per_row;
    let t0 = (piece % per_row) * chunk;
    let mut t1 = t0 + chunk;
    if t1 > seqlen {
        t1 = seqlen;
    }

    let mut db = 0.0f32;
    for t in t0..t1 {
        db += f32::cast_from(g[b * g.stride(0) + t * g.stride(1) + c * g.stride(2)]);
    }
    db_part[piece * db_part.stride(0) + c * db_part.stride(1)] = db;

    for k in 0..width {
        let mut acc = 0.0f32;
        for t in t0..t1 {
            let gv = f32::cast_from(g[b * g.stride(0) + t * g.stride(1) + c * g.stride(2)]);
            acc += gv * ext_value::<F>(x, init, b, t + k, c, wm1);
        }
        dw_part[piece * dw_part.stride(0) + c * dw_part.stride(1) + k * dw_part.stride(2)] = acc;
    }
}

/// Whether every tensor of the conv shares `x`'s float dtype (the kernels take one dtype).
fn same_dtype<B: Backend>(input: &ConvInput<B>) -> bool {
    let dt = input.x.dtype();
    input.weight.dtype() == dt
        && input.bias.as_ref().is_none_or(|b| b.dtype() == dt)
        && input.initial_state.as_ref().is_none_or(|s| s.dtype() == dt)
}

/// Kernel forward of [`crate::MambaBackend::causal_conv1d`].
pub fn causal_conv1d<R, F, I, BT>(
    input: ConvInput<CubeBackend<R, F, I, BT>>,
) -> ConvOutput<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !same_dtype(&input) || input.weight.dims()[1] < 1 {
        return crate::reference::causal_conv1d(input);
    }
    let ConvInput {
        x,
        weight,
        bias,
        initial_state,
        silu,
    } = input;
    let [batch, seqlen, channels] = x.dims();
    let [_, width] = weight.dims();
    let x = prim(x); // [batch, seq, channels]
    let weight = prim(weight); // [channels, width]
    let bias = bias.map(prim); // [channels]
    let init = initial_state.map(prim); // [batch, channels, width - 1]
    let client = x.client.clone();
    let device = x.device.clone();
    let dtype = x.dtype;

    let y = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([batch, seqlen, channels]),
        dtype,
    );
    let n = batch * seqlen * channels;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        conv_forward_kernel::launch::<R>(
            &client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            weight.into_tensor_arg(),
            bias.map(|t| t.into_tensor_arg()).into(),
            init.clone().map(|t| t.into_tensor_arg()).into(),
            y.clone().into_tensor_arg(),
            silu,
            dtype.into(),
        );
    }

    let state = empty_device_contiguous_dtype(
        client.clone(),
        device,
        Shape::new([batch, channels, width - 1]),
        dtype,
    );
    let n = batch * channels * (width - 1);
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        conv_final_state_kernel::launch::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            init.map(|t| t.into_tensor_arg()).into(),
            state.clone().into_tensor_arg(),
            dtype.into(),
        );
    }

    ConvOutput {
        y: wrap(y),
        final_state: wrap(state),
    }
}

/// Kernel backward of [`crate::MambaBackend::causal_conv1d_backward`].
pub fn causal_conv1d_backward<R, F, I, BT>(
    input: ConvInput<CubeBackend<R, F, I, BT>>,
    dy: BTensor<CubeBackend<R, F, I, BT>, 3>,
) -> ConvGrads<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !same_dtype(&input) || dy.dtype() != input.x.dtype() || input.weight.dims()[1] < 1 {
        return crate::reference::causal_conv1d_backward(input, dy);
    }
    let ConvInput {
        x,
        weight,
        bias,
        initial_state,
        silu,
    } = input;
    let [batch, seqlen, channels] = x.dims();
    let [_, width] = weight.dims();
    let has_bias = bias.is_some();
    let has_init = initial_state.is_some();
    let x = prim(x); // [batch, seq, channels]
    let weight = prim(weight); // [channels, width]
    let bias = bias.map(prim); // [channels]
    let init = initial_state.map(prim); // [batch, channels, width - 1]
    let dy = prim(dy); // [batch, seq, channels]
    let client = x.client.clone();
    let device = x.device.clone();
    let dtype = x.dtype;
    let f32_dtype = burn::tensor::DType::F32;

    // g: the gradient at the pre-activation; dy itself without SiLU.
    let g = if silu {
        let g = empty_device_contiguous_dtype(
            client.clone(),
            device.clone(),
            Shape::new([batch, seqlen, channels]),
            f32_dtype,
        );
        let n = batch * seqlen * channels;
        if n > 0 {
            let (count, dim) = elemwise(&client, n);
            conv_grad_pre_kernel::launch::<R>(
                &client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                weight.clone().into_tensor_arg(),
                bias.map(|t| t.into_tensor_arg()).into(),
                init.clone().map(|t| t.into_tensor_arg()).into(),
                dy.into_tensor_arg(),
                g.clone().into_tensor_arg(),
                dtype.into(),
            );
        }
        g
    } else {
        dy
    };
    let g_dtype = g.dtype;

    // dx and dinit
    let dx = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([batch, seqlen, channels]),
        dtype,
    );
    let dinit = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([batch, channels, width - 1]),
        dtype,
    );
    let n = batch * (seqlen + width - 1) * channels;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        conv_grad_input_kernel::launch::<R>(
            &client,
            count,
            dim,
            g.clone().into_tensor_arg(),
            weight.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            dinit.clone().into_tensor_arg(),
            [dtype.into(), g_dtype.into()],
        );
    }

    // dweight and dbias: partial sums per piece, then a sum over pieces.
    let pieces = batch * seqlen.div_ceil(WGRAD_CHUNK).max(1);
    let dw_part = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([pieces, channels, width]),
        f32_dtype,
    );
    let db_part = empty_device_contiguous_dtype(
        client.clone(),
        device.clone(),
        Shape::new([pieces, channels]),
        f32_dtype,
    );
    let n = pieces * channels;
    if n > 0 {
        let (count, dim) = elemwise(&client, n);
        conv_grad_weight_kernel::launch::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            init.map(|t| t.into_tensor_arg()).into(),
            g.into_tensor_arg(),
            dw_part.clone().into_tensor_arg(),
            db_part.clone().into_tensor_arg(),
            WGRAD_CHUNK,
            [dtype.into(), g_dtype.into()],
        );
    }
    let dweight: BTensor<CubeBackend<R, F, I, BT>, 3> = wrap(dw_part);
    let dweight = dweight.sum_dim(0).reshape([channels, width]).cast(dtype);
    let dbias: BTensor<CubeBackend<R, F, I, BT>, 2> = wrap(db_part);
    let dbias = dbias.sum_dim(0).reshape([channels]).cast(dtype);

    ConvGrads {
        x: wrap(dx),
        weight: dweight,
        bias: has_bias.then_some(dbias),
        initial_state: has_init.then(|| wrap(dinit)),
    }
}

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

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use super::{elemwise, prim, wrap};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::{ConvGrads, ConvInput, ConvOutput};

/// Positions one thread of the conv kernels covers (a block of one channel of one batch row):
/// it slides a window of `width` inputs along them, so every input is read once plus a halo of
/// `width - 1`, and the backward's weight and bias gradients come out as one partial sum per
/// block (summed over blocks with a tensor op).
const BLOCK: usize = 32;

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

/// `sigmoid(z)` in f32.
#[cube]
fn sigmoid_f32(z: f32) -> f32 {
    1.0f32 / (1.0f32 + (-z).exp())
}

/// The weights of channel `c` and its bias (zero without one), in f32.
#[cube]
fn channel_weights<F: Float>(
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    c: usize,
    #[comptime] width: usize,
) -> (Array<f32>, f32) {
    let mut w = Array::<f32>::new(width);
    #[unroll]
    for k in 0..width {
        w[k] = f32::cast_from(weight[c * weight.stride(0) + k * weight.stride(1)]);
    }
    let mut bv = 0.0f32;
    #[comptime]
    if let ComptimeOption::Some(bias) = bias {
        bv = f32::cast_from(bias[c * bias.stride(0)]);
    }
    (w, bv)
}

/// `(b, block, c)` of a thread of the blocked kernels, channel fastest (`b` may be past the
/// batch for the last cube's spare threads), and the block's positions `t0 .. t1`.
#[cube]
fn block_coords(seqlen: usize, channels: usize) -> (usize, usize, usize, usize, usize) {
    let nblocks = (seqlen + BLOCK - 1) / BLOCK;
    let c = ABSOLUTE_POS % channels;
    let tb = (ABSOLUTE_POS / channels) % nblocks;
    let b = ABSOLUTE_POS / (channels * nblocks);
    let t0 = tb * BLOCK;
    let mut t1 = t0 + BLOCK;
    if t1 > seqlen {
        t1 = seqlen;
    }
    (b, tb, c, t0, t1)
}

/// Forward: one thread per `(b, block of BLOCK positions, c)`, channel fastest. The window
/// `win[k] = ext[t + k]` slides along the block: each step reads one new input.
#[cube(launch)]
fn conv_forward_kernel<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    y: &mut Tensor<F>,                // [batch, seq, channels]
    #[comptime] silu: bool,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = y.shape(0);
    let seqlen = y.shape(1);
    let channels = y.shape(2);
    let (b, _, c, t0, t1) = block_coords(seqlen, channels);
    if b >= batch {
        terminate!();
    }
    let wm1 = comptime!(width - 1);
    let wm1r = width.runtime() - 1;
    let (w, bv) = channel_weights::<F>(weight, bias, c, width);
    let mut win = Array::<f32>::new(width);
    #[unroll]
    for k in 0..wm1 {
        win[k] = ext_value::<F>(x, init, b, t0 + k, c, wm1r);
    }
    for t in t0..t1 {
        win[wm1] = f32::cast_from(x[b * x.stride(0) + t * x.stride(1) + c * x.stride(2)]);
        let mut v = bv;
        #[unroll]
        for k in 0..width {
            v += w[k] * win[k];
        }
        if silu {
            v *= sigmoid_f32(v);
        }
        y[b * y.stride(0) + t * y.stride(1) + c * y.stride(2)] = F::cast_from(v);
        #[unroll]
        for k in 0..wm1 {
            win[k] = win[k + 1];
        }
    }
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

/// Backward, fused: one thread per `(b, block, c)`, channel fastest. Positions `u` from the
/// block's start to `width - 1` past its end: the gradient at the pre-activation
/// `g[u] = dy[u] silu'(pre[u])` (recomputing `pre` from the sliding input window; zero past the
/// sequence), then `dx[s] = Σ_k w[k] g[s + width - 1 - k]` for `s = u - (width - 1)` once it is
/// inside the block, or `dinit[u]` for `u < width - 1` (the first block: the gradient of
/// `ext[u]`, the initial state's). The block's own positions add `g[u] ext[u + k]` to its
/// weight-gradient partial and `g[u]` to its bias partial.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn conv_backward_kernel<F: Float>(
    x: &Tensor<F>,                    // [batch, seq, channels]
    weight: &Tensor<F>,               // [channels, width]
    bias: &ComptimeOption<Tensor<F>>, // [channels]
    init: &ComptimeOption<Tensor<F>>, // [batch, channels, width - 1]
    dy: &Tensor<F>,                   // [batch, seq, channels]
    dx: &mut Tensor<F>,               // [batch, seq, channels]
    dinit: &mut Tensor<F>,            // [batch, channels, width - 1]
    dw_part: &mut Tensor<f32>,        // [batch · blocks, channels, width]
    db_part: &mut Tensor<f32>,        // [batch · blocks, channels]
    #[comptime] silu: bool,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = dx.shape(0);
    let seqlen = dx.shape(1);
    let channels = dx.shape(2);
    let (b, tb, c, t0, t1) = block_coords(seqlen, channels);
    if b >= batch {
        terminate!();
    }
    let wm1 = comptime!(width - 1);
    let wm1r = width.runtime() - 1;
    let nblocks = (seqlen + BLOCK - 1) / BLOCK;
    let (w, bv) = channel_weights::<F>(weight, bias, c, width);
    // win[k] = ext[u + k], gw[k] = g[u - wm1 + k] (zero before the block).
    let mut win = Array::<f32>::new(width);
    let mut gw = Array::<f32>::new(width);
    let mut dw = Array::<f32>::new(width);
    #[unroll]
    for k in 0..width {
        win[k] = 0.0f32;
        gw[k] = 0.0f32;
        dw[k] = 0.0f32;
    }
    #[unroll]
    for k in 0..wm1 {
        win[k] = ext_value::<F>(x, init, b, t0 + k, c, wm1r);
    }
    let mut db = 0.0f32;
    for u in t0..t1 + wm1r {
        let mut gu = 0.0f32;
        if u < seqlen {
            win[wm1] = f32::cast_from(x[b * x.stride(0) + u * x.stride(1) + c * x.stride(2)]);
            let d = f32::cast_from(dy[b * dy.stride(0) + u * dy.stride(1) + c * dy.stride(2)]);
            gu = d;
            if silu {
                let mut z = bv;
                #[unroll]
                for k in 0..width {
                    z += w[k] * win[k];
                }
                let s = sigmoid_f32(z);
                // d/dz (z s(z)) = s (1 + z (1 - s))
                gu = d * s * (1.0f32 + z * (1.0f32 - s));
            }
            if u < t1 {
                db += gu;
                #[unroll]
                for k in 0..width {
                    dw[k] += gu * win[k];
                }
            }
        }
        gw[wm1] = gu;
        // dext[u] = Σ_k w[k] g[u - k]: dx[u - wm1] inside the block, the initial state's
        // gradient for u < wm1 (first block only).
        let mut acc = 0.0f32;
        #[unroll]
        for k in 0..width {
            acc += w[k] * gw[wm1 - k];
        }
        if u >= t0 + wm1r {
            let s = u - wm1r;
            dx[b * dx.stride(0) + s * dx.stride(1) + c * dx.stride(2)] = F::cast_from(acc);
        } else if u < wm1r {
            dinit[b * dinit.stride(0) + c * dinit.stride(1) + u * dinit.stride(2)] =
                F::cast_from(acc);
        }
        #[unroll]
        for k in 0..wm1 {
            win[k] = win[k + 1];
            gw[k] = gw[k + 1];
        }
    }

    let piece = b * nblocks + tb;
    #[unroll]
    for k in 0..width {
        dw_part[piece * dw_part.stride(0) + c * dw_part.stride(1) + k * dw_part.stride(2)] = dw[k];
    }
    db_part[piece * db_part.stride(0) + c * db_part.stride(1)] = db;
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
    let n = batch * seqlen.div_ceil(BLOCK) * channels;
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
            width,
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
    if !same_dtype(&input)
        || dy.dtype() != input.x.dtype()
        || input.weight.dims()[1] < 1
        // The kernel's initial-state gradient assumes it all lies in the first block.
        || input.weight.dims()[1] > BLOCK
        || input.x.dims()[1] == 0
    {
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
    let pieces = batch * seqlen.div_ceil(BLOCK);
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
        conv_backward_kernel::launch::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            bias.map(|t| t.into_tensor_arg()).into(),
            init.map(|t| t.into_tensor_arg()).into(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            dinit.clone().into_tensor_arg(),
            dw_part.clone().into_tensor_arg(),
            db_part.clone().into_tensor_arg(),
            silu,
            width,
            dtype.into(),
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

//! The cross-entropy of [`crate::loss`] as one kernel each way.
//!
//! One cube of [`THREADS`] per row of logits (a token's `[vocab]` scores): forward, the threads
//! stride over the vocabulary keeping a running max and a sum of exponentials shifted by it (the
//! online log-sum-exp), the cube merges the pairs in shared memory, and one thread writes the
//! row's log-sum-exp and its NLL; backward, the threads stride over the row again and write
//! `dnll · (exp(logit − lse) − [j = label])`. Logits are read in their own dtype through their
//! strides, all math is f32, the gradient is written contiguous in the logits' dtype. Labels
//! reach the kernels as f32 (exact for ids below 2^24), a negative one meaning ignored.

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use super::{prim, wrap};
use burn::tensor::{DType, Int, Shape, Tensor as BTensor};
use burn_cubecl::{
    element::BoolElement, ops::numeric::empty_device_contiguous_dtype, CubeBackend, CubeRuntime,
    FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::loss::{nll_backward_reference, nll_forward_reference};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Two `[n]` tensors: each row's NLL and its log-sum-exp.
type RowPair<R, F, I, BT> = (BTensor<Cb<R, F, I, BT>, 1>, BTensor<Cb<R, F, I, BT>, 1>);

/// Threads per cube (a power of two: the shared merge halves it [`LOG2_THREADS`] times).
const THREADS: u32 = 256;
const LOG2_THREADS: u32 = 8;
/// The largest grid dimension every runtime takes (wgpu's limit).
const MAX_GRID: usize = 65_535;

#[cube]
fn row_index() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

#[cube(launch)]
fn nll_forward_kernel<F: Float>(
    logits: &Tensor<F>,    // [n, vocab]
    labels: &Tensor<f32>,  // [n]
    nll: &mut Tensor<f32>, // [n]
    lse: &mut Tensor<f32>, // [n]
    #[define(F)] _dtype: StorageType,
) {
    let row = row_index();
    if row >= nll.len() {
        terminate!();
    }
    let vocab = logits.shape(1);
    let base = row * logits.stride(0);
    let step = logits.stride(1);
    let u = UNIT_POS as usize;
    // Below every finite logit: `exp(start − v)` is 0 without the `inf − inf` an infinite
    // start would give when two empty slots merge.
    let mut m = f32::new(-3.0e38);
    let mut s = 0.0f32;
    let rounds = (vocab + THREADS as usize - 1) / THREADS as usize;
    for k in 0..rounds {
        let j = k * THREADS as usize + u;
        if j < vocab {
            let v = f32::cast_from(logits[base + j * step]);
            if v > m {
                s = s * (m - v).exp() + 1.0f32;
                m = v;
            } else {
                s += (v - m).exp();
            }
        }
    }
    let mut sm = SharedMemory::<f32>::new(THREADS as usize);
    let mut ss = SharedMemory::<f32>::new(THREADS as usize);
    sm[u] = m;
    ss[u] = s;
    sync_cube();
    let mut half = (THREADS as usize / 2).runtime();
    for _ in 0..LOG2_THREADS {
        if u < half {
            let m1 = sm[u];
            let m2 = sm[u + half];
            let mut mm = m2;
            if m1 > m2 {
                mm = m1;
            }
            ss[u] = ss[u] * (m1 - mm).exp() + ss[u + half] * (m2 - mm).exp();
            sm[u] = mm;
        }
        sync_cube();
        half /= 2;
    }
    if u == 0 {
        let l = sm[0] + ss[0].ln();
        lse[row] = l;
        let lab = labels[row * labels.stride(0)];
        let mut out = 0.0f32;
        if lab >= 0.0f32 {
            let li = u32::cast_from(lab) as usize;
            if li < vocab {
                out = l - f32::cast_from(logits[base + li * step]);
            }
        }
        nll[row] = out;
    }
}

#[cube(launch)]
fn nll_backward_kernel<F: Float>(
    logits: &Tensor<F>,   // [n, vocab]
    labels: &Tensor<f32>, // [n]
    lse: &Tensor<f32>,    // [n]
    dnll: &Tensor<f32>,   // [n]
    out: &mut Tensor<F>,  // [n, vocab], contiguous
    #[define(F)] _dtype: StorageType,
) {
    let row = row_index();
    let n = out.shape(0);
    if row >= n {
        terminate!();
    }
    let vocab = out.shape(1);
    let base = row * logits.stride(0);
    let step = logits.stride(1);
    let lab = labels[row * labels.stride(0)];
    let mut g = 0.0f32;
    let mut li = vocab;
    if lab >= 0.0f32 {
        g = dnll[row * dnll.stride(0)];
        li = u32::cast_from(lab) as usize;
    }
    let l = lse[row * lse.stride(0)];
    let u = UNIT_POS as usize;
    let rounds = (vocab + THREADS as usize - 1) / THREADS as usize;
    for k in 0..rounds {
        let j = k * THREADS as usize + u;
        if j < vocab {
            let mut p = (f32::cast_from(logits[base + j * step]) - l).exp();
            if j == li {
                p -= 1.0f32;
            }
            out[row * vocab + j] = F::cast_from(p * g);
        }
    }
}

fn grid(n: usize) -> (CubeCount, CubeDim) {
    let x = n.clamp(1, MAX_GRID);
    (
        CubeCount::Static(x as u32, n.div_ceil(x).max(1) as u32, 1),
        CubeDim::new_1d(THREADS),
    )
}

fn applies<B: burn::tensor::backend::Backend>(logits: &BTensor<B, 2>) -> bool {
    let [_, vocab] = logits.dims();
    vocab > 0 && matches!(logits.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// The labels as the kernels read them: f32 ids, negative where ignored.
fn f32_labels<B: burn::tensor::backend::Backend>(labels: BTensor<B, 1, Int>) -> BTensor<B, 1> {
    let l = labels.float();
    if l.dtype() == DType::F32 {
        l
    } else {
        l.cast(DType::F32)
    }
}

fn f32_of<B: burn::tensor::backend::Backend>(t: BTensor<B, 1>) -> BTensor<B, 1> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// Kernel of [`crate::MambaBackend::nll_forward`]: `(nll, lse)`, `[n]` f32 each.
pub fn nll_forward<R, F, I, BT>(
    logits: BTensor<Cb<R, F, I, BT>, 2>,
    labels: BTensor<Cb<R, F, I, BT>, 1, Int>,
) -> RowPair<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !applies(&logits) {
        return nll_forward_reference(logits, labels);
    }
    let [n, _] = logits.dims();
    let labels = prim(f32_labels(labels));
    let logits = prim(logits);
    let dtype = logits.dtype;
    let (client, device) = (logits.client.clone(), logits.device.clone());
    let out = || {
        empty_device_contiguous_dtype(client.clone(), device.clone(), Shape::new([n]), DType::F32)
    };
    let (nll, lse) = (out(), out());
    if n > 0 {
        let (count, dim) = grid(n);
        nll_forward_kernel::launch::<R>(
            &client,
            count,
            dim,
            logits.into_tensor_arg(),
            labels.into_tensor_arg(),
            nll.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    (wrap(nll), wrap(lse))
}

/// Kernel of [`crate::MambaBackend::nll_backward`]: `dlogits` `[n, vocab]` in the logits' dtype.
pub fn nll_backward<R, F, I, BT>(
    logits: BTensor<Cb<R, F, I, BT>, 2>,
    labels: BTensor<Cb<R, F, I, BT>, 1, Int>,
    lse: BTensor<Cb<R, F, I, BT>, 1>,
    dnll: BTensor<Cb<R, F, I, BT>, 1>,
) -> BTensor<Cb<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    if !applies(&logits) {
        return nll_backward_reference(logits, labels, lse, dnll);
    }
    let [n, vocab] = logits.dims();
    let labels = prim(f32_labels(labels));
    let lse = prim(f32_of(lse));
    let dnll = prim(f32_of(dnll));
    let logits = prim(logits);
    let dtype = logits.dtype;
    let out = empty_device_contiguous_dtype(
        logits.client.clone(),
        logits.device.clone(),
        Shape::new([n, vocab]),
        dtype,
    );
    if n > 0 {
        let (count, dim) = grid(n);
        nll_backward_kernel::launch::<R>(
            &logits.client,
            count,
            dim,
            logits.clone().into_tensor_arg(),
            labels.into_tensor_arg(),
            lse.into_tensor_arg(),
            dnll.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    wrap(out)
}

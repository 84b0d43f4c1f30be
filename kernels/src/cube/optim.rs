//! [`crate::MambaBackend::adamw_step`] as one kernel: each thread updates one element of the
//! parameter and its two moments (crate::optim has the arithmetic). And the gradients' squared
//! global norm for clipping ([`crate::MambaBackend::squared_norm`]) in one launch a tensor.

// Kernel code spells ceil-division out: `usize::div_ceil` is not a cube function.
#![allow(clippy::manual_div_ceil)]

use super::{elemwise, prim, wrap};
use burn::tensor::{DType, Shape};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::optim::{adamw_reference, squared_norm_reference, AdamWInput, AdamWOutput};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float>(
    p: &Tensor<F>,
    g: &Tensor<F>,
    m: &Tensor<F>,
    v: &Tensor<F>,
    p_out: &mut Tensor<F>,
    m_out: &mut Tensor<F>,
    v_out: &mut Tensor<F>,
    device_scale: &ComptimeOption<Tensor<f32>>, // [1]
    grad_scale: f32,
    beta_1: f32,
    beta_2: f32,
    c1: f32,
    c2: f32,
    epsilon: f32,
    decay: f32,
    lr: f32,
    #[comptime] has_state: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= p.len() {
        terminate!();
    }
    let mut scale = grad_scale;
    #[comptime]
    if let ComptimeOption::Some(f) = device_scale {
        scale *= f[0];
    }
    let gi = f32::cast_from(g[i]) * scale;
    let mut mi = gi * (1.0f32 - beta_1);
    let mut vi = gi * gi * (1.0f32 - beta_2);
    if has_state {
        mi += f32::cast_from(m[i]) * beta_1;
        vi += f32::cast_from(v[i]) * beta_2;
    }
    let delta = (mi / c1) / ((vi / c2).sqrt() + epsilon);
    p_out[i] = F::cast_from(f32::cast_from(p[i]) * decay - delta * lr);
    m_out[i] = F::cast_from(mi);
    v_out[i] = F::cast_from(vi);
}

/// The kernel where every tensor is one float dtype of one length, else the reference.
pub fn adamw_step<R, F, I, BT>(input: AdamWInput<Cb<R, F, I, BT>>) -> AdamWOutput<Cb<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let dtype = input.param.dtype();
    let n = input.param.dims()[0];
    let same = |t: &burn::tensor::Tensor<Cb<R, F, I, BT>, 1>| t.dtype() == dtype && t.dims() == [n];
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        || !same(&input.grad)
        || input
            .moments
            .as_ref()
            .is_some_and(|(m, v)| !same(m) || !same(v))
        || input
            .device_scale
            .as_ref()
            .is_some_and(|f| f.dtype() != DType::F32 || f.dims() != [1])
    {
        return adamw_reference(input);
    }
    let AdamWInput {
        param,
        grad,
        moments,
        device_scale,
        scalars: s,
    } = input;
    let p = into_contiguous(prim(param));
    let g = into_contiguous(prim(grad));
    let client = p.client.clone();
    let out =
        || empty_device_contiguous_dtype(client.clone(), p.device.clone(), Shape::new([n]), dtype);
    let (p_out, m_out, v_out) = (out(), out(), out());
    let has_state = moments.is_some();
    let (m, v) = match moments {
        Some((m, v)) => (into_contiguous(prim(m)), into_contiguous(prim(v))),
        None => (g.clone(), g.clone()),
    };
    let (c1, c2) = s.corrections();
    let (count, dim) = elemwise(&client, n);
    adamw_kernel::launch::<R>(
        &client,
        count,
        dim,
        p.into_tensor_arg(),
        g.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        p_out.clone().into_tensor_arg(),
        m_out.clone().into_tensor_arg(),
        v_out.clone().into_tensor_arg(),
        device_scale.map(|f| prim(f).into_tensor_arg()).into(),
        s.grad_scale as f32,
        s.beta_1,
        s.beta_2,
        c1,
        c2,
        s.epsilon,
        s.decay as f32,
        s.lr as f32,
        has_state,
        dtype.into(),
    );
    AdamWOutput {
        param: wrap(p_out),
        moment_1: wrap(m_out),
        moment_2: wrap(v_out),
    }
}

/// Threads of the one cube that sums one tensor's squares.
const SUM_THREADS: u32 = 256;
const LOG2_SUM_THREADS: u32 = 8;

/// Cubes that share one tensor at most (each writes its partial sum to a slot of its own).
const SUM_CUBES: usize = 64;
/// Values a cube's thread walks at least before another cube is added.
const SUM_PER_THREAD: usize = 16;

/// `out[slot · SUM_CUBES + cube] = Σ t_i²` (f32) over the cube's share of `t`: the cubes stride
/// through the tensor together, so a large adapter (an embedding's `A`, 0.4 M values) spreads
/// over several multiprocessors while a small one takes one cube.
#[cube(launch)]
fn sum_squares_kernel<F: Float>(
    t: &Tensor<F>,
    out: &mut Tensor<f32>,
    slot: u32,
    #[define(F)] _dtype: StorageType,
) {
    let u = UNIT_POS as usize;
    let n = t.len();
    let stride = CUBE_COUNT_X as usize * SUM_THREADS as usize;
    let rounds = (n + stride - 1) / stride;
    let start = CUBE_POS_X as usize * SUM_THREADS as usize + u;
    let mut acc = 0.0f32;
    for k in 0..rounds {
        let i = k * stride + start;
        if i < n {
            let v = f32::cast_from(t[i]);
            acc += v * v;
        }
    }
    let mut shared = SharedMemory::<f32>::new(SUM_THREADS as usize);
    shared[u] = acc;
    sync_cube();
    let mut half = (SUM_THREADS as usize / 2).runtime();
    for _ in 0..LOG2_SUM_THREADS {
        if u < half {
            shared[u] = shared[u] + shared[u + half];
        }
        sync_cube();
        half /= 2;
    }
    if u == 0 {
        out[slot as usize * SUM_CUBES + CUBE_POS_X as usize] = shared[0];
    }
}

/// One launch a tensor into a zeroed `[tensors · SUM_CUBES]` buffer, then one sum; the
/// reference for other dtypes.
pub fn squared_norm<R, F, I, BT>(
    tensors: Vec<burn::tensor::Tensor<Cb<R, F, I, BT>, 1>>,
) -> Option<burn::tensor::Tensor<Cb<R, F, I, BT>, 1>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let supported = |t: &burn::tensor::Tensor<Cb<R, F, I, BT>, 1>| {
        matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
    };
    if tensors.is_empty() || !tensors.iter().all(supported) {
        return squared_norm_reference(tensors);
    }
    let count = tensors.len();
    let first = prim(tensors[0].clone());
    let client = first.client.clone();
    // Slots no cube writes stay zero.
    let sums = prim(burn::tensor::Tensor::<Cb<R, F, I, BT>, 1>::zeros(
        [count * SUM_CUBES],
        (&first.device, DType::F32),
    ));
    for (slot, t) in tensors.into_iter().enumerate() {
        let t = into_contiguous(prim(t));
        let dtype = t.dtype;
        let cubes = t
            .meta
            .num_elements()
            .div_ceil(SUM_THREADS as usize * SUM_PER_THREAD)
            .clamp(1, SUM_CUBES);
        sum_squares_kernel::launch::<R>(
            &client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(SUM_THREADS),
            t.into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            slot as u32,
            dtype.into(),
        );
    }
    Some(wrap::<Cb<R, F, I, BT>, 1>(sums).sum())
}

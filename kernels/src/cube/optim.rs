//! [`crate::MambaBackend::adamw_step`] as one kernel: each thread updates one element of the
//! parameter and its two moments (crate::optim has the arithmetic).

use super::{elemwise, prim, wrap};
use burn::tensor::{DType, Shape};
use burn_cubecl::{
    element::BoolElement, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use cubecl::prelude::*;

use crate::optim::{adamw_reference, AdamWInput, AdamWOutput};

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
    let gi = f32::cast_from(g[i]) * grad_scale;
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
    {
        return adamw_reference(input);
    }
    let AdamWInput {
        param,
        grad,
        moments,
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

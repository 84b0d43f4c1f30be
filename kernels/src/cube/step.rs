//! One-token decode updates (scaffold: the reference until the kernels land).

use burn::tensor::Tensor;
use burn_cubecl::{element::BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::SsdStepInput;

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

pub fn causal_conv1d_step<R, F, I, BT>(
    x: Tensor<Cb<R, F, I, BT>, 2>,
    state: Tensor<Cb<R, F, I, BT>, 3>,
    weight: Tensor<Cb<R, F, I, BT>, 2>,
    bias: Option<Tensor<Cb<R, F, I, BT>, 1>>,
    silu: bool,
) -> (Tensor<Cb<R, F, I, BT>, 2>, Tensor<Cb<R, F, I, BT>, 3>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::reference::causal_conv1d_step(x, state, weight, bias, silu)
}

pub fn ssd_step<R, F, I, BT>(
    input: SsdStepInput<Cb<R, F, I, BT>>,
) -> (Tensor<Cb<R, F, I, BT>, 3>, Tensor<Cb<R, F, I, BT>, 4>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::reference::ssd_step(input)
}

#[allow(clippy::too_many_arguments)]
pub fn selective_step<R, F, I, BT>(
    u: Tensor<Cb<R, F, I, BT>, 2>,
    dt: Tensor<Cb<R, F, I, BT>, 2>,
    a: Tensor<Cb<R, F, I, BT>, 2>,
    b: Tensor<Cb<R, F, I, BT>, 2>,
    c: Tensor<Cb<R, F, I, BT>, 2>,
    d: Tensor<Cb<R, F, I, BT>, 1>,
    state: Tensor<Cb<R, F, I, BT>, 3>,
) -> (Tensor<Cb<R, F, I, BT>, 2>, Tensor<Cb<R, F, I, BT>, 3>)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::reference::selective_step(u, dt, a, b, c, d, state)
}

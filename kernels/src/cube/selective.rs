//! Mamba1's selective scan (scaffold: the reference until the kernels land).

use burn::tensor::Tensor;
use burn_cubecl::{element::BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::{SelectiveScanGrads, SelectiveScanInput, SelectiveScanOutput};

type Cb<R, F, I, BT> = CubeBackend<R, F, I, BT>;

pub fn selective_scan<R, F, I, BT>(
    input: SelectiveScanInput<Cb<R, F, I, BT>>,
) -> SelectiveScanOutput<Cb<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::reference::selective_scan(input)
}

pub fn selective_scan_backward<R, F, I, BT>(
    input: SelectiveScanInput<Cb<R, F, I, BT>>,
    dy: Tensor<Cb<R, F, I, BT>, 3>,
    d_final: Option<Tensor<Cb<R, F, I, BT>, 3>>,
) -> SelectiveScanGrads<Cb<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::reference::selective_scan_backward(input, dy, d_final)
}

//! The SSD chunked scan backward (scaffold: the reference until the kernels land).

use burn::tensor::Tensor;
use burn_cubecl::{element::BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::{SsdGrads, SsdInput};

pub fn ssd_chunk_scan_backward<R, F, I, BT>(
    input: SsdInput<CubeBackend<R, F, I, BT>>,
    dy: Tensor<CubeBackend<R, F, I, BT>, 4>,
    d_final: Option<Tensor<CubeBackend<R, F, I, BT>, 4>>,
) -> SsdGrads<CubeBackend<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    crate::reference::ssd_chunk_scan_backward(input, dy, d_final)
}

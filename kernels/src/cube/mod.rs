//! cubecl kernels for the cube backends (wgpu, CUDA, ...) and the autodiff steps that use them.
//!
//! The launch helpers every kernel module shares live here.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor as BTensor, TensorPrimitive};
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

pub mod autodiff;
pub mod conv;
pub mod selective;
pub mod ssd;
pub mod ssd_bwd;
pub mod step;
pub mod tile;

pub(crate) fn prim<B: Backend, const D: usize>(t: BTensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

pub(crate) fn wrap<B: Backend, const D: usize>(t: FloatTensor<B>) -> BTensor<B, D> {
    BTensor::from_primitive(TensorPrimitive::Float(t))
}

/// Launch configuration for `n` independent threads.
pub(crate) fn elemwise<R: CubeRuntime>(
    client: &ComputeClient<R>,
    n: usize,
) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(client, n);
    (calculate_cube_count_elemwise(client, n, cube_dim), cube_dim)
}

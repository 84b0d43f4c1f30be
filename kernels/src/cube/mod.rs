//! cubecl kernels for the cube backends (wgpu, CUDA, ...) and the autodiff steps that use them.
//!
//! The launch helpers every kernel module shares live here.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor as BTensor, TensorPrimitive};
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

pub mod autodiff;
pub mod cache;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cublas;
pub mod gemv;
pub mod loss;
pub mod norm;
#[cfg(all(test, feature = "cuda", feature = "wgpu"))]
mod offline;
pub mod optim;
pub mod selective;
pub mod split;
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

/// Launch configuration for `n` independent threads in cubes of 64, for kernels with few
/// threads that each run a long sequential loop: small cubes spread them over every
/// multiprocessor instead of crowding a few.
pub(crate) fn spread(n: usize) -> (CubeCount, CubeDim) {
    const DIM: usize = 64;
    (
        CubeCount::Static(n.div_ceil(DIM) as u32, 1, 1),
        CubeDim::new_1d(DIM as u32),
    )
}

/// [`crate::MambaBackend::read_while`] on a cube backend: the copy is handed to the runtime's
/// queue first (behind the work already queued), `meanwhile` queues more, and only then does the
/// host wait, for that copy alone.
pub(crate) fn read_while<B, R, T>(
    t: BTensor<B, 1, burn::tensor::Int>,
    meanwhile: impl FnOnce() -> T,
) -> (burn::tensor::TensorData, T)
where
    B: Backend<IntTensorPrimitive = burn_cubecl::tensor::CubeTensor<R>>,
    R: CubeRuntime,
{
    let t = burn_cubecl::kernel::into_contiguous(t.into_primitive());
    let shape = t.meta.shape().clone();
    let dtype = t.dtype;
    let desc = cubecl::server::CopyDescriptor::new(
        t.handle.clone().binding(),
        shape.clone(),
        t.meta.strides().clone(),
        t.elem_size(),
    );
    let read = t.client.read_one_tensor_async(desc);
    let out = meanwhile();
    let bytes = cubecl::future::block_on(read)
        .unwrap_or_else(|e| panic!("reading {shape:?} {dtype:?} from the device: {e}"));
    (
        burn::tensor::TensorData::from_bytes(bytes, shape, dtype),
        out,
    )
}

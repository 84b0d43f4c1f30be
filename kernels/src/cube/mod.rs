//! cubecl kernels for the cube backends (wgpu, CUDA, ...) and the autodiff steps that use them.

pub mod autodiff;
pub mod conv;
pub mod ssd;

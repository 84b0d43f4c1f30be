//! cubecl kernels for the cube backends (wgpu, CUDA, ...) and the autodiff steps that use them.

pub mod autodiff;
pub mod conv;
pub mod selective;
pub mod ssd;
pub mod ssd_bwd;
pub mod step;

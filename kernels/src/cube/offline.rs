//! The CUDA C++ that cubecl-cuda would compile for a kernel, generated on a machine without a
//! GPU: the kernel is defined against a wgpu client (lavapipe; only its launch properties are
//! read) and compiled with cubecl's CUDA compiler and the options cubecl-cuda sets for sm_90.
//! `scripts/cuda_offline.py` then compiles the files with NVRTC and ptxas (registers, spills)
//! and disassembles them (`nvdisasm`), so a kernel's SASS can be read before device time is
//! spent on it. The emitting tests are `#[ignore]`d tools, run with
//! `cargo test -p mamba-kernels --features wgpu,cuda --lib cuda_source -- --ignored`; they write
//! under `$MAMBA_CUDA_SOURCE_DIR` (default `target/cuda-source`).

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use cubecl::CubeTask;

/// A client whose properties the kernel's definition reads.
pub fn client() -> ComputeClient<WgpuRuntime> {
    WgpuRuntime::client(&WgpuDevice::default())
}

/// The settings a `#[cube(launch)]` kernel is built with, for cubes of `threads` threads.
pub fn settings(threads: u32) -> KernelSettings {
    KernelSettings::default()
        .cube_dim(CubeDim::new_1d(threads))
        .address_type(AddressType::U32)
}

/// A tensor argument's compilation data (no in-place alias).
pub fn tensor() -> TensorCompilationArg {
    TensorCompilationArg { inplace: None }
}

/// Writes `kernel`'s CUDA C++ to `<dir>/<name>.cu` (`$MAMBA_CUDA_SOURCE_DIR`).
pub fn emit<K: CubeKernel>(name: &str, kernel: K, mode: ExecutionMode) {
    let dir = std::env::var("MAMBA_CUDA_SOURCE_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/cuda-source").to_string()
    });
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir}: {e}"));
    let task = KernelTask::<cubecl::cuda::CudaCompiler, _>::new(kernel);
    // As cubecl-cuda sets them for an sm_90 device with CUDA ≥ 12.8.
    let mut opts = <cubecl::cuda::CudaCompiler as cubecl::Compiler>::CompilationOptions::default();
    opts.supports_features.fast_math = true;
    opts.supports_features.grid_constants = true;
    opts.supports_features.fast_tanh = true;
    let compiled = task
        .compile(
            &mut Default::default(),
            &opts,
            mode,
            AddressType::U32.unsigned_type(),
        )
        .unwrap_or_else(|e| panic!("compiling {name} to CUDA C++: {e:?}"));
    let path = format!("{dir}/{name}.cu");
    std::fs::write(&path, compiled.source).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    eprintln!("{path}");
}

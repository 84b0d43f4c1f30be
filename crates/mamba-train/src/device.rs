//! `--device auto|cuda[:N]|wgpu|cpu`: picking a backend at run time; `--ops
//! auto|reference|kernels`: picking the implementation of the hot ops on it.
//!
//! Code that runs on "any backend" implements [`BackendJob`]; [`run_on`] instantiates it with
//! the backend type the device string selects, and the job calls [`select_ops`] before any work.

use std::str::FromStr;

use anyhow::{bail, Result};
use mamba_kernels::{check_ops_mode, set_ops_mode, MambaBackend, OpsMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Wgpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" | "ndarray" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!(
                    "unknown device `{other}`: expected auto, cuda, cuda:N, wgpu or cpu"
                )),
            },
        }
    }
}

/// Applies `--ops` inside a job on backend `B` (named `backend` in errors): checks that `B` can
/// honour `mode` (`kernels` needs a backend with kernels, so not the CPU) and selects it for the
/// whole process. Call it before any model work.
pub fn select_ops<B: MambaBackend>(mode: OpsMode, backend: &str) -> Result<()> {
    check_ops_mode::<B>(mode, backend).map_err(anyhow::Error::msg)?;
    set_ops_mode(mode);
    Ok(())
}

/// Work generic over the backend.
pub trait BackendJob {
    type Output;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<Self::Output>;
}

#[cfg(feature = "ndarray")]
pub type CpuBackend = burn::backend::NdArray<f32>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu<f32, i32, u32>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32, i32>;

#[cfg(feature = "cuda")]
fn cuda_available(index: usize) -> bool {
    use burn::tensor::Tensor;
    if !std::path::Path::new("/dev/nvidiactl").exists()
        && std::env::var_os("CUDA_VISIBLE_DEVICES").is_none()
    {
        return false;
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| {
        let device = burn::backend::cuda::CudaDevice::new(index);
        Tensor::<CudaBackend, 1>::zeros([1], &device).into_data();
    })
    .is_ok();
    std::panic::set_hook(hook);
    ok
}

#[cfg(feature = "wgpu")]
fn hardware_wgpu() -> Option<burn::backend::wgpu::WgpuDevice> {
    use burn::backend::wgpu::WgpuDevice;
    use burn::tensor::Tensor;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = [WgpuDevice::DiscreteGpu(0), WgpuDevice::IntegratedGpu(0)]
        .into_iter()
        .find(|d| {
            let d = d.clone();
            std::panic::catch_unwind(move || {
                Tensor::<WgpuBackend, 1>::zeros([1], &d).into_data();
            })
            .is_ok()
        });
    std::panic::set_hook(hook);
    found
}

/// Run `job` on the backend `spec` names. `auto` takes CUDA, then a hardware wgpu adapter, then
/// the CPU, and says which it took on stderr.
// Built without any backend feature, `job` is only passed along (and every arm fails).
#[allow(clippy::only_used_in_recursion)]
pub fn run_on<J: BackendJob>(spec: DeviceSpec, job: J) -> Result<J::Output> {
    // Before any device exists: compiled kernels cached per kernel-source hash.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    mamba_kernels::cube::cache::configure_kernel_cache();
    match spec {
        DeviceSpec::Auto => {
            #[cfg(feature = "cuda")]
            if cuda_available(0) {
                eprintln!("device: auto → cuda:0");
                return run_on(DeviceSpec::Cuda(0), job);
            }
            #[cfg(feature = "wgpu")]
            if let Some(d) = hardware_wgpu() {
                eprintln!("device: auto → wgpu ({d:?})");
                return job.run::<WgpuBackend>(d, "wgpu");
            }
            eprintln!("device: auto → cpu");
            run_on(DeviceSpec::Cpu, job)
        }
        DeviceSpec::Cpu => {
            #[cfg(feature = "ndarray")]
            return job.run::<CpuBackend>(Default::default(), "cpu");
            #[cfg(not(feature = "ndarray"))]
            bail!("this binary was built without the `ndarray` feature (CPU backend)")
        }
        DeviceSpec::Wgpu => {
            #[cfg(feature = "wgpu")]
            return job.run::<WgpuBackend>(Default::default(), "wgpu");
            #[cfg(not(feature = "wgpu"))]
            bail!("this binary was built without the `wgpu` feature")
        }
        DeviceSpec::Cuda(i) => {
            #[cfg(feature = "cuda")]
            {
                if !cuda_available(i) {
                    bail!("device cuda:{i}: no usable CUDA device (driver missing, or index out of range)");
                }
                job.run::<CudaBackend>(
                    burn::backend::cuda::CudaDevice::new(i),
                    &format!("cuda:{i}"),
                )
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = i;
                bail!("this binary was built without the `cuda` feature")
            }
        }
    }
}

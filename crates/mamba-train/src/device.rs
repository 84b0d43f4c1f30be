//! `--device auto|cuda[:N]|wgpu|cpu`: picking a backend at run time; `--ops
//! auto|reference|kernels`: picking the implementation of the hot ops on it.
//!
//! Code that runs on "any backend" implements [`BackendJob`]; [`run_on`] instantiates it with
//! the backend type the device string selects, and the job calls [`select_ops`] before any work.
//! Training may take several devices of one kind ([`DeviceList`], [`DevicesJob`],
//! [`run_on_devices`]): `cuda:0,cuda:1`, `cuda:all`, or `cpu,cpu` (CPU replicas, sharing the
//! cores: how the data-parallel path is tested without GPUs).

use std::str::FromStr;

use anyhow::{bail, Result};
use mamba_kernels::{check_ops_mode, set_ops_mode, MambaBackend, OpsMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// One device, or several of one kind for data-parallel training: a comma-separated list of
/// [`DeviceSpec`]s, or `cuda:all` (every CUDA device there is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    specs: Vec<DeviceSpec>,
    all_cuda: bool,
}

impl DeviceList {
    pub fn single(spec: DeviceSpec) -> Self {
        Self {
            specs: vec![spec],
            all_cuda: false,
        }
    }

    /// The list as written (for `cuda:all`, before the devices are counted: `[Cuda(0)]`).
    pub fn specs(&self) -> &[DeviceSpec] {
        &self.specs
    }

    /// Whether the list names more than one device (or `cuda:all`).
    pub fn is_parallel(&self) -> bool {
        self.all_cuda || self.specs.len() > 1
    }

    /// From `train.devices` (a list) when it is set, else `device.name`.
    pub fn from_config(devices: &[String], name: &str) -> Result<Self, String> {
        if devices.is_empty() {
            name.parse()
        } else {
            devices.join(",").parse()
        }
    }
}

impl FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("device list `{s}`: an empty entry"));
        }
        if parts.len() == 1 && parts[0] == "cuda:all" {
            return Ok(Self {
                specs: vec![DeviceSpec::Cuda(0)],
                all_cuda: true,
            });
        }
        let specs = parts
            .iter()
            .map(|p| {
                if *p == "cuda:all" {
                    Err("`cuda:all` stands alone, not in a list".to_string())
                } else {
                    p.parse::<DeviceSpec>()
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if specs.len() > 1 {
            let same_kind = specs
                .windows(2)
                .all(|w| std::mem::discriminant(&w[0]) == std::mem::discriminant(&w[1]));
            if !same_kind {
                return Err(format!(
                    "device list `{s}`: every device must be of one kind (cuda:N, or cpu)"
                ));
            }
            match specs[0] {
                // A CUDA device named twice holds two replicas: no faster, but the whole
                // data-parallel path on one GPU (`run_on_devices` says so).
                DeviceSpec::Cuda(_) | DeviceSpec::Cpu => {}
                DeviceSpec::Auto | DeviceSpec::Wgpu => {
                    return Err(format!(
                        "device list `{s}`: data parallelism runs on CUDA devices (cuda:0,cuda:1 or cuda:all) or on CPU replicas (cpu,cpu); not on `auto` or `wgpu`"
                    ))
                }
            }
        }
        Ok(Self {
            specs,
            all_cuda: false,
        })
    }
}

impl std::fmt::Display for DeviceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.all_cuda {
            return f.write_str("cuda:all");
        }
        let names: Vec<String> = self.specs.iter().map(spec_name).collect();
        f.write_str(&names.join(","))
    }
}

fn spec_name(spec: &DeviceSpec) -> String {
    match spec {
        DeviceSpec::Auto => "auto".into(),
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Wgpu => "wgpu".into(),
        DeviceSpec::Cuda(i) => format!("cuda:{i}"),
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

/// Work generic over the backend that takes every device of a [`DeviceList`] (one or more, all
/// on one backend type), with their names.
pub trait DevicesJob {
    type Output;
    fn run<B: MambaBackend>(
        self,
        devices: Vec<B::Device>,
        names: Vec<String>,
    ) -> Result<Self::Output>;
}

/// A [`DevicesJob`] on a single device.
struct One<J>(J);

impl<J: DevicesJob> BackendJob for One<J> {
    type Output = J::Output;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<J::Output> {
        self.0.run::<B>(vec![device], vec![name.to_string()])
    }
}

/// Run `job` on every device of `list`: one device goes through [`run_on`] (so `auto` works);
/// several must be CUDA devices (each checked) or CPU replicas.
pub fn run_on_devices<J: DevicesJob>(list: &DeviceList, job: J) -> Result<J::Output> {
    if !list.is_parallel() {
        return run_on(list.specs[0], One(job));
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    mamba_kernels::cube::cache::configure_kernel_cache();
    match list.specs[0] {
        DeviceSpec::Cpu => {
            #[cfg(feature = "ndarray")]
            {
                let n = list.specs.len();
                let names = (0..n).map(|r| format!("cpu (replica {r})")).collect();
                job.run::<CpuBackend>(vec![Default::default(); n], names)
            }
            #[cfg(not(feature = "ndarray"))]
            bail!("this binary was built without the `ndarray` feature (CPU backend)")
        }
        DeviceSpec::Cuda(_) => {
            #[cfg(feature = "cuda")]
            {
                let indices: Vec<usize> = if list.all_cuda {
                    let found: Vec<usize> = (0..64).take_while(|&i| cuda_available(i)).collect();
                    if found.is_empty() {
                        bail!("device cuda:all: no usable CUDA device (driver missing?)");
                    }
                    found
                } else {
                    let mut v = Vec::new();
                    for s in &list.specs {
                        let DeviceSpec::Cuda(i) = *s else {
                            unreachable!("a checked list")
                        };
                        if !cuda_available(i) {
                            bail!("device cuda:{i}: no usable CUDA device (driver missing, or index out of range)");
                        }
                        v.push(i);
                    }
                    v
                };
                let mut seen = std::collections::HashSet::new();
                if let Some(i) = indices.iter().find(|i| !seen.insert(**i)) {
                    eprintln!("device: cuda:{i} is named more than once: its replicas share one GPU (a check of the data-parallel path, not a speed-up)");
                }
                let names = indices
                    .iter()
                    .enumerate()
                    .map(|(r, i)| {
                        if indices.iter().filter(|j| *j == i).count() > 1 {
                            format!("cuda:{i} (replica {r})")
                        } else {
                            format!("cuda:{i}")
                        }
                    })
                    .collect();
                let devices = indices
                    .iter()
                    .map(|&i| burn::backend::cuda::CudaDevice::new(i))
                    .collect();
                job.run::<CudaBackend>(devices, names)
            }
            #[cfg(not(feature = "cuda"))]
            bail!("this binary was built without the `cuda` feature")
        }
        _ => unreachable!("a checked list holds cuda or cpu devices"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        let one: DeviceList = "cuda:1".parse().unwrap();
        assert!(!one.is_parallel());
        assert_eq!(one.specs(), &[DeviceSpec::Cuda(1)]);
        let two: DeviceList = "cuda:0, cuda:1".parse().unwrap();
        assert!(two.is_parallel());
        assert_eq!(two.to_string(), "cuda:0,cuda:1");
        let all: DeviceList = "cuda:all".parse().unwrap();
        assert!(all.is_parallel());
        assert_eq!(all.to_string(), "cuda:all");
        let twice: DeviceList = "cuda:0,cuda:0".parse().unwrap();
        assert_eq!(twice.specs(), &[DeviceSpec::Cuda(0), DeviceSpec::Cuda(0)]);
        let cpus: DeviceList = "cpu,cpu".parse().unwrap();
        assert_eq!(cpus.specs(), &[DeviceSpec::Cpu, DeviceSpec::Cpu]);
        for (bad, says) in [
            ("cuda:0,cpu", "one kind"),
            ("wgpu,wgpu", "not on `auto` or `wgpu`"),
            ("auto,auto", "not on `auto` or `wgpu`"),
            ("cuda:0,", "empty entry"),
            ("cuda:all,cuda:1", "stands alone"),
            ("tpu", "unknown device `tpu`"),
        ] {
            let e = bad.parse::<DeviceList>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(
            DeviceList::from_config(&["cpu".into(), "cpu".into()], "cuda:0").unwrap(),
            cpus
        );
        assert_eq!(DeviceList::from_config(&[], "cuda:1").unwrap(), one);
    }
}

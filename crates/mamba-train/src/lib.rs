//! Training, evaluation and benchmarking for mamba-burn, and the helpers the binaries share.
//! The binaries in `src/bin` stay thin: argument parsing and a call into this crate.

pub mod bench;
pub mod bundled;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod evaluate;
pub mod export;
pub mod generation;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod step;
pub mod train;

pub use device::{
    run_on, run_on_devices, select_ops, BackendJob, DeviceList, DeviceSpec, DevicesJob,
};
pub use mamba_kernels::OpsMode;

//! mamba-burn: train and fine-tune Mamba and Mamba2 language models in Rust on burn.
//!
//! This root package re-exports the workspace crates and owns the end-to-end tests and the
//! binaries (`eval`, `generate`, ...), whose sources live in `crates/mamba-train/src/bin`.

pub use mamba_data as data;
pub use mamba_hf as hf;
pub use mamba_kernels as kernels;
pub use mamba_model as model;
pub use mamba_train as train;

//! Mamba and Mamba2 language models on burn: configuration, backend-generic modules, loss,
//! recurrent inference and greedy generation. The hot ops go through
//! [`mamba_kernels::MambaBackend`]; this crate never depends on training code.

pub mod backprop;
pub mod cache;
pub mod config;
pub mod generate;
pub mod lora;
pub mod loss;
pub mod mamba1;
pub mod mamba2;
pub mod model;
pub mod nn;
pub mod precision;

pub use backprop::{BackpropOptions, LossAndGrads};
pub use cache::{LayerState, ModelCache};
pub use config::{ConfigError, Mamba1Config, Mamba2Config, ModelConfig, NormMode};
pub use mamba_kernels::MambaBackend;
pub use model::{Block, ForwardArgs, ForwardOutput, MambaLM, Mixer};
pub use precision::{Compute, Precision};

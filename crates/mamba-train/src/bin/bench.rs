//! `bench gemm --device D [--shapes step|small] [--dtypes bf16,f32] [--skip-burn] [--json]`
//! `bench kernels --device D [--shapes bench|small] [--only ssd,conv,scan] [--json]`
//! `bench generate --device D [--config C] [--batch 1] [--prompt-len 512] [--new-tokens 256] [--precision P] [--json]`
//! `bench model --device D [--config mamba2-130m|mamba1-130m|<config.json>] [--batch 2] [--seq 512] [--json]`
//!
//! The kernels against the reference ops: time and agreement of each hot op
//! (`mamba_train::bench::kernels`) and of a whole model's loss and gradients
//! (`mamba_train::bench::model`).

use anyhow::{ensure, Result};
use clap::{Parser, Subcommand};
use mamba_model::MambaBackend;
use mamba_train::bench::{gemm, generate, kernels, model, train};
use mamba_train::{run_on, BackendJob, DeviceSpec};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the Mamba kernels against the reference ops (time and agreement)")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Each op (SSD scan, causal conv1d, selective scan) at fixed shapes: median forward and
    /// forward+backward time with the kernels and the reference, and their largest relative error
    /// over the outputs and input gradients.
    Kernels {
        /// auto, cuda, cuda:N, wgpu or cpu (the CPU has no kernels: reference only).
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// bench (realistic sizes) or small (tiny odd shapes, seconds on lavapipe/CPU).
        #[arg(long, default_value = "bench")]
        shapes: kernels::ShapeSet,
        /// Untimed runs before the timed ones.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// SSD chunk size (default 256; 16 for the small shapes).
        #[arg(long)]
        chunk: Option<usize>,
        /// Only these ops: ssd, conv, scan (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<kernels::Op>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also compute the SSD scan in f64 on the CPU and report both sides' errors against it.
        #[arg(long)]
        truth_f64: bool,
        /// dtype of the SSD's activations: f32, or bf16 (the bf16 kernels; with
        /// `MAMBA_SSD_TENSOR_CORES=1` their tensor-core path). The other ops stay f32.
        #[arg(long, default_value = "f32")]
        ssd_dtype: kernels::SsdDtype,
        /// Fail (exit status 1, after the report) when the kernels' largest relative error on
        /// any output or gradient exceeds this: against f64 with `--truth-f64`, else against
        /// the reference ops. The device check of a kernel path CI cannot run.
        #[arg(long)]
        max_err: Option<f64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A randomly initialised model: loss and every parameter gradient with the kernels against
    /// the reference on the same weights and batch, and the forward+backward time of each.
    Model {
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// mamba2-130m, mamba1-130m or a model config JSON.
        #[arg(long, default_value = "mamba2-130m")]
        config: String,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Whole training steps (the `train` binary's optimizer step) of a randomly initialised
    /// model on random tokens: first step, median step time, tokens/s and peak memory, as the
    /// peer benchmark `peer_mssm.py` reports them.
    Train {
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        #[command(flatten)]
        opts: train::Options,
        #[arg(long)]
        json: bool,
    },
    /// The training step's matrix products through the backend's `matmul_t` (cuBLAS on CUDA)
    /// and through burn's matmul (cubecl's), timed and checked against f64 rows on the host.
    Gemm {
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        #[command(flatten)]
        opts: gemm::Options,
        #[arg(long)]
        json: bool,
    },
    /// Decoding speed of a randomly initialised model through `generate` (greedy): prefill time,
    /// per-token decode time and tokens/s at a batch size, prompt length and number of new
    /// tokens.
    Generate {
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        #[command(flatten)]
        opts: generate::Options,
        #[arg(long)]
        json: bool,
    },
}

struct GenerateJob(generate::Options);

impl BackendJob for GenerateJob {
    type Output = generate::Report;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<generate::Report> {
        generate::run::<B>(&device, name, &self.0)
    }
}

struct GemmJob(gemm::Options);

impl BackendJob for GemmJob {
    type Output = gemm::Report;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<gemm::Report> {
        gemm::run::<B>(&device, name, &self.0)
    }
}

struct TrainJob(train::Options);

impl BackendJob for TrainJob {
    type Output = train::Report;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<train::Report> {
        train::run::<B>(&device, name, &self.0)
    }
}

struct KernelsJob(kernels::Options);

impl BackendJob for KernelsJob {
    type Output = kernels::Report;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<kernels::Report> {
        let dtype = self.0.ssd_dtype.dtype();
        ensure!(
            B::supports_dtype(&device, dtype),
            "--ssd-dtype: the {name} backend has no {} tensors (on the CPU and wgpu use \
             --ssd-dtype f32)",
            self.0.ssd_dtype.name()
        );
        Ok(kernels::run::<B>(&device, name, &self.0))
    }
}

struct ModelJob(model::Options);

impl BackendJob for ModelJob {
    type Output = model::Report;
    fn run<B: MambaBackend>(self, device: B::Device, name: &str) -> Result<model::Report> {
        model::run::<B>(&device, name, &self.0)
    }
}

fn main() -> Result<()> {
    match Args::parse().command {
        Command::Kernels {
            device,
            shapes,
            warmup,
            iters,
            chunk,
            only,
            seed,
            truth_f64,
            ssd_dtype,
            max_err,
            json,
        } => {
            if let Some(m) = max_err {
                ensure!(
                    m.is_finite() && m >= 0.0,
                    "--max-err {m}: expected a finite number ≥ 0"
                );
            }
            let opts = kernels::Options {
                shapes,
                warmup,
                iters,
                chunk,
                only,
                seed,
                truth_f64,
                ssd_dtype,
            };
            let report = run_on(device, KernelsJob(opts))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", kernels::table(&report));
            }
            if let Some(max) = max_err {
                let over = kernels::over_tolerance(&report, max);
                ensure!(
                    over.is_empty(),
                    "--max-err {max:e} exceeded: {}",
                    over.join("; ")
                );
            }
        }
        Command::Model {
            device,
            config,
            batch,
            seq,
            warmup,
            iters,
            seed,
            json,
        } => {
            let opts = model::Options {
                config,
                batch,
                seq,
                warmup,
                iters,
                seed,
            };
            let report = run_on(device, ModelJob(opts))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", model::table(&report));
            }
        }
        Command::Train { device, opts, json } => {
            let report = run_on(device, TrainJob(opts))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", train::line(&report));
            }
        }
        Command::Gemm { device, opts, json } => {
            let report = run_on(device, GemmJob(opts))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", gemm::table(&report));
            }
            let failed = gemm::failures(&report);
            if !failed.is_empty() {
                anyhow::bail!(
                    "{} product(s) off the f64 truth:\n  {}",
                    failed.len(),
                    failed.join("\n  ")
                );
            }
        }
        Command::Generate { device, opts, json } => {
            let report = run_on(device, GenerateJob(opts))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", generate::line(&report));
            }
        }
    }
    Ok(())
}

//! `bench model`: a randomly initialised model's loss and every parameter's gradient with the
//! kernels against the reference ops, on the same weights and batch, and the time of a forward +
//! backward step with each. This is the end-to-end check that the kernels compute what the
//! reference computes inside a real model (all layers, residuals, norms, the LM head).

use std::path::Path;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use mamba_hf::checkpoint::export_grads;
use mamba_kernels::{set_ops_mode, MambaBackend, OpsMode};
use mamba_model::{Mamba1Config, Mamba2Config, MambaLM, ModelConfig};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{catch, rel_err, time_ms, worst, Num, RunInfo};
use crate::train::count_params;

/// A randomly initialised model of `spec` ([`resolve_config`]) on `device`, the backend seeded
/// with `seed` first: the config and the model.
pub fn random_model<B: burn::tensor::backend::Backend>(
    spec: &str,
    seed: u64,
    device: &B::Device,
) -> Result<(ModelConfig, MambaLM<B>)> {
    let config = resolve_config(spec)?;
    B::seed(device, seed);
    let model = MambaLM::<B>::init(&config, device)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--config {spec}"))?;
    Ok((config, model))
}

/// The configs `--config` knows by name; anything else is read as a config JSON.
pub const PRESETS: &[&str] = &["mamba2-130m", "mamba1-130m"];

/// `mamba2-130m` (transformers' shape: hidden 768, 24 layers, 24 heads × 64, state 128, one
/// group, vocab 50,288, chunk 256, tied), `mamba1-130m` (hidden 768, 24 layers, d_inner 1,536,
/// state 16, dt_rank 48, conv 4, vocab 50,280, tied), or a config JSON in any format `mamba-hf`
/// reads.
pub fn resolve_config(spec: &str) -> Result<ModelConfig> {
    Ok(match spec {
        "mamba2-130m" => ModelConfig::Mamba2(Mamba2Config {
            vocab_size: 50288,
            hidden_size: 768,
            num_heads: 24,
            head_dim: 64,
            state_size: 128,
            n_groups: 1,
            expand: 2,
            conv_kernel: 4,
            chunk_size: 256,
            num_hidden_layers: 24,
            time_step_rank: 48,
            tie_word_embeddings: true,
            pad_token_id: Some(0),
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..Mamba2Config::default()
        }),
        "mamba1-130m" => ModelConfig::Mamba1(Mamba1Config {
            vocab_size: 50280,
            hidden_size: 768,
            state_size: 16,
            num_hidden_layers: 24,
            expand: 2,
            intermediate_size: 1536,
            conv_kernel: 4,
            time_step_rank: 48,
            tie_word_embeddings: true,
            ..Mamba1Config::default()
        }),
        path => mamba_hf::load_config(Path::new(path)).with_context(|| {
            format!(
                "--config {path}: expected {} or a model config JSON",
                PRESETS.join(", ")
            )
        })?,
    })
}

#[derive(Debug, Clone)]
pub struct Options {
    /// A name from [`PRESETS`] or a config JSON path.
    pub config: String,
    pub batch: usize,
    pub seq: usize,
    pub warmup: usize,
    pub iters: usize,
    pub seed: u64,
}

/// One implementation's step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub loss: Num,
    pub fwd_bwd_ms: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParamErr {
    pub name: String,
    pub rel_err: Num,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    #[serde(flatten)]
    pub info: RunInfo,
    pub config: String,
    pub model_type: &'static str,
    pub params: usize,
    pub batch: usize,
    pub seq: usize,
    pub dtype: &'static str,
    pub warmup: usize,
    pub iters: usize,
    /// `None` on a backend without kernels, or when the run failed (see the notes).
    pub kernels: Option<Step>,
    pub reference: Option<Step>,
    /// `|loss_k − loss_r| / |loss_r|`.
    pub loss_rel_err: Option<Num>,
    /// Largest `‖g_k − g_r‖ / ‖g_r‖` over the parameters (transformers' names).
    pub max_grad_rel_err: Option<Num>,
    pub worst_param: Option<String>,
    /// The five largest gradient errors.
    pub worst_params: Vec<ParamErr>,
    /// Parameters compared.
    pub grads_compared: usize,
    pub notes: Vec<String>,
}

/// A step's loss, its gradients on the host (transformers' names) and its median time.
type Measured = (f64, Vec<(String, Vec<usize>, Vec<f32>)>, f64);

fn measure<B: MambaBackend>(
    model: &MambaLM<Autodiff<B>>,
    ids: &Tensor<Autodiff<B>, 2, Int>,
    mode: OpsMode,
    device: &B::Device,
    opts: &Options,
) -> Result<Measured, String> {
    set_ops_mode(mode);
    let result = catch(|| {
        let ms = time_ms::<B>(device, opts.warmup, opts.iters, || {
            let _ = model.loss(ids.clone(), ids.clone()).backward();
        });
        let loss = model.loss(ids.clone(), ids.clone());
        let grads = loss.backward();
        let loss: f64 = loss.into_scalar().elem();
        (loss, export_grads(model, &grads), ms)
    });
    B::memory_cleanup(device);
    result
}

/// Runs the model benchmark on backend `B`; `name` is what `--device` selected.
pub fn run<B: MambaBackend>(device: &B::Device, name: &str, opts: &Options) -> Result<Report> {
    let (config, model) = random_model::<Autodiff<B>>(&opts.config, opts.seed, device)?;
    let (params, _) = count_params(&model);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let vocab = config.vocab_size() as i64;
    let ids: Vec<i64> = (0..opts.batch * opts.seq)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let ids = Tensor::from_data(TensorData::new(ids, [opts.batch, opts.seq]), device);

    let mut notes = Vec::new();
    let mut run_mode = |mode: OpsMode| match measure::<B>(&model, &ids, mode, device, opts) {
        Ok(m) => Some(m),
        Err(e) => {
            notes.push(format!("{mode} failed: {e}"));
            None
        }
    };
    let kernels = if B::has_kernels() {
        run_mode(OpsMode::Kernels)
    } else {
        None
    };
    let reference = run_mode(OpsMode::Reference);
    set_ops_mode(OpsMode::Auto);

    let tokens = (opts.batch * opts.seq) as f64;
    let step = |m: &Option<Measured>| {
        m.as_ref().map(|(loss, _, ms)| Step {
            loss: Num(*loss),
            fwd_bwd_ms: *ms,
            tokens_per_s: tokens / (ms * 1e-3),
        })
    };
    let mut errs: Vec<(String, f64)> = Vec::new();
    let mut loss_rel_err = None;
    if let (Some((lk, gk, _)), Some((lr, gr, _))) = (&kernels, &reference) {
        loss_rel_err = Some(Num(if lk.is_finite() && lr.is_finite() {
            ((lk - lr) / lr).abs()
        } else {
            f64::INFINITY
        }));
        for (name, _, want) in gr {
            let err = match gk.iter().find(|(n, _, _)| n == name) {
                Some((_, _, got)) => rel_err(got, want),
                None => {
                    notes.push(format!("{name}: no gradient with the kernels"));
                    f64::INFINITY
                }
            };
            errs.push((name.clone(), err));
        }
        for (name, _, _) in gk {
            if !gr.iter().any(|(n, _, _)| n == name) {
                notes.push(format!("{name}: no gradient with the reference"));
                errs.push((name.clone(), f64::INFINITY));
            }
        }
    }
    let worst_one = worst(&errs);
    let mut sorted = errs.clone();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Report {
        bench: "model",
        info: RunInfo::new::<B>(device, name),
        config: opts.config.clone(),
        model_type: config.model_type(),
        params,
        batch: opts.batch,
        seq: opts.seq,
        dtype: "f32",
        warmup: opts.warmup,
        iters: opts.iters,
        kernels: step(&kernels),
        reference: step(&reference),
        loss_rel_err,
        max_grad_rel_err: worst_one.as_ref().map(|w| Num(w.1)),
        worst_param: worst_one.map(|w| w.0),
        worst_params: sorted
            .into_iter()
            .take(5)
            .map(|(name, e)| ParamErr {
                name,
                rel_err: Num(e),
            })
            .collect(),
        grads_compared: errs.len(),
        notes,
    })
}

/// The readable report.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "bench model on {}\n{} ({}, {} parameters), batch {} × {} tokens, f32, median of {} after {} warm-up\n",
        r.info.describe(),
        r.config,
        r.model_type,
        r.params,
        r.batch,
        r.seq,
        r.iters,
        r.warmup
    );
    for (label, st) in [("kernels", &r.kernels), ("reference", &r.reference)] {
        match st {
            Some(st) => {
                s += &format!(
                    "{label:<10} loss {:.6}  fwd+bwd {:.2} ms  {:.0} tokens/s\n",
                    st.loss.0, st.fwd_bwd_ms, st.tokens_per_s
                )
            }
            None => s += &format!("{label:<10} -\n"),
        }
    }
    if let (Some(l), Some(g), Some(w)) = (&r.loss_rel_err, &r.max_grad_rel_err, &r.worst_param) {
        s += &format!(
            "loss rel err {:.2e}; max grad rel err {:.2e} ({w}) over {} parameters\n",
            l.0, g.0, r.grads_compared
        );
        for p in r.worst_params.iter().skip(1) {
            s += &format!("    next: {:.2e} ({})\n", p.rel_err.0, p.name);
        }
    }
    for n in &r.notes {
        s += &format!("note: {n}\n");
    }
    s
}

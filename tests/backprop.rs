//! The segment-driven backward (`MambaLM::loss_and_grads`: block checkpointing, the chunked LM
//! head) against plain autodiff of the whole-logits loss, on the transformers fixtures: the same
//! loss and every gradient, full fine-tuning and LoRA, Mamba2 (tied, untied with groups) and
//! Mamba1.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Int, Tensor};
use common::*;
use mamba_burn::hf::load_model_dir;
use mamba_burn::model::loss::{causal_lm_loss, chunked_causal_lm_loss};
use mamba_burn::model::{BackpropOptions, ForwardArgs, MambaLM, NormMode};

const LOSS_REL: f64 = 1e-6;
const GRAD_REL: f64 = 1e-6;

/// Each float parameter: (trainable, its gradient), in visit order.
type ParamGrads = Vec<(bool, Option<Vec<f32>>)>;

/// The gradients of plain autodiff.
struct FromGradients<'a>(&'a <CpuAd as AutodiffBackend>::Gradients, ParamGrads);

impl ModuleVisitor<CpuAd> for FromGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuAd, D>>) {
        let g = param.val().grad(self.0).map(values);
        self.1.push((param.is_require_grad(), g));
    }
}

/// The gradients the driver returns.
struct FromParams<'a>(&'a GradientsParams, ParamGrads);

impl ModuleVisitor<CpuAd> for FromParams<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuAd, D>>) {
        let g = self.0.get::<Cpu, D>(param.id).map(values);
        self.1.push((param.is_require_grad(), g));
    }
}

fn plain_grads(model: &MambaLM<CpuAd>, ids: &[Vec<i64>], labels: &[Vec<i64>]) -> (f64, ParamGrads) {
    let device = Default::default();
    let out = model.forward_with(
        int_tensor(ids, &device),
        ForwardArgs {
            labels: Some(int_tensor(labels, &device)),
            ..Default::default()
        },
    );
    let loss = out.loss.unwrap();
    let value = values(loss.clone())[0] as f64;
    let grads = loss.backward();
    let mut c = FromGradients(&grads, Vec::new());
    model.visit(&mut c);
    (value, c.1)
}

fn driven_grads(
    model: &MambaLM<CpuAd>,
    ids: &[Vec<i64>],
    labels: &[Vec<i64>],
    opts: BackpropOptions,
) -> (f64, ParamGrads) {
    let device = Default::default();
    let out = model.loss_and_grads(int_tensor(ids, &device), int_tensor(labels, &device), opts);
    let value = values(out.loss)[0] as f64;
    let mut c = FromParams(&out.grads, Vec::new());
    model.visit(&mut c);
    (value, c.1)
}

fn check(case: &str, lora: bool) {
    let r = Reference::load(case);
    let device = Default::default();
    let model: MambaLM<CpuAd> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
    let model = if lora { lora_model(model) } else { model };
    let ids = r.ids("input_ids");
    let labels = r.ids("labels");
    let (want_loss, want) = plain_grads(&model, &ids, &labels);
    assert!(want.iter().any(|(_, g)| g.is_some()));
    for (checkpoint_every, loss_chunk) in [(0, 0), (0, 7), (1, 0), (1, 5), (2, 11)] {
        let opts = BackpropOptions {
            checkpoint_every,
            loss_chunk,
            seed: 3,
        };
        let (loss, got) = driven_grads(&model, &ids, &labels, opts);
        let what =
            format!("{case} lora={lora} checkpoint_every={checkpoint_every} chunk={loss_chunk}");
        let rel = ((loss - want_loss) / want_loss).abs();
        assert!(
            rel <= LOSS_REL,
            "{what}: loss {loss} vs {want_loss} (rel {rel:e})"
        );
        assert_eq!(got.len(), want.len());
        let mut compared = 0;
        for (i, ((trainable, g), (_, w))) in got.iter().zip(&want).enumerate() {
            match (g, w) {
                (Some(g), Some(w)) => {
                    let err = rel_err(g, w);
                    assert!(
                        err <= GRAD_REL,
                        "{what}: parameter #{i}: gradient rel {err:e}"
                    );
                    compared += 1;
                }
                (None, None) => assert!(
                    !trainable,
                    "{what}: trainable parameter #{i} got no gradient"
                ),
                (g, w) => panic!(
                    "{what}: parameter #{i}: gradient present here {} / in plain autodiff {}",
                    g.is_some(),
                    w.is_some()
                ),
            }
        }
        eprintln!("{what}: loss rel {rel:e}, {compared} gradients within {GRAD_REL:e}");
    }
}

#[test]
fn mamba2_tied_full_and_lora() {
    check("mamba2_g1_tied", false);
    check("mamba2_g1_tied", true);
}

#[test]
fn mamba2_untied_groups_full_and_lora() {
    check("mamba2_g2_untied_bias_limit", false);
    check("mamba2_g2_untied_bias_limit", true);
}

#[test]
fn mamba1_full_and_lora() {
    check("mamba1_tied", false);
    check("mamba1_tied", true);
}

/// The chunked loss (any chunk size) equals the whole-logits loss, and `MambaLM::loss` (which
/// chunks) equals `forward_with`'s.
#[test]
fn chunked_loss_equals_plain() {
    let device = Default::default();
    let logits = Tensor::<Cpu, 3>::random([3, 9, 41], Distribution::Normal(0.0, 2.0), &device);
    let mut rows: Vec<Vec<i64>> = (0..3)
        .map(|b| (0..9).map(|t| ((b * 7 + t * 5) % 41) as i64).collect())
        .collect();
    rows[1][4] = -100;
    rows[2][0] = -100;
    let labels: Tensor<Cpu, 2, Int> = int_tensor(&rows, &device);
    let want = values(causal_lm_loss(logits.clone(), labels.clone()))[0];
    for chunk in [1, 4, 5, 24, 100] {
        let h = logits.clone();
        let got = values(chunked_causal_lm_loss(h, labels.clone(), chunk, |x| x))[0];
        assert!(
            ((got - want) / want).abs() < 1e-6,
            "chunk {chunk}: {got} vs {want}"
        );
    }
    let r = Reference::load("mamba2_g2_untied_bias_limit");
    let model: MambaLM<Cpu> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
    let ids = int_tensor(&r.ids("input_ids"), &device);
    let labels = int_tensor(&r.ids("labels"), &device);
    let plain = model.forward_with(
        ids.clone(),
        ForwardArgs {
            labels: Some(labels.clone()),
            ..Default::default()
        },
    );
    let a = values(plain.loss.unwrap())[0];
    let b = values(model.loss(ids, labels))[0];
    assert!(((a - b) / a).abs() < 1e-6, "{a} vs {b}");
    assert!((a as f64 - r.f64("loss")).abs() / r.f64("loss") < 1e-5);
}

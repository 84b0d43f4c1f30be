//! Parity with transformers: fixtures written by `scripts/make_fixtures.py` on the GPU machine
//! (transformers 5.17, torch 2.11, float32 on the CPU). Each case checks logits, loss, masked
//! (left-padded) logits, `logits_to_keep`, gradients and greedy continuations (cached and
//! uncached). Cases with more than one group also check the grouped norm against a grouped
//! reference (transformers with mamba_ssm's grouped RMSNorm patched in).

mod common;

use burn::tensor::backend::AutodiffBackend;
use common::*;
use mamba_burn::hf::checkpoint::export_grads;
use mamba_burn::hf::load_model_dir;
use mamba_burn::model::generate::greedy;
use mamba_burn::model::{ForwardArgs, MambaLM, NormMode};

const LOGITS_ABS: f32 = 1e-4;
const LOSS_REL: f64 = 1e-5;
const GRAD_REL: f64 = 1e-3;

fn check_forward(r: &Reference, norm: NormMode, prefix: &str, loss_key: &str) {
    let device = Default::default();
    let model: MambaLM<Cpu> = load_model_dir(&r.dir, norm, &device).unwrap();
    let ids = r.ids("input_ids");
    let labels = r.ids("labels");
    let out = model.forward_with(
        int_tensor(&ids, &device),
        ForwardArgs {
            labels: Some(int_tensor(&labels, &device)),
            ..Default::default()
        },
    );
    let (want, shape) = r.tensor(&format!("{prefix}logits"));
    assert_eq!(out.logits.dims().to_vec(), shape);
    let err = max_abs(&values(out.logits), &want);
    assert!(
        err <= LOGITS_ABS,
        "{}: {prefix}logits max-abs {err:e}",
        r.dir.display()
    );
    let loss = values(out.loss.unwrap())[0] as f64;
    let want = r.f64(loss_key);
    let rel = ((loss - want) / want).abs();
    eprintln!(
        "{}: {prefix}logits max-abs {err:e}, {loss_key} {loss} vs {want} rel {rel:e}",
        r.dir.display()
    );
    assert!(
        rel <= LOSS_REL,
        "{}: {loss_key} {loss} vs {want} (rel {rel:e})",
        r.dir.display()
    );
}

fn check_masked_and_kept(r: &Reference) {
    let device = Default::default();
    let model: MambaLM<Cpu> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
    let ids = r.ids("input_ids");
    let mask = r.ids("attention_mask");
    let out = model.forward_with(
        int_tensor(&ids, &device),
        ForwardArgs {
            attention_mask: Some(float_tensor(&mask, &device)),
            ..Default::default()
        },
    );
    let (want, _) = r.tensor("logits_masked");
    let err = max_abs(&values(out.logits), &want);
    assert!(
        err <= LOGITS_ABS,
        "{}: masked logits max-abs {err:e}",
        r.dir.display()
    );

    let out = model.forward_with(
        int_tensor(&ids, &device),
        ForwardArgs {
            logits_to_keep: 5,
            ..Default::default()
        },
    );
    let (want, shape) = r.tensor("logits_keep5");
    assert_eq!(out.logits.dims().to_vec(), shape);
    let err = max_abs(&values(out.logits), &want);
    assert!(
        err <= LOGITS_ABS,
        "{}: logits_to_keep max-abs {err:e}",
        r.dir.display()
    );
}

fn check_grads(r: &Reference, norm: NormMode, prefix: &str) {
    let device = Default::default();
    let model: MambaLM<CpuAd> = load_model_dir(&r.dir, norm, &device).unwrap();
    let ids = r.ids("input_ids");
    let labels = r.ids("labels");
    let out = model.forward_with(
        int_tensor(&ids, &device),
        ForwardArgs {
            labels: Some(int_tensor(&labels, &device)),
            ..Default::default()
        },
    );
    let grads = out.loss.unwrap().backward();
    let ours = export_grads::<CpuAd>(&model, &grads);
    let names: Vec<String> = serde_json::from_value(r.json["grad_names"].clone()).unwrap();
    assert!(!names.is_empty());
    for name in names {
        let (want, shape) = r.tensor(&format!("{prefix}grad.{name}"));
        let (_, our_shape, got) = ours
            .iter()
            .find(|(k, _, _)| *k == name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(our_shape, &shape, "{name}");
        let err = rel_err(got, &want);
        eprintln!("  {prefix}grad {name}: rel {err:e}");
        assert!(
            err <= GRAD_REL,
            "{}: gradient of {name}: rel {err:e}",
            r.dir.display()
        );
    }
    let _ = <CpuAd as AutodiffBackend>::inner;
}

fn check_greedy(r: &Reference, norm: NormMode, key: &str) {
    let device = Default::default();
    let model: MambaLM<Cpu> = load_model_dir(&r.dir, norm, &device).unwrap();
    let prompt = r.u32s("prompt_ids");
    let want = r.u32s(key);
    let new = want.len() - prompt.len();
    for cached in [true, false] {
        let got = greedy(&model, &prompt, new, None, cached, &device);
        assert_eq!(got, want, "{}: greedy (cached: {cached})", r.dir.display());
    }
}

fn full_case(case: &str, grouped: bool) {
    let r = Reference::load(case);
    check_forward(&r, NormMode::Hf, "", "loss");
    check_masked_and_kept(&r);
    check_grads(&r, NormMode::Hf, "");
    check_greedy(&r, NormMode::Hf, "greedy_cached");
    assert_eq!(r.u32s("greedy_cached"), r.u32s("greedy_uncached"));
    if grouped {
        check_forward(&r, NormMode::Grouped, "grouped.", "grouped_loss");
        check_grads(&r, NormMode::Grouped, "grouped.");
        check_greedy(&r, NormMode::Grouped, "grouped_greedy_cached");
    }
}

#[test]
fn mamba2_one_group_tied() {
    full_case("mamba2_g1_tied", false);
}

#[test]
fn mamba2_two_groups_untied_bias_time_step_limit() {
    full_case("mamba2_g2_untied_bias_limit", true);
}

#[test]
fn mamba2_four_groups_bf16_sharded() {
    full_case("mamba2_g4_bf16_sharded", true);
}

#[test]
fn mamba1_tied() {
    full_case("mamba1_tied", false);
}

#[test]
fn mamba1_untied_f16() {
    full_case("mamba1_untied_f16", false);
}

/// For one group the two norms are the same function.
#[test]
fn one_group_norms_agree() {
    let r = Reference::load("mamba2_g1_tied");
    check_forward(&r, NormMode::Grouped, "", "loss");
}

/// For more than one group they are not: the grouped model must not match transformers'
/// full-width logits (guards against a norm option that does nothing).
#[test]
fn grouped_norm_differs_from_hf_for_several_groups() {
    let r = Reference::load("mamba2_g2_untied_bias_limit");
    let device = Default::default();
    let model: MambaLM<Cpu> = load_model_dir(&r.dir, NormMode::Grouped, &device).unwrap();
    let logits = values(model.forward(int_tensor(&r.ids("input_ids"), &device)));
    let (hf, _) = r.tensor("logits");
    assert!(max_abs(&logits, &hf) > 1e-3);
}

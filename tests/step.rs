//! One optimizer step (`mamba_train::step::optimizer_step`) issues all its device work before it
//! reads anything back: the losses stay on the device, the clipping factor is computed there and
//! handed to the update as a tensor. Here it is checked against the same step composed on the
//! host the way it was before: each micro-batch's loss and gradients from `loss_and_grads`,
//! summed, the global norm read back, torch's `clip_grad_norm_` factor, and the update with that
//! factor as a plain scale. Same loss, same norm, same parameters after the step.

mod common;

use std::collections::HashSet;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use common::*;
use mamba_burn::data::Batch;
use mamba_burn::hf::load_model_dir;
use mamba_burn::model::{BackpropOptions, MambaLM, NormMode};
use mamba_burn::train::optim::{AdamW, ScaledStep, Scaling};
use mamba_burn::train::step::{no_decay_ids, optimizer_step, Share, StepError, StepSettings};

/// Every trainable parameter's values, in visit order.
fn trainable(model: &MambaLM<CpuAd>) -> Vec<Vec<f32>> {
    struct V(Vec<Vec<f32>>);
    impl ModuleVisitor<CpuAd> for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuAd, D>>) {
            if param.is_require_grad() {
                self.0.push(values(param.val().inner()));
            }
        }
    }
    let mut v = V(Vec::new());
    model.visit(&mut v);
    v.0
}

/// `Σ g²` over the gradients of the trainable parameters, in f64 on the host.
fn squared_norm(model: &MambaLM<CpuAd>, grads: &GradientsParams) -> f64 {
    struct N<'a>(&'a GradientsParams, f64);
    impl ModuleVisitor<CpuAd> for N<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuAd, D>>) {
            if let Some(g) = self.0.get::<Cpu, D>(param.id) {
                self.1 += values(g).iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            }
        }
    }
    let mut n = N(grads, 0.0);
    model.visit(&mut n);
    n.1
}

fn row_batch(ids: &[i64], labels: &[i64]) -> Batch {
    Batch {
        batch: 1,
        seq_len: ids.len(),
        ids: ids.to_vec(),
        labels: labels.to_vec(),
        tokens: labels[1..].iter().filter(|&&l| l != -100).count(),
    }
}

#[test]
fn step_clips_on_the_device_as_on_the_host() {
    let r = Reference::load("mamba2_g1_tied");
    let device = Default::default();
    let model: MambaLM<CpuAd> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
    let model = lora_model(model);
    let ids = r.ids("input_ids");
    let labels = r.ids("labels");
    // Two micro-batches: a row each.
    let shares: Vec<Share> = ids
        .iter()
        .zip(&labels)
        .map(|(i, l)| Share::whole(row_batch(i, l)))
        .collect();
    assert!(shares.len() >= 2, "the fixture has {} rows", shares.len());
    let accum_n = shares.len() as f64;
    let backprop = BackpropOptions {
        checkpoint_every: 0,
        loss_chunk: 0,
        seed: 0,
    };
    let skip: HashSet<_> = no_decay_ids(&model);
    let lr = 3e-3;

    // On the host: losses and gradients, the norm read back, the factor, a plain scale.
    let host_grads = || {
        let mut accum = GradientsAccumulator::<MambaLM<CpuAd>>::new();
        let mut loss_sum = 0.0;
        for s in &shares {
            let b = &s.batch;
            let out = model.loss_and_grads(
                int_tensor(std::slice::from_ref(&b.ids), &device),
                int_tensor(std::slice::from_ref(&b.labels), &device),
                backprop,
            );
            loss_sum += values(out.loss)[0] as f64;
            accum.accumulate(&model, out.grads);
        }
        (accum.grads(), loss_sum)
    };
    let (grads, loss_sum) = host_grads();
    let norm = squared_norm(&model, &grads).sqrt() / accum_n;

    for max_grad_norm in [0.5 * norm, 0.0, 10.0 * norm] {
        let settings = StepSettings {
            grad_accum: shares.len(),
            max_grad_norm,
            weight_decay: 0.1,
            backprop,
        };
        let clip = if max_grad_norm > 0.0 {
            (max_grad_norm / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let mut host_optim = AdamW::<CpuAd>::new(0.9, 0.999, 1e-8);
        let host = host_optim.step_scaled(
            lr,
            model.clone(),
            host_grads().0,
            Scaling {
                grad_scale: clip / accum_n,
                device_scale: None,
                weight_decay: settings.weight_decay,
                skip_decay: Some(&skip),
            },
        );

        let mut optim = AdamW::<CpuAd>::new(0.9, 0.999, 1e-8);
        let (stepped, report) = optimizer_step(
            model.clone(),
            &mut optim,
            &shares,
            0,
            lr,
            &settings,
            &skip,
            &device,
            None,
        )
        .map_err(|e| format!("{e:?}"))
        .unwrap();
        let what = format!("max_grad_norm {max_grad_norm:.4} (norm {norm:.4})");
        let loss = loss_sum / accum_n;
        assert!(
            ((report.loss - loss) / loss).abs() < 1e-6,
            "{what}: loss {} against {loss}",
            report.loss
        );
        assert!(
            ((report.grad_norm - norm) / norm).abs() < 1e-5,
            "{what}: norm {} against {norm}",
            report.grad_norm
        );
        let (got, want, before) = (trainable(&stepped), trainable(&host), trainable(&model));
        assert_eq!(got.len(), want.len());
        for (i, ((g, w), b)) in got.iter().zip(&want).zip(&before).enumerate() {
            // The update itself (the step's size is what clipping changes).
            let dg: Vec<f32> = g.iter().zip(b).map(|(x, y)| x - y).collect();
            let dw: Vec<f32> = w.iter().zip(b).map(|(x, y)| x - y).collect();
            let err = rel_err(&dg, &dw);
            assert!(err < 1e-4, "{what}: parameter #{i}: update rel {err:e}");
        }
    }
}

/// A step whose loss is not finite is an error, and the model is not handed back.
#[test]
fn a_non_finite_loss_fails_the_step() {
    let r = Reference::load("mamba2_g1_tied");
    let device = Default::default();
    let model: MambaLM<CpuAd> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
    // Every weight infinite: the loss is NaN.
    struct Inf;
    impl burn::module::ModuleMapper<CpuAd> for Inf {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<CpuAd, D>>,
        ) -> Param<Tensor<CpuAd, D>> {
            param.map(|t| (t.zeros_like() + f32::INFINITY).require_grad())
        }
    }
    let model = model.map(&mut Inf);
    let ids = r.ids("input_ids");
    let labels = r.ids("labels");
    let shares = vec![Share::whole(row_batch(&ids[0], &labels[0]))];
    let settings = StepSettings {
        grad_accum: 1,
        max_grad_norm: 1.0,
        weight_decay: 0.0,
        backprop: BackpropOptions {
            checkpoint_every: 0,
            loss_chunk: 0,
            seed: 0,
        },
    };
    let mut optim = AdamW::<CpuAd>::new(0.9, 0.999, 1e-8);
    let skip = HashSet::new();
    match optimizer_step(
        model, &mut optim, &shares, 0, 1e-3, &settings, &skip, &device, None,
    ) {
        Err(StepError::NonFinite(v)) => assert!(!v.is_finite()),
        Err(e) => panic!("expected a non-finite loss, got {e:?}"),
        Ok((_, r)) => panic!("the step succeeded with loss {}", r.loss),
    }
}

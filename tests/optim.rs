//! The training loop's AdamW (`mamba_train::optim::AdamW`): the one-launch kernel against the
//! composition in tensor ops, and the optimizer against burn's own `AdamW` adaptor (same
//! parameters step by step, with and without the gradient scale and decoupled decay, and each
//! one resuming from the other's record).

mod common;
#[path = "common/kernels.rs"]
#[allow(dead_code)]
mod kcommon;

use std::collections::HashSet;

use burn::module::{Module, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use common::CpuAd;
use kcommon::{check, poison, random, Cpu, Gpu};
use mamba_burn::kernels::optim::{adamw_reference, AdamWInput, AdamWScalars};
use mamba_burn::kernels::MambaBackend;
use mamba_burn::train::optim::{AdamW, ScaledStep, Scaling};

/// The kernel (wgpu) against the reference (CPU): first step (no moments) and a later one, with
/// a gradient scale and a decay, at a length that is not a multiple of any cube.
#[test]
fn adamw_kernel_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    let n = 1_237;
    let data = [
        random(&[n], 1.0),
        random(&[n], 0.1),
        random(&[n], 0.01),
        random(&[n], 1e-4).convert::<f32>(),
    ];
    // v ≥ 0, as a second moment is.
    let v = Tensor::<Cpu, 1>::from_data(data[3].clone(), &cpu)
        .abs()
        .into_data();
    // The last case's gradient factor comes from the device (the clipping factor), beside a
    // host scale.
    for (time, with_state, grad_scale, decay, factor) in [
        (1, false, 1.0, 1.0, None),
        (7, true, 0.37, 0.999, None),
        (3, true, 0.5, 1.0, Some(0.74f32)),
    ] {
        let scalars = AdamWScalars {
            lr: 3e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            time,
            grad_scale,
            decay,
        };
        fn input<B: MambaBackend>(
            d: &[burn::tensor::TensorData],
            v: &burn::tensor::TensorData,
            with_state: bool,
            factor: Option<f32>,
            scalars: AdamWScalars,
            device: &B::Device,
        ) -> AdamWInput<B> {
            let t = |x: &burn::tensor::TensorData| Tensor::<B, 1>::from_data(x.clone(), device);
            AdamWInput {
                param: t(&d[0]),
                grad: t(&d[1]),
                moments: with_state.then(|| (t(&d[2]), t(v))),
                device_scale: factor.map(|f| Tensor::<B, 1>::from_floats([f], device)),
                scalars,
            }
        }
        let want = adamw_reference(input::<Cpu>(&data, &v, with_state, factor, scalars, &cpu));
        if let Some(f) = factor {
            // The reference applies the device factor as a host scale of the same product.
            let folded = AdamWScalars {
                grad_scale: grad_scale * f as f64,
                ..scalars
            };
            let host = adamw_reference(input::<Cpu>(&data, &v, with_state, None, folded, &cpu));
            let e = check(
                "device factor as a host scale",
                want.param.clone(),
                host.param,
            );
            assert!(e < 1e-6, "{e:e}");
        }
        poison(n);
        let got = Gpu::adamw_step(input::<Gpu>(&data, &v, with_state, factor, scalars, &gpu));
        let what = format!("adamw t={time} state={with_state} factor={factor:?}");
        let e = [
            check(&format!("{what} param"), got.param, want.param),
            check(&format!("{what} m"), got.moment_1, want.moment_1),
            check(&format!("{what} v"), got.moment_2, want.moment_2),
        ];
        eprintln!("{what}: {:.2e} {:.2e} {:.2e}", e[0], e[1], e[2]);
    }
}

fn model() -> Linear<CpuAd> {
    LinearConfig::new(12, 7)
        .with_bias(true)
        .init(&Default::default())
}

/// Gradients of a fixed loss at the model's current parameters.
fn grads(m: &Linear<CpuAd>, step: usize) -> GradientsParams {
    let device = Default::default();
    <CpuAd as burn::tensor::backend::Backend>::seed(&device, 100 + step as u64);
    let x = Tensor::<CpuAd, 2>::random([5, 12], Distribution::Normal(0.0, 1.0), &device);
    let y = m.forward(x);
    let loss = (y.clone() * y).sum();
    GradientsParams::from_grads(loss.backward(), m)
}

fn params(m: &Linear<CpuAd>) -> Vec<Tensor<Cpu, 1>> {
    let mut out = vec![m.weight.val().inner().flatten(0, 1)];
    out.extend(m.bias.as_ref().map(|b| b.val().inner()));
    out
}

fn same(what: &str, a: &Linear<CpuAd>, b: &Linear<CpuAd>) {
    for (x, y) in params(a).into_iter().zip(params(b)) {
        let err = kcommon::rel_err(
            &x.into_data().to_vec::<f32>().unwrap(),
            &y.into_data().to_vec::<f32>().unwrap(),
        );
        assert!(err < 1e-6, "{what}: relative difference {err:e}");
    }
}

/// Step for step what burn's `AdamW` adaptor does: plain steps, then steps with a gradient
/// scale and a decay that skips the bias; and either resumes from the other's record.
#[test]
fn adamw_matches_burn_adamw_and_its_record() {
    // burn initialises parameters lazily, and each clone of an unread one draws its own: start
    // both from one record.
    let start = model();
    let record = || start.clone().into_record();
    let mut burn_opt = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_epsilon(1e-8)
        .init::<CpuAd, Linear<CpuAd>>();
    let mut ours = AdamW::<CpuAd>::new(0.9, 0.999, 1e-8);
    let _ = params(&start);
    let (mut a, mut b) = (model().load_record(record()), model().load_record(record()));
    same("start", &a, &b);
    let skip: HashSet<ParamId> = a.bias.iter().map(|p| p.id).collect();
    for step in 0..6 {
        let lr = 1e-2 / (step + 1) as f64;
        let (ga, gb) = (grads(&a, step), grads(&b, step));
        if step < 3 {
            a = burn_opt.step(lr, a, ga);
            b = Optimizer::step(&mut ours, lr, b, gb);
        } else {
            // The last steps' clipping factor is on the device, as the training step hands it.
            let scaling = Scaling {
                grad_scale: 0.25,
                device_scale: (step >= 5)
                    .then(|| Tensor::<Cpu, 1>::from_floats([0.8], &Default::default())),
                weight_decay: 0.1,
                skip_decay: Some(&skip),
            };
            a = burn_opt.step_scaled(lr, a, ga, scaling.clone());
            b = ours.step_scaled(lr, b, gb, scaling);
        }
        same(&format!("step {step}"), &a, &b);
    }
    // Resume each from the other's record: the next step agrees again.
    let burn_from_ours = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_epsilon(1e-8)
        .init::<CpuAd, Linear<CpuAd>>()
        .load_record(Optimizer::<Linear<CpuAd>, CpuAd>::to_record(&ours));
    let ours_from_burn = Optimizer::<Linear<CpuAd>, CpuAd>::load_record(
        AdamW::<CpuAd>::new(0.9, 0.999, 1e-8),
        burn_opt.to_record(),
    );
    let (mut c, mut d) = (b.clone(), a.clone());
    let (gc, gd) = (grads(&c, 9), grads(&d, 9));
    let mut burn_from_ours = burn_from_ours;
    let mut ours_from_burn = ours_from_burn;
    c = burn_from_ours.step(1e-3, c, gc);
    d = Optimizer::step(&mut ours_from_burn, 1e-3, d, gd);
    same("resumed across", &c, &d);
}

/// The global norm's one-launch-a-tensor kernel (wgpu) against the sum of squares in f64 on the
/// host: tensors of one value, of less than a cube, and of many cubes' worth (several cubes
/// share it), and no tensors at all.
#[test]
fn squared_norm_kernel_matches_host_sum() {
    let gpu = Default::default();
    let sizes = [1usize, 5, 300, 70_001, 402_304];
    let data: Vec<_> = sizes.iter().map(|&n| random(&[n], 0.5)).collect();
    let want: f64 = data
        .iter()
        .flat_map(|d| d.to_vec::<f32>().unwrap())
        .map(|v| (v as f64) * (v as f64))
        .sum();
    poison(sizes.len() * 64);
    let tensors = data
        .iter()
        .map(|d| Tensor::<Gpu, 1>::from_data(d.clone(), &gpu))
        .collect();
    let got = Gpu::squared_norm(tensors).expect("a norm").into_scalar() as f64;
    let rel = (got - want).abs() / want;
    assert!(
        rel < 1e-5,
        "squared norm {got} against {want} (relative {rel:e})"
    );
    let cpu = Default::default();
    let on_cpu = data
        .iter()
        .map(|d| Tensor::<Cpu, 1>::from_data(d.clone(), &cpu))
        .collect();
    let ref_rel = (Cpu::squared_norm(on_cpu).unwrap().into_scalar() as f64 - want).abs() / want;
    assert!(ref_rel < 1e-5, "reference: relative {ref_rel:e}");
    assert!(Gpu::squared_norm(Vec::new()).is_none());
}

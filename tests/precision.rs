//! Precision (`f32`, `bf16-mixed`, `bf16`) on the transformers fixtures.
//!
//! The CPU backend has no bf16, so `bf16-mixed` runs here as bf16 storage with f32 compute
//! (`Compute::Bf16Emulated`: every value stored in bf16 on a GPU is rounded to bf16 here), which
//! has the numerics of the cast points; the tensor-core path itself is measured on the H200
//! (BENCHMARKS.md). `Compute::Native(F64)` runs the same cast points with real casts, so a tensor
//! left in the wrong dtype (an op mixing dtypes, a gradient registered in its parent's wrong
//! dtype) fails here as it would in bf16 on a GPU.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor};
use common::*;
use mamba_burn::hf::load_model_dir;
use mamba_burn::model::generate::greedy;
use mamba_burn::model::precision::round_bf16;
use mamba_burn::model::{BackpropOptions, Compute, MambaLM, NormMode, Precision};

/// The bound: `bf16-mixed` loss within 2e-2 relative of f32.
const BF16_LOSS_REL: f64 = 2e-2;
/// The same bound on the gradient (relative L2 over all trainable parameters together).
const BF16_GRAD_REL: f64 = 2e-2;

#[test]
fn round_bf16_is_the_nearest_bf16() {
    let device = Default::default();
    let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 3.0, 1e-20, -7.5e12];
    // Exact powers of two and their neighbours (where ⌊log2⌋ is fragile).
    for e in -40..40 {
        let p = 2f32.powi(e);
        xs.extend([
            p,
            p * (1.0 + f32::EPSILON),
            p * (1.0 - f32::EPSILON / 2.0),
            -p,
        ]);
    }
    // Ties between two bf16 values (round to even) and random values over many magnitudes.
    xs.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -(1.0 + 1.0 / 256.0)]);
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..5000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let m = (s % 1_000_000) as f32 / 1e6 + 1.0;
        let e = ((s >> 32) % 60) as i32 - 30;
        let sign = if (s >> 40) & 1 == 1 { -1.0 } else { 1.0 };
        xs.push(sign * m * 2f32.powi(e));
    }
    let got = values(round_bf16(Tensor::<Cpu, 1>::from_floats(
        xs.as_slice(),
        &device,
    )));
    for (x, g) in xs.iter().zip(&got) {
        let want = half::bf16::from_f32(*x).to_f32();
        assert_eq!(*g, want, "round_bf16({x:e}) = {g:e}, bf16 gives {want:e}");
    }
}

#[test]
fn precision_names_parse_as_lightning_spells_them() {
    assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
    assert_eq!("32-true".parse::<Precision>().unwrap(), Precision::F32);
    assert_eq!(
        "bf16-mixed".parse::<Precision>().unwrap(),
        Precision::Bf16Mixed
    );
    assert_eq!("bf16-true".parse::<Precision>().unwrap(), Precision::Bf16);
    let err = "fp16".parse::<Precision>().unwrap_err();
    assert!(err.contains("bf16-mixed"), "{err}");
    // The CPU has no bf16: the emulation stands in.
    assert_eq!(
        Precision::Bf16Mixed.compute::<Cpu>(&Default::default()),
        Compute::Bf16Emulated
    );
}

/// One parameter's dtype, whether it trains, whether it is a matrix, and its gradient's dtype.
#[derive(Debug, Clone, Copy)]
struct ParamInfo {
    dtype: DType,
    trainable: bool,
    matrix: bool,
    grad: Option<DType>,
}

/// Every trainable parameter's gradient, concatenated in visit order, and each parameter's
/// [`ParamInfo`].
fn grads_of(model: &MambaLM<CpuAd>, grads: &GradientsParams) -> (Vec<f32>, Vec<ParamInfo>) {
    struct V<'a>(&'a GradientsParams, Vec<f32>, Vec<ParamInfo>);
    impl ModuleVisitor<CpuAd> for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuAd, D>>) {
            let g = self.0.get::<Cpu, D>(param.id);
            self.2.push(ParamInfo {
                dtype: param.val().dtype(),
                trainable: param.is_require_grad(),
                matrix: D >= 2,
                grad: g.as_ref().map(|g| g.dtype()),
            });
            if let Some(g) = g {
                self.1.extend(values(g));
            }
        }
    }
    let mut v = V(grads, Vec::new(), Vec::new());
    model.visit(&mut v);
    (v.1, v.2)
}

struct Run {
    loss: f64,
    grads: Vec<f32>,
    dtypes: Vec<ParamInfo>,
}

fn run(model: &MambaLM<CpuAd>, r: &Reference, opts: BackpropOptions) -> Run {
    let device = Default::default();
    let out = model.loss_and_grads(
        int_tensor(&r.ids("input_ids"), &device),
        int_tensor(&r.ids("labels"), &device),
        opts,
    );
    let loss = values(out.loss)[0] as f64;
    let (grads, dtypes) = grads_of(model, &out.grads);
    Run {
        loss,
        grads,
        dtypes,
    }
}

fn load(case: &str, with_lora: bool) -> (Reference, MambaLM<CpuAd>) {
    let r = Reference::load(case);
    let model: MambaLM<CpuAd> = load_model_dir(&r.dir, NormMode::Hf, &Default::default()).unwrap();
    (r, if with_lora { lora_model(model) } else { model })
}

const OPTS: [BackpropOptions; 2] = [
    BackpropOptions {
        checkpoint_every: 0,
        loss_chunk: 0,
        seed: 1,
    },
    BackpropOptions {
        checkpoint_every: 1,
        loss_chunk: 7,
        seed: 1,
    },
];

/// `mixed` (the same weights in another compute dtype) against `model` in f32 at each of
/// [`OPTS`]: the case's name, the loss's and the gradients' relative errors, and `mixed`'s run.
fn against_f32(
    model: &MambaLM<CpuAd>,
    mixed: &MambaLM<CpuAd>,
    r: &Reference,
    case: &str,
    with_lora: bool,
) -> Vec<(String, f64, f64, Run)> {
    OPTS.iter()
        .map(|&opts| {
            let want = run(model, r, opts);
            let got = run(mixed, r, opts);
            let what = format!("{case} lora={with_lora} ckpt={}", opts.checkpoint_every);
            let loss_rel = ((got.loss - want.loss) / want.loss).abs();
            let grad_rel = rel_err(&got.grads, &want.grads);
            (what, loss_rel, grad_rel, got)
        })
        .collect()
}

/// `bf16-mixed` against f32: loss within 2e-2, gradients within 2e-2 (relative L2), with and
/// without checkpointing; the gradients reach the f32 masters as f32.
fn bf16_mixed_close_to_f32(case: &str, with_lora: bool) {
    let (r, model) = load(case, with_lora);
    let mixed = model.clone().with_compute(Compute::Bf16Emulated, false);
    assert_eq!(mixed.compute, Compute::Bf16Emulated);
    for (what, loss_rel, grad_rel, got) in against_f32(&model, &mixed, &r, case, with_lora) {
        eprintln!(
            "{what}: bf16-mixed loss {} (rel {loss_rel:.2e}), gradient rel {grad_rel:.2e}",
            got.loss
        );
        assert!(loss_rel <= BF16_LOSS_REL, "{what}: loss rel {loss_rel:e}");
        assert!(
            grad_rel <= BF16_GRAD_REL,
            "{what}: gradient rel {grad_rel:e}"
        );
        // Not the f32 numbers: the rounding happened.
        assert!(
            loss_rel > 0.0 && grad_rel > 1e-7,
            "{what}: no bf16 rounding took place"
        );
        for p in &got.dtypes {
            assert_eq!(p.dtype, DType::F32);
            if p.trainable {
                assert_eq!(p.grad, Some(DType::F32), "{what}: a master's gradient");
            }
        }
    }
    // The frozen base's matrices are stored rounded to bf16 values (LoRA); masters and vectors
    // keep f32 values.
    struct Rounded(bool, usize, usize);
    impl ModuleVisitor<CpuAd> for Rounded {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<CpuAd, D>>) {
            if D < 2 {
                return;
            }
            let v = values(param.val());
            let exact = v.iter().all(|x| half::bf16::from_f32(*x).to_f32() == *x);
            if param.is_require_grad() {
                self.2 += usize::from(!exact);
            } else {
                assert!(exact, "a frozen weight not stored in bf16");
                self.1 += 1;
            }
            self.0 |= !exact;
        }
    }
    let mut v = Rounded(false, 0, 0);
    mixed.visit(&mut v);
    if with_lora {
        assert!(v.1 > 0 && v.2 > 0, "frozen {} / f32 masters {}", v.1, v.2);
    } else {
        assert_eq!(v.1, 0, "full fine-tuning: nothing is frozen");
    }
}

#[test]
fn bf16_mixed_mamba2_full_and_lora() {
    bf16_mixed_close_to_f32("mamba2_g1_tied", false);
    bf16_mixed_close_to_f32("mamba2_g1_tied", true);
    bf16_mixed_close_to_f32("mamba2_g2_untied_bias_limit", true);
}

#[test]
fn bf16_mixed_mamba1_full_and_lora() {
    bf16_mixed_close_to_f32("mamba1_tied", false);
    bf16_mixed_close_to_f32("mamba1_tied", true);
}

/// The same cast points with a real second dtype (f64 on the CPU): every activation in it,
/// the frozen base stored in it, masters and their gradients f32, and the numbers those of f32
/// (to f32 rounding). An op that mixed dtypes would panic here, as it would in bf16 on a GPU.
fn native_cast_points(case: &str, with_lora: bool) {
    let (r, model) = load(case, with_lora);
    let compute = Compute::Native(DType::F64);
    let mixed = model.clone().with_compute(compute, false);
    for (what, loss_rel, grad_rel, got) in against_f32(&model, &mixed, &r, case, with_lora) {
        assert!(loss_rel <= 1e-5, "{what}: loss rel {loss_rel:e}");
        assert!(grad_rel <= 1e-4, "{what}: gradient rel {grad_rel:e}");
        let mut frozen = 0;
        for p in &got.dtypes {
            if p.trainable {
                assert_eq!(p.dtype, DType::F32, "{what}: a master");
                assert_eq!(p.grad, Some(DType::F32), "{what}: a master's gradient");
            } else if p.matrix {
                assert_eq!(p.dtype, DType::F64, "{what}: a frozen matrix");
                frozen += 1;
            } else {
                assert_eq!(p.dtype, DType::F32, "{what}: a frozen vector stays f32");
            }
        }
        assert_eq!(frozen > 0, with_lora, "{what}");
    }
    // `bf16` (no masters): every matrix in the compute dtype, its gradient too.
    let pure = model.with_compute(compute, true);
    let got = run(&pure, &r, OPTS[1]);
    for p in &got.dtypes {
        let want = if p.matrix { DType::F64 } else { DType::F32 };
        assert_eq!(p.dtype, want);
        if p.trainable {
            assert_eq!(p.grad, Some(want));
        }
    }
}

#[test]
fn cast_points_mamba2() {
    native_cast_points("mamba2_g1_tied", false);
    native_cast_points("mamba2_g2_untied_bias_limit", true);
}

#[test]
fn cast_points_mamba1() {
    native_cast_points("mamba1_tied", true);
}

/// Inference in another dtype: every weight matrix stored in it, the cached recurrent step and the
/// full forward agree, greedy continuations match f32's (these fixtures' margins are wide).
#[test]
fn inference_in_the_compute_dtype() {
    let device = Default::default();
    for case in ["mamba2_g1_tied", "mamba1_tied"] {
        let r = Reference::load(case);
        let model: MambaLM<Cpu> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
        let prompt = r.u32s("prompt_ids");
        let want = greedy(&model, &prompt, 10, None, true, &device);
        let m = model.with_compute(Compute::Native(DType::F64), false);
        struct AllF64;
        impl ModuleVisitor<Cpu> for AllF64 {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Cpu, D>>) {
                let want = if D >= 2 { DType::F64 } else { DType::F32 };
                assert_eq!(param.val().dtype(), want);
            }
        }
        m.visit(&mut AllF64);
        assert_eq!(greedy(&m, &prompt, 10, None, true, &device), want, "{case}");
        assert_eq!(
            greedy(&m, &prompt, 10, None, false, &device),
            want,
            "{case}"
        );
        let logits = m.forward(int_tensor(&r.ids("input_ids"), &device));
        assert_eq!(logits.dtype(), DType::F32, "logits come back in f32");
        let e = m.with_compute(Compute::Bf16Emulated, false);
        let got = greedy(&e, &prompt, 10, None, true, &device);
        assert_eq!(got.len(), want.len());
    }
}

/// The guard against torch: on the fixtures, our `bf16-mixed` loss beside our f32 loss, and
/// torch's bf16 autocast loss beside torch's f32 loss (`autocast.json`, written on an H200 by
/// scripts/autocast_reference.py: f32 weights, bf16 matmuls, transformers' torch path).
///
/// Measured (2026-12-02): Mamba1 ours 7.7e-6 / 2.7e-5 against torch's 1.1e-4 / 2.1e-4, closer;
/// Mamba2 ours 1.19e-4 / 6.4e-5 / 6.2e-5 against torch's 4.2e-5 / 4.7e-5 / 5.2e-5, 1.2–2.8×
/// further. What we round that
/// torch's path does not: the SSD's output (bf16, as mamba_ssm's kernels write it; transformers'
/// torch SSD promotes to f32 against the f32 `A`) and, at inference, the embedding table (stored
/// in bf16 with the other matrices). The bound asserted: the 2e-2, and within 4× of
/// torch's error, so that a regression in the cast points shows.
#[test]
fn bf16_mixed_against_torch_autocast() {
    let device = Default::default();
    let mut rows = Vec::new();
    for case in [
        "mamba2_g1_tied",
        "mamba2_g2_untied_bias_limit",
        "mamba2_g4_bf16_sharded",
        "mamba1_tied",
        "mamba1_untied_f16",
    ] {
        let r = Reference::load(case);
        let path = r.dir.join("autocast.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run scripts/autocast_reference.py)",
                path.display()
            )
        });
        let torch: serde_json::Value = serde_json::from_str(&text).unwrap();
        let torch_rel = torch["rel_err"].as_f64().unwrap();
        let model: MambaLM<Cpu> = load_model_dir(&r.dir, NormMode::Hf, &device).unwrap();
        let ids = int_tensor(&r.ids("input_ids"), &device);
        let labels = int_tensor(&r.ids("labels"), &device);
        let f32_loss = values(model.loss(ids.clone(), labels.clone()))[0] as f64;
        let mixed = model.with_compute(Compute::Bf16Emulated, false);
        let bf16_loss = values(mixed.loss(ids, labels))[0] as f64;
        let ours = ((bf16_loss - f32_loss) / f32_loss).abs();
        eprintln!("{case}: ours bf16-mixed rel {ours:.2e}, torch autocast rel {torch_rel:.2e}");
        rows.push((case, ours, torch_rel));
    }
    for (case, ours, torch) in rows {
        assert!(ours > 0.0, "{case}: no rounding took place");
        assert!(ours <= BF16_LOSS_REL, "{case}: {ours:e}");
        assert!(
            ours <= 4.0 * torch,
            "{case}: bf16-mixed is {ours:e} from f32, torch's autocast {torch:e}"
        );
    }
}

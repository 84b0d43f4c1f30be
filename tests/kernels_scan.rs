//! The selective-scan kernels (forward and backward) and the three one-token decode kernels on
//! `Wgpu` (Mesa's lavapipe on a machine without a GPU) against the reference ops on `NdArray`:
//! forward outputs, final states, the gradients of every input through `Autodiff` end to end,
//! the backward op itself, and multi-step decoding against the full scans. Small odd shapes,
//! fresh random inputs on every run.
//!
//! Metric as in `tests/kernels.rs`: `‖got − want‖ / ‖want‖ ≤ 1e-4` in f32 over whole tensors
//! (the allocator is poisoned with NaN first, so an element a kernel fails to write shows up); a
//! NaN or an infinity anywhere fails.

use burn::backend::Autodiff;
use burn::tensor::activation::{silu, softplus};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use mamba_burn::kernels::{
    reference, ConvInput, DecodeLinearInput, Mamba2StepInput, MambaBackend, SelectiveScanGrads,
    SelectiveScanInput, SsdInput, SsdStepInput,
};

#[path = "common/kernels.rs"]
mod kcommon;
use kcommon::{check, grad_or_zeros, poison, random, Cpu, Gpu, Uses};

/// `offset + |N(0, scale)|`: positive values (a `dt` used without softplus must be positive, or
/// the state grows without bound).
fn random_pos(shape: &[usize], scale: f32, offset: f32) -> TensorData {
    let v: Vec<f32> = random(shape, scale)
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| offset + x.abs())
        .collect();
    TensorData::new(v, shape.to_vec())
}

/// `A = -exp(A_log)`, `A_log ~ N(0, 1)`: decays `exp(dt A)` from about 1 down to nearly 0.
fn random_a(shape: &[usize]) -> TensorData {
    let v: Vec<f32> = random(shape, 1.0)
        .to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(|x| -x.exp())
        .collect();
    TensorData::new(v, shape.to_vec())
}

// ------------------------------------------------------------------------------------------
// Selective scan
// ------------------------------------------------------------------------------------------

/// One selective-scan case.
#[derive(Debug, Clone, Copy)]
struct ScanCase {
    batch: usize,
    seq: usize,
    channels: usize,
    state: usize,
    z: bool,
    bias: bool,
    init: bool,
    softplus: bool,
    /// Read `u`, `B` and `C` as narrowed (strided) views of wider tensors, as the model's
    /// slices of the projections are.
    strided: bool,
}

/// Extra columns around the strided views.
const PAD: usize = 3;

struct ScanData {
    case: ScanCase,
    /// `[batch, seq, channels (+ 2 PAD when strided)]`
    u: TensorData,
    delta: TensorData,
    a: TensorData,
    /// `[batch, seq, 2 state (+ PAD when strided)]`: `B` then `C` (after `PAD` columns).
    bc: TensorData,
    d: TensorData,
    z: Option<TensorData>,
    bias: Option<TensorData>,
    init: Option<TensorData>,
    /// Upstream gradients of `y` and of the final state.
    r: TensorData,
    r2: TensorData,
}

impl ScanData {
    fn new(case: ScanCase) -> Self {
        let ScanCase {
            batch: bs,
            seq: l,
            channels: d,
            state: n,
            ..
        } = case;
        let pad = if case.strided { PAD } else { 0 };
        let (delta, bias) = if case.softplus {
            (random(&[bs, l, d], 1.0), random(&[d], 0.5))
        } else {
            (
                random_pos(&[bs, l, d], 0.5, 0.02),
                random_pos(&[d], 0.1, 0.0),
            )
        };
        Self {
            case,
            u: random(&[bs, l, d + 2 * pad], 1.0),
            delta,
            a: random_a(&[d, n]),
            bc: random(&[bs, l, 2 * n + pad], 0.7),
            d: random(&[d], 1.0),
            z: case.z.then(|| random(&[bs, l, d], 1.5)),
            bias: case.bias.then_some(bias),
            init: case.init.then(|| random(&[bs, d, n], 1.0)),
            r: random(&[bs, l, d], 1.0),
            r2: random(&[bs, d, n], 1.0),
        }
    }
}

/// Leaf tensors of one case on one backend (`u` and `bc` unnarrowed).
struct ScanLeaves<B: Backend> {
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    bc: Tensor<B, 3>,
    d: Tensor<B, 1>,
    z: Option<Tensor<B, 3>>,
    bias: Option<Tensor<B, 1>>,
    init: Option<Tensor<B, 3>>,
}

impl<B: Backend> ScanLeaves<B> {
    fn new(data: &ScanData, device: &B::Device) -> Self {
        let t3 = |t: &TensorData| Tensor::<B, 3>::from_data(t.clone(), device);
        Self {
            u: t3(&data.u),
            delta: t3(&data.delta),
            a: Tensor::from_data(data.a.clone(), device),
            bc: t3(&data.bc),
            d: Tensor::from_data(data.d.clone(), device),
            z: data.z.as_ref().map(t3),
            bias: data.bias.clone().map(|t| Tensor::from_data(t, device)),
            init: data.init.as_ref().map(t3),
        }
    }

    fn require_grad(self) -> Self
    where
        B: AutodiffBackend,
    {
        Self {
            u: self.u.require_grad(),
            delta: self.delta.require_grad(),
            a: self.a.require_grad(),
            bc: self.bc.require_grad(),
            d: self.d.require_grad(),
            z: self.z.map(|t| t.require_grad()),
            bias: self.bias.map(|t| t.require_grad()),
            init: self.init.map(|t| t.require_grad()),
        }
    }

    fn input(&self, case: &ScanCase) -> SelectiveScanInput<B> {
        let (pad, n, ch) = (
            if case.strided { PAD } else { 0 },
            case.state,
            case.channels,
        );
        SelectiveScanInput {
            u: self.u.clone().narrow(2, pad, ch),
            delta: self.delta.clone(),
            a: self.a.clone(),
            b: self.bc.clone().narrow(2, 0, n),
            c: self.bc.clone().narrow(2, n + pad, n),
            d: self.d.clone(),
            z: self.z.clone(),
            delta_bias: self.bias.clone(),
            delta_softplus: case.softplus,
            initial_state: self.init.clone(),
        }
    }
}

fn scan_cases() -> Vec<ScanCase> {
    let base = ScanCase {
        batch: 2,
        seq: 37,
        channels: 70,
        state: 16,
        z: true,
        bias: true,
        init: true,
        softplus: true,
        strided: false,
    };
    let mut cases = Vec::new();
    // Every combination of the options, at a length that is not a multiple of any chunk.
    for z in [false, true] {
        for bias in [false, true] {
            for init in [false, true] {
                for softplus in [false, true] {
                    cases.push(ScanCase {
                        z,
                        bias,
                        init,
                        softplus,
                        ..base
                    });
                }
            }
        }
    }
    // Lengths: one step, a single partial chunk, several chunks; state 16 and 5.
    for seq in [1, 7, 16, 100] {
        for state in [16, 5] {
            cases.push(ScanCase { seq, state, ..base });
        }
    }
    cases.push(ScanCase {
        state: 5,
        z: false,
        bias: false,
        init: false,
        softplus: false,
        ..base
    });
    // Strided views, fewer channels than a cube, odd batch; a large state.
    cases.push(ScanCase {
        batch: 3,
        seq: 29,
        channels: 33,
        strided: true,
        ..base
    });
    cases.push(ScanCase {
        batch: 1,
        seq: 20,
        channels: 9,
        state: 64,
        ..base
    });
    cases
}

#[test]
fn selective_scan_forward_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    assert!(Gpu::has_kernels());
    let mut worst = (0.0f64, 0.0f64);
    for case in scan_cases() {
        let data = ScanData::new(case);
        let want = reference::selective_scan(ScanLeaves::<Cpu>::new(&data, &cpu).input(&case));
        poison(case.batch * case.seq * case.channels);
        poison(case.batch * case.channels * case.state);
        let got = Gpu::selective_scan(ScanLeaves::<Gpu>::new(&data, &gpu).input(&case));
        let e_y = check(&format!("{case:?} y"), got.y, want.y);
        let e_s = check(
            &format!("{case:?} final_state"),
            got.final_state,
            want.final_state,
        );
        worst = (worst.0.max(e_y), worst.1.max(e_s));
        eprintln!("{case:?}: y {e_y:.2e}, final_state {e_s:.2e}");
    }
    eprintln!("max: y {:.2e}, final_state {:.2e}", worst.0, worst.1);
}

/// Forward outputs and the gradients of `loss = Σ y·r + Σ final_state·r2` (the terms `uses`
/// names) on an autodiff backend, in the order y, final_state, du, ddelta, dA, dB/dC (of the
/// unnarrowed `bc`), dD, then dz, d delta_bias, d initial_state when present.
fn scan_autodiff<B: AutodiffBackend + MambaBackend>(
    data: &ScanData,
    uses: Uses,
    device: &B::Device,
) -> Vec<(&'static str, Tensor<B::InnerBackend, 3>)> {
    let case = data.case;
    let leaves = ScanLeaves::<B>::new(data, device).require_grad();
    let out = B::selective_scan(leaves.input(&case));
    let r = Tensor::<B, 3>::from_data(data.r.clone(), device);
    let r2 = Tensor::<B, 3>::from_data(data.r2.clone(), device);
    let loss = match uses {
        Uses::Both => (out.y.clone() * r).sum() + (out.final_state.clone() * r2).sum(),
        Uses::Y => (out.y.clone() * r).sum(),
        Uses::FinalState => (out.final_state.clone() * r2).sum(),
    };
    let grads = loss.backward();
    let mut res = vec![
        ("y", out.y.inner()),
        ("final_state", out.final_state.inner()),
        ("du", grad_or_zeros(&leaves.u, &grads)),
        ("ddelta", grad_or_zeros(&leaves.delta, &grads)),
        ("dA", grad_or_zeros(&leaves.a, &grads).unsqueeze()),
        ("dBC", grad_or_zeros(&leaves.bc, &grads)),
        ("dD", grad_or_zeros(&leaves.d, &grads).unsqueeze()),
    ];
    if let Some(z) = &leaves.z {
        res.push(("dz", grad_or_zeros(z, &grads)));
    }
    if let Some(b) = &leaves.bias {
        res.push(("dbias", grad_or_zeros(b, &grads).unsqueeze()));
    }
    if let Some(s) = &leaves.init {
        res.push(("dinit", grad_or_zeros(s, &grads)));
    }
    res
}

#[test]
fn selective_scan_autodiff_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    assert!(<Autodiff<Gpu> as MambaBackend>::has_kernels());
    let mut worst: Vec<(&str, f64)> = Vec::new();
    for (k, case) in scan_cases().into_iter().enumerate() {
        let data = ScanData::new(case);
        let uses = Uses::nth(k);
        let want = scan_autodiff::<Autodiff<Cpu>>(&data, uses, &cpu);
        poison(case.batch * case.seq * case.channels);
        let got = scan_autodiff::<Autodiff<Gpu>>(&data, uses, &gpu);
        assert_eq!(got.len(), want.len());
        let mut line = format!("{case:?} {uses:?}:");
        for ((name, g), (_, w)) in got.into_iter().zip(want) {
            let err = check(&format!("{case:?} {name}"), g, w);
            line += &format!(" {name} {err:.2e}");
            match worst.iter_mut().find(|(n, _)| *n == name) {
                Some((_, e)) => *e = e.max(err),
                None => worst.push((name, err)),
            }
        }
        eprintln!("{line}");
    }
    eprintln!("max: {worst:?}");
}

/// The trait's backward op itself, with and without a final-state gradient: the kernels against
/// the reference backward.
#[test]
fn selective_scan_backward_op_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    for (k, case) in scan_cases().into_iter().enumerate() {
        let data = ScanData::new(case);
        let with_final = k % 2 == 0;
        let want = reference::selective_scan_backward(
            ScanLeaves::<Cpu>::new(&data, &cpu).input(&case),
            Tensor::from_data(data.r.clone(), &cpu),
            with_final.then(|| Tensor::from_data(data.r2.clone(), &cpu)),
        );
        poison(case.batch * case.seq * case.channels);
        let got: SelectiveScanGrads<Gpu> = Gpu::selective_scan_backward(
            ScanLeaves::<Gpu>::new(&data, &gpu).input(&case),
            Tensor::from_data(data.r.clone(), &gpu),
            with_final.then(|| Tensor::from_data(data.r2.clone(), &gpu)),
        );
        assert_eq!(got.z.is_some(), case.z);
        assert_eq!(got.delta_bias.is_some(), case.bias);
        assert_eq!(got.initial_state.is_some(), case.init);
        let what = |name: &str| format!("{case:?} d_final {with_final} {name}");
        let mut line = format!("{case:?} d_final {with_final}:");
        line += &format!(" du {:.2e}", check(&what("du"), got.u, want.u));
        line += &format!(
            " ddelta {:.2e}",
            check(&what("ddelta"), got.delta, want.delta)
        );
        line += &format!(" dA {:.2e}", check(&what("dA"), got.a, want.a));
        line += &format!(" dB {:.2e}", check(&what("dB"), got.b, want.b));
        line += &format!(" dC {:.2e}", check(&what("dC"), got.c, want.c));
        line += &format!(" dD {:.2e}", check(&what("dD"), got.d, want.d));
        if let (Some(g), Some(w)) = (got.z, want.z) {
            line += &format!(" dz {:.2e}", check(&what("dz"), g, w));
        }
        if let (Some(g), Some(w)) = (got.delta_bias, want.delta_bias) {
            line += &format!(" dbias {:.2e}", check(&what("dbias"), g, w));
        }
        if let (Some(g), Some(w)) = (got.initial_state, want.initial_state) {
            line += &format!(" dinit {:.2e}", check(&what("dinit"), g, w));
        }
        eprintln!("{line}");
    }
}

// ------------------------------------------------------------------------------------------
// Decode steps
// ------------------------------------------------------------------------------------------

#[test]
fn selective_step_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    for (batch, channels, state) in [(2, 70, 16), (3, 33, 5), (1, 1, 1)] {
        let u = random(&[batch, channels], 1.0);
        let dt = random_pos(&[batch, channels], 0.7, 0.01);
        let a = random_a(&[channels, state]);
        let b = random(&[batch, state], 0.7);
        let c = random(&[batch, state], 0.7);
        let d = random(&[channels], 1.0);
        let s = random(&[batch, channels, state], 1.0);
        fn run<B: MambaBackend>(
            t: [&TensorData; 7],
            device: &B::Device,
        ) -> (Tensor<B, 2>, Tensor<B, 3>) {
            let t2 = |d: &TensorData| Tensor::<B, 2>::from_data(d.clone(), device);
            B::selective_step(
                t2(t[0]),
                t2(t[1]),
                t2(t[2]),
                t2(t[3]),
                t2(t[4]),
                Tensor::from_data(t[5].clone(), device),
                Tensor::from_data(t[6].clone(), device),
            )
        }
        let all = [&u, &dt, &a, &b, &c, &d, &s];
        let (yw, sw) = run::<Cpu>(all, &cpu);
        poison(batch * channels * state);
        let (yg, sg) = run::<Gpu>(all, &gpu);
        let what = format!("selective_step {batch}x{channels}x{state}");
        let e_y = check(&format!("{what} y"), yg, yw);
        let e_s = check(&format!("{what} state"), sg, sw);
        eprintln!("{what}: y {e_y:.2e}, state {e_s:.2e}");
    }
}

#[test]
fn ssd_step_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    // (batch, heads, head_dim, state, groups, dt_limit)
    let cases = [
        (2, 4, 8, 16, 2, (0.0, f64::INFINITY)),
        (3, 6, 5, 7, 3, (0.05, 1.5)),
        (1, 3, 4, 5, 1, (0.0, 0.5)),
    ];
    for (batch, heads, head_dim, state, groups, dt_limit) in cases {
        let x = random(&[batch, heads, head_dim], 1.0);
        let dt = random(&[batch, heads], 1.0);
        let a = random_a(&[heads]);
        let b = random(&[batch, groups, state], 0.7);
        let c = random(&[batch, groups, state], 0.7);
        let d = random(&[heads], 1.0);
        let dt_bias = random(&[heads], 0.5);
        let s = random(&[batch, heads, head_dim, state], 1.0);
        fn input<B: Backend>(
            t: [&TensorData; 8],
            dt_limit: (f64, f64),
            device: &B::Device,
        ) -> SsdStepInput<B> {
            SsdStepInput {
                x: Tensor::from_data(t[0].clone(), device),
                dt: Tensor::from_data(t[1].clone(), device),
                a: Tensor::from_data(t[2].clone(), device),
                b: Tensor::from_data(t[3].clone(), device),
                c: Tensor::from_data(t[4].clone(), device),
                d: Tensor::from_data(t[5].clone(), device),
                dt_bias: Tensor::from_data(t[6].clone(), device),
                dt_limit,
                state: Tensor::from_data(t[7].clone(), device),
            }
        }
        let all = [&x, &dt, &a, &b, &c, &d, &dt_bias, &s];
        let (yw, sw) = Cpu::ssd_step(input::<Cpu>(all, dt_limit, &cpu));
        poison(batch * heads * head_dim * state);
        let (yg, sg) = Gpu::ssd_step(input::<Gpu>(all, dt_limit, &gpu));
        let what = format!("ssd_step {batch}x{heads}x{head_dim}x{state} g{groups} {dt_limit:?}");
        let e_y = check(&format!("{what} y"), yg, yw);
        let e_s = check(&format!("{what} state"), sg, sw);
        eprintln!("{what}: y {e_y:.2e}, state {e_s:.2e}");
    }
}

/// The fused Mamba2 decode step (one kernel reading `z`, `xBC`, `dt` in place from a strided
/// view of the projection) against the reference composition of conv step, SSD step and gate on
/// the CPU. The cases cover several groups, an MLP part in front, no conv bias, a width of 2,
/// more local channels (`head_dim + 2 · state`), more rows and more state entries than a cube has
/// threads, and the `dt` clamps.
#[test]
fn mamba2_step_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    // (batch, heads, head_dim, state, groups, d_mlp, width, bias, dt_limit)
    let cases = [
        (2, 4, 8, 16, 2, 0, 4, true, (0.0, f64::INFINITY)),
        (3, 6, 5, 70, 3, 3, 4, false, (0.05, 1.5)),
        (1, 2, 130, 4, 1, 0, 2, true, (0.0, 0.5)),
        // More state entries than the cube has threads (each thread takes two).
        (2, 2, 20, 130, 1, 0, 4, true, (0.0, f64::INFINITY)),
    ];
    for (batch, heads, head_dim, state, groups, d_mlp, width, bias, dt_limit) in cases {
        let inner = heads * head_dim;
        let conv_dim = inner + 2 * groups * state;
        let width_in = 2 * d_mlp + inner + conv_dim + heads;
        // Three extra columns on each side: the op gets a strided view.
        let proj = random(&[batch, width_in + 6], 1.0);
        let conv_state = random(&[batch, conv_dim, width - 1], 1.0);
        let w = random(&[conv_dim, width], 0.5);
        let bv = bias.then(|| random(&[conv_dim], 0.5));
        let a = random_a(&[heads]);
        let d = random(&[heads], 1.0);
        let dt_bias = random(&[heads], 0.5);
        let ssm = random(&[batch, heads, head_dim, state], 1.0);
        fn make<B: Backend>(
            t: [&TensorData; 7],
            bv: &Option<TensorData>,
            width_in: usize,
            d_mlp: usize,
            groups: usize,
            dt_limit: (f64, f64),
            device: &B::Device,
        ) -> Mamba2StepInput<B> {
            Mamba2StepInput {
                proj: Tensor::<B, 2>::from_data(t[0].clone(), device).narrow(1, 3, width_in),
                d_mlp,
                groups,
                conv_state: Tensor::from_data(t[1].clone(), device),
                conv_weight: Tensor::from_data(t[2].clone(), device),
                conv_bias: bv.clone().map(|b| Tensor::from_data(b, device)),
                a: Tensor::from_data(t[3].clone(), device),
                d: Tensor::from_data(t[4].clone(), device),
                dt_bias: Tensor::from_data(t[5].clone(), device),
                dt_limit,
                ssm_state: Tensor::from_data(t[6].clone(), device),
            }
        }
        let all = [&proj, &conv_state, &w, &a, &d, &dt_bias, &ssm];
        let want = Cpu::mamba2_step(make::<Cpu>(
            all, &bv, width_in, d_mlp, groups, dt_limit, &cpu,
        ));
        poison(batch * heads * head_dim * state);
        let got = Gpu::mamba2_step(make::<Gpu>(
            all, &bv, width_in, d_mlp, groups, dt_limit, &gpu,
        ));
        let what = format!(
            "mamba2_step {batch}x{heads}x{head_dim}x{state} g{groups} mlp{d_mlp} w{width} bias {bias} {dt_limit:?}"
        );
        let e_y = check(&format!("{what} y"), got.y, want.y);
        let e_c = check(
            &format!("{what} conv state"),
            got.conv_state,
            want.conv_state,
        );
        let e_s = check(&format!("{what} ssm state"), got.ssm_state, want.ssm_state);
        eprintln!("{what}: y {e_y:.2e}, conv state {e_c:.2e}, ssm state {e_s:.2e}");
    }
}

/// The decode projection kernel (norm folded in before, residual and bias after) against the
/// reference composition on the CPU: one row and the most rows it takes, `k` not a multiple of
/// any vector (scalar loads), of 2 and of 4, `k` over one staged slab (several slabs), enough
/// columns for four a thread group (with a ragged last cube), several norm groups, no norm, no
/// bias, no residual, and `x` read through a strided view.
#[test]
fn decode_linear_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    // (rows, k, n, norm groups (0: no norm), bias, residual)
    let cases = [
        (1, 768, 100, 1, false, false),
        (3, 300, 13, 3, true, true),
        (32, 37, 70, 1, true, false),
        (5, 512, 9, 0, false, true),
        (2, 1000, 40, 4, false, true),
        (1, 1000, 33, 4, true, true),
        (1, 37, 5, 0, true, false),
        (1, 3000, 17, 2, true, true),
        (4, 1024, 30, 1, false, true),
        (32, 768, 50, 1, true, true),
        (2, 256, 4100, 1, true, true),
    ];
    for (rows, k, n, groups, bias, residual) in cases {
        let x = random(&[rows, k + 5], 1.0);
        let nw = random(&[k], 0.5);
        let w = random(&[n, k], 0.1);
        let b = random(&[n], 0.5);
        let r = random(&[rows, n], 1.0);
        #[allow(clippy::too_many_arguments)]
        fn run<B: MambaBackend>(
            t: [&TensorData; 5],
            k: usize,
            groups: usize,
            bias: bool,
            residual: bool,
            device: &B::Device,
        ) -> Tensor<B, 2> {
            B::decode_linear(DecodeLinearInput {
                x: Tensor::<B, 2>::from_data(t[0].clone(), device).narrow(1, 2, k),
                norm: (groups > 0).then(|| (Tensor::from_data(t[1].clone(), device), groups, 1e-5)),
                weight: Tensor::from_data(t[2].clone(), device),
                bias: bias.then(|| Tensor::from_data(t[3].clone(), device)),
                residual: residual.then(|| Tensor::from_data(t[4].clone(), device)),
                out_dtype: burn::tensor::DType::F32,
            })
        }
        let all = [&x, &nw, &w, &b, &r];
        let want = run::<Cpu>(all, k, groups, bias, residual, &cpu);
        poison(rows * n);
        let got = run::<Gpu>(all, k, groups, bias, residual, &gpu);
        let what = format!(
            "decode_linear {rows}x{k}->{n} groups {groups} bias {bias} residual {residual}"
        );
        let e = check(&what, got, want);
        eprintln!("{what}: {e:.2e}");
    }
}

/// The whole fused decode step of a Mamba2 model on the kernels (three launches a layer:
/// `decode_linear`, `mamba2_step`, `decode_linear`) against the model's full forward on the same
/// backend (the chunked SSD scan): prefill a prefix, then step, for a batch of two.
#[test]
fn fused_decode_matches_full_forward() {
    use burn::tensor::Int;
    use mamba_burn::model::{Mamba2Config, MambaLM, ModelConfig, NormMode};
    let gpu = burn::backend::wgpu::WgpuDevice::default();
    for groups in [1, 2] {
        let config = ModelConfig::Mamba2(Mamba2Config {
            vocab_size: 50,
            hidden_size: 32,
            num_heads: 4,
            head_dim: 16,
            state_size: 8,
            n_groups: groups,
            chunk_size: 8,
            num_hidden_layers: 2,
            time_step_rank: 2,
            tie_word_embeddings: groups == 1,
            ..Mamba2Config::default()
        })
        .with_norm(NormMode::Grouped);
        let m = MambaLM::<Gpu>::init(&config, &gpu).unwrap();
        let (batch, seq, prefix) = (2, 13, 4);
        let data: Vec<i64> = (0..batch * seq)
            .map(|i| ((i * 17 + 3) % 50) as i64)
            .collect();
        let ids = Tensor::<Gpu, 2, Int>::from_data(TensorData::new(data, [batch, seq]), &gpu);
        let full = m.forward(ids.clone()); // [b, seq, V]
        let (_, mut cache) = m.prefill(ids.clone().narrow(1, 0, prefix));
        for t in prefix..seq {
            let tok = ids.clone().narrow(1, t, 1).reshape([batch]);
            let (logits, c) = m.step(tok, cache);
            cache = c;
            let want = full.clone().narrow(1, t, 1).reshape([batch, 50]);
            check(&format!("fused decode g{groups} at {t}"), logits, want);
        }
    }
}

#[test]
fn conv_step_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    for (batch, channels, width, bias, silu) in [
        (2, 70, 4, true, true),
        (3, 33, 4, false, true),
        (2, 17, 2, true, false),
        (1, 5, 3, true, true),
    ] {
        let x = random(&[batch, channels], 1.0);
        let s = random(&[batch, channels, width - 1], 1.0);
        let w = random(&[channels, width], 0.5);
        let bv = bias.then(|| random(&[channels], 0.5));
        fn run<B: MambaBackend>(
            x: &TensorData,
            s: &TensorData,
            w: &TensorData,
            bv: &Option<TensorData>,
            silu: bool,
            device: &B::Device,
        ) -> (Tensor<B, 2>, Tensor<B, 3>) {
            B::causal_conv1d_step(
                Tensor::from_data(x.clone(), device),
                Tensor::from_data(s.clone(), device),
                Tensor::from_data(w.clone(), device),
                bv.clone().map(|b| Tensor::from_data(b, device)),
                silu,
            )
        }
        let (yw, sw) = run::<Cpu>(&x, &s, &w, &bv, silu, &cpu);
        poison(batch * channels * (width - 1));
        let (yg, sg) = run::<Gpu>(&x, &s, &w, &bv, silu, &gpu);
        let what = format!("conv_step {batch}x{channels} w{width} bias {bias} silu {silu}");
        let e_y = check(&format!("{what} y"), yg, yw);
        if width > 1 {
            let e_s = check(&format!("{what} state"), sg, sw);
            eprintln!("{what}: y {e_y:.2e}, state {e_s:.2e}");
        } else {
            assert_eq!(sg.dims(), [batch, channels, 0]);
            eprintln!("{what}: y {e_y:.2e}");
        }
    }
}

/// Decoding token by token with the step kernels gives the full scans' outputs and final states
/// (selective scan, SSD scan and conv, all on the kernels).
#[test]
fn decode_steps_equal_scans() {
    let gpu = burn::backend::wgpu::WgpuDevice::default();
    let (batch, seq) = (2, 23);

    // Selective: dt = softplus(delta + bias) given to the step, the gate applied outside.
    let case = ScanCase {
        batch,
        seq,
        channels: 70,
        state: 16,
        z: true,
        bias: true,
        init: true,
        softplus: true,
        strided: false,
    };
    let data = ScanData::new(case);
    let input = ScanLeaves::<Gpu>::new(&data, &gpu).input(&case);
    let full = Gpu::selective_scan(input.clone());
    let dt = softplus(
        input.delta.clone()
            + input
                .delta_bias
                .clone()
                .unwrap()
                .reshape([1, 1, case.channels]),
        1.0,
    );
    let mut state = input.initial_state.clone().unwrap();
    let mut ys = Vec::new();
    let at = |t: Tensor<Gpu, 3>, i: usize| {
        let [b, _, c] = t.dims();
        t.narrow(1, i, 1).reshape([b, c])
    };
    for i in 0..seq {
        let (y, s) = Gpu::selective_step(
            at(input.u.clone(), i),
            at(dt.clone(), i),
            input.a.clone(),
            at(input.b.clone(), i),
            at(input.c.clone(), i),
            input.d.clone(),
            state,
        );
        state = s;
        ys.push(y * silu(at(input.z.clone().unwrap(), i)));
    }
    let e_y = check("selective decode y", Tensor::stack::<3>(ys, 1), full.y);
    let e_s = check("selective decode state", state, full.final_state);
    eprintln!("selective decode: y {e_y:.2e}, state {e_s:.2e}");

    // SSD.
    let (heads, head_dim, state_n, groups) = (4, 8, 16, 2);
    let ssd = SsdInput::<Gpu> {
        x: Tensor::from_data(random(&[batch, seq, heads, head_dim], 1.0), &gpu),
        dt: Tensor::from_data(random(&[batch, seq, heads], 1.0), &gpu),
        a: Tensor::from_data(random_a(&[heads]), &gpu),
        b: Tensor::from_data(random(&[batch, seq, groups, state_n], 0.5), &gpu),
        c: Tensor::from_data(random(&[batch, seq, groups, state_n], 0.5), &gpu),
        d: Tensor::from_data(random(&[heads], 1.0), &gpu),
        dt_bias: Tensor::from_data(random(&[heads], 0.5), &gpu),
        dt_limit: (0.0, f64::INFINITY),
        initial_state: Some(Tensor::from_data(
            random(&[batch, heads, head_dim, state_n], 1.0),
            &gpu,
        )),
        chunk_size: 8,
    };
    let full = Gpu::ssd_chunk_scan(ssd.clone());
    let mut state = ssd.initial_state.clone().unwrap();
    let mut ys = Vec::new();
    for i in 0..seq {
        let (y, s) = Gpu::ssd_step(SsdStepInput {
            x: ssd
                .x
                .clone()
                .narrow(1, i, 1)
                .reshape([batch, heads, head_dim]),
            dt: ssd.dt.clone().narrow(1, i, 1).reshape([batch, heads]),
            a: ssd.a.clone(),
            b: ssd
                .b
                .clone()
                .narrow(1, i, 1)
                .reshape([batch, groups, state_n]),
            c: ssd
                .c
                .clone()
                .narrow(1, i, 1)
                .reshape([batch, groups, state_n]),
            d: ssd.d.clone(),
            dt_bias: ssd.dt_bias.clone(),
            dt_limit: ssd.dt_limit,
            state,
        });
        state = s;
        ys.push(y);
    }
    let e_y = check("ssd decode y", Tensor::stack::<4>(ys, 1), full.y);
    let e_s = check("ssd decode state", state, full.final_state);
    eprintln!("ssd decode: y {e_y:.2e}, state {e_s:.2e}");

    // Conv.
    let (channels, width) = (37, 4);
    let conv = ConvInput::<Gpu> {
        x: Tensor::from_data(random(&[batch, seq, channels], 1.0), &gpu),
        weight: Tensor::from_data(random(&[channels, width], 0.5), &gpu),
        bias: Some(Tensor::from_data(random(&[channels], 0.5), &gpu)),
        initial_state: Some(Tensor::from_data(
            random(&[batch, channels, width - 1], 1.0),
            &gpu,
        )),
        silu: true,
    };
    let full = Gpu::causal_conv1d(conv.clone());
    let mut state = conv.initial_state.clone().unwrap();
    let mut ys = Vec::new();
    for i in 0..seq {
        let (y, s) = Gpu::causal_conv1d_step(
            at(conv.x.clone(), i),
            state,
            conv.weight.clone(),
            conv.bias.clone(),
            conv.silu,
        );
        state = s;
        ys.push(y);
    }
    let e_y = check("conv decode y", Tensor::stack::<3>(ys, 1), full.y);
    let e_s = check("conv decode state", state, full.final_state);
    eprintln!("conv decode: y {e_y:.2e}, state {e_s:.2e}");
}

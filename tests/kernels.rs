//! The cubecl kernels (run on `Wgpu`, which is a `CubeBackend`; on a machine without a GPU that
//! is Mesa's lavapipe) against the reference ops on `NdArray`: forward outputs, final states and
//! the gradients of every input through `Autodiff`, at small odd shapes with fresh random inputs
//! on every run.
//!
//! Metric: `‖got − want‖ / ‖want‖ ≤ 1e-4` in f32 over whole tensors (so any element a kernel
//! fails to write shows up, helped by poisoning the allocator with NaN first); a NaN or an
//! infinity anywhere fails.

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use mamba_burn::kernels::{
    kernels_active, reference, set_ops_mode, ConvGrads, ConvInput, MambaBackend, OpsMode, SsdGrads,
    SsdInput,
};

#[path = "common/kernels.rs"]
mod kcommon;
use kcommon::{check, grad_or_zeros, poison, random, rel_err, Cpu, Gpu, Uses, REL_TOL};

/// One conv case: the data, shared by every backend.
#[derive(Debug, Clone, Copy)]
struct ConvCase {
    batch: usize,
    seq: usize,
    channels: usize,
    width: usize,
    bias: bool,
    init: bool,
    silu: bool,
    /// Extra channels around `x`: when nonzero `x` is a narrowed (strided) view, as the model's
    /// slices of the input projection are.
    pad: usize,
}

struct ConvData {
    case: ConvCase,
    /// `[batch, seq, channels + 2 * pad]`
    x: TensorData,
    weight: TensorData,
    bias: Option<TensorData>,
    init: Option<TensorData>,
    /// Upstream gradients of `y` and of the final state.
    r: TensorData,
    r2: TensorData,
}

impl ConvData {
    fn new(case: ConvCase) -> Self {
        let ConvCase {
            batch,
            seq,
            channels,
            width,
            pad,
            ..
        } = case;
        Self {
            case,
            x: random(&[batch, seq, channels + 2 * pad], 1.0),
            weight: random(&[channels, width], 0.5),
            bias: case.bias.then(|| random(&[channels], 0.5)),
            init: case
                .init
                .then(|| random(&[batch, channels, width - 1], 1.0)),
            r: random(&[batch, seq, channels], 1.0),
            r2: random(&[batch, channels, width - 1], 1.0),
        }
    }
}

/// Leaf tensors of one case on one backend (`x_full` is the unnarrowed input).
struct ConvLeaves<B: Backend> {
    x_full: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    init: Option<Tensor<B, 3>>,
}

impl<B: Backend> ConvLeaves<B> {
    fn new(d: &ConvData, device: &B::Device, grad: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>) -> Self {
        Self {
            x_full: grad(Tensor::from_data(d.x.clone(), device)),
            weight: Tensor::from_data(d.weight.clone(), device),
            bias: d.bias.clone().map(|b| Tensor::from_data(b, device)),
            init: d.init.clone().map(|s| Tensor::from_data(s, device)),
        }
    }

    fn input(&self, case: &ConvCase) -> ConvInput<B> {
        ConvInput {
            x: self.x_full.clone().narrow(2, case.pad, case.channels),
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            initial_state: self.init.clone(),
            silu: case.silu,
        }
    }
}

fn conv_cases() -> Vec<ConvCase> {
    let mut cases = Vec::new();
    for width in [2, 3, 4] {
        for bias in [false, true] {
            for init in [false, true] {
                for silu in [false, true] {
                    cases.push(ConvCase {
                        batch: 2,
                        seq: 37,
                        channels: 70,
                        width,
                        bias,
                        init,
                        silu,
                        pad: 0,
                    });
                }
            }
        }
    }
    // Strided input (a narrowed view), sequences shorter than the state, and a wider kernel.
    let base = ConvCase {
        batch: 3,
        seq: 29,
        channels: 33,
        width: 4,
        bias: true,
        init: true,
        silu: true,
        pad: 5,
    };
    cases.push(base);
    cases.push(ConvCase {
        seq: 2,
        pad: 0,
        ..base
    });
    cases.push(ConvCase {
        seq: 1,
        init: false,
        ..base
    });
    cases.push(ConvCase { width: 7, ..base });
    cases
}

#[test]
fn conv_forward_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    assert!(Gpu::has_kernels());
    for case in conv_cases() {
        let d = ConvData::new(case);
        let want = reference::causal_conv1d(ConvLeaves::<Cpu>::new(&d, &cpu, |t| t).input(&case));
        poison(case.batch * case.seq * case.channels);
        poison(case.batch * case.channels * (case.width - 1));
        let got = Gpu::causal_conv1d(ConvLeaves::<Gpu>::new(&d, &gpu, |t| t).input(&case));
        let e_y = check(&format!("{case:?} y"), got.y, want.y);
        let e_s = check(
            &format!("{case:?} final_state"),
            got.final_state,
            want.final_state,
        );
        eprintln!("{case:?}: y {e_y:.2e}, final_state {e_s:.2e}");
    }
}

/// Forward outputs and input gradients of `loss = Σ y·r + Σ final_state·r2` on an autodiff
/// backend, as host vectors in the order y, final_state, dx (of the unnarrowed input), dweight,
/// dbias, dinit.
fn conv_autodiff<B: AutodiffBackend + MambaBackend>(
    d: &ConvData,
    device: &B::Device,
) -> Vec<(&'static str, Tensor<B::InnerBackend, 3>)> {
    let case = d.case;
    let leaves = ConvLeaves::<B>::new(d, device, |t| t.require_grad());
    let leaves = ConvLeaves {
        weight: leaves.weight.require_grad(),
        bias: leaves.bias.map(|b| b.require_grad()),
        init: leaves.init.map(|s| s.require_grad()),
        ..leaves
    };
    let out = B::causal_conv1d(leaves.input(&case));
    let r = Tensor::<B, 3>::from_data(d.r.clone(), device);
    let r2 = Tensor::<B, 3>::from_data(d.r2.clone(), device);
    let loss = (out.y.clone() * r).sum() + (out.final_state.clone() * r2).sum();
    let grads = loss.backward();
    let mut res = vec![
        ("y", out.y.inner()),
        ("final_state", out.final_state.inner()),
        ("dx", leaves.x_full.grad(&grads).expect("dx")),
        (
            "dweight",
            leaves.weight.grad(&grads).expect("dweight").unsqueeze(),
        ),
    ];
    if let Some(b) = &leaves.bias {
        res.push(("dbias", b.grad(&grads).expect("dbias").unsqueeze()));
    }
    if let Some(s) = &leaves.init {
        res.push(("dinit", s.grad(&grads).expect("dinit")));
    }
    res
}

#[test]
fn conv_autodiff_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    assert!(<Autodiff<Gpu> as MambaBackend>::has_kernels());
    for case in conv_cases() {
        let d = ConvData::new(case);
        let want = conv_autodiff::<Autodiff<Cpu>>(&d, &cpu);
        poison(case.batch * case.seq * (case.channels + 2 * case.pad));
        let got = conv_autodiff::<Autodiff<Gpu>>(&d, &gpu);
        assert_eq!(got.len(), want.len());
        let mut line = format!("{case:?}:");
        for ((name, g), (_, w)) in got.into_iter().zip(want) {
            let err = check(&format!("{case:?} {name}"), g, w);
            line += &format!(" {name} {err:.2e}");
        }
        eprintln!("{line}");
    }
}

/// The trait's backward op itself: the kernels against the reference backward, and the
/// reference backward (the default for every other backend) against autodiff of the reference.
#[test]
fn conv_backward_op_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    for case in conv_cases() {
        let d = ConvData::new(case);
        fn dy<B: Backend>(d: &ConvData, device: &B::Device) -> Tensor<B, 3> {
            Tensor::from_data(d.r.clone(), device)
        }

        // Reference backward vs autodiff of the reference forward (y only).
        let leaves = ConvLeaves::<Autodiff<Cpu>>::new(&d, &cpu, |t| t.require_grad());
        let leaves = ConvLeaves {
            weight: leaves.weight.require_grad(),
            bias: leaves.bias.map(|b| b.require_grad()),
            init: leaves.init.map(|s| s.require_grad()),
            ..leaves
        };
        let y = reference::causal_conv1d(leaves.input(&case)).y;
        let grads = (y * dy(&d, &cpu)).sum().backward();
        let want = reference::causal_conv1d_backward(
            ConvLeaves::<Cpu>::new(&d, &cpu, |t| t).input(&case),
            dy(&d, &cpu),
        );
        let dx_want = leaves
            .x_full
            .grad(&grads)
            .unwrap()
            .narrow(2, case.pad, case.channels);
        check(&format!("{case:?} ref dx"), want.x.clone(), dx_want);
        check(
            &format!("{case:?} ref dweight"),
            want.weight.clone(),
            leaves.weight.grad(&grads).unwrap(),
        );
        if let (Some(b), Some(db)) = (&leaves.bias, &want.bias) {
            check(
                &format!("{case:?} ref dbias"),
                db.clone(),
                b.grad(&grads).unwrap(),
            );
        }
        if let (Some(s), Some(ds)) = (&leaves.init, &want.initial_state) {
            check(
                &format!("{case:?} ref dinit"),
                ds.clone(),
                s.grad(&grads).unwrap(),
            );
        }

        // Kernel backward vs reference backward.
        poison(case.batch * case.seq * case.channels);
        let got: ConvGrads<Gpu> = Gpu::causal_conv1d_backward(
            ConvLeaves::<Gpu>::new(&d, &gpu, |t| t).input(&case),
            dy(&d, &gpu),
        );
        assert_eq!(got.bias.is_some(), case.bias);
        assert_eq!(got.initial_state.is_some(), case.init);
        let e_x = check(&format!("{case:?} dx"), got.x, want.x);
        let e_w = check(&format!("{case:?} dweight"), got.weight, want.weight);
        if let (Some(g), Some(w)) = (got.bias, want.bias) {
            check(&format!("{case:?} dbias"), g, w);
        }
        if let (Some(g), Some(w)) = (got.initial_state, want.initial_state) {
            check(&format!("{case:?} dinit"), g, w);
        }
        eprintln!("{case:?}: kernel backward dx {e_x:.2e}, dweight {e_w:.2e}");
    }
}

/// The metric itself must be able to fail: a perturbed tensor and a NaN are rejected.
#[test]
fn metric_rejects_wrong_values() {
    let want = vec![1.0f32, -2.0, 3.0, 0.5];
    assert!(rel_err(&want, &want) == 0.0);
    let mut off = want.clone();
    off[2] += 0.01;
    assert!(rel_err(&off, &want) > REL_TOL);
    let mut nan = want.clone();
    nan[1] = f32::NAN;
    assert!(rel_err(&nan, &want).is_infinite());
    assert!(rel_err(&want, &nan).is_infinite());
}

/// One SSD case.
#[derive(Debug, Clone, Copy)]
struct SsdCase {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    state: usize,
    groups: usize,
    chunk: usize,
    init: bool,
    dt_limit: (f64, f64),
}

struct SsdData {
    x: TensorData,
    dt: TensorData,
    a: TensorData,
    b: TensorData,
    c: TensorData,
    d: TensorData,
    dt_bias: TensorData,
    init: Option<TensorData>,
}

impl SsdData {
    fn new(case: &SsdCase) -> Self {
        let SsdCase {
            batch: bs,
            seq: l,
            heads: h,
            head_dim: p,
            state: n,
            groups: g,
            ..
        } = *case;
        // A = -exp(A_log) with A_log ~ N(0, 0.5): decays of a realistic range.
        let a_log = random(&[h], 0.5).to_vec::<f32>().unwrap();
        let a: Vec<f32> = a_log.iter().map(|v| -v.exp()).collect();
        Self {
            x: random(&[bs, l, h, p], 1.0),
            dt: random(&[bs, l, h], 1.0),
            a: TensorData::new(a, [h]),
            b: random(&[bs, l, g, n], 0.5),
            c: random(&[bs, l, g, n], 0.5),
            d: random(&[h], 1.0),
            dt_bias: random(&[h], 0.5),
            init: case.init.then(|| random(&[bs, h, p, n], 1.0)),
        }
    }

    fn input<B: Backend>(&self, case: &SsdCase, device: &B::Device) -> SsdInput<B> {
        SsdInput {
            x: Tensor::from_data(self.x.clone(), device),
            dt: Tensor::from_data(self.dt.clone(), device),
            a: Tensor::from_data(self.a.clone(), device),
            b: Tensor::from_data(self.b.clone(), device),
            c: Tensor::from_data(self.c.clone(), device),
            d: Tensor::from_data(self.d.clone(), device),
            dt_bias: Tensor::from_data(self.dt_bias.clone(), device),
            dt_limit: case.dt_limit,
            initial_state: self.init.clone().map(|s| Tensor::from_data(s, device)),
            chunk_size: case.chunk,
        }
    }
}

fn ssd_cases() -> Vec<SsdCase> {
    let base = SsdCase {
        batch: 2,
        seq: 37,
        heads: 4,
        head_dim: 8,
        state: 8,
        groups: 2,
        chunk: 16,
        init: false,
        dt_limit: (0.0, f64::INFINITY),
    };
    vec![
        base,
        SsdCase { init: true, ..base },
        // one group, seq a multiple of the chunk, a dt clamp
        SsdCase {
            groups: 1,
            seq: 32,
            dt_limit: (0.05, 1.5),
            init: true,
            ..base
        },
        // heads == groups, a single partial chunk
        SsdCase {
            groups: 4,
            seq: 5,
            ..base
        },
        // a clamp that bites on both sides
        SsdCase {
            dt_limit: (0.4, 1.0),
            init: true,
            ..base
        },
        // several chunks of an odd size, odd dims
        SsdCase {
            batch: 3,
            seq: 50,
            heads: 6,
            head_dim: 5,
            state: 7,
            groups: 3,
            chunk: 7,
            init: true,
            ..base
        },
        // The kernels chunk by 64 whatever the chunk size: several kernel chunks with a ragged
        // end, head_dim and state over one 64-wide tile and not multiples of it, a clamp.
        SsdCase {
            batch: 2,
            seq: 150,
            heads: 4,
            head_dim: 72,
            state: 80,
            groups: 2,
            chunk: 32,
            init: true,
            dt_limit: (0.01, 2.0),
        },
        // four heads per group, a length that is a multiple of 64
        SsdCase {
            batch: 1,
            seq: 128,
            heads: 8,
            head_dim: 16,
            state: 16,
            groups: 2,
            chunk: 64,
            init: false,
            dt_limit: (0.0, f64::INFINITY),
        },
        // eleven heads in one group: the backward's per-group kernels split them over cubes
        // (at most eight heads each), several heads per cube
        SsdCase {
            batch: 1,
            seq: 70,
            heads: 11,
            head_dim: 8,
            state: 12,
            groups: 1,
            chunk: 64,
            init: true,
            dt_limit: (0.0, f64::INFINITY),
        },
    ]
}

#[test]
fn ssd_forward_matches_reference() {
    use_ssd_kernels();
    let gpu = Default::default();
    let cpu = Default::default();
    for case in ssd_cases() {
        let data = SsdData::new(&case);
        let want = reference::ssd_chunk_scan(data.input::<Cpu>(&case, &cpu));
        poison(case.batch * case.seq * case.heads * case.head_dim);
        poison(case.batch * case.heads * case.head_dim * case.state);
        let got = Gpu::ssd_chunk_scan(data.input::<Gpu>(&case, &gpu));
        let e_y = check(&format!("{case:?} y"), got.y, want.y);
        let e_s = check(
            &format!("{case:?} final_state"),
            got.final_state,
            want.final_state,
        );
        eprintln!("{case:?}: y {e_y:.2e}, final_state {e_s:.2e}");
    }
}

/// `(name, tensor)` pairs flattened to rank 4 for comparison.
type Named<B> = Vec<(&'static str, Tensor<B, 4>)>;

fn ssd_grads_named<B: Backend>(g: SsdGrads<B>) -> Named<B> {
    let mut v = vec![
        ("dx", g.x),
        ("ddt", g.dt.unsqueeze()),
        ("dA", g.a.unsqueeze()),
        ("dB", g.b),
        ("dC", g.c),
        ("dD", g.d.unsqueeze()),
        ("ddt_bias", g.dt_bias.unsqueeze()),
    ];
    if let Some(s) = g.initial_state {
        v.push(("dinit", s));
    }
    v
}

fn compare_named<B1: Backend, B2: Backend>(what: String, got: Named<B1>, want: Named<B2>) {
    assert_eq!(got.len(), want.len(), "{what}: number of tensors");
    let mut line = format!("{what}:");
    for ((name, g), (wname, w)) in got.into_iter().zip(want) {
        assert_eq!(name, wname);
        let err = check(&format!("{what} {name}"), g, w);
        line += &format!(" {name} {err:.2e}");
    }
    eprintln!("{line}");
}

/// The kernel backward op against the reference backward (autodiff of the reference), with and
/// without an upstream gradient for the final state; computing the forward's intermediates again
/// and reading those the forward kept (which must give the very same gradients).
#[test]
fn ssd_backward_op_matches_reference() {
    use_ssd_kernels();
    let gpu = Default::default();
    let cpu = Default::default();
    for (k, case) in ssd_cases().into_iter().enumerate() {
        let data = SsdData::new(&case);
        let [bs, l, h, p, n] = [case.batch, case.seq, case.heads, case.head_dim, case.state];
        let dy = random(&[bs, l, h, p], 1.0);
        let df = (k % 2 == 0).then(|| random(&[bs, h, p, n], 1.0));
        let want = reference::ssd_chunk_scan_backward(
            data.input::<Cpu>(&case, &cpu),
            Tensor::from_data(dy.clone(), &cpu),
            df.clone().map(|t| Tensor::from_data(t, &cpu)),
        );
        poison(bs * l * h * p);
        let got = Gpu::ssd_chunk_scan_backward(
            data.input::<Gpu>(&case, &gpu),
            None,
            Tensor::from_data(dy.clone(), &gpu),
            df.clone().map(|t| Tensor::from_data(t, &gpu)),
        );
        let (out, kept) = Gpu::ssd_chunk_scan_keeping(data.input::<Gpu>(&case, &gpu));
        assert!(kept.is_some(), "{case:?}: the kernel forward kept nothing");
        let plain = Gpu::ssd_chunk_scan(data.input::<Gpu>(&case, &gpu));
        assert_eq!(
            out.y.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
            plain
                .y
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap(),
            "{case:?}: y while keeping"
        );
        poison(bs * l * h * p);
        let from_kept = Gpu::ssd_chunk_scan_backward(
            data.input::<Gpu>(&case, &gpu),
            kept,
            Tensor::from_data(dy, &gpu),
            df.map(|t| Tensor::from_data(t, &gpu)),
        );
        let (a, b) = (ssd_grads_named(from_kept), ssd_grads_named(got));
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(
                x.clone()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap(),
                y.clone()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .unwrap(),
                "{case:?}: {name} from the kept intermediates"
            );
        }
        compare_named(format!("{case:?}"), b, ssd_grads_named(want));
    }
}

/// Outputs and input gradients of a loss through the SSD scan on `Autodiff<B>`, reading the
/// outputs `uses` names.
fn ssd_autodiff<B: AutodiffBackend + MambaBackend>(
    data: &SsdData,
    case: &SsdCase,
    r: &TensorData,
    r2: &TensorData,
    uses: Uses,
    device: &B::Device,
) -> Named<B::InnerBackend> {
    let i = data.input::<B>(case, device);
    let i = SsdInput {
        x: i.x.require_grad(),
        dt: i.dt.require_grad(),
        a: i.a.require_grad(),
        b: i.b.require_grad(),
        c: i.c.require_grad(),
        d: i.d.require_grad(),
        dt_bias: i.dt_bias.require_grad(),
        initial_state: i.initial_state.map(|s| s.require_grad()),
        ..i
    };
    let out = B::ssd_chunk_scan(i.clone());
    let loss_y = || (out.y.clone() * Tensor::from_data(r.clone(), device)).sum();
    let loss_s = || (out.final_state.clone() * Tensor::from_data(r2.clone(), device)).sum();
    let loss = match uses {
        Uses::Both => loss_y() + loss_s(),
        Uses::Y => loss_y(),
        Uses::FinalState => loss_s(),
    };
    let grads = loss.backward();
    let g = |t: &Tensor<B, 4>| grad_or_zeros(t, &grads);
    let mut v = vec![
        ("y", out.y.inner()),
        ("final_state", out.final_state.inner()),
        ("dx", g(&i.x)),
        ("ddt", grad_or_zeros(&i.dt, &grads).unsqueeze()),
        ("dA", grad_or_zeros(&i.a, &grads).unsqueeze()),
        ("dB", g(&i.b)),
        ("dC", g(&i.c)),
        ("dD", grad_or_zeros(&i.d, &grads).unsqueeze()),
        ("ddt_bias", grad_or_zeros(&i.dt_bias, &grads).unsqueeze()),
    ];
    if let Some(s) = &i.initial_state {
        v.push(("dinit", g(s)));
    }
    v
}

/// End to end through `Autodiff<Wgpu>` (the custom autodiff node running the kernels both
/// ways) against `Autodiff<NdArray>` differentiating the reference.
#[test]
fn ssd_autodiff_matches_reference() {
    use_ssd_kernels();
    let gpu = Default::default();
    let cpu = Default::default();
    for (k, case) in ssd_cases().into_iter().enumerate() {
        let data = SsdData::new(&case);
        let [bs, l, h, p, n] = [case.batch, case.seq, case.heads, case.head_dim, case.state];
        let r = random(&[bs, l, h, p], 1.0);
        let r2 = random(&[bs, h, p, n], 1.0);
        let uses = Uses::nth(k);
        let want = ssd_autodiff::<Autodiff<Cpu>>(&data, &case, &r, &r2, uses, &cpu);
        poison(bs * l * h * p);
        let got = ssd_autodiff::<Autodiff<Gpu>>(&data, &case, &r, &r2, uses, &gpu);
        compare_named(format!("{case:?} {uses:?}"), got, want);
    }
}

/// The SSD tests above run the tiled kernels with slabs of more than one part on this device
/// (the state, scan and `C·Bᵀ` kernels) and with one part where shared memory is short (the
/// backward's `dB`/`dC` kernel beside its staged tile), so both staging paths are covered
/// wherever the suite runs (Mesa's lavapipe gives a workgroup 32 KiB).
#[test]
fn ssd_slab_parts_cover_both_paths() {
    use cubecl::Runtime;
    use mamba_burn::kernels::cube::{
        ssd::CHUNK_SMEM,
        ssd_bwd::DBC_SMEM,
        tile::{slab_parts, Tc},
    };
    let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
    let smem = client.properties().hardware.max_shared_memory_size;
    let chunk = slab_parts(&client, CHUNK_SMEM, Tc::Off);
    let dbc = slab_parts(&client, DBC_SMEM, Tc::Off);
    assert!(chunk >= 2, "{smem} bytes of shared memory: {chunk} parts");
    assert!(
        (1..=4).contains(&dbc) && dbc <= chunk,
        "{smem} bytes: dbc {dbc}, chunk {chunk}"
    );
    eprintln!("shared memory {smem} B: chunk kernels {chunk} parts, dB/dC {dbc}");
}

/// Selects the kernels (`auto` would too, on wgpu) and makes sure they are what the SSD tests
/// exercise.
fn use_ssd_kernels() {
    set_ops_mode(OpsMode::Kernels);
    assert!(kernels_active::<Gpu>());
    assert!(kernels_active::<Autodiff<Gpu>>());
}

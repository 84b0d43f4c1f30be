//! The fused norm kernels (RMSNorm and the gated RMSNorm, forward and backward, on `Wgpu`: on a
//! machine without a GPU, Mesa's lavapipe) against the tensor-op reference on `NdArray`: the
//! output and the gradients of `y`, `z` and `w` through `Autodiff`, with the gate read through a
//! narrowed (strided) view as the model reads it from the input projection, group widths that
//! are not multiples of the kernel's 256 threads, and the weight frozen (no `dw`) or trained.
//! Metric as in tests/kernels.rs: `‖got − want‖ / ‖want‖ ≤ 1e-4`, NaN-poisoned allocator.

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use mamba_burn::kernels::{kernels_active, set_ops_mode, MambaBackend, OpsMode};

#[path = "common/kernels.rs"]
#[allow(dead_code)]
mod kcommon;
use kcommon::{check, poison, random, Cpu, Gpu};

#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    seq: usize,
    width: usize,
    groups: usize,
    gate: bool,
    /// Extra channels on both sides of `z`'s source, so that `z` is a strided view.
    pad: usize,
    train_w: bool,
}

struct Data {
    y: TensorData,
    /// `[batch, seq, width + 2 pad]`
    z: TensorData,
    w: TensorData,
    dout: TensorData,
}

fn cases() -> Vec<Case> {
    let c = |batch, seq, width, groups, gate, pad, train_w| Case {
        batch,
        seq,
        width,
        groups,
        gate,
        pad,
        train_w,
    };
    vec![
        c(2, 5, 300, 1, false, 0, true),
        c(1, 7, 768, 1, false, 0, false),
        c(2, 3, 1536, 1, true, 16, true),
        c(3, 4, 96, 4, true, 5, true),
        c(2, 6, 520, 8, true, 3, false),
        c(1, 2, 40, 2, false, 0, true),
    ]
}

/// Output and the gradients of `y`, `z` (zeros without the gate) and `w` (zeros when frozen) for
/// the loss `Σ out · dout`.
fn run<B: AutodiffBackend + MambaBackend>(
    case: &Case,
    d: &Data,
    device: &B::Device,
) -> [Tensor<B::InnerBackend, 3>; 3]
where
    B::InnerBackend: Backend,
{
    let y = Tensor::<B, 3>::from_data(d.y.clone(), device).require_grad();
    let zsrc = Tensor::<B, 3>::from_data(d.z.clone(), device).require_grad();
    let z = zsrc.clone().narrow(2, case.pad, case.width);
    let w = Tensor::<B, 1>::from_data(d.w.clone(), device);
    let w = if case.train_w { w.require_grad() } else { w };
    let out = if case.gate {
        B::gated_rms_norm(y.clone(), z, w.clone(), case.groups, 1e-5)
    } else {
        B::rms_norm(y.clone(), w.clone(), 1e-5)
    };
    let dout = Tensor::<B, 3>::from_data(d.dout.clone(), device);
    let grads = (out.clone() * dout).sum().backward();
    let dy = y.grad(&grads).expect("y takes a gradient");
    let dz = zsrc
        .grad(&grads)
        .unwrap_or_else(|| zsrc.clone().inner().zeros_like())
        .narrow(2, case.pad, case.width);
    let _ = w
        .grad(&grads)
        .map(|g| assert!(case.train_w && g.dims() == [case.width]));
    [out.inner(), dy, dz]
}

fn dw<B: AutodiffBackend + MambaBackend>(
    case: &Case,
    d: &Data,
    device: &B::Device,
) -> Option<Tensor<B::InnerBackend, 1>> {
    let y = Tensor::<B, 3>::from_data(d.y.clone(), device);
    let z = Tensor::<B, 3>::from_data(d.z.clone(), device).narrow(2, case.pad, case.width);
    let w = Tensor::<B, 1>::from_data(d.w.clone(), device).require_grad();
    let out = if case.gate {
        B::gated_rms_norm(y, z, w.clone(), case.groups, 1e-5)
    } else {
        B::rms_norm(y, w.clone(), 1e-5)
    };
    let dout = Tensor::<B, 3>::from_data(d.dout.clone(), device);
    let grads = (out * dout).sum().backward();
    w.grad(&grads)
}

#[test]
fn norm_kernels_match_reference() {
    set_ops_mode(OpsMode::Kernels);
    assert!(kernels_active::<Gpu>());
    let gpu = Default::default();
    let cpu = Default::default();
    for case in cases() {
        let [b, l, w] = [case.batch, case.seq, case.width];
        let data = Data {
            y: random(&[b, l, w], 1.5),
            z: random(&[b, l, w + 2 * case.pad], 2.0),
            w: random(&[w], 1.0),
            dout: random(&[b, l, w], 1.0),
        };
        let want = run::<Autodiff<Cpu>>(&case, &data, &cpu);
        poison(b * l * w);
        let got = run::<Autodiff<Gpu>>(&case, &data, &gpu);
        for (name, (g, w)) in ["out", "dy", "dz"].iter().zip(got.into_iter().zip(want)) {
            if *name == "dz" && !case.gate {
                continue;
            }
            check(&format!("{case:?} {name}"), g, w);
        }
        if case.train_w {
            let g = dw::<Autodiff<Gpu>>(&case, &data, &gpu).expect("dw");
            let w = dw::<Autodiff<Cpu>>(&case, &data, &cpu).expect("dw");
            check(&format!("{case:?} dw"), g, w);
        }
        // The inference path (no autodiff) runs the same forward kernel.
        let y = Tensor::<Gpu, 3>::from_data(data.y.clone(), &gpu);
        let wt = Tensor::<Gpu, 1>::from_data(data.w.clone(), &gpu);
        let z = Tensor::<Gpu, 3>::from_data(data.z.clone(), &gpu).narrow(2, case.pad, w);
        let plain = if case.gate {
            Gpu::gated_rms_norm(y, z, wt, case.groups, 1e-5)
        } else {
            Gpu::rms_norm(y, wt, 1e-5)
        };
        let want = run::<Autodiff<Cpu>>(&case, &data, &cpu);
        let [out, _, _] = want;
        check(&format!("{case:?} inference"), plain, out);
    }
}

/// The decode step's fused residual add and RMSNorm against the reference: the sum and the
/// normed output, with the residual read through a strided view and widths below, at and above
/// the kernel's 256 threads.
#[test]
fn add_norm_kernel_matches_reference() {
    let gpu = Default::default();
    let cpu = Default::default();
    for (batch, width) in [(1, 768), (3, 256), (2, 37), (5, 1000)] {
        let x = random(&[batch, 1, width + 4], 1.0);
        let h = random(&[batch, 1, width], 1.0);
        let w = random(&[width], 0.5);
        fn run<B: MambaBackend>(
            t: [&TensorData; 3],
            width: usize,
            device: &B::Device,
        ) -> (Tensor<B, 3>, Tensor<B, 3>) {
            B::add_rms_norm(
                Tensor::<B, 3>::from_data(t[0].clone(), device).narrow(2, 2, width),
                Tensor::from_data(t[1].clone(), device),
                Tensor::from_data(t[2].clone(), device),
                1e-5,
            )
        }
        let (sw, ow) = run::<Cpu>([&x, &h, &w], width, &cpu);
        poison(batch * width);
        let (sg, og) = run::<Gpu>([&x, &h, &w], width, &gpu);
        let e_s = check(&format!("add_norm {batch}x{width} sum"), sg, sw);
        let e_o = check(&format!("add_norm {batch}x{width} out"), og, ow);
        eprintln!("add_norm {batch}x{width}: sum {e_s:.2e}, out {e_o:.2e}");
    }
}

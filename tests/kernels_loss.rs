//! The training step's fused ops against what they replace:
//! - the cross-entropy op (`MambaBackend::nll_rows`: one kernel forward, one backward on `Wgpu`,
//!   here Mesa's lavapipe) against burn's `log_softmax` + `gather` differentiated op by op on
//!   `NdArray`, values and the logits' gradient under a non-uniform upstream gradient, with
//!   ignored labels (`-100`), vocabularies that are not multiples of the kernel's 256 threads,
//!   logits read through a strided view, and the tensor-op composition the CPU runs;
//! - the split op (`MambaBackend::split_last`) against `narrow`, with every piece, only some, or
//!   one piece read by the loss.
//!
//! Metric as in tests/kernels.rs: `‖got − want‖ / ‖want‖ ≤ 1e-4`, NaN-poisoned allocator.

use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use mamba_burn::kernels::{kernels_active, set_ops_mode, MambaBackend, OpsMode};

#[path = "common/kernels.rs"]
#[allow(dead_code)]
mod kcommon;
use kcommon::{check, poison, random, Cpu, Gpu};

/// Labels for `n` rows over `vocab`: every fifth ignored, the rest spread over the vocabulary
/// (the last id included).
fn labels(n: usize, vocab: usize) -> TensorData {
    let ids: Vec<i64> = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else if i % 7 == 6 {
                vocab as i64 - 1
            } else {
                ((i * 7919 + 13) % vocab) as i64
            }
        })
        .collect();
    TensorData::new(ids, [n])
}

/// `(nll [n], dlogits [n, vocab])` for the loss `Σ_i w_i · nll_i`, the logits a view of columns
/// `pad..pad + vocab` of `src` `[n, vocab + 2 pad]`. `fused` picks `B::nll_rows`; otherwise
/// burn's log-softmax and gather, differentiated op by op.
fn run<B: AutodiffBackend + MambaBackend>(
    src: &TensorData,
    labels: &TensorData,
    weights: &TensorData,
    vocab: usize,
    pad: usize,
    fused: bool,
    device: &B::Device,
) -> (Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 2>) {
    let src = Tensor::<B, 2>::from_data(src.clone(), device).require_grad();
    let logits = src.clone().narrow(1, pad, vocab);
    let [n, _] = logits.dims();
    let ids = Tensor::<B, 1, Int>::from_data(labels.clone(), device);
    let nll = if fused {
        B::nll_rows(logits, ids)
    } else {
        let counted = ids.clone().not_equal_elem(-100);
        let safe = ids.mask_fill(counted.clone().bool_not(), 0);
        -(log_softmax(logits, 1)
            .gather(1, safe.reshape([n, 1]))
            .reshape([n])
            * counted.float())
    };
    let w = Tensor::<B, 1>::from_data(weights.clone(), device);
    let grads = (nll.clone() * w).sum().backward();
    let d = src.grad(&grads).expect("the logits take a gradient");
    (nll.inner(), d.narrow(1, pad, vocab))
}

#[test]
fn cross_entropy_kernels_match_reference() {
    set_ops_mode(OpsMode::Kernels);
    assert!(kernels_active::<Gpu>());
    let gpu = Default::default();
    let cpu = Default::default();
    for (n, vocab, pad) in [(1, 50, 0), (7, 1000, 3), (33, 5003, 0), (12, 256, 1)] {
        let src = random(&[n, vocab + 2 * pad], 3.0);
        let ids = labels(n, vocab);
        let w = random(&[n], 1.0);
        let (want_nll, want_d) = run::<Autodiff<Cpu>>(&src, &ids, &w, vocab, pad, false, &cpu);
        let (cpu_nll, cpu_d) = run::<Autodiff<Cpu>>(&src, &ids, &w, vocab, pad, true, &cpu);
        check(
            &format!("{n}x{vocab} nll (tensor ops)"),
            cpu_nll,
            want_nll.clone(),
        );
        check(
            &format!("{n}x{vocab} dlogits (tensor ops)"),
            cpu_d,
            want_d.clone(),
        );
        poison(n * vocab);
        let (nll, d) = run::<Autodiff<Gpu>>(&src, &ids, &w, vocab, pad, true, &gpu);
        let e_n = check(&format!("{n}x{vocab} nll (kernel)"), nll, want_nll.clone());
        let e_d = check(&format!("{n}x{vocab} dlogits (kernel)"), d, want_d);
        eprintln!("cross-entropy {n}x{vocab}: nll {e_n:.2e}, dlogits {e_d:.2e}");
        // Inference (no autodiff) runs the forward kernel alone.
        let logits = Tensor::<Gpu, 2>::from_data(src.clone(), &gpu).narrow(1, pad, vocab);
        let plain = Gpu::nll_rows(logits, Tensor::from_data(ids.clone(), &gpu));
        check(&format!("{n}x{vocab} nll (inference)"), plain, want_nll);
    }
}

/// The gradient of `src` `[2, 3, 10]` for a loss over pieces `[3, 5, 2]` of its last dimension
/// (the ones `used` names, each weighted by its own random tensor), split by `B::split_last` or
/// by `narrow`.
fn split_grad<B: AutodiffBackend + MambaBackend>(
    src: &TensorData,
    weights: &[TensorData; 3],
    used: &[usize],
    fused: bool,
    device: &B::Device,
) -> Tensor<B::InnerBackend, 3> {
    let sizes = [3, 5, 2];
    let x = Tensor::<B, 3>::from_data(src.clone(), device).require_grad();
    let pieces = if fused {
        B::split_last(x.clone(), &sizes)
    } else {
        let mut start = 0;
        sizes
            .iter()
            .map(|&len| {
                let p = x.clone().narrow(2, start, len);
                start += len;
                p
            })
            .collect()
    };
    let mut loss = None;
    for &i in used {
        let w = Tensor::<B, 3>::from_data(weights[i].clone(), device);
        let term = (pieces[i].clone() * w).sum();
        loss = Some(match loss {
            Some(l) => l + term,
            None => term,
        });
    }
    let grads = loss.expect("a piece is used").backward();
    x.grad(&grads).expect("x takes a gradient")
}

#[test]
fn split_matches_narrow() {
    set_ops_mode(OpsMode::Kernels);
    let gpu = Default::default();
    let cpu = Default::default();
    let src = random(&[2, 3, 10], 1.0);
    let weights = [
        random(&[2, 3, 3], 1.0),
        random(&[2, 3, 5], 1.0),
        random(&[2, 3, 2], 1.0),
    ];
    for used in [&[0, 1, 2][..], &[1, 2], &[0, 2], &[0], &[1]] {
        let want = split_grad::<Autodiff<Cpu>>(&src, &weights, used, false, &cpu);
        let got_cpu = split_grad::<Autodiff<Cpu>>(&src, &weights, used, true, &cpu);
        check(&format!("split {used:?} (cpu)"), got_cpu, want.clone());
        poison(60);
        let got = split_grad::<Autodiff<Gpu>>(&src, &weights, used, true, &gpu);
        check(&format!("split {used:?} (wgpu)"), got, want);
    }
    // The pieces are the narrowed views, values and shapes.
    let x = Tensor::<Cpu, 3>::from_data(src.clone(), &cpu);
    let pieces = Cpu::split_last(x.clone(), &[3, 5, 2]);
    check("piece 1", pieces[1].clone(), x.narrow(2, 3, 5));
}

/// On a cube backend the split's pieces are views wherever a piece starts at the runtime's memory
/// alignment (burn's `narrow` also asks the end to be aligned, and copies otherwise): their
/// values through `into_data` and through a kernel that reads one in place (the gated norm with
/// the piece as its gate), against `narrow` on the CPU.
#[test]
fn split_pieces_are_views() {
    set_ops_mode(OpsMode::Kernels);
    let gpu = Default::default();
    let cpu = Default::default();
    // Piece 1 starts 512 bytes into each row (aligned on every runtime) and ends 96 bytes before
    // it: burn's `narrow` copies it.
    let sizes = [128, 200, 24];
    let src = random(&[3, 41, 352], 1.0);
    let x_cpu = Tensor::<Cpu, 3>::from_data(src.clone(), &cpu);
    let x_gpu = Tensor::<Gpu, 3>::from_data(src.clone(), &gpu);
    let pieces = Gpu::split_last(x_gpu.clone(), &sizes);
    let mut start = 0;
    for (k, (piece, &len)) in pieces.iter().zip(&sizes).enumerate() {
        check(
            &format!("piece {k}"),
            piece.clone(),
            x_cpu.clone().narrow(2, start, len),
        );
        start += len;
    }
    let view = pieces[1].clone().into_primitive().tensor();
    assert_eq!(view.handle.offset_start, Some(512), "piece 1 is a view");
    assert_eq!(
        view.meta.strides()[1],
        352,
        "piece 1 keeps the input's row stride"
    );
    // A kernel reading the view in place.
    let y = random(&[3, 41, 200], 1.0);
    let w = random(&[200], 1.0);
    let got = Gpu::gated_rms_norm(
        Tensor::from_data(y.clone(), &gpu),
        pieces[1].clone(),
        Tensor::from_data(w.clone(), &gpu),
        4,
        1e-5,
    );
    let want = Cpu::gated_rms_norm(
        Tensor::from_data(y, &cpu),
        x_cpu.narrow(2, 128, 200),
        Tensor::from_data(w, &cpu),
        4,
        1e-5,
    );
    check("gated norm of a view", got, want);
}

/// The one-launch `cat` of the split's backward (wgpu) against `Tensor::cat` on the CPU: two and
/// three pieces, one of them a strided view, over several cubes, with widths that are whole
/// vectors (the vector kernel) and widths that are not; four pieces take `Tensor::cat`.
#[test]
fn cat_last_matches_cat() {
    set_ops_mode(OpsMode::Kernels);
    let gpu = Default::default();
    let cpu = Default::default();
    for widths in [
        &[300, 45][..],
        &[17, 1536, 24],
        &[256, 1792, 24],
        &[128, 64],
        &[5, 6, 7, 8],
    ] {
        let data: Vec<TensorData> = widths.iter().map(|&w| random(&[3, 41, w], 1.0)).collect();
        let want = Tensor::cat(
            data.iter()
                .map(|d| Tensor::<Cpu, 3>::from_data(d.clone(), &cpu))
                .collect(),
            2,
        );
        poison(3 * 41 * widths.iter().sum::<usize>());
        let pieces: Vec<Tensor<Gpu, 3>> = data
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let t = Tensor::<Gpu, 3>::from_data(d.clone(), &gpu);
                if k == 1 {
                    // The same values as a view with a wider row stride.
                    let w = widths[k];
                    Tensor::cat(vec![t, Tensor::zeros([3, 41, 5], &gpu)], 2).narrow(2, 0, w)
                } else {
                    t
                }
            })
            .collect();
        check(&format!("cat_last {widths:?}"), Gpu::cat_last(pieces), want);
    }
}

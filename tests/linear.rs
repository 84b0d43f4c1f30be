//! Linear layers through `MambaBackend::linear_layer` / `matmul_t` (kernels/src/linear.rs): the
//! products against f64 on the host for every transpose flag and operand layout, and the
//! autodiff node's output and gradients against burn's own differentiated `x · wᵀ + b`, with
//! each input trained or frozen, on the CPU and on `Wgpu` (lavapipe without a GPU). On CUDA the
//! same products are cuBLAS's: `bench gemm --shapes small` checks those against f64 on the device
//! (BENCHMARKS.md).

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use mamba_burn::kernels::MambaBackend;
use mamba_burn::train::bench::gemm::matmul_t_f64;

#[path = "common/kernels.rs"]
#[allow(dead_code)]
mod kcommon;
use kcommon::{check, random, rel_err, values, Cpu, Gpu};

/// `data` (logical `[r, c]`) on `B`, lying in memory row-major (0), transposed (1: a transposed
/// view of the `[c, r]` transpose) or pitched (2: a narrowed view of a wider tensor).
fn operand<B: Backend>(data: &TensorData, layout: usize, device: &B::Device) -> Tensor<B, 2> {
    let [r, c] = [data.shape[0], data.shape[1]];
    let v = data.to_vec::<f32>().unwrap();
    match layout {
        0 => Tensor::from_data(data.clone(), device),
        1 => {
            let t: Vec<f32> = (0..c * r).map(|i| v[(i % r) * c + i / r]).collect();
            Tensor::<B, 2>::from_data(TensorData::new(t, [c, r]), device).transpose()
        }
        _ => {
            let wide: Vec<f32> = (0..r * (c + 3))
                .map(|i| {
                    let (row, col) = (i / (c + 3), i % (c + 3));
                    if (1..=c).contains(&col) {
                        v[row * c + col - 1]
                    } else {
                        f32::NAN
                    }
                })
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(wide, [r, c + 3]), device).narrow(1, 1, c)
        }
    }
}

fn matmul_t_matches_f64<B: MambaBackend>(device: &B::Device) {
    let (m, n, k) = (7, 5, 6);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a_dims = if ta { [k, m] } else { [m, k] };
        let b_dims = if tb { [n, k] } else { [k, n] };
        let (da, db) = (random(&a_dims, 1.0), random(&b_dims, 1.0));
        let want = matmul_t_f64(
            &da.to_vec::<f32>().unwrap(),
            &db.to_vec::<f32>().unwrap(),
            [m, n, k],
            (ta, tb),
            &(0..m).collect::<Vec<_>>(),
        );
        for la in 0..3 {
            for lb in 0..3 {
                let a = operand::<B>(&da, la, device);
                let b = operand::<B>(&db, lb, device);
                let (got, dims) = values(B::matmul_t(a, b, ta, tb));
                assert_eq!(dims, vec![m, n]);
                let err = rel_err(&got, &want);
                assert!(
                    err < 1e-6,
                    "{} matmul_t ta={ta} tb={tb} layouts {la}/{lb}: error {err:e}",
                    B::name(device)
                );
            }
        }
    }
}

#[test]
fn matmul_t_matches_f64_on_the_cpu() {
    matmul_t_matches_f64::<Cpu>(&Default::default());
}

#[test]
fn matmul_t_matches_f64_on_wgpu() {
    matmul_t_matches_f64::<Gpu>(&Default::default());
}

/// `B::linear_layer` on `Autodiff<B>` (the linear node) against burn differentiating `x · wᵀ + b`
/// itself on the CPU: output and the gradients of whichever of `x`, `w`, `b` are trained.
fn linear_node_matches_burn<B: MambaBackend>(device: &B::Device) {
    type Ref = Autodiff<Cpu>;
    let cpu = Default::default();
    let (rows, d_in, d_out) = (9, 12, 7);
    let (dx, dw, db, dy) = (
        random(&[rows, d_in], 1.0),
        random(&[d_out, d_in], 0.3),
        random(&[d_out], 1.0),
        random(&[rows, d_out], 1.0),
    );
    for (train_x, train_w, bias) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
        (true, true, false),
    ] {
        let what = format!(
            "{} linear (x {train_x}, w {train_w}, bias {bias})",
            B::name(device)
        );
        let leaf = |d: &TensorData, train: bool| {
            let t = Tensor::<Autodiff<B>, 2>::from_data(d.clone(), device);
            if train {
                t.require_grad()
            } else {
                t
            }
        };
        let (x, w) = (leaf(&dx, train_x), leaf(&dw, train_w));
        let b =
            bias.then(|| Tensor::<Autodiff<B>, 1>::from_data(db.clone(), device).require_grad());
        // A loss that weights every output differently: `sum(y · dy)`.
        let y = <Autodiff<B> as MambaBackend>::linear_layer(x.clone(), w.clone(), b.clone());
        let loss = (y.clone() * Tensor::from_data(dy.clone(), device)).sum();
        let grads = loss.backward();

        let (rx, rw) = (
            Tensor::<Ref, 2>::from_data(dx.clone(), &cpu).require_grad(),
            Tensor::<Ref, 2>::from_data(dw.clone(), &cpu).require_grad(),
        );
        let rb = Tensor::<Ref, 1>::from_data(db.clone(), &cpu).require_grad();
        let mut ry = rx.clone().matmul(rw.clone().transpose());
        if bias {
            ry = ry + rb.clone().unsqueeze::<2>();
        }
        let rloss = (ry.clone() * Tensor::from_data(dy.clone(), &cpu)).sum();
        let rgrads = rloss.backward();

        check(&format!("{what}: y"), y.inner(), ry.inner());
        assert_eq!(x.grad(&grads).is_some(), train_x, "{what}: dx present");
        assert_eq!(w.grad(&grads).is_some(), train_w, "{what}: dw present");
        if train_x {
            check(
                &format!("{what}: dx"),
                x.grad(&grads).unwrap(),
                rx.grad(&rgrads).unwrap(),
            );
        }
        if train_w {
            check(
                &format!("{what}: dw"),
                w.grad(&grads).unwrap(),
                rw.grad(&rgrads).unwrap(),
            );
        }
        if let Some(b) = b {
            check(
                &format!("{what}: db"),
                b.grad(&grads).unwrap(),
                rb.grad(&rgrads).unwrap(),
            );
        }
    }
}

#[test]
fn linear_node_matches_burn_on_the_cpu() {
    linear_node_matches_burn::<Cpu>(&Default::default());
}

#[test]
fn linear_node_matches_burn_on_wgpu() {
    linear_node_matches_burn::<Gpu>(&Default::default());
}

/// The LoRA layer node (`MambaBackend::lora_linear`: base and adapter products in one node, each
/// adding into the other's output) against burn's differentiated `x · wᵀ + b + s · (x · aᵀ) · bᵀ`
/// in f32 on the CPU: the output and the gradients of `x`, `w`, `a`, `b` and the bias, for the
/// LoRA case (frozen base) and with every input trained or the adapter's input frozen.
fn lora_node_matches_burn<B: MambaBackend>(device: &B::Device) {
    type Ref = Autodiff<Cpu>;
    let cpu = Default::default();
    let (rows, d_in, d_out, r, scale) = (11, 12, 9, 3, 2.0);
    let data = [
        random(&[rows, d_in], 1.0),
        random(&[d_out, d_in], 0.3),
        random(&[r, d_in], 0.3),
        random(&[d_out, r], 0.5),
        random(&[d_out], 1.0),
    ];
    let dy = random(&[rows, d_out], 1.0);
    // Which of x, w, a, b train; the bias trains when present.
    for (train, bias) in [
        ([true, false, true, true], true),
        ([true, false, true, true], false),
        ([true, true, true, true], true),
        ([false, false, true, true], false),
        ([true, false, false, true], false),
    ] {
        let what = format!("{} lora (trains {train:?}, bias {bias})", B::name(device));
        fn leaves<C: burn::tensor::backend::AutodiffBackend>(
            d: &[TensorData; 5],
            train: [bool; 4],
            dev: &C::Device,
        ) -> Vec<Tensor<C, 2>> {
            (0..4)
                .map(|i| {
                    let t = Tensor::<C, 2>::from_data(d[i].clone(), dev);
                    if train[i] {
                        t.require_grad()
                    } else {
                        t
                    }
                })
                .collect()
        }
        let t = leaves::<Autodiff<B>>(&data, train, device);
        let bt = bias
            .then(|| Tensor::<Autodiff<B>, 1>::from_data(data[4].clone(), device).require_grad());
        let y = <Autodiff<B> as MambaBackend>::lora_linear(
            t[0].clone(),
            t[1].clone(),
            bt.clone(),
            t[2].clone(),
            t[3].clone(),
            scale,
        );
        let grads = (y.clone() * Tensor::from_data(dy.clone(), device))
            .sum()
            .backward();

        let rt = leaves::<Ref>(&data, train, &cpu);
        let rb = Tensor::<Ref, 1>::from_data(data[4].clone(), &cpu).require_grad();
        let mut ry = rt[0].clone().matmul(rt[1].clone().transpose())
            + rt[0]
                .clone()
                .matmul(rt[2].clone().transpose())
                .matmul(rt[3].clone().transpose())
                * scale;
        if bias {
            ry = ry + rb.clone().unsqueeze::<2>();
        }
        let rgrads = (ry.clone() * Tensor::from_data(dy.clone(), &cpu))
            .sum()
            .backward();

        check(&format!("{what}: y"), y.inner(), ry.inner());
        for (i, name) in ["x", "w", "a", "b"].iter().enumerate() {
            assert_eq!(
                t[i].grad(&grads).is_some(),
                train[i],
                "{what}: d{name} present"
            );
            if train[i] {
                check(
                    &format!("{what}: d{name}"),
                    t[i].grad(&grads).unwrap(),
                    rt[i].grad(&rgrads).unwrap(),
                );
            }
        }
        if let Some(b) = bt {
            check(
                &format!("{what}: dbias"),
                b.grad(&grads).unwrap(),
                rb.grad(&rgrads).unwrap(),
            );
        }
    }
}

#[test]
fn lora_node_matches_burn_on_the_cpu() {
    lora_node_matches_burn::<Cpu>(&Default::default());
}

#[test]
fn lora_node_matches_burn_on_wgpu() {
    lora_node_matches_burn::<Gpu>(&Default::default());
}

//! What the kernel tests share: the backends, the metric (`‖got − want‖ / ‖want‖ ≤ 1e-4` in f32
//! over whole tensors, a NaN or an infinity anywhere failing), NaN poisoning of the GPU allocator
//! and fresh random data.

use burn::backend::{NdArray, Wgpu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor, TensorData};

pub type Cpu = NdArray<f32>;
pub type Gpu = Wgpu<f32, i32, u32>;

pub const REL_TOL: f64 = 1e-4;

/// `‖got − want‖ / ‖want‖`, infinite when either side holds a non-finite value.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    if got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    num.sqrt() / den.sqrt().max(1e-30)
}

pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<f32>, Vec<usize>) {
    let dims = t.dims().to_vec();
    (
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
        dims,
    )
}

/// Compare whole tensors (shape and values); returns the relative error.
pub fn check<B1: Backend, B2: Backend, const D: usize>(
    what: &str,
    got: Tensor<B1, D>,
    want: Tensor<B2, D>,
) -> f64 {
    let (g, gd) = values(got);
    let (w, wd) = values(want);
    assert_eq!(gd, wd, "{what}: shape");
    let err = rel_err(&g, &w);
    assert!(
        err <= REL_TOL,
        "{what}: relative error {err:e} > {REL_TOL:e}"
    );
    err
}

/// Fill and free a buffer of `n` NaNs on the GPU, so that a later allocation of the same size
/// likely reuses NaN memory: an output element a kernel forgets to write then shows as NaN.
pub fn poison(n: usize) {
    let device = Default::default();
    let t = Tensor::<Gpu, 1>::full([n.max(1)], f32::NAN, &device);
    let _ = t.clone().narrow(0, 0, 1).into_data();
    drop(t);
}

pub fn random(shape: &[usize], scale: f32) -> TensorData {
    let device = Default::default();
    let t = Tensor::<Cpu, 1>::random(
        [shape.iter().product::<usize>()],
        Distribution::Normal(0.0, 1.0),
        &device,
    ) * scale;
    TensorData::new(t.into_data().to_vec::<f32>().unwrap(), shape.to_vec())
}

/// Which outputs of a two-output op (`y` and the final state) a test loss reads. They are two
/// graph nodes, and a loss that reads only one of them takes its own path through the backward
/// (the other's gradient is absent, not zero).
#[derive(Debug, Clone, Copy)]
pub enum Uses {
    Both,
    Y,
    FinalState,
}

impl Uses {
    /// Cycles through the three by case number, so that every kind of case meets each.
    pub fn nth(i: usize) -> Self {
        [Uses::Both, Uses::Y, Uses::FinalState][i % 3]
    }
}

/// The gradient of `t`, or zeros where none reached it: with a loss that reads only the final
/// state, the reference leaves the inputs only `y` depends on (`C`, `D`) without a gradient,
/// while the kernel op registers zeros for them.
pub fn grad_or_zeros<B: AutodiffBackend, const D: usize>(
    t: &Tensor<B, D>,
    grads: &B::Gradients,
) -> Tensor<B::InnerBackend, D> {
    t.grad(grads)
        .unwrap_or_else(|| t.clone().inner().zeros_like())
}

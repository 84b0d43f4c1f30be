//! Small building blocks with PyTorch's parameter layouts, so that checkpoints map one to one.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Int, Tensor};

use mamba_kernels::MambaBackend;

use crate::lora::{LoraEmbedding, LoraLinear};
use crate::precision::Compute;

/// A linear layer storing `weight` as `[out, in]` (PyTorch's layout), so Hugging Face
/// checkpoints load and save without transposes.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter on this layer, if any.
    pub lora: Option<LoraLinear<B>>,
}

impl<B: Backend> Linear<B> {
    /// PyTorch's default init (Kaiming-uniform with `a = sqrt(5)`, i.e. `U(±1/sqrt(in))`),
    /// bias zero as mamba_ssm initialises it.
    pub fn init(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let weight = Tensor::random([d_out, d_in], Distribution::Uniform(-bound, bound), device);
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
            lora: None,
        }
    }

    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl<B: MambaBackend> Linear<B> {
    /// `x @ Wᵀ + b` over the last dimension, plus the LoRA path when adapted, in the compute
    /// dtype `c` (input, weights and output; the weights cast at use).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, c: Compute) -> Tensor<B, D> {
        let x = c.act(x);
        if let Some(l) = self.lora.as_ref().filter(|l| !l.dropout_active(&x)) {
            // Without dropout the adapter reads `x` itself: one op for the base and the adapter.
            let mut dims = x.dims();
            let rows = dims[..D - 1].iter().product::<usize>();
            dims[D - 1] = self.d_out();
            let y = B::lora_linear(
                x.reshape([rows, self.d_in()]),
                c.weight(self.weight.val()),
                self.bias.as_ref().map(|b| c.weight(b.val())),
                c.weight(l.a.val()),
                c.weight(l.b.val()),
                l.scaling,
            );
            return c.act(y.reshape(dims));
        }
        let base = c.act(linear(
            x.clone(),
            c.weight(self.weight.val()),
            self.bias.as_ref().map(|b| c.weight(b.val())),
        ));
        match &self.lora {
            Some(l) => c.act(base + l.forward(x, c)),
            None => base,
        }
    }
}

/// `x · wᵀ + bias` over the last dimension of `x` (`[.., in]`), `w` `[out, in]` in PyTorch's
/// layout: [`MambaBackend::linear_layer`] on the rows of `x`, so the weight is never transposed in
/// memory and, on CUDA, the products are cuBLAS's.
pub fn linear<B: MambaBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = w.dims()[0];
    B::linear_layer(x.reshape([rows, d_in]), w, bias).reshape(dims)
}

/// Token embeddings, `weight` `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    /// A LoRA adapter on the embeddings, if any.
    pub lora: Option<LoraEmbedding<B>>,
}

impl<B: Backend> Embedding<B> {
    pub fn init(vocab: usize, hidden: usize, std: f64, device: &B::Device) -> Self {
        let weight = Tensor::random([vocab, hidden], Distribution::Normal(0.0, std), device);
        Self {
            weight: Param::from_tensor(weight),
            lora: None,
        }
    }
}

impl<B: MambaBackend> Embedding<B> {
    /// `[batch, seq]` ids to `[batch, seq, hidden]`, in f32 (the residual stream's dtype)
    /// whatever the dtype the table is stored in; the adapter runs in the compute dtype `c`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, c: Compute) -> Tensor<B, 3> {
        crate::lora::embed(self, ids, c)
    }
}

/// RMSNorm as Mamba uses it: `w * x / sqrt(mean(x²) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn init(size: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([size], device)),
            eps,
        }
    }
}

impl<B: MambaBackend> RmsNorm<B> {
    /// Over the last dimension (`[.., width]`, any rank), through [`MambaBackend::rms_norm`].
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let width = dims[D - 1];
        let rows: usize = dims[..D - 1].iter().product();
        let y = B::rms_norm(x.reshape([rows, 1, width]), self.weight.val(), self.eps); // [rows, 1, w]
        y.reshape(dims)
    }
}

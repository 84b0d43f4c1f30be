//! The Mamba2 mixer: in_proj → causal conv + SiLU → SSD scan → gated RMSNorm → out_proj.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use mamba_kernels::{ConvInput, Mamba2StepInput, MambaBackend, SsdInput};

use crate::config::{Mamba2Config, NormMode};
use crate::nn::Linear;
use crate::precision::{to_dtype, Compute};

/// Shapes of a Mamba2 mixer, fixed at construction.
#[derive(Debug, Clone, Copy)]
pub struct Mamba2Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub state: usize,
    pub groups: usize,
    pub conv_kernel: usize,
    pub chunk_size: usize,
    pub d_mlp: usize,
    pub eps: f64,
    pub dt_limit: (f64, f64),
    pub norm: NormMode,
}

impl Mamba2Dims {
    pub fn from_config(c: &Mamba2Config) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size(),
            heads: c.num_heads,
            head_dim: c.head_dim,
            state: c.state_size,
            groups: c.n_groups,
            conv_kernel: c.conv_kernel,
            chunk_size: c.chunk_size,
            d_mlp: c.d_mlp,
            eps: c.layer_norm_epsilon,
            dt_limit: c.time_step_limit,
            norm: c.norm,
        }
    }
    pub fn conv_dim(&self) -> usize {
        self.intermediate + 2 * self.groups * self.state
    }
}

/// Recurrent state of one Mamba2 layer.
#[derive(Debug, Clone)]
pub struct Mamba2State<B: Backend> {
    /// `[batch, conv_dim, conv_kernel - 1]`: the last inputs of the conv.
    pub conv: Tensor<B, 3>,
    /// `[batch, heads, head_dim, state]`
    pub ssm: Tensor<B, 4>,
    /// `[heads]`: the decay rates `-exp(A_log)` (f32), computed once when the state is made so
    /// that a decode step does not launch their two kernels in every layer.
    pub a: Tensor<B, 1>,
}

#[derive(Module, Debug)]
pub struct Mamba2Mixer<B: Backend> {
    /// `hidden → [2·d_mlp, z (I), xBC (I + 2·G·N), dt (H)]`
    pub in_proj: Linear<B>,
    /// `[conv_dim, conv_kernel]` (checkpoint: `conv1d.weight` `[conv_dim, 1, kernel]`)
    pub conv1d_weight: Param<Tensor<B, 2>>,
    /// `[conv_dim]`
    pub conv1d_bias: Option<Param<Tensor<B, 1>>>,
    /// `[heads]`
    pub dt_bias: Param<Tensor<B, 1>>,
    /// `[heads]`
    pub a_log: Param<Tensor<B, 1>>,
    /// `[heads]`
    pub d: Param<Tensor<B, 1>>,
    /// Gated RMSNorm weight `[intermediate]`.
    pub norm_weight: Param<Tensor<B, 1>>,
    pub out_proj: Linear<B>,
    #[module(skip)]
    pub dims: Mamba2Dims,
}

impl<B: Backend> Mamba2Mixer<B> {
    /// Random init following mamba_ssm / transformers: `A_log = log(1..=H)`, `D = 1`, `dt_bias`
    /// the inverse softplus of a log-uniform `dt` in `[time_step_min, time_step_max]`.
    pub fn init(c: &Mamba2Config, device: &B::Device) -> Self {
        let dims = Mamba2Dims::from_config(c);
        let conv_dim = dims.conv_dim();
        let in_proj = Linear::init(dims.hidden, c.in_proj_size(), c.use_bias, device);
        let mut out_proj = Linear::init(dims.intermediate, dims.hidden, c.use_bias, device);
        if c.rescale_prenorm_residual {
            let scale = 1.0 / (c.num_hidden_layers as f64).sqrt();
            out_proj.weight = out_proj.weight.map(|w| w * scale);
        }
        let bound = 1.0 / (dims.conv_kernel as f64).sqrt();
        let conv1d_weight = Tensor::random(
            [conv_dim, dims.conv_kernel],
            Distribution::Uniform(-bound, bound),
            device,
        );
        let a: Vec<f32> = (1..=dims.heads).map(|h| (h as f32).ln()).collect();
        let dt_bias = init_dt_bias::<B>(
            dims.heads,
            c.time_step_min,
            c.time_step_max,
            c.time_step_floor,
            device,
        );
        Self {
            in_proj,
            conv1d_weight: Param::from_tensor(conv1d_weight),
            conv1d_bias: c
                .use_conv_bias
                .then(|| Param::from_tensor(Tensor::zeros([conv_dim], device))),
            dt_bias: Param::from_tensor(dt_bias),
            a_log: Param::from_tensor(Tensor::from_floats(a.as_slice(), device)),
            d: Param::from_tensor(Tensor::ones([dims.heads], device)),
            norm_weight: Param::from_tensor(Tensor::ones([dims.intermediate], device)),
            out_proj,
            dims,
        }
    }
}

/// `dt_bias = dt + log(-expm1(-dt))` (inverse softplus) with `dt` log-uniform in `[min, max]`,
/// floored at `floor`.
pub fn init_dt_bias<B: Backend>(
    n: usize,
    min: f64,
    max: f64,
    floor: f64,
    device: &B::Device,
) -> Tensor<B, 1> {
    let u = Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, 1.0), device);
    let dt = (u * (max.ln() - min.ln()) + min.ln())
        .exp()
        .clamp_min(floor);
    // inverse softplus: dt + log(1 - exp(-dt))
    dt.clone() + (-(dt.neg().exp()) + 1.0).log()
}

impl<B: MambaBackend> Mamba2Mixer<B> {
    /// `proj` `[b, l, in_proj]` → `z` `[b, l, I]`, `xBC` `[b, l, conv_dim]`, `dt` `[b, l, H]`
    /// (views; the MLP part, when `d_mlp > 0`, is dropped). One [`MambaBackend::split_last`], so
    /// the backward writes the projection's gradient once.
    fn split_proj(&self, proj: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let d = &self.dims;
        let mut sizes = vec![d.intermediate, d.conv_dim(), d.heads];
        if d.d_mlp > 0 {
            sizes.insert(0, 2 * d.d_mlp);
        }
        let mut pieces = B::split_last(proj, &sizes).into_iter().rev();
        let mut next = || pieces.next().expect("three pieces");
        let (dt, xbc, z) = (next(), next(), next());
        (z, xbc, dt)
    }

    fn a(&self) -> Tensor<B, 1> {
        self.a_log.val().exp().neg()
    }

    /// Full-sequence forward. `x` `[batch, seq, hidden]`, `mask` `[batch, seq]` (1 keep, 0 pad).
    /// Continues from `state` when given; returns the state after the last position when
    /// `want_state`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&Tensor<B, 3>>,
        state: Option<Mamba2State<B>>,
        want_state: bool,
        c: Compute,
    ) -> (Tensor<B, 3>, Option<Mamba2State<B>>) {
        let d = &self.dims;
        let [batch, seq, _] = x.dims();
        let x = apply_mask(c.act(x), mask);
        let proj = self.in_proj.forward(x, c); // [b, l, in_proj]
        let (z, xbc, dt) = self.split_proj(proj);
        let (conv_state, ssm_state) = match state {
            Some(s) => (Some(s.conv), Some(s.ssm)),
            None => (None, None),
        };
        let conv = B::causal_conv1d(ConvInput {
            x: xbc,
            weight: c.weight(self.conv1d_weight.val()),
            bias: self.conv1d_bias.as_ref().map(|b| c.weight(b.val())),
            initial_state: conv_state.map(|s| c.act(s)),
            silu: true,
        });
        let xbc = apply_mask(c.act(conv.y), mask); // [b, l, conv_dim]
        let gn = d.groups * d.state;
        let [xs, bm, cm]: [Tensor<B, 3>; 3] = B::split_last(xbc, &[d.intermediate, gn, gn])
            .try_into()
            .expect("three pieces");
        let xs = xs.reshape([batch, seq, d.heads, d.head_dim]);
        let bm = bm.reshape([batch, seq, d.groups, d.state]);
        let cm = cm.reshape([batch, seq, d.groups, d.state]);
        // The per-head parameters stay f32 (the kernels read them as f32, as mamba_ssm's do
        // under autocast): a bf16 `dt_bias` alone would shift `dt` by up to 1.6%.
        let a = self.a();
        let ssd = B::ssd_chunk_scan(SsdInput {
            x: xs,
            dt,
            a: a.clone(),
            b: bm,
            c: cm,
            d: self.d.val(),
            dt_bias: self.dt_bias.val(),
            dt_limit: d.dt_limit,
            initial_state: ssm_state.map(|s| c.act(s)),
            chunk_size: d.chunk_size,
        });
        let y = c.act(ssd.y).reshape([batch, seq, d.intermediate]);
        let y = self.gated_norm(y, z, c);
        let out = self.out_proj.forward(y, c);
        let state = want_state.then(|| Mamba2State {
            conv: conv.final_state,
            ssm: ssd.final_state,
            a: a.clone(),
        });
        (out, state)
    }

    /// One-token step: `x` `[batch, hidden]`. Between the projections it is one
    /// [`MambaBackend::mamba2_step`] ([`Self::step_inner`]: conv step, SSD step, gate; one
    /// launch on kernel backends) and the gated norm's RMS and weight
    /// ([`MambaBackend::norm_forward`]).
    pub fn step(
        &self,
        x: Tensor<B, 2>,
        state: Mamba2State<B>,
        c: Compute,
    ) -> (Tensor<B, 2>, Mamba2State<B>) {
        let d = &self.dims;
        let [batch, _] = x.dims();
        let proj = self.in_proj.forward(x, c); // [b, in_proj]
        let (y, state) = self.step_inner(proj, state, c); // y · silu(z): [b, I]
        let y = c.act(B::norm_forward(
            y.reshape([batch, 1, d.intermediate]),
            None,
            self.norm_weight.val(),
            self.norm_groups(),
            d.eps,
        ));
        (
            self.out_proj.forward(y, c).reshape([batch, d.hidden]),
            state,
        )
    }

    /// The step between the projections: `proj` `[batch, in_proj]` (the in-projection's
    /// output) to `y · silu(z)` `[batch, I]`, before the gated norm's RMS and weight.
    pub fn step_inner(
        &self,
        proj: Tensor<B, 2>,
        state: Mamba2State<B>,
        c: Compute,
    ) -> (Tensor<B, 2>, Mamba2State<B>) {
        let d = &self.dims;
        let out = B::mamba2_step(Mamba2StepInput {
            proj,
            d_mlp: d.d_mlp,
            groups: d.groups,
            conv_state: c.act(state.conv),
            conv_weight: c.weight(self.conv1d_weight.val()),
            conv_bias: self.conv1d_bias.as_ref().map(|b| c.vector(b.val())),
            a: state.a.clone(),
            d: self.d.val(),
            dt_bias: self.dt_bias.val(),
            dt_limit: d.dt_limit,
            ssm_state: c.act(state.ssm),
        });
        (
            out.y,
            Mamba2State {
                conv: out.conv_state,
                ssm: out.ssm_state,
                a: state.a,
            },
        )
    }

    /// The groups the gated norm takes its RMS over (all channels at once for
    /// [`NormMode::Hf`]).
    pub fn norm_groups(&self) -> usize {
        match self.dims.norm {
            NormMode::Grouped => self.dims.groups,
            NormMode::Hf => 1,
        }
    }

    /// Gate first (`y · silu(z)`), then RMS over groups of `I / G` channels (or over all `I`
    /// with [`NormMode::Hf`]), then the weight: one [`MambaBackend::gated_rms_norm`].
    /// The norm computes in f32; its output is in the compute dtype `c`.
    fn gated_norm(&self, y: Tensor<B, 3>, z: Tensor<B, 3>, c: Compute) -> Tensor<B, 3> {
        c.act(B::gated_rms_norm(
            y,
            z,
            self.norm_weight.val(),
            self.norm_groups(),
            self.dims.eps,
        ))
    }

    pub fn zero_state(&self, batch: usize, device: &B::Device) -> Mamba2State<B> {
        let d = &self.dims;
        Mamba2State {
            conv: Tensor::zeros([batch, d.conv_dim(), d.conv_kernel - 1], device),
            ssm: Tensor::zeros([batch, d.heads, d.head_dim, d.state], device),
            a: self.a(),
        }
    }
}

/// Zero the padded positions: `x` `[batch, seq, ch]`, `mask` `[batch, seq, 1]`.
pub(crate) fn apply_mask<B: Backend>(x: Tensor<B, 3>, mask: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
    match mask {
        Some(m) => {
            let m = to_dtype(m.clone(), x.dtype());
            x * m
        }
        None => x,
    }
}

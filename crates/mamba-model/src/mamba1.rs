//! The Mamba (v1) mixer: in_proj → [x, z]; causal conv + SiLU on x; x_proj → [dt (R), B, C];
//! dt_proj; selective scan gated by silu(z); out_proj.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softplus};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use mamba_kernels::{ConvInput, MambaBackend, SelectiveScanInput};

use crate::config::Mamba1Config;
use crate::mamba2::{apply_mask, init_dt_bias};
use crate::nn::Linear;
use crate::precision::Compute;

#[derive(Debug, Clone, Copy)]
pub struct Mamba1Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub state: usize,
    pub dt_rank: usize,
    pub conv_kernel: usize,
}

/// Recurrent state of one Mamba1 layer.
#[derive(Debug, Clone)]
pub struct Mamba1State<B: Backend> {
    /// `[batch, intermediate, conv_kernel - 1]`
    pub conv: Tensor<B, 3>,
    /// `[batch, intermediate, state]`
    pub ssm: Tensor<B, 3>,
    /// `[intermediate, state]`: the decay rates `-exp(A_log)` (f32), computed once when the
    /// state is made (a decode step does not recompute them in every layer).
    pub a: Tensor<B, 2>,
}

#[derive(Module, Debug)]
pub struct Mamba1Mixer<B: Backend> {
    /// `hidden → [x (I), z (I)]`
    pub in_proj: Linear<B>,
    /// `[intermediate, conv_kernel]`
    pub conv1d_weight: Param<Tensor<B, 2>>,
    pub conv1d_bias: Option<Param<Tensor<B, 1>>>,
    /// `I → [dt (R), B (N), C (N)]`
    pub x_proj: Linear<B>,
    /// `R → I`, with bias.
    pub dt_proj: Linear<B>,
    /// `[intermediate, state]`
    pub a_log: Param<Tensor<B, 2>>,
    /// `[intermediate]`
    pub d: Param<Tensor<B, 1>>,
    pub out_proj: Linear<B>,
    #[module(skip)]
    pub dims: Mamba1Dims,
}

impl<B: Backend> Mamba1Mixer<B> {
    /// Random init following mamba_ssm / transformers (S4D-real `A`, dt_proj as in the paper).
    pub fn init(c: &Mamba1Config, device: &B::Device) -> Self {
        let dims = Mamba1Dims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            state: c.state_size,
            dt_rank: c.time_step_rank,
            conv_kernel: c.conv_kernel,
        };
        let i = dims.intermediate;
        let n = dims.state;
        let mut dt_proj = Linear::init(dims.dt_rank, i, true, device);
        let std = (dims.dt_rank as f64).powf(-0.5) * c.time_step_scale;
        dt_proj.weight = Param::from_tensor(if c.time_step_init_scheme == "constant" {
            Tensor::full([i, dims.dt_rank], std, device)
        } else {
            Tensor::random([i, dims.dt_rank], Distribution::Uniform(-std, std), device)
        });
        dt_proj.bias = Some(Param::from_tensor(init_dt_bias::<B>(
            i,
            c.time_step_min,
            c.time_step_max,
            c.time_step_floor,
            device,
        )));
        let a: Vec<f32> = (0..i)
            .flat_map(|_| (1..=n).map(|s| (s as f32).ln()))
            .collect();
        let bound = 1.0 / (dims.conv_kernel as f64).sqrt();
        let mut out_proj = Linear::init(i, dims.hidden, c.use_bias, device);
        if c.rescale_prenorm_residual {
            let scale = 1.0 / (c.num_hidden_layers as f64).sqrt();
            out_proj.weight = out_proj.weight.map(|w| w * scale);
        }
        Self {
            in_proj: Linear::init(dims.hidden, 2 * i, c.use_bias, device),
            conv1d_weight: Param::from_tensor(Tensor::random(
                [i, dims.conv_kernel],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            conv1d_bias: c
                .use_conv_bias
                .then(|| Param::from_tensor(Tensor::zeros([i], device))),
            x_proj: Linear::init(i, dims.dt_rank + 2 * n, false, device),
            dt_proj,
            a_log: Param::from_tensor(
                Tensor::<B, 1>::from_floats(a.as_slice(), device).reshape([i, n]),
            ),
            d: Param::from_tensor(Tensor::ones([i], device)),
            out_proj,
            dims,
        }
    }
}

impl<B: MambaBackend> Mamba1Mixer<B> {
    fn a(&self) -> Tensor<B, 2> {
        self.a_log.val().exp().neg()
    }

    /// Full-sequence forward. `x` `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&Tensor<B, 3>>,
        state: Option<Mamba1State<B>>,
        want_state: bool,
        c: Compute,
    ) -> (Tensor<B, 3>, Option<Mamba1State<B>>) {
        let d = &self.dims;
        let i = d.intermediate;
        let proj = self.in_proj.forward(x, c); // [b, l, 2I]
        let [xs, z]: [Tensor<B, 3>; 2] =
            B::split_last(proj, &[i, i]).try_into().expect("two pieces"); // [b, l, I] each
        let xs = apply_mask(xs, mask);
        let (conv_state, ssm_state) = match state {
            Some(s) => (Some(s.conv), Some(s.ssm)),
            None => (None, None),
        };
        let conv = B::causal_conv1d(ConvInput {
            x: xs,
            weight: c.weight(self.conv1d_weight.val()),
            bias: self.conv1d_bias.as_ref().map(|b| c.weight(b.val())),
            initial_state: conv_state.map(|s| c.act(s)),
            silu: true,
        });
        let xs = apply_mask(c.act(conv.y), mask);
        let params = self.x_proj.forward(xs.clone(), c); // [b, l, R + 2N]
        let [ts, bm, cm]: [Tensor<B, 3>; 3] = B::split_last(params, &[d.dt_rank, d.state, d.state])
            .try_into()
            .expect("three pieces"); // [b, l, R], [b, l, N], [b, l, N]
        let delta = self.dt_proj.forward(ts, c); // [b, l, I], bias included
        let a = self.a();
        let scan = B::selective_scan(SelectiveScanInput {
            u: xs,
            delta,
            a: c.weight(a.clone()),
            b: bm,
            c: cm,
            d: c.weight(self.d.val()),
            z: Some(z),
            delta_bias: None,
            delta_softplus: true,
            initial_state: ssm_state.map(|s| c.act(s)),
        });
        let out = self.out_proj.forward(c.act(scan.y), c);
        let state = want_state.then(|| Mamba1State {
            conv: conv.final_state,
            ssm: scan.final_state,
            a,
        });
        (out, state)
    }

    /// One-token step: `x` `[batch, hidden]`.
    pub fn step(
        &self,
        x: Tensor<B, 2>,
        state: Mamba1State<B>,
        c: Compute,
    ) -> (Tensor<B, 2>, Mamba1State<B>) {
        let d = &self.dims;
        let i = d.intermediate;
        let proj = self.in_proj.forward(x, c); // [b, 2I]
        let xs = proj.clone().narrow(1, 0, i);
        let z = proj.narrow(1, i, i);
        let (xs, conv) = B::causal_conv1d_step(
            xs,
            c.act(state.conv),
            c.weight(self.conv1d_weight.val()),
            self.conv1d_bias.as_ref().map(|b| c.weight(b.val())),
            true,
        );
        let params = self.x_proj.forward(xs.clone(), c); // [b, R + 2N]
        let ts = params.clone().narrow(1, 0, d.dt_rank);
        let bm = params.clone().narrow(1, d.dt_rank, d.state);
        let cm = params.narrow(1, d.dt_rank + d.state, d.state);
        let dt = c.act(softplus(self.dt_proj.forward(ts, c), 1.0)); // [b, I]
        let (y, ssm) = B::selective_step(
            xs,
            dt,
            c.weight(state.a.clone()),
            bm,
            cm,
            c.weight(self.d.val()),
            c.act(state.ssm),
        );
        let y = c.act(y * silu(z));
        let a = state.a;
        (self.out_proj.forward(y, c), Mamba1State { conv, ssm, a })
    }

    pub fn zero_state(&self, batch: usize, device: &B::Device) -> Mamba1State<B> {
        let d = &self.dims;
        Mamba1State {
            conv: Tensor::zeros([batch, d.intermediate, d.conv_kernel - 1], device),
            ssm: Tensor::zeros([batch, d.intermediate, d.state], device),
            a: self.a(),
        }
    }
}

//! Reference implementations of the Mamba ops in plain burn tensor ops.
//!
//! They define what "correct" means for the kernels, run on every backend, and are
//! differentiated by `Autodiff<B>` like any other tensor code. The SSD scan follows the chunked
//! ("state space duality") algorithm: intra-chunk quadratic form, per-chunk states, state passing
//! between chunks, and the state-to-output term, all with matrix products.

use burn::tensor::activation::{silu, softplus};
use burn::tensor::{backend::Backend, Bool, Tensor};

use crate::{
    ConvGrads, ConvInput, ConvOutput, DecodeLinearInput, Mamba2StepInput, Mamba2StepOutput,
    MambaBackend, SelectiveScanGrads, SelectiveScanInput, SelectiveScanOutput, SsdGrads, SsdInput,
    SsdOutput, SsdStepInput,
};

/// `dt = clamp(softplus(dt + bias), limit)`; the clamp is skipped for `(0, inf)` (softplus is
/// positive, so it would be the identity anyway, and this keeps it out of the autodiff graph).
fn discretize_dt<B: Backend, const D: usize>(
    dt: Tensor<B, D>,
    bias: Tensor<B, D>,
    limit: (f64, f64),
) -> Tensor<B, D> {
    let dt = softplus(dt + bias, 1.0);
    clamp_limit(dt, limit)
}

fn clamp_limit<B: Backend, const D: usize>(dt: Tensor<B, D>, (lo, hi): (f64, f64)) -> Tensor<B, D> {
    let dt = if lo > 0.0 { dt.clamp_min(lo) } else { dt };
    if hi.is_finite() {
        dt.clamp_max(hi)
    } else {
        dt
    }
}

/// Expand `[.., groups, n]` to `[.., heads, n]`: head `h` reads group `h / (heads / groups)`.
fn groups_to_heads<B: Backend>(t: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [b, l, g, n] = t.dims();
    if g == heads {
        return t;
    }
    t.unsqueeze_dim::<5>(3) // [b, l, g, 1, n]
        .expand([b, l, g, heads / g, n])
        .reshape([b, l, heads, n])
}

/// Stable segment sum: `out[.., i, j] = sum_{k = j+1..=i} x[.., k]` for `i >= j`, `-inf` above
/// the diagonal. `x` is `[a, b, c, t]`, the result `[a, b, c, t, t]`.
fn segsum<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 5> {
    let [a, b, c, t] = x.dims();
    let device = x.device();
    // [a, b, c, t(k), t(j)] holding x[k]
    let xe = x.unsqueeze_dim::<5>(4).expand([a, b, c, t, t]);
    // keep k > j (strictly lower triangle), zero elsewhere
    let strict: Tensor<B, 5, Bool> = Tensor::<B, 2, Bool>::tril_mask([t, t], -1, &device)
        .unsqueeze::<5>()
        .expand([a, b, c, t, t]);
    let xe = xe.mask_fill(strict, 0.0);
    let cs = xe.cumsum(3); // sum over k <= i
    let lower: Tensor<B, 5, Bool> = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &device)
        .unsqueeze::<5>()
        .expand([a, b, c, t, t]);
    cs.mask_fill(lower, f32::NEG_INFINITY)
}

/// `t` in `other`'s dtype (no op when it is).
fn like<B: Backend, const D: usize, const E: usize>(
    t: Tensor<B, D>,
    other: &Tensor<B, E>,
) -> Tensor<B, D> {
    if t.dtype() == other.dtype() {
        t
    } else {
        t.cast(other.dtype())
    }
}

/// `t` with `pad` zero positions appended along dimension 1 (see [`pad_dim`]).
fn pad_seq<B: Backend, const D: usize>(t: Tensor<B, D>, pad: usize) -> Tensor<B, D> {
    pad_dim(t, 1, 0, pad)
}

/// `t` with `before` and `after` zeros along `dim`, in `t`'s dtype (burn's `pad` makes its
/// zeros in the default float dtype, which breaks bf16 / f64 activations).
fn pad_dim<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    dim: usize,
    before: usize,
    after: usize,
) -> Tensor<B, D> {
    let zeros = |n: usize| {
        let mut dims = t.dims();
        dims[dim] = n;
        Tensor::zeros(dims, (&t.device(), t.dtype()))
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(zeros(before));
    }
    let tail = (after > 0).then(|| zeros(after));
    parts.push(t);
    parts.extend(tail);
    Tensor::cat(parts, dim)
}

/// The SSD chunked scan for any sequence length (padded internally to a multiple of the chunk).
pub fn ssd_chunk_scan<B: Backend>(input: SsdInput<B>) -> SsdOutput<B> {
    let SsdInput {
        x,
        dt,
        a,
        b,
        c,
        d,
        dt_bias,
        dt_limit,
        initial_state,
        chunk_size,
    } = input;
    let [batch, seqlen, heads, head_dim] = x.dims();
    let [_, _, _, dstate] = b.dims();
    let device = x.device();
    assert!(chunk_size > 0, "chunk_size must be positive");
    // The per-head parameters may come in another dtype (f32 masters beside bf16 activations).
    let (a, d, dt_bias) = (like(a, &x), like(d, &x), like(dt_bias, &x));

    let dt = discretize_dt(dt, dt_bias.reshape([1, 1, heads]), dt_limit); // [b, l, h]
    let nchunks = seqlen.div_ceil(chunk_size).max(1);
    let padded = nchunks * chunk_size;
    let pad = padded - seqlen;
    let q = chunk_size;

    let dtype = x.dtype();
    let d_residual = x.clone() * d.reshape([1, 1, heads, 1]); // [b, l, h, p]

    // Padding with dt = 0 makes padded steps the identity on the state.
    let (x, dt, b, c) = if pad > 0 {
        (
            pad_seq(x, pad),
            pad_seq(dt, pad),
            pad_seq(b, pad),
            pad_seq(c, pad),
        )
    } else {
        (x, dt, b, c)
    };
    let b = groups_to_heads(b, heads); // [b, L, h, n]
    let c = groups_to_heads(c, heads); // [b, L, h, n]

    let xdt = x * dt.clone().unsqueeze_dim::<4>(3); // [b, L, h, p]
    let adt = dt * a.reshape([1, 1, heads]); // [b, L, h]

    // Chunked views.
    let x_ch = xdt
        .reshape([batch, nchunks, q, heads, head_dim])
        .permute([0, 1, 3, 2, 4]); // [b, c, h, q, p]
    let b_ch = b
        .reshape([batch, nchunks, q, heads, dstate])
        .permute([0, 1, 3, 2, 4]); // [b, c, h, q, n]
    let c_ch = c
        .reshape([batch, nchunks, q, heads, dstate])
        .permute([0, 1, 3, 2, 4]); // [b, c, h, q, n]
    let adt = adt
        .reshape([batch, nchunks, q, heads])
        .permute([0, 3, 1, 2]); // [b, h, c, q]
    let a_cs = adt.clone().cumsum(3); // [b, h, c, q]

    // 1. Intra-chunk (diagonal blocks): Y = (C Bᵀ ∘ L) X.
    let l_mat = segsum(adt).exp().permute([0, 2, 1, 3, 4]); // [b, c, h, q, q]
    let cb = c_ch.clone().matmul(b_ch.clone().swap_dims(3, 4)); // [b, c, h, q, q]
    let y_diag = (cb * l_mat).matmul(x_ch.clone()); // [b, c, h, q, p]

    // 2. State at the end of each chunk from that chunk's inputs.
    let a_last = a_cs.clone().narrow(3, q - 1, 1); // [b, h, c, 1]
    let decay_states = (a_last.clone() - a_cs.clone()).exp(); // [b, h, c, q]
    let decay_states = decay_states.permute([0, 2, 1, 3]).unsqueeze_dim::<5>(4); // [b, c, h, q, 1]
    let states = (x_ch * decay_states).swap_dims(3, 4).matmul(b_ch); // [b, c, h, p, n]

    // 3. State passing between chunks, starting from the initial state.
    let init = match initial_state {
        Some(s) => s,
        None => Tensor::zeros([batch, heads, head_dim, dstate], (&device, dtype)),
    }
    .unsqueeze_dim::<5>(1); // [b, 1, h, p, n]
    let states = Tensor::cat(vec![init, states], 1); // [b, c+1, h, p, n]
    let chunk_a = pad_dim(a_last.reshape([batch, heads, nchunks]), 2, 1, 0); // [b, h, c+1]
    let decay_chunk = segsum(chunk_a.unsqueeze_dim::<4>(2))
        .reshape([batch, heads, nchunks + 1, nchunks + 1])
        .exp(); // [b, h, c+1, c+1]
    let flat = states
        .reshape([batch, nchunks + 1, heads, head_dim * dstate])
        .swap_dims(1, 2); // [b, h, c+1, p*n]
    let new_states = decay_chunk.matmul(flat); // [b, h, c+1, p*n]
    let new_states =
        new_states
            .swap_dims(1, 2)
            .reshape([batch, nchunks + 1, heads, head_dim, dstate]);
    let prev_states = new_states.clone().narrow(1, 0, nchunks); // [b, c, h, p, n]
    let final_state = new_states
        .narrow(1, nchunks, 1)
        .reshape([batch, heads, head_dim, dstate]);

    // 4. State -> output for each chunk: Y_off = (C · h_prev) * exp(cumsum A).
    let decay_out = a_cs.exp().permute([0, 2, 1, 3]).unsqueeze_dim::<5>(4); // [b, c, h, q, 1]
    let y_off = c_ch.matmul(prev_states.swap_dims(3, 4)) * decay_out; // [b, c, h, q, p]

    let y = (y_diag + y_off)
        .permute([0, 1, 3, 2, 4])
        .reshape([batch, padded, heads, head_dim]);
    let y = if pad > 0 { y.narrow(1, 0, seqlen) } else { y };
    SsdOutput {
        y: y + d_residual,
        final_state,
    }
}

/// One-token SSD update.
pub fn ssd_step<B: Backend>(input: SsdStepInput<B>) -> (Tensor<B, 3>, Tensor<B, 4>) {
    let SsdStepInput {
        x,
        dt,
        a,
        b,
        c,
        d,
        dt_bias,
        dt_limit,
        state,
    } = input;
    let [batch, heads, head_dim] = x.dims();
    let [_, groups, dstate] = b.dims();
    let (a, d, dt_bias) = (like(a, &x), like(d, &x), like(dt_bias, &x));
    let dt = discretize_dt(dt, dt_bias.reshape([1, heads]), dt_limit); // [b, h]
    let da = (dt.clone() * a.reshape([1, heads])).exp(); // [b, h]
    let expand = |t: Tensor<B, 3>| -> Tensor<B, 3> {
        if groups == heads {
            t
        } else {
            t.unsqueeze_dim::<4>(2)
                .expand([batch, groups, heads / groups, dstate])
                .reshape([batch, heads, dstate])
        }
    };
    let b = expand(b); // [b, h, n]
    let c = expand(c); // [b, h, n]
    let dbx =
        (x.clone() * dt.unsqueeze_dim::<3>(2)).unsqueeze_dim::<4>(3) * b.unsqueeze_dim::<4>(2); // [b, h, p, n]
    let state = state * da.reshape([batch, heads, 1, 1]) + dbx; // [b, h, p, n]
    let y = state
        .clone()
        .matmul(c.unsqueeze_dim::<4>(3))
        .reshape([batch, heads, head_dim]);
    let y = y + x * d.reshape([1, heads, 1]);
    (y, state)
}

/// Causal depthwise conv1d with optional initial state, bias and SiLU.
pub fn causal_conv1d<B: Backend>(input: ConvInput<B>) -> ConvOutput<B> {
    let ConvInput {
        x,
        weight,
        bias,
        initial_state,
        silu: apply_silu,
    } = input;
    let [batch, seqlen, channels] = x.dims();
    let [_, width] = weight.dims();
    let device = x.device();
    let state = match initial_state {
        Some(s) => s.swap_dims(1, 2), // [b, w-1, c]
        None => Tensor::zeros([batch, width - 1, channels], (&device, x.dtype())),
    };
    let ext = Tensor::cat(vec![state, x], 1); // [b, l + w - 1, c]
    let mut y: Option<Tensor<B, 3>> = None;
    for k in 0..width {
        let wk = weight.clone().narrow(1, k, 1).reshape([1, 1, channels]);
        let term = ext.clone().narrow(1, k, seqlen) * wk; // [b, l, c]
        y = Some(match y {
            Some(acc) => acc + term,
            None => term,
        });
    }
    let mut y = y.expect("conv width must be at least 1");
    if let Some(bias) = bias {
        y = y + bias.reshape([1, 1, channels]);
    }
    if apply_silu {
        y = silu(y);
    }
    let total = seqlen + width - 1;
    let final_state = ext
        .narrow(1, total - (width - 1), width - 1)
        .swap_dims(1, 2); // [b, c, w-1]
    ConvOutput { y, final_state }
}

/// Backward of [`causal_conv1d`]'s output `y` in plain tensor ops: the gradients of `x`, the
/// weight, the bias and the initial state given `dy` `[batch, seq, channels]`.
pub fn causal_conv1d_backward<B: Backend>(input: ConvInput<B>, dy: Tensor<B, 3>) -> ConvGrads<B> {
    let ConvInput {
        x,
        weight,
        bias,
        initial_state,
        silu: apply_silu,
    } = input;
    let [batch, seqlen, channels] = x.dims();
    let [_, width] = weight.dims();
    let device = x.device();
    let has_bias = bias.is_some();
    let has_init = initial_state.is_some();
    let state = match initial_state {
        Some(s) => s.swap_dims(1, 2), // [b, w-1, c]
        None => Tensor::zeros([batch, width - 1, channels], (&device, x.dtype())),
    };
    let ext = Tensor::cat(vec![state, x], 1); // [b, l + w - 1, c]
    let w_k = |k: usize| weight.clone().narrow(1, k, 1).reshape([1, 1, channels]);

    // Gradient at the pre-activation.
    let g = if apply_silu {
        let mut pre = ext.clone().narrow(1, 0, seqlen) * w_k(0); // [b, l, c]
        for k in 1..width {
            pre = pre + ext.clone().narrow(1, k, seqlen) * w_k(k);
        }
        if let Some(bias) = bias {
            pre = pre + bias.reshape([1, 1, channels]);
        }
        let s = burn::tensor::activation::sigmoid(pre.clone());
        dy * s.clone() * (pre * (s.neg() + 1.0) + 1.0)
    } else {
        dy
    };

    // dweight[c, k] = sum_{b, t} g[b, t, c] ext[b, t + k, c]
    let dweight = Tensor::cat(
        (0..width)
            .map(|k| {
                (g.clone() * ext.clone().narrow(1, k, seqlen))
                    .sum_dim(1)
                    .sum_dim(0)
                    .reshape([channels, 1])
            })
            .collect(),
        1,
    ); // [c, w]
    let dbias = g.clone().sum_dim(1).sum_dim(0).reshape([channels]);

    // dext[b, j, c] = sum_k g[b, j - k, c] w[c, k]
    let mut dext: Option<Tensor<B, 3>> = None;
    for k in 0..width {
        let term = pad_dim(g.clone() * w_k(k), 1, k, width - 1 - k);
        dext = Some(match dext {
            Some(acc) => acc + term,
            None => term,
        });
    }
    let dext = dext.expect("conv width must be at least 1"); // [b, l + w - 1, c]
    let dx = dext.clone().narrow(1, width - 1, seqlen);
    let dinit = dext.narrow(1, 0, width - 1).swap_dims(1, 2); // [b, c, w-1]
    ConvGrads {
        x: dx,
        weight: dweight,
        bias: has_bias.then_some(dbias),
        initial_state: has_init.then_some(dinit),
    }
}

/// A decode step's projection: `norm_G(x)` (f32 math, in `x`'s dtype), then `linear` in the
/// weight's dtype, then `+ residual` (in the residual's dtype) or the cast to `out_dtype`.
pub fn decode_linear<B: Backend>(input: DecodeLinearInput<B>) -> Tensor<B, 2> {
    let DecodeLinearInput {
        x,
        norm,
        weight,
        bias,
        residual,
        out_dtype,
    } = input;
    let [rows, k] = x.dims();
    let x = match norm {
        Some((w, groups, eps)) => {
            crate::norm::norm_forward_reference(x.reshape([rows, 1, k]), None, w, groups, eps)
                .reshape([rows, k])
        }
        None => x,
    };
    let to =
        |t: Tensor<B, 2>, dt: burn::tensor::DType| if t.dtype() == dt { t } else { t.cast(dt) };
    let wd = weight.dtype();
    let y = burn::tensor::module::linear(to(x, wd), weight.transpose(), bias);
    match residual {
        Some(r) => {
            let rd = r.dtype();
            r + to(y, rd)
        }
        None => to(y, out_dtype),
    }
}

/// One decode step of a Mamba2 mixer between its projections, composed of `B`'s own conv and
/// SSD steps: split `proj` into `z`, `xBC`, `dt`; conv step with SiLU; SSD step on the conv's
/// `x`, `B`, `C`; then `y · silu(z)`, computed in f32 and returned in `proj`'s dtype.
pub fn mamba2_step<B: MambaBackend>(input: Mamba2StepInput<B>) -> Mamba2StepOutput<B> {
    let Mamba2StepInput {
        proj,
        d_mlp,
        groups,
        conv_state,
        conv_weight,
        conv_bias,
        a,
        d,
        dt_bias,
        dt_limit,
        ssm_state,
    } = input;
    let [batch, _] = proj.dims();
    let [_, heads, head_dim, dstate] = ssm_state.dims();
    let inner = heads * head_dim;
    let gn = groups * dstate;
    let conv_dim = inner + 2 * gn;
    let dtype = proj.dtype();
    let z = proj.clone().narrow(1, 2 * d_mlp, inner);
    let xbc = proj.clone().narrow(1, 2 * d_mlp + inner, conv_dim);
    let dt = proj.narrow(1, 2 * d_mlp + inner + conv_dim, heads);
    // The conv bias may be stored in another dtype than the weight (an f32 vector beside bf16
    // weights): the conv step takes them alike.
    let conv_bias = conv_bias.map(|b| {
        if b.dtype() == conv_weight.dtype() {
            b
        } else {
            b.cast(conv_weight.dtype())
        }
    });
    let (xbc, conv_state) = B::causal_conv1d_step(xbc, conv_state, conv_weight, conv_bias, true);
    let x = xbc
        .clone()
        .narrow(1, 0, inner)
        .reshape([batch, heads, head_dim]);
    let bm = xbc
        .clone()
        .narrow(1, inner, gn)
        .reshape([batch, groups, dstate]);
    let cm = xbc
        .narrow(1, inner + gn, gn)
        .reshape([batch, groups, dstate]);
    let (y, ssm_state) = B::ssd_step(SsdStepInput {
        x,
        dt,
        a,
        b: bm,
        c: cm,
        d,
        dt_bias,
        dt_limit,
        state: ssm_state,
    });
    let to =
        |t: Tensor<B, 2>, dt: burn::tensor::DType| if t.dtype() == dt { t } else { t.cast(dt) };
    let f32 = burn::tensor::DType::F32;
    let y = to(y.reshape([batch, inner]), f32) * silu(to(z, f32));
    Mamba2StepOutput {
        y: to(y, dtype),
        conv_state,
        ssm_state,
    }
}

/// One-token causal conv update.
pub fn causal_conv1d_step<B: Backend>(
    x: Tensor<B, 2>,
    state: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    apply_silu: bool,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let [batch, channels] = x.dims();
    let [_, width] = weight.dims();
    let window = Tensor::cat(vec![state, x.reshape([batch, channels, 1])], 2); // [b, c, w]
    let mut y = (window.clone() * weight.unsqueeze_dim::<3>(0))
        .sum_dim(2)
        .reshape([batch, channels]);
    if let Some(bias) = bias {
        y = y + bias.unsqueeze_dim::<2>(0);
    }
    if apply_silu {
        y = silu(y);
    }
    let new_state = window.narrow(2, 1, width - 1);
    (y, new_state)
}

/// Mamba1's selective scan, sequential over time as transformers' reference path does.
pub fn selective_scan<B: Backend>(input: SelectiveScanInput<B>) -> SelectiveScanOutput<B> {
    let SelectiveScanInput {
        u,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
    } = input;
    let [batch, seqlen, channels] = u.dims();
    let [_, dstate] = a.dims();
    let device = u.device();
    let mut dt = delta;
    if let Some(bias) = delta_bias {
        dt = dt + bias.reshape([1, 1, channels]);
    }
    if delta_softplus {
        dt = softplus(dt, 1.0);
    }
    // [b, l, c, n]
    let da =
        (dt.clone().unsqueeze_dim::<4>(3) * a.unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(0)).exp();
    let dbu = (dt * u.clone()).unsqueeze_dim::<4>(3) * b.unsqueeze_dim::<4>(2);
    let mut state = match initial_state {
        Some(s) => s,
        None => Tensor::zeros([batch, channels, dstate], (&device, u.dtype())),
    };
    let mut states = Vec::with_capacity(seqlen);
    for t in 0..seqlen {
        let da_t = da
            .clone()
            .narrow(1, t, 1)
            .reshape([batch, channels, dstate]);
        let dbu_t = dbu
            .clone()
            .narrow(1, t, 1)
            .reshape([batch, channels, dstate]);
        state = da_t * state + dbu_t;
        states.push(state.clone());
    }
    let hs: Tensor<B, 4> = Tensor::stack(states, 1); // [b, l, c, n]
    let y = (hs * c.unsqueeze_dim::<4>(2))
        .sum_dim(3)
        .reshape([batch, seqlen, channels]);
    let mut y = y + u * d.reshape([1, 1, channels]);
    if let Some(z) = z {
        y = y * silu(z);
    }
    SelectiveScanOutput {
        y,
        final_state: state,
    }
}

/// Mamba1's one-token state update (used by decoding): returns `y` `[batch, channels]`
/// (before the gate) and the new state.
pub fn selective_step<B: Backend>(
    u: Tensor<B, 2>,
    dt: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    c: Tensor<B, 2>,
    d: Tensor<B, 1>,
    state: Tensor<B, 3>,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let [batch, channels] = u.dims();
    let da = (dt.clone().unsqueeze_dim::<3>(2) * a.unsqueeze_dim::<3>(0)).exp(); // [b, c, n]
    let dbu = (dt * u.clone()).unsqueeze_dim::<3>(2) * b.unsqueeze_dim::<3>(1); // [b, c, n]
    let state = da * state + dbu;
    let y = (state.clone() * c.unsqueeze_dim::<3>(1))
        .sum_dim(2)
        .reshape([batch, channels]);
    (y + u * d.unsqueeze_dim::<2>(0), state)
}

type Ad<B> = burn::backend::Autodiff<B>;

fn tracked<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<Ad<B>, D> {
    Tensor::from_inner(t).require_grad()
}

fn grad_of<B: Backend, const D: usize>(
    t: &Tensor<Ad<B>, D>,
    grads: &<Ad<B> as burn::tensor::backend::AutodiffBackend>::Gradients,
) -> Tensor<B, D> {
    t.grad(grads).unwrap_or_else(|| t.zeros_like().inner())
}

/// Reference backward of [`ssd_chunk_scan`]: differentiates the reference forward with
/// `Autodiff<B>` and returns the gradients of `sum(y · dy) + sum(final_state · d_final)`.
pub fn ssd_chunk_scan_backward<B: Backend>(
    input: SsdInput<B>,
    dy: Tensor<B, 4>,
    d_final: Option<Tensor<B, 4>>,
) -> SsdGrads<B> {
    let x = tracked(input.x);
    let dt = tracked(input.dt);
    let a = tracked(input.a);
    let b = tracked(input.b);
    let c = tracked(input.c);
    let d = tracked(input.d);
    let dt_bias = tracked(input.dt_bias);
    let init = input.initial_state.map(tracked);
    let out = ssd_chunk_scan(SsdInput {
        x: x.clone(),
        dt: dt.clone(),
        a: a.clone(),
        b: b.clone(),
        c: c.clone(),
        d: d.clone(),
        dt_bias: dt_bias.clone(),
        dt_limit: input.dt_limit,
        initial_state: init.clone(),
        chunk_size: input.chunk_size,
    });
    let mut loss = (out.y * Tensor::from_inner(dy)).sum();
    if let Some(df) = d_final {
        loss = loss + (out.final_state * Tensor::from_inner(df)).sum();
    }
    let grads = loss.backward();
    SsdGrads {
        x: grad_of(&x, &grads),
        dt: grad_of(&dt, &grads),
        a: grad_of(&a, &grads),
        b: grad_of(&b, &grads),
        c: grad_of(&c, &grads),
        d: grad_of(&d, &grads),
        dt_bias: grad_of(&dt_bias, &grads),
        initial_state: init.map(|s| grad_of(&s, &grads)),
    }
}

/// Reference backward of [`selective_scan`], as [`ssd_chunk_scan_backward`].
pub fn selective_scan_backward<B: Backend>(
    input: SelectiveScanInput<B>,
    dy: Tensor<B, 3>,
    d_final: Option<Tensor<B, 3>>,
) -> SelectiveScanGrads<B> {
    let u = tracked(input.u);
    let delta = tracked(input.delta);
    let a = tracked(input.a);
    let b = tracked(input.b);
    let c = tracked(input.c);
    let d = tracked(input.d);
    let z = input.z.map(tracked);
    let delta_bias = input.delta_bias.map(tracked);
    let init = input.initial_state.map(tracked);
    let out = selective_scan(SelectiveScanInput {
        u: u.clone(),
        delta: delta.clone(),
        a: a.clone(),
        b: b.clone(),
        c: c.clone(),
        d: d.clone(),
        z: z.clone(),
        delta_bias: delta_bias.clone(),
        delta_softplus: input.delta_softplus,
        initial_state: init.clone(),
    });
    let mut loss = (out.y * Tensor::from_inner(dy)).sum();
    if let Some(df) = d_final {
        loss = loss + (out.final_state * Tensor::from_inner(df)).sum();
    }
    let grads = loss.backward();
    SelectiveScanGrads {
        u: grad_of(&u, &grads),
        delta: grad_of(&delta, &grads),
        a: grad_of(&a, &grads),
        b: grad_of(&b, &grads),
        c: grad_of(&c, &grads),
        d: grad_of(&d, &grads),
        z: z.map(|t| grad_of(&t, &grads)),
        delta_bias: delta_bias.map(|t| grad_of(&t, &grads)),
        initial_state: init.map(|s| grad_of(&s, &grads)),
    }
}

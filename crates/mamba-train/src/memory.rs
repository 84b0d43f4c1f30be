//! What a training step will hold on the device, estimated before the first step from the
//! model's shapes (printed at start and compared with the device's memory), and the
//! out-of-memory message that names sizes and what to try.

use mamba_model::{MambaLM, ModelConfig};

/// Bytes by category: weights in their stored dtype, gradients and AdamW state f32,
/// activations in the compute dtype (the residual stream f32).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Estimate {
    /// Every parameter.
    pub weights: u64,
    /// Gradients and AdamW's two moments of the trainable parameters.
    pub grads_optimizer: u64,
    /// Activations kept for backward: every block's graph, or only the inputs of checkpointed
    /// blocks plus one re-run block's graph.
    pub activations: u64,
    /// One LM-head chunk: its logits, their log-softmax and gradient.
    pub logits: u64,
    pub total: u64,
}

/// Elements one block keeps for backward per token when its graph is kept: the residual and
/// its norm, the input projection's output, the conv's output, the SSD's inputs and output, the
/// gated norm's intermediates and the output projection's input (counted from the ops the
/// block runs; burn's autodiff keeps each op's inputs that its backward reads).
fn block_elements_per_token(config: &ModelConfig) -> u64 {
    match config {
        ModelConfig::Mamba2(c) => {
            let d = c.hidden_size as u64;
            let i = c.intermediate_size() as u64;
            let p = c.in_proj_size() as u64;
            let conv = i + 2 * (c.n_groups * c.state_size) as u64;
            4 * d + p + 2 * conv + 6 * i
        }
        ModelConfig::Mamba1(c) => {
            let d = c.hidden_size as u64;
            let i = c.intermediate_size as u64;
            let n = c.state_size as u64;
            let r = c.time_step_rank as u64;
            4 * d + 2 * i + 3 * i + (r + 2 * n) + 3 * i + 2 * i
        }
    }
}

/// What the SSD kernels keep from a tracked forward for the backward (`mamba_kernels::SsdKept`,
/// f32), a layer's worth for `batch` sequences of `seq`: per 64-token chunk (the last one
/// padded) a state, `C·Bᵀ`, and dt and its cumsum. Nothing on backends without the kernels, or
/// for Mamba1.
fn ssd_kept_bytes<B: mamba_model::MambaBackend>(config: &ModelConfig, batch: u64, seq: u64) -> u64 {
    match config {
        ModelConfig::Mamba2(c) if mamba_kernels::kernels_active::<B>() => {
            let q = mamba_kernels::SSD_KERNEL_CHUNK as u64;
            let chunks = batch * seq.div_ceil(q).max(1);
            let (h, p, n, g) = (
                c.num_heads as u64,
                c.head_dim as u64,
                c.state_size as u64,
                c.n_groups as u64,
            );
            4 * chunks * (h * p * n + g * q * q + 2 * h * q)
        }
        _ => 0,
    }
}

/// The estimate for micro-batches of `batch × seq` tokens.
pub fn estimate<B: mamba_model::MambaBackend>(
    model: &MambaLM<B>,
    batch: usize,
    seq: usize,
    checkpoint_every: usize,
    loss_chunk: usize,
) -> Estimate {
    let (_, trainable) = crate::train::count_params(model);
    let config = &model.config;
    let tokens = (batch * seq) as u64;
    let layers = config.num_layers() as u64;
    let act = model.compute.dtype().size() as u64;
    let block = act * tokens * block_elements_per_token(config);
    let block = block + ssd_kept_bytes::<B>(config, batch as u64, seq as u64);
    let residual = 4 * tokens * config.hidden_size() as u64;
    let activations = if checkpoint_every == 0 {
        layers * block
    } else {
        let checkpointed = layers.div_ceil(checkpoint_every as u64);
        checkpointed * residual + (layers - checkpointed) * block + 2 * block
    };
    let vocab = config.vocab_size() as u64;
    let chunk = mamba_model::loss::chunk_tokens(loss_chunk, vocab as usize, tokens as usize) as u64;
    // The chunk's logits in the compute dtype, their f32 log-softmax and its gradient.
    let logits = (act + 2 * 4) * chunk.min(tokens) * vocab;
    let weights = param_bytes(model);
    let grads_optimizer = 12 * trainable as u64;
    Estimate {
        weights,
        grads_optimizer,
        activations,
        logits,
        total: weights + grads_optimizer + activations + logits,
    }
}

/// Bytes of every parameter in the dtype it is stored in.
pub fn param_bytes<B: burn::tensor::backend::Backend>(model: &MambaLM<B>) -> u64 {
    struct Bytes(u64);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Bytes {
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            let t = param.val();
            let n: usize = t.dims().iter().product();
            self.0 += (n * t.dtype().size()) as u64;
        }
    }
    let mut b = Bytes(0);
    burn::module::Module::visit(model, &mut b);
    b.0
}

pub fn gib(bytes: u64) -> f64 {
    mamba_kernels::memory::gib(bytes)
}

impl Estimate {
    pub fn line(&self) -> String {
        format!(
            "{:.2} GiB (weights {:.2}, grads + AdamW {:.2}, activations {:.2}, LM-head chunk {:.2})",
            gib(self.total),
            gib(self.weights),
            gib(self.grads_optimizer),
            gib(self.activations),
            gib(self.logits)
        )
    }
}

/// Where a run ran out of device memory, for [`OutOfMemory::message`].
pub struct OutOfMemory<'a> {
    /// 1-based.
    pub step: u64,
    pub batch: usize,
    pub seq: usize,
    /// What the runtime said.
    pub runtime_message: &'a str,
    /// The device's total memory, where the backend reports it.
    pub total: Option<u64>,
    pub estimate: &'a Estimate,
    pub checkpointing: bool,
    pub last_checkpoint: &'a str,
}

impl OutOfMemory<'_> {
    /// The error text: where it happened, the sizes, and what to try.
    pub fn message(&self) -> String {
        let msg = self.runtime_message;
        let what = msg.lines().next().unwrap_or(msg).trim();
        let device = match self.total {
            Some(t) => format!("the device has {:.1} GiB", gib(t)),
            None => "the device's total memory is not reported by this backend".into(),
        };
        let mut advice = Vec::new();
        if !self.checkpointing {
            advice.push(
                "train.gradient_checkpointing = true (keeps only each block's input)".to_string(),
            );
        }
        advice.push(format!(
            "a smaller train.batch_size with a larger train.grad_accum (e.g. batch_size = {} and grad_accum = 2: the same tokens per step)",
            (self.batch / 2).max(1),
        ));
        advice.push("a shorter data.seq_len".into());
        advice.push(
            "train.loss_chunk_tokens smaller than its default, if the LM head's chunk is large"
                .into(),
        );
        format!(
            "out of device memory at step {} (micro-batch {} x {} tokens): {what}; {device}, and this run was estimated to need {}. Try: {}. Last checkpoint: {} (left intact).",
            self.step,
            self.batch,
            self.seq,
            self.estimate.line(),
            advice.join("; "),
            self.last_checkpoint
        )
    }
}

//! The training forward + backward of a causal LM, driven segment by segment: gradient
//! checkpointing as transformers means it, and an LM head whose loss never materialises all the
//! logits.
//!
//! Why a driver and not one `loss.backward()`: burn 0.21's autodiff runs a backward pass under
//! its graph's lock, and a nested backward (what a recomputing node would need) takes every
//! graph's lock to clean up, its own outer one included, so a node cannot re-run a block and
//! differentiate it inside the outer pass. Instead the model is cut into segments, each with its
//! own graph, and the driver walks them backwards, handing each the gradient of its output
//! (`backward_with`, torch's `y.backward(dy)`):
//!
//! ```text
//! ids ─ embeddings ─┬─ block 0 ─ block 1 ─ … ─ block L-1 ─┬─ norm_f ─ [chunk 0 | chunk 1 | …] → loss
//!        (graph)    │  segments: a checkpointed block keeps │ head: one chunk of tokens at a time,
//!                   │  only its input and runs again in     │ its logits and their gradient made
//!                   │  backward; a run of other blocks      │ and dropped in the forward, keeping
//!                   │  keeps its graph                      │ only d(loss)/d(hidden) per chunk
//! ```
//!
//! The loss and every gradient are the ones plain autodiff gives (the tests hold them to 1e-6),
//! whatever blocks are checkpointed. Dropout masks are reproduced in the re-run: each
//! checkpointed block reseeds the backend from [`BackpropOptions::seed`] and its index before its
//! forward and again before its re-run.

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use mamba_kernels::memory::sample;
use mamba_kernels::{BackwardWith, MambaBackend};

use crate::loss::{chunk_tokens, counted_targets, nll_sum, shift_labels};
use crate::model::{Block, MambaLM};

/// How [`MambaLM::loss_and_grads`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackpropOptions {
    /// `0`: no checkpointing (every activation kept). `k ≥ 1`: blocks `0, k, 2k, …` keep only
    /// their input and are re-run in backward (`1`: every block, as transformers'
    /// `gradient_checkpointing_enable()`; larger `k` trades memory back for speed).
    pub checkpoint_every: usize,
    /// Tokens per LM-head chunk; `0` picks [`crate::loss::LOGITS_CHUNK_ELEMENTS`] / vocab.
    pub loss_chunk: usize,
    /// Reseeds dropout in checkpointed blocks (forward and re-run alike).
    pub seed: u64,
}

impl BackpropOptions {
    fn checkpointed(&self, layer: usize) -> bool {
        self.checkpoint_every > 0 && layer.is_multiple_of(self.checkpoint_every)
    }

    fn block_seed(&self, layer: usize) -> u64 {
        splitmix64(self.seed ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What one forward + backward gives.
#[derive(Debug)]
pub struct LossAndGrads<A: AutodiffBackend> {
    /// Mean next-token cross-entropy over counted labels, `[1]` (still on the device).
    pub loss: Tensor<A::InnerBackend, 1>,
    /// The gradient of `loss` for every trainable parameter it reaches.
    pub grads: GradientsParams,
    /// Counted target tokens (the loss's denominator).
    pub targets: usize,
}

/// A piece of the residual stream between two cut points.
enum Segment<A: AutodiffBackend> {
    /// A run of consecutive blocks that kept their graph; `input` is a fresh leaf (`leaf`), or,
    /// for the first segment, the embeddings' output itself (its graph included).
    Kept {
        input: Tensor<A, 3>,
        output: Tensor<A, 3>,
        leaf: bool,
    },
    /// Block `layer` ran without a graph; `input` is all it kept.
    Recompute {
        layer: usize,
        input: Tensor<A::InnerBackend, 3>,
    },
}

/// The same parameters, untracked: a forward through it builds no graph.
struct Detach;

impl<A: AutodiffBackend> ModuleMapper<A> for Detach {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
        param.map(|t| Tensor::from_inner(t.inner()))
    }
}

/// `acc += more`, parameter by parameter (a parameter reached by two segments, such as tied
/// embeddings, gets the sum).
fn merge<A: AutodiffBackend, M: AutodiffModule<A>>(
    acc: &mut GradientsParams,
    module: &M,
    grads: A::Gradients,
) {
    struct Merge<'a> {
        acc: &'a mut GradientsParams,
        more: GradientsParams,
    }
    impl<A: AutodiffBackend> burn::module::ModuleVisitor<A> for Merge<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            if let Some(g) = self.more.remove::<A::InnerBackend, D>(param.id) {
                let sum = match self.acc.remove::<A::InnerBackend, D>(param.id) {
                    Some(old) => old + g,
                    None => g,
                };
                self.acc.register(param.id, sum);
            }
        }
    }
    let more = GradientsParams::from_grads(grads, module);
    if more.is_empty() {
        return;
    }
    module.visit(&mut Merge { acc, more });
}

impl<A> MambaLM<A>
where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
{
    /// Forward and backward of the causal-LM loss of `ids` against `labels` (`[batch, seq]`,
    /// `-100` ignored, shifted inside), with `opts`' checkpointing and LM-head chunking. The
    /// same loss and gradients as `self.loss(ids, labels).backward()`, in less memory.
    pub fn loss_and_grads(
        &self,
        ids: Tensor<A, 2, Int>,
        labels: Tensor<A, 2, Int>,
        opts: BackpropOptions,
    ) -> LossAndGrads<A> {
        let targets = counted_targets(&labels);
        self.loss_and_grads_counted(ids, labels, targets, opts)
    }

    /// [`loss_and_grads`](Self::loss_and_grads) with the number of counted targets given:
    /// labels after the shift that are not `-100` (what [`counted_targets`] reads from the
    /// device, and `mamba_data::Batch::tokens` holds on the host). The training step passes it,
    /// so that no micro-batch waits for the device to count.
    pub fn loss_and_grads_counted(
        &self,
        ids: Tensor<A, 2, Int>,
        labels: Tensor<A, 2, Int>,
        targets: usize,
        opts: BackpropOptions,
    ) -> LossAndGrads<A> {
        let device = ids.device();
        let [batch, seq] = ids.dims();
        let mut grads = GradientsParams::new();

        // Forward, segment by segment.
        let c = self.compute;
        let embedded = self.embeddings.forward(ids, c); // [b, l, d] f32
        let mut segments: Vec<Segment<A>> = Vec::new();
        let mut x = embedded.clone();
        let mut layer = 0;
        while layer < self.layers.len() {
            if opts.checkpointed(layer) {
                A::seed(&device, opts.block_seed(layer));
                let input = x.inner();
                let block = self.layers[layer].clone().map(&mut Detach);
                let (y, _) = block.forward(Tensor::from_inner(input.clone()), None, None, false, c);
                segments.push(Segment::Recompute { layer, input });
                x = y;
                layer += 1;
            } else {
                let first = segments.is_empty();
                let input = if first {
                    x
                } else {
                    Tensor::from_inner(x.inner()).require_grad()
                };
                let mut y = input.clone();
                while layer < self.layers.len() && !opts.checkpointed(layer) {
                    y = self.layers[layer].forward(y, None, None, false, c).0;
                    layer += 1;
                }
                x = Tensor::from_inner(y.clone().inner());
                segments.push(Segment::Kept {
                    input,
                    output: y,
                    leaf: !first,
                });
            }
        }

        sample::<A>(&device);

        // The head: norm_f over a fresh leaf, then the loss a chunk of tokens at a time, each
        // chunk's backward run at once so that only one chunk's logits exist.
        let last = Tensor::<A, 3>::from_inner(x.inner()).require_grad();
        let hidden = self.config.hidden_size();
        let n = batch * seq.saturating_sub(1);
        let loss_inner;
        let mut dlast = None;
        if n == 0 || targets == 0 {
            // Nothing counted: the loss is 0/0 as transformers gives it, and no gradient flows.
            loss_inner = Tensor::<A::InnerBackend, 1>::zeros([1], &device) / 0.0;
        } else {
            let h = c
                .act(self.norm_f.forward(last.clone()))
                .narrow(1, 0, seq - 1)
                .reshape([n, hidden]); // [n, d] in the compute dtype
            let h_values = h.clone().inner();
            let shifted = shift_labels(labels.inner()); // [n]
            let scale = 1.0 / targets as f64;
            let chunk = chunk_tokens(opts.loss_chunk, self.config.vocab_size(), n);
            let mut total: Option<Tensor<A::InnerBackend, 1>> = None;
            let mut dh = Vec::with_capacity(n.div_ceil(chunk));
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                let part = Tensor::<A, 2>::from_inner(h_values.clone().narrow(0, start, len))
                    .require_grad(); // [len, d]
                let nll = nll_sum(
                    self.lm_logits(part.clone()),
                    Tensor::from_inner(shifted.clone().narrow(0, start, len)),
                );
                let value = nll.clone().inner();
                let mut g = (nll * scale).backward();
                dh.push(
                    part.grad_remove(&mut g)
                        .expect("the chunk is a tracked leaf"),
                );
                merge::<A, _>(&mut grads, self, g);
                sample::<A>(&device);
                total = Some(match total {
                    Some(t) => t + value,
                    None => value,
                });
                start += len;
            }
            loss_inner = total.expect("n > 0") * scale;
            let dh = Tensor::cat(dh, 0); // [n, d]
            let mut g = A::backward_with(h, dh);
            dlast = last.grad_remove(&mut g);
            merge::<A, _>(&mut grads, self, g);
        }

        // Backward through the segments, last first.
        let mut upstream = dlast;
        for segment in segments.into_iter().rev() {
            let Some(dy) = upstream.take() else { break };
            match segment {
                Segment::Kept {
                    input,
                    output,
                    leaf,
                } => {
                    if !A::is_tracked(&output) {
                        break;
                    }
                    let mut g = A::backward_with(output, dy);
                    sample::<A>(&device);
                    if leaf {
                        upstream = input.grad_remove(&mut g);
                    }
                    merge::<A, _>(&mut grads, self, g);
                }
                Segment::Recompute { layer, input } => {
                    A::seed(&device, opts.block_seed(layer));
                    let input = Tensor::<A, 3>::from_inner(input).require_grad();
                    let block: &Block<A> = &self.layers[layer];
                    let (y, _) = block.forward(input.clone(), None, None, false, c);
                    let mut g = A::backward_with(y, dy);
                    sample::<A>(&device);
                    upstream = input.grad_remove(&mut g);
                    merge::<A, _>(&mut grads, self, g);
                }
            }
        }
        // The embeddings, when the first block was checkpointed.
        if let Some(dy) = upstream {
            if A::is_tracked(&embedded) {
                let g = A::backward_with(embedded, dy);
                merge::<A, _>(&mut grads, self, g);
            }
        }
        LossAndGrads {
            loss: loss_inner,
            grads,
            targets,
        }
    }
}

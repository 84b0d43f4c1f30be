//! The training loop's AdamW: burn's `AdamW` arithmetic and record, one launch a parameter.
//!
//! burn's `OptimizerAdaptor<AdamW>` updates a parameter in ~14 tensor ops, and the step's
//! gradient scale (mean over micro-batches, clipping) and decoupled weight decay add two more:
//! ~16 launches a parameter. At LoRA's hundred-odd small tensors that was a third of a
//! mamba2-130m step's launches. [`AdamW`] folds all of it into [`MambaBackend::adamw_step`]
//! (one kernel on cube backends, the same tensor ops elsewhere) and keeps its state as burn's
//! adaptor does, in the same record type, so optimizer checkpoints written by either load into
//! the other.

use std::collections::HashSet;

use hashbrown::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, MultiGradientsParams,
    Optimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use mamba_kernels::optim::{AdamWInput, AdamWScalars};
use mamba_model::MambaBackend;

/// The record of burn's AdamW adaptor, which [`AdamW`] reads and writes.
pub type AdamWRecord<A> = HashMap<ParamId, AdaptorRecord<burn::optim::AdamW, A>>;

/// What a step folds into the update besides AdamW itself.
#[derive(Debug, Clone)]
pub struct Scaling<'a, B: Backend> {
    /// Every gradient is multiplied by this first.
    pub grad_scale: f64,
    /// And by this `[1]` f32 tensor on the device (the clipping factor, which the step computes
    /// there so that it never waits for the global norm before issuing the update).
    pub device_scale: Option<Tensor<B, 1>>,
    /// Decoupled weight decay: a parameter is multiplied by `1 − lr · weight_decay` before
    /// the update, except those in `skip_decay`.
    pub weight_decay: f64,
    pub skip_decay: Option<&'a HashSet<ParamId>>,
}

impl<B: Backend> Scaling<'static, B> {
    /// No scale, no decay.
    pub fn none() -> Self {
        Scaling {
            grad_scale: 1.0,
            device_scale: None,
            weight_decay: 0.0,
            skip_decay: None,
        }
    }
}

/// An optimizer the training step can hand its gradient scale and weight decay to.
pub trait ScaledStep<M: AutodiffModule<A>, A: AutodiffBackend>: Optimizer<M, A> {
    /// One step with `scaling` applied (what `step` does with [`Scaling::NONE`]).
    fn step_scaled(
        &mut self,
        lr: LearningRate,
        module: M,
        grads: GradientsParams,
        scaling: Scaling<A::InnerBackend>,
    ) -> M;
}

/// AdamW (β₁, β₂, ε as in `burn::optim::AdamWConfig`; no AMSGrad, no cautious decay; weight
/// decay comes per step through [`Scaling`]).
#[derive(Clone)]
pub struct AdamW<A: AutodiffBackend> {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    records: AdamWRecord<A>,
}

impl<A: AutodiffBackend> AdamW<A> {
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32) -> Self {
        Self {
            beta_1,
            beta_2,
            epsilon,
            records: HashMap::new(),
        }
    }
}

enum Grads {
    Single(GradientsParams),
    Multi(MultiGradientsParams),
}

impl Grads {
    fn remove<B: Backend, const D: usize>(
        &mut self,
        id: ParamId,
    ) -> Option<(Tensor<B, D>, B::Device)> {
        match self {
            Grads::Single(g) => g.remove::<B, D>(id).map(|t| {
                let device = t.device();
                (t, device)
            }),
            Grads::Multi(g) => g.remove::<B, D>(id),
        }
    }
}

struct Mapper<'a, A: AutodiffBackend> {
    optim: (f32, f32, f32),
    records: &'a mut AdamWRecord<A>,
    grads: Grads,
    lr: LearningRate,
    scaling: Scaling<'a, A::InnerBackend>,
}

impl<A> ModuleMapper<A> for Mapper<'_, A>
where
    A: AutodiffBackend,
    A::InnerBackend: MambaBackend,
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some((grad, device)) = self.grads.remove::<A::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let tensor = if tensor.device() != device {
            tensor.to_device(&device)
        } else {
            tensor
        };
        let (key, record) = self.records.remove_entry(&id).unzip();
        let state: Option<AdamWState<A::InnerBackend, D>> = record.map(|r| r.into_state::<D>());
        let inner = tensor.inner();
        let shape = inner.shape();
        let n = shape.num_elements();
        let (moments, time) = match state {
            Some(s) => {
                let m = s.momentum.to_device(&device);
                (
                    Some((m.moment_1.reshape([n]), m.moment_2.reshape([n]))),
                    m.time + 1,
                )
            }
            None => (None, 1),
        };
        let skip = self.scaling.skip_decay.is_some_and(|s| s.contains(&id));
        let decay = if skip || self.scaling.weight_decay == 0.0 {
            1.0
        } else {
            1.0 - self.lr * self.scaling.weight_decay
        };
        let (beta_1, beta_2, epsilon) = self.optim;
        let out = <A::InnerBackend as MambaBackend>::adamw_step(AdamWInput {
            param: inner.reshape([n]),
            grad: grad.reshape([n]),
            moments,
            device_scale: self.scaling.device_scale.clone(),
            scalars: AdamWScalars {
                lr: self.lr,
                beta_1,
                beta_2,
                epsilon,
                time,
                grad_scale: self.scaling.grad_scale,
                decay,
            },
        });
        let state: AdamWState<A::InnerBackend, D> = AdamWState {
            momentum: AdaptiveMomentumState {
                time,
                moment_1: out.moment_1.reshape(shape.clone()),
                moment_2: out.moment_2.reshape(shape.clone()),
                max_moment_2: None,
            },
        };
        self.records
            .insert(key.unwrap_or(id), AdaptorRecord::from_state(state));
        let mut tensor = Tensor::from_inner(out.param.reshape(shape));
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

impl<A> AdamW<A>
where
    A: AutodiffBackend,
    A::InnerBackend: MambaBackend,
{
    fn run<M: AutodiffModule<A>>(
        &mut self,
        lr: LearningRate,
        module: M,
        grads: Grads,
        scaling: Scaling<A::InnerBackend>,
    ) -> M {
        module.map(&mut Mapper {
            optim: (self.beta_1, self.beta_2, self.epsilon),
            records: &mut self.records,
            grads,
            lr,
            scaling,
        })
    }
}

impl<M, A> Optimizer<M, A> for AdamW<A>
where
    M: AutodiffModule<A>,
    A: AutodiffBackend,
    A::InnerBackend: MambaBackend,
{
    type Record = AdamWRecord<A>;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        self.run(lr, module, Grads::Single(grads), Scaling::none())
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        self.run(lr, module, Grads::Multi(grads), Scaling::none())
    }

    fn to_record(&self) -> Self::Record {
        self.records.clone()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.records = record;
        self
    }
}

impl<M, A> ScaledStep<M, A> for AdamW<A>
where
    M: AutodiffModule<A>,
    A: AutodiffBackend,
    A::InnerBackend: MambaBackend,
{
    fn step_scaled(
        &mut self,
        lr: LearningRate,
        module: M,
        grads: GradientsParams,
        scaling: Scaling<A::InnerBackend>,
    ) -> M {
        self.run(lr, module, Grads::Single(grads), scaling)
    }
}

/// burn's adaptors (any simple optimizer): the scale and the decay as tensor ops before its step.
impl<O, M, A> ScaledStep<M, A> for OptimizerAdaptor<O, M, A>
where
    O: burn::optim::SimpleOptimizer<A::InnerBackend>,
    M: AutodiffModule<A>,
    A: AutodiffBackend,
{
    fn step_scaled(
        &mut self,
        lr: LearningRate,
        module: M,
        mut grads: GradientsParams,
        scaling: Scaling<A::InnerBackend>,
    ) -> M {
        if scaling.grad_scale != 1.0 {
            module.visit(&mut Scale {
                grads: &mut grads,
                factor: scaling.grad_scale,
            });
        }
        if let Some(factor) = scaling.device_scale {
            module.visit(&mut ScaleBy {
                grads: &mut grads,
                factor,
            });
        }
        let module = if scaling.weight_decay > 0.0 {
            module.map(&mut Decay {
                skip: scaling.skip_decay,
                factor: 1.0 - lr * scaling.weight_decay,
            })
        } else {
            module
        };
        self.step(lr, module, grads)
    }
}

/// Multiply every gradient by `factor`.
pub(crate) struct Scale<'a> {
    pub grads: &'a mut GradientsParams,
    pub factor: f64,
}

impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}

/// Multiply every gradient by a `[1]` f32 factor on the device.
struct ScaleBy<'a, B: Backend> {
    grads: &'a mut GradientsParams,
    factor: Tensor<B, 1>,
}

impl<A: AutodiffBackend> burn::module::ModuleVisitor<A> for ScaleBy<'_, A::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        if let Some(g) = self.grads.remove::<A::InnerBackend, D>(param.id) {
            let f = self.factor.clone().cast(g.dtype()).reshape([1; D]);
            self.grads.register(param.id, g * f);
        }
    }
}

/// Decoupled weight decay `p ← p · factor` on trainable parameters not in `skip`.
struct Decay<'a> {
    skip: Option<&'a HashSet<ParamId>>,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Decay<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.skip.is_some_and(|s| s.contains(&param.id)) || !param.is_require_grad() {
            return param;
        }
        let factor = self.factor;
        param.map(|t| Tensor::from_inner(t.inner() * factor).require_grad())
    }
}

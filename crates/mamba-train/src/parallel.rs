//! Data parallelism on burn-collective: one model replica per device, each on its share of
//! every batch, the gradients summed across the replicas, one identical optimizer step on each.
//!
//! Rank 0 is the training loop's own thread: it draws every global micro-batch from the data
//! stream, cuts it into one share per rank ([`Share::split`]), hands ranks 1.. theirs
//! ([`Replicas::step`]) and runs its own; it alone validates, logs, checkpoints and exports.
//! Ranks 1.. are threads started here, one per further device, each with a fork of rank 0's model
//! and optimizer (so the parameter ids and the optimizer state are rank 0's).
//!
//! The collectives are burn-collective's (`register`, `all_reduce`, `finish_collective`) on the
//! inner (non-autodiff) backend: one small all-reduce per step that shares the ranks' loss parts
//! and whether any failed, then the gradients, flattened into buckets in module order (so that
//! ranks agree on the order without relying on parameter ids) and summed. See DESIGN.md ("Data
//! parallelism") for why this and not burn-train's DDP strategy.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use burn::collective::{
    all_reduce, finish_collective, register, reset_collective, AllReduceStrategy, CollectiveConfig,
    PeerId, ReduceOperation,
};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use mamba_kernels::BackwardWith;
use mamba_model::{MambaBackend, MambaLM};

use crate::step::{optimizer_step, Share, StepError, StepReport, StepSettings};

/// Gradients are summed in flat buckets of at most this many elements (PyTorch DDP's idea: few
/// large transfers, bounded extra memory).
const BUCKET_ELEMENTS: usize = 1 << 25;

/// One rank of a data-parallel run.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub id: PeerId,
    pub rank: usize,
    pub world: usize,
}

impl Peer {
    pub fn new(rank: usize, world: usize) -> Self {
        Self {
            id: PeerId::from(rank),
            rank,
            world,
        }
    }

    /// burn-collective's settings for this run: every rank passes the same.
    fn config(&self) -> CollectiveConfig {
        CollectiveConfig::default()
            .with_num_devices(self.world)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2))
    }

    /// Joins the run's collective (blocks until every rank has).
    fn join<B: Backend>(&self, device: &B::Device) -> Result<()> {
        register::<B>(self.id, device.clone(), self.config())
            .map_err(|e| anyhow!("rank {}: joining the collective: {e:?}", self.rank))
    }

    fn leave<B: Backend>(&self) -> Result<()> {
        finish_collective::<B>(self.id)
            .map_err(|e| anyhow!("rank {}: leaving the collective: {e:?}", self.rank))
    }

    /// `values` summed over every rank.
    pub fn sum_values<B: Backend>(&self, values: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        let t = Tensor::<B, 1>::from_data(
            TensorData::new(values.to_vec(), [values.len()]).convert::<f32>(),
            device,
        );
        let summed = self.sum_tensor(t)?;
        Ok(summed
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .map_err(|e| anyhow!("{e:?}"))?)
    }

    fn sum_tensor<B: Backend>(&self, t: Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        let out = all_reduce::<B>(self.id, t.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(|e| anyhow!("rank {}: all-reduce: {e:?}", self.rank))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// `grads` summed over every rank: flattened in `model`'s parameter order, bucketed by
    /// dtype and size, all-reduced, and put back in their shapes.
    pub fn sum_grads<A: AutodiffBackend>(
        &self,
        model: &MambaLM<A>,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let mut flat = Flatten::<A> {
            grads,
            order: Vec::new(),
        };
        model.visit(&mut flat);
        let Flatten { mut grads, order } = flat;
        let mut summed: HashMap<ParamId, Tensor<A::InnerBackend, 1>> = HashMap::new();
        let mut bucket: Vec<(ParamId, Tensor<A::InnerBackend, 1>)> = Vec::new();
        let mut size = 0;
        let mut flush = |bucket: &mut Vec<(ParamId, Tensor<A::InnerBackend, 1>)>| -> Result<()> {
            if bucket.is_empty() {
                return Ok(());
            }
            let lens: Vec<usize> = bucket.iter().map(|(_, t)| t.dims()[0]).collect();
            let ids: Vec<ParamId> = bucket.iter().map(|(id, _)| *id).collect();
            let parts: Vec<_> = bucket.drain(..).map(|(_, t)| t).collect();
            let joined = if parts.len() == 1 {
                parts.into_iter().next().expect("one part")
            } else {
                Tensor::cat(parts, 0)
            };
            let total = self.sum_tensor(joined)?;
            let mut at = 0;
            for (id, len) in ids.into_iter().zip(lens) {
                summed.insert(id, total.clone().narrow(0, at, len));
                at += len;
            }
            Ok(())
        };
        let mut dtype: Option<DType> = None;
        for (id, t) in order {
            let n = t.dims()[0];
            if dtype.is_some_and(|d| d != t.dtype()) || (size > 0 && size + n > BUCKET_ELEMENTS) {
                flush(&mut bucket)?;
                size = 0;
            }
            dtype = Some(t.dtype());
            size += n;
            bucket.push((id, t));
        }
        flush(&mut bucket)?;
        let mut restore = Restore::<A> {
            grads: &mut grads,
            summed,
        };
        model.visit(&mut restore);
        Ok(grads)
    }
}

/// Takes each parameter's gradient out of `grads`, flattened, in module order.
struct Flatten<A: AutodiffBackend> {
    grads: GradientsParams,
    order: Vec<(ParamId, Tensor<A::InnerBackend, 1>)>,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for Flatten<A> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        if let Some(g) = self.grads.remove::<A::InnerBackend, D>(param.id) {
            let n = g.shape().num_elements();
            self.order.push((param.id, g.reshape([n])));
        }
    }
}

/// Puts the summed gradients back in their parameters' shapes.
struct Restore<'a, A: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    summed: HashMap<ParamId, Tensor<A::InnerBackend, 1>>,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for Restore<'_, A> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        if let Some(flat) = self.summed.remove(&param.id) {
            let dims: [usize; D] = param.shape().dims();
            self.grads.register(param.id, flat.reshape(dims));
        }
    }
}

/// burn-collective keeps one collective per backend type in the process: one data-parallel run
/// at a time holds it (others wait).
static COLLECTIVE: Mutex<()> = Mutex::new(());

enum Order {
    Step {
        step: u64,
        lr: f64,
        shares: Vec<Share>,
    },
    Stop,
}

struct Worker {
    name: String,
    orders: SyncSender<Order>,
    handle: Option<JoinHandle<()>>,
}

/// Ranks 1.. of a data-parallel run, each on its own thread and device; rank 0 is the caller.
pub struct Replicas {
    workers: Vec<Worker>,
    reports: Receiver<(usize, Result<StepReport, StepError>)>,
    /// Rank 0's place in the collective.
    pub peer: Peer,
    leave: Option<Box<dyn FnOnce() -> Result<()>>>,
    _lock: MutexGuard<'static, ()>,
}

impl Replicas {
    /// Starts one rank per device after the first (rank 0, the caller's `model` and `optim`, is
    /// on `devices[0]`), each with a fork of `model` and a clone of `optim` on its device, and
    /// joins the collective. `names` name the devices in errors.
    #[allow(clippy::too_many_arguments)]
    pub fn start<A, O>(
        devices: &[A::Device],
        names: &[String],
        model: &MambaLM<A>,
        optim: &O,
        settings: StepSettings,
        skip_decay: &HashSet<ParamId>,
    ) -> Result<Self>
    where
        A: AutodiffBackend + MambaBackend + BackwardWith,
        A::InnerBackend: MambaBackend,
        O: Optimizer<MambaLM<A>, A> + 'static,
    {
        let lock = COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner());
        let world = devices.len();
        // What a failed run before this one in the process may have left.
        reset_collective::<A::InnerBackend>();
        let (report_tx, reports) = channel();
        let mut workers = Vec::new();
        for (rank, device) in devices.iter().enumerate().skip(1) {
            let peer = Peer::new(rank, world);
            let device = device.clone();
            let replica = model.clone().fork(&device);
            let optim = optim.clone();
            let skip = skip_decay.clone();
            let tx: Sender<_> = report_tx.clone();
            let (orders, rx) = sync_channel::<Order>(1);
            let name = names
                .get(rank)
                .cloned()
                .unwrap_or_else(|| format!("rank {rank}"));
            let handle = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || rank_loop(peer, device, replica, optim, settings, skip, rx, tx))
                .context("starting a data-parallel rank")?;
            workers.push(Worker {
                name,
                orders,
                handle: Some(handle),
            });
        }
        let peer = Peer::new(0, world);
        peer.join::<A::InnerBackend>(&devices[0])?;
        Ok(Self {
            workers,
            reports,
            peer,
            leave: Some(Box::new(move || peer.leave::<A::InnerBackend>())),
            _lock: lock,
        })
    }

    /// The number of ranks, rank 0 included.
    pub fn world(&self) -> usize {
        self.peer.world
    }

    /// Hands ranks 1.. their shares of step `step` (`per_rank[r - 1]` for rank r).
    pub fn send(&self, step: u64, lr: f64, per_rank: Vec<Vec<Share>>) -> Result<()> {
        for (w, shares) in self.workers.iter().zip(per_rank) {
            w.orders
                .send(Order::Step { step, lr, shares })
                .map_err(|_| anyhow!("data-parallel rank on {} has stopped", w.name))?;
        }
        Ok(())
    }

    /// Every rank's report of the step just sent, in rank order (ranks 1..), with its device.
    pub fn collect(&self) -> Vec<(String, Result<StepReport, StepError>)> {
        let mut got: Vec<Option<Result<StepReport, StepError>>> =
            (0..self.workers.len()).map(|_| None).collect();
        for _ in 0..self.workers.len() {
            match self.reports.recv() {
                Ok((rank, r)) => got[rank - 1] = Some(r),
                Err(_) => break,
            }
        }
        self.workers
            .iter()
            .zip(got)
            .map(|(w, r)| {
                (
                    w.name.clone(),
                    r.unwrap_or_else(|| {
                        Err(StepError::Other(anyhow!("the rank on {} stopped", w.name)))
                    }),
                )
            })
            .collect()
    }

    /// Stops the ranks and leaves the collective.
    pub fn finish(mut self) -> Result<()> {
        for w in &self.workers {
            let _ = w.orders.send(Order::Stop);
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                h.join()
                    .map_err(|_| anyhow!("the data-parallel rank on {} panicked", w.name))?;
            }
        }
        if let Some(leave) = self.leave.take() {
            leave()?;
        }
        Ok(())
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        // An error ended the run: the ranks stop at their next order; nobody waits for them.
        for w in &self.workers {
            let _ = w.orders.try_send(Order::Stop);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn rank_loop<A, O>(
    peer: Peer,
    device: A::Device,
    model: MambaLM<A>,
    mut optim: O,
    settings: StepSettings,
    skip: HashSet<ParamId>,
    orders: Receiver<Order>,
    reports: Sender<(usize, Result<StepReport, StepError>)>,
) where
    A: AutodiffBackend + MambaBackend + BackwardWith,
    A::InnerBackend: MambaBackend,
    O: Optimizer<MambaLM<A>, A>,
{
    if let Err(e) = peer.join::<A::InnerBackend>(&device) {
        let _ = reports.send((peer.rank, Err(StepError::Other(e))));
        return;
    }
    let mut model = Some(model);
    while let Ok(Order::Step { step, lr, shares }) = orders.recv() {
        let Some(m) = model.take() else { return };
        let r = optimizer_step(
            m,
            &mut optim,
            &shares,
            step,
            lr,
            &settings,
            &skip,
            &device,
            Some(&peer),
        );
        let failed = r.is_err();
        let report = r.map(|(m, report)| {
            model = Some(m);
            report
        });
        if reports.send((peer.rank, report)).is_err() || failed {
            return;
        }
    }
    let _ = peer.leave::<A::InnerBackend>();
}

/// The micro-batches of one step, each cut into one share per rank: `result[r]` is rank r's.
pub fn shares_per_rank(batches: Vec<mamba_data::Batch>, world: usize) -> Result<Vec<Vec<Share>>> {
    let mut per_rank: Vec<Vec<Share>> = (0..world).map(|_| Vec::new()).collect();
    for b in batches {
        let shares = Share::split(&b, world).with_context(|| {
            format!(
                "train.batch_size = {} does not split evenly over {world} devices",
                b.batch
            )
        })?;
        for (r, s) in shares.into_iter().enumerate() {
            per_rank[r].push(s);
        }
    }
    Ok(per_rank)
}

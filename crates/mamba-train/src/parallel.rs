//! Data parallelism on burn-collective: one model replica per device, each on its share of
//! every batch, the gradients summed across the replicas, one identical optimizer step on each.
//!
//! Rank 0 is the training loop's own thread: it draws every global micro-batch from the data
//! stream, cuts it into one share per rank ([`Share::split`]), hands ranks 1.. theirs and runs
//! its own ([`Ranks::step`]); it alone validates, logs, checkpoints and exports.
//! Ranks 1.. are threads started here, one per further device, each with a fork of rank 0's model
//! and optimizer (so the parameter ids and the optimizer state are rank 0's).
//!
//! Several processes (`[nodes]`): each runs this with its own devices and the same data
//! stream, takes the shares of its ranks (node n's first rank is n × its device count), and joins
//! the others through burn-collective's orchestrator, which node 0 serves ([`Topology`]). The
//! trainable parameters start from node 0's (summed with zeros from the others: burn-collective
//! 0.21 has no global broadcast); a frozen base must be the same files (or seed) everywhere.
//! Refused for now (`config::NODES_BLOCKED`): burn-collective 0.21's cross-process all-reduce
//! hangs from its second operation on.
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
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_communication::Address;
use mamba_kernels::BackwardWith;
use mamba_model::{MambaBackend, MambaLM};

use crate::step::{optimizer_step, Share, StepError, StepReport, StepSettings};

/// Gradients are summed in flat buckets of at most this many elements (PyTorch DDP's idea: few
/// large transfers, bounded extra memory).
const BUCKET_ELEMENTS: usize = 1 << 25;

/// Where this process's ranks sit in the run.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Ranks in the whole run (every node's devices).
    pub world: usize,
    /// This process's devices (ranks `first_rank..first_rank + local`).
    pub local: usize,
    pub first_rank: usize,
    /// Several processes: how they meet.
    pub nodes: Option<NodeLink>,
}

/// One process of several.
#[derive(Debug, Clone)]
pub struct NodeLink {
    pub count: usize,
    pub rank: usize,
    /// `ws://host:port` of the orchestrator (node 0 serves it on that port).
    pub orchestrator: String,
    /// `ws://host:port` of this node's data service, as the others reach it.
    pub address: String,
    pub port: u16,
}

impl Topology {
    /// `local` devices in this process alone.
    pub fn single_process(local: usize) -> Self {
        Self {
            world: local,
            local,
            first_rank: 0,
            nodes: None,
        }
    }

    /// From the run config's `[nodes]` and this process's device count.
    pub fn of(cfg: &crate::config::RunConfig, local: usize) -> Result<Self> {
        let n = &cfg.nodes;
        if n.count <= 1 {
            return Ok(Self::single_process(local));
        }
        let orchestrator = n.orchestrator.clone().context("`nodes.orchestrator`")?;
        let address = n.address.clone().context("`nodes.address`")?;
        let port = crate::config::ws_port("nodes.address", &address)?;
        Ok(Self {
            world: n.count * local,
            local,
            first_rank: n.rank * local,
            nodes: Some(NodeLink {
                count: n.count,
                rank: n.rank,
                orchestrator,
                address,
                port,
            }),
        })
    }

    /// Whether this process is node 0 (the one that writes).
    pub fn writes(&self) -> bool {
        self.first_rank == 0
    }

    /// burn-collective's settings for this process's ranks (the same on each of them).
    fn config(&self) -> Result<CollectiveConfig> {
        let config = CollectiveConfig::default()
            .with_num_devices(self.local)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        let Some(n) = &self.nodes else {
            return Ok(config);
        };
        let parse = |key: &str, a: &str| {
            a.parse::<Address>()
                .map_err(|e| anyhow!("`{key}` = {a:?}: {e}"))
        };
        Ok(config
            .with_num_nodes(n.count as u32)
            .with_global_address(parse("nodes.orchestrator", &n.orchestrator)?)
            .with_node_address(parse("nodes.address", &n.address)?)
            .with_data_service_port(n.port)
            // Ring needs tensors longer than the node count; the two-value one may not be.
            .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2)))
    }
}

/// Serves burn-collective's orchestrator on `port` for the rest of the process (node 0 of
/// several).
pub fn start_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the orchestrator's runtime")?;
    std::thread::Builder::new()
        .name("orchestrator".into())
        .spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)))
        .context("starting the orchestrator")?;
    Ok(())
}

/// One rank of a data-parallel run.
#[derive(Debug, Clone)]
pub struct Peer {
    pub id: PeerId,
    /// Its rank in the whole run.
    pub rank: usize,
    pub world: usize,
    config: CollectiveConfig,
}

impl Peer {
    fn new(rank: usize, topology: &Topology) -> Result<Self> {
        Ok(Self {
            id: PeerId::from(rank),
            rank,
            world: topology.world,
            config: topology.config()?,
        })
    }

    /// Joins the run's collective (blocks until every rank has).
    fn join<B: Backend>(&self, device: &B::Device) -> Result<()> {
        register::<B>(self.id, device.clone(), self.config.clone())
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
        summed
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .map_err(|e| anyhow!("{e:?}"))
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

/// Zeros in the place of every trainable parameter's value except on rank 0, so that a sum over
/// the ranks is rank 0's value.
struct ZeroUnlessRankZero {
    rank: usize,
    values: GradientsParams,
}

impl<A: AutodiffBackend> ModuleVisitor<A> for ZeroUnlessRankZero {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        if param.is_require_grad() {
            let v = param.val().inner();
            let v = if self.rank == 0 { v } else { v.zeros_like() };
            self.values.register(param.id, v);
        }
    }
}

/// Sets each trainable parameter to its entry in `values`.
struct SetValues {
    values: GradientsParams,
}

impl<A: AutodiffBackend> burn::module::ModuleMapper<A> for SetValues {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
        if !param.is_require_grad() {
            return param;
        }
        match self.values.remove::<A::InnerBackend, D>(param.id) {
            Some(v) => param.map(|_| Tensor::from_inner(v).require_grad()),
            None => param,
        }
    }
}

impl Peer {
    /// `model` with rank 0's trainable parameters (the processes of a several-node run each
    /// made their own; burn-collective 0.21 has no global broadcast, so the others add zeros).
    pub fn from_rank_zero<A: AutodiffBackend>(&self, model: MambaLM<A>) -> Result<MambaLM<A>> {
        let mut z = ZeroUnlessRankZero {
            rank: self.rank,
            values: GradientsParams::new(),
        };
        model.visit(&mut z);
        let values = self.sum_grads(&model, z.values)?;
        Ok(model.map(&mut SetValues { values }))
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

/// The other ranks of this process, each on its own thread and device; the first rank is the
/// caller's.
pub struct Replicas {
    workers: Vec<Worker>,
    reports: Receiver<(usize, Result<StepReport, StepError>)>,
    /// This thread's place in the collective (rank 0 of a single process).
    pub peer: Peer,
    topology: Topology,
    leave: Option<Box<dyn FnOnce() -> Result<()>>>,
    _lock: MutexGuard<'static, ()>,
}

impl Replicas {
    /// Starts one rank per device after the first (the caller's `model` and `optim` are on
    /// `devices[0]`, this process's first rank), each with a fork of `model` and a clone of
    /// `optim` on its device, and joins the collective (node 0 of several serves the
    /// orchestrator first). `names` name the devices in errors.
    #[allow(clippy::too_many_arguments)]
    pub fn start<A, O>(
        topology: &Topology,
        devices: &[A::Device],
        names: &[String],
        model: MambaLM<A>,
        optim: &O,
        settings: StepSettings,
        skip_decay: &HashSet<ParamId>,
    ) -> Result<(Self, MambaLM<A>)>
    where
        A: AutodiffBackend + MambaBackend + BackwardWith,
        A::InnerBackend: MambaBackend,
        O: crate::optim::ScaledStep<MambaLM<A>, A> + 'static,
    {
        let lock = COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner());
        // What a failed run before this one in the process may have left.
        reset_collective::<A::InnerBackend>();
        if let Some(n) = &topology.nodes {
            if n.rank == 0 {
                start_orchestrator(crate::config::ws_port(
                    "nodes.orchestrator",
                    &n.orchestrator,
                )?)?;
            }
        }
        let (report_tx, reports) = channel();
        let mut workers = Vec::new();
        for (local, device) in devices.iter().enumerate().skip(1) {
            let rank = topology.first_rank + local;
            let peer = Peer::new(rank, topology)?;
            let device = device.clone();
            let replica = model.clone().fork(&device);
            let several_nodes = topology.nodes.is_some();
            let optim = optim.clone();
            let skip = skip_decay.clone();
            let tx: Sender<_> = report_tx.clone();
            let (orders, rx) = sync_channel::<Order>(1);
            let name = names
                .get(local)
                .cloned()
                .unwrap_or_else(|| format!("rank {rank}"));
            let handle = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || {
                    rank_loop(
                        peer,
                        several_nodes,
                        device,
                        replica,
                        optim,
                        settings,
                        skip,
                        rx,
                        tx,
                    )
                })
                .context("starting a data-parallel rank")?;
            workers.push(Worker {
                name,
                orders,
                handle: Some(handle),
            });
        }
        let peer = Peer::new(topology.first_rank, topology)?;
        peer.join::<A::InnerBackend>(&devices[0])?;
        let model = if topology.nodes.is_some() {
            peer.from_rank_zero(model)?
        } else {
            model
        };
        let leaving = peer.clone();
        Ok((
            Self {
                workers,
                reports,
                peer,
                topology: topology.clone(),
                leave: Some(Box::new(move || leaving.leave::<A::InnerBackend>())),
                _lock: lock,
            },
            model,
        ))
    }

    /// Where this process's ranks sit.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Hands this process's other ranks their shares of step `step` (`per_rank[i]` for its
    /// rank `first_rank + 1 + i`).
    pub fn send(&self, step: u64, lr: f64, per_rank: Vec<Vec<Share>>) -> Result<()> {
        for (w, shares) in self.workers.iter().zip(per_rank) {
            w.orders
                .send(Order::Step { step, lr, shares })
                .map_err(|_| anyhow!("data-parallel rank on {} has stopped", w.name))?;
        }
        Ok(())
    }

    /// Every other rank's report of the step just sent, in rank order, with its device.
    pub fn collect(&self) -> Vec<(String, Result<StepReport, StepError>)> {
        let mut got: Vec<Option<Result<StepReport, StepError>>> =
            (0..self.workers.len()).map(|_| None).collect();
        for _ in 0..self.workers.len() {
            match self.reports.recv() {
                Ok((rank, r)) => got[rank - self.topology.first_rank - 1] = Some(r),
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
    several_nodes: bool,
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
    O: crate::optim::ScaledStep<MambaLM<A>, A>,
{
    let joined = peer.join::<A::InnerBackend>(&device).and_then(|()| {
        if several_nodes {
            peer.from_rank_zero(model)
        } else {
            Ok(model)
        }
    });
    let model = match joined {
        Ok(m) => m,
        Err(e) => {
            let _ = reports.send((peer.rank, Err(StepError::Other(e))));
            return;
        }
    };
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

/// The ranks of a run as the training loop sees them: its own (the first of this process), and
/// the others' threads when data-parallel.
pub struct Ranks<'a> {
    pub replicas: Option<&'a Replicas>,
    /// Rank 0's device, for messages.
    pub name: &'a str,
}

impl Ranks<'_> {
    /// One optimizer step on every rank, the step's global micro-batches cut into one share per
    /// rank; an error comes with the device it happened on.
    #[allow(clippy::too_many_arguments)]
    pub fn step<A, O>(
        &self,
        model: MambaLM<A>,
        optim: &mut O,
        batches: Vec<mamba_data::Batch>,
        step: u64,
        lr: f64,
        settings: &StepSettings,
        skip_decay: &HashSet<ParamId>,
        device: &A::Device,
    ) -> std::result::Result<(MambaLM<A>, StepReport), (StepError, String)>
    where
        A: AutodiffBackend + MambaBackend + BackwardWith,
        A::InnerBackend: MambaBackend,
        O: crate::optim::ScaledStep<MambaLM<A>, A>,
    {
        let at = |e: StepError| (e, self.name.to_string());
        let Some(replicas) = self.replicas else {
            let shares: Vec<Share> = batches.into_iter().map(Share::whole).collect();
            return optimizer_step(
                model, optim, &shares, step, lr, settings, skip_decay, device, None,
            )
            .map_err(at);
        };
        let topology = replicas.topology();
        let mut per_rank: Vec<Vec<Share>> = shares_per_rank(batches, topology.world)
            .map_err(|e| at(StepError::Other(e)))?
            .into_iter()
            .skip(topology.first_rank)
            .take(topology.local)
            .collect();
        let mine = per_rank.remove(0);
        replicas
            .send(step, lr, per_rank)
            .map_err(|e| at(StepError::Other(e)))?;
        let own = optimizer_step(
            model,
            optim,
            &mine,
            step,
            lr,
            settings,
            skip_decay,
            device,
            Some(&replicas.peer),
        );
        let others = replicas.collect();
        match own {
            Ok(r) if others.iter().all(|(_, o)| o.is_ok()) => Ok(r),
            own => {
                // The error that says what happened: the first rank's that is not "another
                // rank failed".
                let mut errors = std::iter::once((self.name.to_string(), own.map(|_| ())))
                    .chain(others.into_iter().map(|(n, o)| (n, o.map(|_| ()))))
                    .filter_map(|(n, r)| r.err().map(|e| (e, n)));
                let first = errors.next().expect("some rank failed");
                Err(if matches!(first.0, StepError::PeerFailed) {
                    errors
                        .find(|(e, _)| !matches!(e, StepError::PeerFailed))
                        .unwrap_or(first)
                } else {
                    first
                })
            }
        }
    }
}

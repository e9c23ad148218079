//! Communicators: how the ranks of a tensor-parallel group exchange tensors.
//!
//! [`Communicator`] is what a backend needs to run the IR's collectives
//! ([`transfuse_ir::DistOp`]) and what a pipeline passes between its stages (point-to-point
//! [`Communicator::send`]/[`Communicator::recv`]); [`InProcessGroup`] implements it for ranks
//! that are threads of one process (the ranks of [`crate::tp`], the stages of [`crate::pp`]):
//! each collective is a barrier over shared buffers, each send a message in the receiver's
//! mailbox (buffered: a send never waits).
//! A rank that fails calls [`Communicator::abort`]: the group is poisoned, every rank waiting
//! in or later entering a collective returns that rank's error. A collective that waits longer
//! than the group's timeout poisons the group too, so a rank that never arrives ends the
//! others with an error instead of a hang; a `recv` waits at most as long.
//!
//! [`crate::nccl::NcclComm`] implements it over NCCL, on CUDA devices, across processes and
//! nodes too.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::collections::{HashMap, VecDeque};

use transfuse_ir::Tensor;

use crate::RuntimeError;

/// The kind of a collective, for the per-rank traffic log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectiveKind {
    /// Sum over ranks.
    AllReduce,
    /// Concatenation in rank order.
    AllGather,
    /// Sum over ranks, each keeping its chunk.
    ReduceScatter,
    /// A point-to-point send.
    Send,
    /// A point-to-point receive.
    Recv,
}

/// One collective a rank took part in: its kind and the f32 elements of its own operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collective {
    /// What it was.
    pub kind: CollectiveKind,
    /// Elements this rank contributed.
    pub elems: usize,
    /// Whether it ran on device buffers where they were (NCCL on a CUDA rank's buffers);
    /// false for one over host memory (the in-process group, including its host-staged
    /// [`DeviceComm`] defaults, and NCCL's host-slice methods).
    pub on_device: bool,
}

/// The ranks of one tensor-parallel group, seen from one rank.
pub trait Communicator: Send + Sync {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Replaces `data` by its elementwise sum over all ranks (every rank passes the same
    /// length). The sum runs in rank order on every rank, so all ranks get the same bits.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), RuntimeError>;
    /// Every rank's `data`, in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError>;
    /// The elementwise sum over all ranks of `data` (every rank passes the same length, a
    /// multiple of the world), of which this rank gets the `rank`-th of `world` contiguous
    /// chunks. Summed in rank order, like [`Communicator::all_reduce_sum`].
    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>, RuntimeError>;
    /// Sends `t` to rank `to`; it is queued there (messages from one rank to another arrive
    /// in order), so a send does not wait for the receiver.
    fn send(&self, to: usize, t: Tensor) -> Result<(), RuntimeError>;
    /// The next tensor rank `from` sent to this rank, waiting for it (at most the group's
    /// timeout, and never past an abort).
    fn recv(&self, from: usize) -> Result<Tensor, RuntimeError>;
    /// Poisons the group with `why`: every rank's current and later collectives return it.
    fn abort(&self, why: &str);
    /// The collectives this rank took part in since the last [`Communicator::take_log`].
    fn take_log(&self) -> Vec<Collective>;
    /// The group's error, if it was aborted (or a collective timed out).
    fn poisoned(&self) -> Option<String> {
        None
    }
    /// Clears an aborted group so it can run again, where the communicator allows it (the
    /// in-process group does; an aborted NCCL communicator stays dead, so this does nothing
    /// there). Only called when no rank is inside a collective.
    fn reset(&self) {}
}

/// A [`Communicator`] that runs the collectives on buffers of a [`crate::device::Device`] `D`:
/// what a device rank's segments ([`crate::tp::DeviceSegments`]) call, so the values that
/// cross a collective stay in device memory. Buffers hold f32. The defaults stage through the
/// host (read the buffer back, run the host-slice collective, write the result): correct on any
/// device, and what the in-process group does for wgpu ranks; [`crate::nccl::NcclComm`]
/// overrides them with NCCL on the CUDA buffers themselves.
pub trait DeviceComm<D: crate::device::Device>: Communicator {
    /// In place: the first `elems` f32 of `buf` become their sum over the ranks.
    fn all_reduce_device(
        &self,
        dev: &D,
        buf: &D::Buffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        let mut v = read_f32(dev, buf, elems)?;
        self.all_reduce_sum(&mut v)?;
        dev.write(buf, bytemuck::cast_slice(&v))
    }

    /// `out` (at least `world × elems` f32) gets every rank's first `elems` f32 of `buf`, in
    /// rank order.
    fn all_gather_device(
        &self,
        dev: &D,
        buf: &D::Buffer,
        out: &D::Buffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        let v = read_f32(dev, buf, elems)?;
        let parts = self.all_gather(&v)?;
        let all: Vec<f32> = parts.into_iter().flatten().collect();
        if all.len() != elems * self.world() {
            return Err(RuntimeError::Comm(format!(
                "all_gather: rank {} gathered {} elements, not {} × {elems}",
                self.rank(),
                all.len(),
                self.world()
            )));
        }
        dev.write(out, bytemuck::cast_slice(&all))
    }

    /// `out` (at least `elems / world` f32) gets this rank's chunk of the sum over the ranks
    /// of `buf`'s first `elems` f32 (`elems` a multiple of the world).
    fn reduce_scatter_device(
        &self,
        dev: &D,
        buf: &D::Buffer,
        out: &D::Buffer,
        elems: usize,
    ) -> Result<(), RuntimeError> {
        let v = read_f32(dev, buf, elems)?;
        let mine = self.reduce_scatter_sum(&v)?;
        dev.write(out, bytemuck::cast_slice(&mine))
    }
}

fn read_f32<D: crate::device::Device>(
    dev: &D,
    buf: &D::Buffer,
    elems: usize,
) -> Result<Vec<f32>, RuntimeError> {
    let b = dev.read(buf, 4 * elems as u64)?;
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl<D: crate::device::Device> DeviceComm<D> for SingleRank {}

/// A world of one: collectives are the identity (what a single-device backend runs).
#[derive(Debug, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        Ok(vec![data.to_vec()])
    }
    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>, RuntimeError> {
        Ok(data.to_vec())
    }
    fn send(&self, to: usize, _: Tensor) -> Result<(), RuntimeError> {
        Err(RuntimeError::Comm(format!(
            "send to rank {to}: a world of one has no other rank"
        )))
    }
    fn recv(&self, from: usize) -> Result<Tensor, RuntimeError> {
        Err(RuntimeError::Comm(format!(
            "recv from rank {from}: a world of one has no other rank"
        )))
    }
    fn abort(&self, _: &str) {}
    fn take_log(&self) -> Vec<Collective> {
        Vec::new()
    }
}

struct State {
    /// Completed collectives; a rank waiting in round `g` is released when `round > g`.
    round: u64,
    /// Operands deposited for the current round.
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The operands of the last completed round; replaced only when the next round completes,
    /// which needs every rank, so no rank misses its round's result.
    last: Arc<Vec<Vec<f32>>>,
    /// Point-to-point messages not yet received, by (from, to).
    mail: HashMap<(usize, usize), VecDeque<Tensor>>,
    poison: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock leaves consistent state behind: every
        // field is written before any wait.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A group of ranks in one process; [`InProcessGroup::ranks`] gives one communicator per rank.
pub struct InProcessGroup;

impl InProcessGroup {
    /// `world` communicators over shared buffers; a collective waits at most `timeout` for the
    /// other ranks.
    pub fn ranks(world: usize, timeout: Duration) -> Vec<Arc<InProcessComm>> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                slots: vec![None; world],
                arrived: 0,
                last: Arc::new(Vec::new()),
                mail: HashMap::new(),
                poison: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| {
                Arc::new(InProcessComm {
                    rank,
                    shared: shared.clone(),
                    log: Mutex::new(Vec::new()),
                })
            })
            .collect()
    }
}

/// One rank of an [`InProcessGroup`].
pub struct InProcessComm {
    rank: usize,
    shared: Arc<Shared>,
    log: Mutex<Vec<Collective>>,
}

impl InProcessComm {
    /// Clears a poisoned group so it can run again; only call it when no rank is inside a
    /// collective (the runner does, after every rank has returned).
    pub fn reset(&self) {
        let mut st = self.shared.lock();
        st.poison = None;
        st.arrived = 0;
        st.slots.iter_mut().for_each(|s| *s = None);
        st.mail.clear();
    }

    /// The group's error, if it is poisoned.
    pub fn poisoned(&self) -> Option<String> {
        self.shared.lock().poison.clone()
    }

    /// Deposits `mine` and waits for every rank's operand of this round.
    fn exchange(&self, mine: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>, RuntimeError> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(p) = &st.poison {
            return Err(RuntimeError::Comm(p.clone()));
        }
        let round = st.round;
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == sh.world {
            let all: Vec<Vec<f32>> = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.last = Arc::new(all);
            st.arrived = 0;
            st.round += 1;
            sh.cv.notify_all();
            return Ok(st.last.clone());
        }
        let deadline = Instant::now() + sh.timeout;
        loop {
            if let Some(p) = &st.poison {
                return Err(RuntimeError::Comm(p.clone()));
            }
            if st.round > round {
                return Ok(st.last.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..sh.world).filter(|&r| st.slots[r].is_none()).collect();
                let why = format!(
                    "collective #{round} timed out after {:.1}s on rank {}: ranks {missing:?} never arrived",
                    sh.timeout.as_secs_f64(),
                    self.rank
                );
                st.poison = Some(why.clone());
                sh.cv.notify_all();
                return Err(RuntimeError::Comm(why));
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn check_peer(&self, what: &str, peer: usize) -> Result<(), RuntimeError> {
        if peer >= self.shared.world || peer == self.rank {
            return Err(RuntimeError::Comm(format!(
                "{what}: rank {} cannot address rank {peer} in a group of {}",
                self.rank, self.shared.world
            )));
        }
        Ok(())
    }

    /// [`Self::exchange`] for a reduction: every rank must contribute as many elements as
    /// this one (else the group is aborted with the mismatch named).
    fn exchange_equal(&self, op: &str, data: &[f32]) -> Result<Arc<Vec<Vec<f32>>>, RuntimeError> {
        let all = self.exchange(data.to_vec())?;
        if let Some((r, v)) = all.iter().enumerate().find(|(_, v)| v.len() != data.len()) {
            let why = format!(
                "{op}: rank {r} contributed {} elements, rank {} {}",
                v.len(),
                self.rank,
                data.len()
            );
            self.abort(&why);
            return Err(RuntimeError::Comm(why));
        }
        Ok(all)
    }

    fn record(&self, kind: CollectiveKind, elems: usize) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Collective {
                kind,
                elems,
                on_device: false,
            });
    }
}

impl<D: crate::device::Device> DeviceComm<D> for InProcessComm {}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), RuntimeError> {
        self.record(CollectiveKind::AllReduce, data.len());
        let all = self.exchange_equal("all_reduce", data)?;
        data.copy_from_slice(&all[0]);
        for v in &all[1..] {
            data.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.record(CollectiveKind::AllGather, data.len());
        Ok(self.exchange(data.to_vec())?.as_ref().clone())
    }

    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>, RuntimeError> {
        let world = self.shared.world;
        if !data.len().is_multiple_of(world) {
            let why = format!(
                "reduce_scatter: rank {} has {} elements, not a multiple of the world {world}",
                self.rank,
                data.len()
            );
            self.abort(&why);
            return Err(RuntimeError::Comm(why));
        }
        self.record(CollectiveKind::ReduceScatter, data.len());
        let all = self.exchange_equal("reduce_scatter", data)?;
        let chunk = data.len() / world;
        let range = self.rank * chunk..(self.rank + 1) * chunk;
        let mut out = all[0][range.clone()].to_vec();
        for v in &all[1..] {
            out.iter_mut()
                .zip(&v[range.clone()])
                .for_each(|(a, b)| *a += b);
        }
        Ok(out)
    }

    fn send(&self, to: usize, t: Tensor) -> Result<(), RuntimeError> {
        self.check_peer("send", to)?;
        self.record(CollectiveKind::Send, t.len());
        let mut st = self.shared.lock();
        if let Some(p) = &st.poison {
            return Err(RuntimeError::Comm(p.clone()));
        }
        st.mail.entry((self.rank, to)).or_default().push_back(t);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor, RuntimeError> {
        self.check_peer("recv", from)?;
        let sh = &*self.shared;
        let mut st = sh.lock();
        let deadline = Instant::now() + sh.timeout;
        loop {
            if let Some(p) = &st.poison {
                return Err(RuntimeError::Comm(p.clone()));
            }
            if let Some(t) = st
                .mail
                .get_mut(&(from, self.rank))
                .and_then(VecDeque::pop_front)
            {
                drop(st);
                self.record(CollectiveKind::Recv, t.len());
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                let why = format!(
                    "recv on rank {} timed out after {:.1}s: rank {from} sent nothing",
                    self.rank,
                    sh.timeout.as_secs_f64()
                );
                st.poison = Some(why.clone());
                sh.cv.notify_all();
                return Err(RuntimeError::Comm(why));
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn abort(&self, why: &str) {
        let mut st = self.shared.lock();
        st.poison.get_or_insert_with(|| why.to_string());
        self.shared.cv.notify_all();
    }

    fn take_log(&self) -> Vec<Collective> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn poisoned(&self) -> Option<String> {
        InProcessComm::poisoned(self)
    }

    fn reset(&self) {
        InProcessComm::reset(self)
    }
}

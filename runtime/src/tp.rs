//! The tensor-parallel runner: N ranks of one sharded graph as N threads of this process.
//!
//! Each rank is a [`Loaded`] graph (the same SPMD graph from `transfuse_passes::shard`, its own
//! weight slices) on its own backend instance, joined by a [`Communicator`] group
//! ([`crate::comm::InProcessGroup`]). A call runs every rank concurrently on the same inputs
//! and returns rank 0's outputs: the sharded graph gathers or reduces every output that is not
//! rank-local, so all ranks hold the same values. Rank-local outputs (a KV cache sharded by
//! heads) are carried by each rank for its next call.
//!
//! A rank that fails (an error or a panic) aborts the group, so the others leave their
//! collectives with that rank's error instead of waiting; the call returns the failing rank's
//! own error and the group is reset for the next call.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::comm::{Collective, Communicator, InProcessComm};
use crate::{KernelTime, Loaded, RuntimeError, TensorMap};

/// N ranks run as one [`Loaded`].
pub struct TpLoaded {
    ranks: Vec<Box<dyn Loaded>>,
    comms: Vec<Arc<InProcessComm>>,
}

impl TpLoaded {
    /// Rank `r` is `ranks[r]`, whose backend uses `comms[r]`.
    ///
    /// Panics if the two lengths differ (a programming error of the caller).
    pub fn new(ranks: Vec<Box<dyn Loaded>>, comms: Vec<Arc<InProcessComm>>) -> TpLoaded {
        assert_eq!(ranks.len(), comms.len(), "one communicator per rank");
        TpLoaded { ranks, comms }
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// The collectives each rank ran since the last call of this method.
    pub fn take_logs(&self) -> Vec<Vec<Collective>> {
        self.comms.iter().map(|c| c.take_log()).collect()
    }

    /// Runs `f` on every rank at once; the first rank error that is not the group's abort, or
    /// else the first error, is returned.
    fn all<T: Send>(
        &mut self,
        f: impl Fn(&mut dyn Loaded) -> Result<T, RuntimeError> + Sync,
    ) -> Result<T, RuntimeError> {
        let comms = &self.comms;
        let results: Vec<Result<T, RuntimeError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .enumerate()
                .map(|(r, rank)| {
                    let f = &f;
                    s.spawn(move || {
                        let res = catch_unwind(AssertUnwindSafe(|| f(rank.as_mut())))
                            .unwrap_or_else(|p| {
                                let msg = p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_else(|| "panic".into());
                                Err(RuntimeError::Comm(format!("rank {r} panicked: {msg}")))
                            });
                        if let Err(e) = &res {
                            if !matches!(e, RuntimeError::Comm(_)) || comms[r].poisoned().is_none()
                            {
                                comms[r].abort(&format!("rank {r} failed: {e}"));
                            }
                        }
                        res
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank panics are caught"))
                .collect()
        });
        let failed = results.iter().any(|r| r.is_err());
        if failed {
            for c in &self.comms {
                c.reset();
            }
        }
        let mut first_err = None;
        let mut root_err = None;
        let mut out = None;
        for (r, res) in results.into_iter().enumerate() {
            match res {
                Ok(v) if r == 0 => out = Some(v),
                Ok(_) => {}
                Err(e) => {
                    if root_err.is_none() && !matches!(e, RuntimeError::Comm(_)) {
                        root_err = Some(e);
                    } else if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match root_err.or(first_err) {
            Some(e) => Err(e),
            None => Ok(out.expect("rank 0 succeeded")),
        }
    }
}

impl Loaded for TpLoaded {
    fn run(
        &mut self,
        inputs: &TensorMap,
        carry: &[(String, String)],
    ) -> Result<TensorMap, RuntimeError> {
        self.all(|rank| rank.run(inputs, carry))
    }

    fn clear_carry(&mut self) {
        for r in &mut self.ranks {
            r.clear_carry();
        }
    }

    /// Rank 0's kernel times (every rank runs, since collectives need them all).
    fn profile(&mut self, inputs: &TensorMap) -> Result<Vec<KernelTime>, RuntimeError> {
        self.all(|rank| rank.profile(inputs))
    }
}

//! The collective cost model: bytes each rank sends for the collectives of tensor, pipeline and
//! data parallelism, and their time on a link (α–β model: a latency per step plus bytes over
//! bandwidth).
//!
//! This is the one cost model of collectives in transfuse: the planner uses it, and the
//! tensor-parallel runtime (issue 13) is to reuse these functions rather than write its own.
//! All are pure functions of the group size and the message size.
//!
//! Ring algorithms (what NCCL runs on NVLink rings and the bandwidth-optimal bound):
//! - all-reduce of `B` bytes over `n` ranks: each rank sends `2(n−1)/n · B` in `2(n−1)` steps
//!   (a reduce-scatter then an all-gather);
//! - all-gather to a `B`-byte result, and reduce-scatter of a `B`-byte input: `(n−1)/n · B` in
//!   `n−1` steps each;
//! - point-to-point send of `B` bytes: `B` in one step.
//!
//! A group of one rank sends nothing.

/// A link as a collective sees it: per-rank bandwidth (per direction) and per-step latency.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Link {
    /// GB/s per rank and direction.
    pub gbs: f64,
    /// Seconds per algorithm step (launch + hop latency).
    pub latency_s: f64,
}

impl Link {
    /// A link of `gbs` GB/s with `latency_s` per step.
    pub fn new(gbs: f64, latency_s: f64) -> Link {
        Link { gbs, latency_s }
    }

    /// Time for `steps` steps moving `bytes` per rank in all.
    pub fn time(&self, bytes: f64, steps: u64) -> f64 {
        if bytes <= 0.0 {
            return 0.0;
        }
        steps as f64 * self.latency_s + bytes / (self.gbs * 1e9)
    }
}

/// Bytes each rank sends in a ring all-reduce of `bytes` over `n` ranks: `2(n−1)/n · bytes`.
pub fn all_reduce_bytes(n: u64, bytes: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    2.0 * (n - 1) as f64 / n as f64 * bytes
}

/// Bytes each rank sends in a ring all-gather whose result is `bytes`: `(n−1)/n · bytes`.
pub fn all_gather_bytes(n: u64, bytes: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    (n - 1) as f64 / n as f64 * bytes
}

/// Bytes each rank sends in a ring reduce-scatter of a `bytes` input: `(n−1)/n · bytes`.
pub fn reduce_scatter_bytes(n: u64, bytes: f64) -> f64 {
    all_gather_bytes(n, bytes)
}

/// Time of a ring all-reduce of `bytes` over `n` ranks on `link`.
pub fn all_reduce_time(n: u64, bytes: f64, link: Link) -> f64 {
    link.time(all_reduce_bytes(n, bytes), 2 * n.saturating_sub(1))
}

/// Time of a ring all-gather to a `bytes` result over `n` ranks on `link`.
pub fn all_gather_time(n: u64, bytes: f64, link: Link) -> f64 {
    link.time(all_gather_bytes(n, bytes), n.saturating_sub(1))
}

/// Time of a ring reduce-scatter of `bytes` over `n` ranks on `link`.
pub fn reduce_scatter_time(n: u64, bytes: f64, link: Link) -> f64 {
    link.time(reduce_scatter_bytes(n, bytes), n.saturating_sub(1))
}

/// Time of a point-to-point send of `bytes` on `link`.
pub fn send_time(bytes: f64, link: Link) -> f64 {
    link.time(bytes, 1)
}

/// Whether a parallel group of `size` ranks whose members are `stride` ranks apart stays within
/// one node of `per_node` GPUs, with ranks numbered node by node (Megatron's order: tensor
/// fastest, then data, then pipeline).
pub fn within_node(stride: u64, size: u64, per_node: u64) -> bool {
    size <= 1 || stride * size <= per_node
}

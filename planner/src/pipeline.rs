//! Pipeline schedule arithmetic (Narayanan et al. 2021, section 2.2).

/// Micro-batches per step, `m = B / (b·d)`, as Megatron defines them: `None` when the global
/// batch `B` is not a whole number of micro-batches of `b` sequences on each of `d` replicas.
pub fn micro_batches(global_batch: u64, micro_batch: u64, dp: u64) -> Option<u64> {
    let per_step = micro_batch.checked_mul(dp)?;
    if per_step == 0 || !global_batch.is_multiple_of(per_step) || global_batch < per_step {
        return None;
    }
    Some(global_batch / per_step)
}

/// The 1F1B (PipeDream-Flush) bubble as a fraction of the ideal time: `(p − 1) / m`
/// (Narayanan et al. 2021, section 2.2.1; the same for GPipe). The step takes
/// `(m + p − 1)` micro-batch slots instead of `m`.
pub fn bubble_fraction(p: u64, m: u64) -> f64 {
    if m == 0 {
        return f64::INFINITY;
    }
    (p.saturating_sub(1)) as f64 / m as f64
}

//! The memory planner: which device buffer each temporary of a plan lives in.
//!
//! A temporary is live from the first forward kernel that binds it to the last one. Temporaries
//! whose live ranges do not overlap share one physical buffer (a *slot*), sized to the largest
//! of them. Slots are assigned greedily in order of first use, best fit first: a temporary takes
//! the smallest free slot that holds it, else grows the largest free slot, else opens a new one.
//!
//! Slots are whole buffers, never offsets into one arena: a WebGPU dispatch may not bind one
//! buffer both read-only and read-write, and two temporaries live in the same kernel are always
//! in different slots, so every binding of a launch is a distinct buffer.
//!
//! The plan depends on the bound dims (sizes are polynomials of `batch`, `seq`, `past`), so the
//! executor plans again when they change; planning is linear in the number of buffers.

/// One temporary: its size and live range (kernel indices, inclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    /// Bytes.
    pub bytes: u64,
    /// First kernel that binds it.
    pub first: usize,
    /// Last kernel that binds it.
    pub last: usize,
}

/// Slot of each temporary and the bytes it takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Slot index of each interval, in input order.
    pub slot_of: Vec<usize>,
    /// Size of each slot in bytes.
    pub slots: Vec<u64>,
    /// Σ bytes of all temporaries (one buffer per tensor).
    pub naive_bytes: u64,
    /// Σ slot sizes: what the plan allocates.
    pub planned_bytes: u64,
    /// The most bytes live at once (no plan can use less).
    pub live_peak_bytes: u64,
}

/// Plans slots for `intervals` (see the module docs).
pub fn plan(intervals: &[Interval]) -> MemoryPlan {
    let mut order: Vec<usize> = (0..intervals.len()).collect();
    order.sort_by_key(|&i| (intervals[i].first, std::cmp::Reverse(intervals[i].bytes)));
    let mut slots: Vec<u64> = vec![];
    // Last kernel of the slot's current occupant.
    let mut busy_until: Vec<usize> = vec![];
    let mut slot_of = vec![0; intervals.len()];
    for i in order {
        let t = &intervals[i];
        let free = |s: usize| busy_until[s] < t.first;
        let fits = (0..slots.len())
            .filter(|&s| free(s) && slots[s] >= t.bytes)
            .min_by_key(|&s| slots[s]);
        let s = match fits {
            Some(s) => s,
            None => match (0..slots.len())
                .filter(|&s| free(s))
                .max_by_key(|&s| slots[s])
            {
                Some(s) => {
                    slots[s] = t.bytes;
                    s
                }
                None => {
                    slots.push(t.bytes);
                    busy_until.push(0);
                    slots.len() - 1
                }
            },
        };
        busy_until[s] = t.last;
        slot_of[i] = s;
    }
    let end = intervals.iter().map(|t| t.last + 1).max().unwrap_or(0);
    let mut live = vec![0u64; end];
    for t in intervals {
        for l in &mut live[t.first..=t.last] {
            *l += t.bytes;
        }
    }
    MemoryPlan {
        slot_of,
        naive_bytes: intervals.iter().map(|t| t.bytes).sum(),
        planned_bytes: slots.iter().sum(),
        live_peak_bytes: live.into_iter().max().unwrap_or(0),
        slots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(bytes: u64, first: usize, last: usize) -> Interval {
        Interval { bytes, first, last }
    }

    /// No two temporaries live in the same kernel share a slot, and each slot holds its members.
    fn check(ts: &[Interval], p: &MemoryPlan) {
        for (i, a) in ts.iter().enumerate() {
            assert!(p.slots[p.slot_of[i]] >= a.bytes);
            for (j, b) in ts.iter().enumerate().skip(i + 1) {
                if p.slot_of[i] == p.slot_of[j] {
                    assert!(a.last < b.first || b.last < a.first, "{a:?} overlaps {b:?}");
                }
            }
        }
        assert!(p.planned_bytes >= p.live_peak_bytes);
        assert!(p.planned_bytes <= p.naive_bytes);
    }

    #[test]
    fn a_chain_needs_two_slots() {
        // t0 → k0..k1, t1 → k1..k2, t2 → k2..k3, …: each overlaps only its neighbours.
        let ts: Vec<Interval> = (0..10).map(|i| iv(100, i, i + 1)).collect();
        let p = plan(&ts);
        check(&ts, &p);
        assert_eq!(p.slots.len(), 2);
        assert_eq!(
            (p.naive_bytes, p.planned_bytes, p.live_peak_bytes),
            (1000, 200, 200)
        );
    }

    #[test]
    fn overlapping_tensors_never_share() {
        let ts = vec![
            iv(10, 0, 5),
            iv(20, 1, 2),
            iv(30, 2, 4),
            iv(5, 3, 6),
            iv(40, 5, 7),
        ];
        let p = plan(&ts);
        check(&ts, &p);
        // Kernel 2 has the first three live: 10 + 20 + 30.
        assert_eq!(p.live_peak_bytes, 60);
    }

    #[test]
    fn best_fit_then_grow() {
        // A small and a big slot free up; the larger newcomer (60) takes the big slot (best
        // fit), the other (50) grows the small one rather than opening a third: 100 + 50.
        let ts = vec![iv(10, 0, 0), iv(100, 0, 0), iv(50, 1, 1), iv(60, 1, 1)];
        let p = plan(&ts);
        check(&ts, &p);
        assert_eq!(p.slots.len(), 2);
        assert_eq!(p.planned_bytes, 150);
    }

    #[test]
    fn empty() {
        let p = plan(&[]);
        assert_eq!(p, MemoryPlan::default());
    }
}

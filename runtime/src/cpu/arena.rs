//! The fast mode's arena: f32 buffers of intermediates reused by liveness.
//!
//! `run_graph` hands a value's buffer back here when its last consumer has run (and nothing
//! else holds it), and kernels take their output buffers from here ([`buffer`]). Buffers are
//! kept in buckets by exact length, so a forward whose dims repeat the previous one's finds
//! every intermediate it needs already allocated: after the first call, it allocates only the
//! buffers it hands out as outputs (which the caller keeps). The arena of a loaded program
//! lives across its runs; at the end of a run each bucket keeps at most as many buffers as the
//! run took from it, so a change of dims frees the old sizes.
//!
//! The arena is installed for the duration of a run on the thread that runs the graph
//! ([`Arena::install`]); kernels allocate their outputs on that thread before splitting work
//! across rayon, and with no arena installed (the reference mode, other threads)
//! [`buffer`] is a plain zeroed allocation.

use std::cell::RefCell;
use std::collections::HashMap;

/// Buffers by length, and what the arena has done so far.
#[derive(Default, Debug)]
pub struct Arena {
    free: HashMap<usize, Vec<Vec<f32>>>,
    /// Buffers taken from each bucket during the current run.
    taken: HashMap<usize, usize>,
    stats: ArenaStats,
}

/// Counters of an [`Arena`] since it was made.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ArenaStats {
    /// Buffers allocated because no free one of the length was at hand.
    pub fresh: usize,
    /// Buffers handed out again from the free lists.
    pub reused: usize,
    /// Buffers handed back after their value's last use.
    pub returned: usize,
}

thread_local! {
    static CURRENT: RefCell<Option<Arena>> = const { RefCell::new(None) };
}

impl Arena {
    /// The counters so far.
    pub fn stats(&self) -> ArenaStats {
        self.stats
    }

    /// Runs `f` with this arena installed on the calling thread, then trims the free lists to
    /// what the run used. A nested install (a graph run from inside a run) keeps the outer
    /// arena and runs `f` with the inner one.
    pub fn install<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let mine = std::mem::take(self);
        let outer = CURRENT.with(|c| c.borrow_mut().replace(mine));
        // Put the arena back even when `f` unwinds.
        struct Restore<'a> {
            arena: &'a mut Arena,
            outer: Option<Option<Arena>>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let outer = self.outer.take().flatten();
                let mine = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
                *self.arena = mine.unwrap_or_default();
                self.arena.trim();
            }
        }
        let _restore = Restore {
            arena: self,
            outer: Some(outer),
        };
        f()
    }

    fn trim(&mut self) {
        let taken = std::mem::take(&mut self.taken);
        self.free.retain(|len, bufs| {
            bufs.truncate(taken.get(len).copied().unwrap_or(0));
            !bufs.is_empty()
        });
    }

    fn take(&mut self, n: usize) -> Vec<f32> {
        *self.taken.entry(n).or_default() += 1;
        match self.free.get_mut(&n).and_then(Vec::pop) {
            Some(v) => {
                self.stats.reused += 1;
                v
            }
            None => {
                self.stats.fresh += 1;
                fresh(n)
            }
        }
    }

    fn give(&mut self, v: Vec<f32>) {
        self.stats.returned += 1;
        self.free.entry(v.len()).or_default().push(v);
    }
}

/// Bytes from which a fresh arena buffer asks the kernel for transparent huge pages.
const HUGE_MIN_BYTES: usize = 4 << 20;

/// A zeroed buffer of `n` f32 for the arena. A large one asks Linux for transparent huge pages
/// (`madvise(MADV_HUGEPAGE)` on its 2 MiB-aligned interior, before the first touch) when the
/// system leaves that to the program (`transparent_hugepage/enabled = madvise`): a GEMM's
/// column-block store and epilogue walk rows `n` floats apart, one 4 KiB page per row, and
/// the arena keeps these buffers across runs.
fn fresh(n: usize) -> Vec<f32> {
    let bytes = n * std::mem::size_of::<f32>();
    if bytes < HUGE_MIN_BYTES {
        return vec![0f32; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: std::ffi::c_int = 14;
        extern "C" {
            fn madvise(
                addr: *mut std::ffi::c_void,
                len: usize,
                advice: std::ffi::c_int,
            ) -> std::ffi::c_int;
        }
        let start = v.as_mut_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the allocation just made; the advice changes only
            // how its pages are backed, not their contents. A failure (no THP) is harmless.
            unsafe { madvise(lo as *mut std::ffi::c_void, hi - lo, MADV_HUGEPAGE) };
        }
    }
    v.resize(n, 0.0);
    v
}

/// A buffer of `n` f32 for a kernel's output: from the installed arena (contents are whatever
/// its last user left: the caller writes every element), else freshly zeroed.
pub fn buffer(n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    CURRENT.with(|c| match c.borrow_mut().as_mut() {
        Some(a) => a.take(n),
        None => vec![0f32; n],
    })
}

/// Hands a dead value's buffer to the installed arena (dropped when none is installed).
pub fn give(v: Vec<f32>) {
    if v.is_empty() {
        return;
    }
    CURRENT.with(|c| {
        if let Some(a) = c.borrow_mut().as_mut() {
            a.give(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_length_and_trimmed_to_use() {
        let mut a = Arena::default();
        a.install(|| {
            let x = buffer(10);
            let y = buffer(10);
            give(x);
            let z = buffer(10);
            give(y);
            give(z);
        });
        assert_eq!(a.stats().fresh, 2);
        assert_eq!(a.stats().reused, 1);
        a.install(|| {
            let x = buffer(10);
            let y = buffer(10);
            give(x);
            give(y);
        });
        assert_eq!(a.stats().fresh, 2, "the second run found both buffers");
        a.install(|| give(buffer(7)));
        assert_eq!(a.stats().fresh, 3);
        // The run above took no length-10 buffer: those were freed.
        assert!(!a.free.contains_key(&10));
        assert_eq!(buffer(3), vec![0.0; 3], "no arena installed: zeroed");
    }

    #[test]
    fn large_fresh_buffers_are_zeroed_at_odd_lengths() {
        // Above the huge-page threshold (the madvise path) and at odd lengths around it.
        let big = HUGE_MIN_BYTES / 4;
        for n in [1, 3, 783, big - 1, big, big + 129, 3 * big + 50] {
            let mut a = Arena::default();
            let v = a.install(|| buffer(n));
            assert_eq!(v.len(), n);
            assert!(
                v.iter().all(|&x| x == 0.0),
                "fresh buffer of {n} not zeroed"
            );
        }
    }
}

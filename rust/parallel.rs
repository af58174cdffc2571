//! Our own rayon pool, the chunk planner, and the fork handler.
//!
//! The pool is separate from rayon's global pool (and from torch's OpenMP
//! pool) so its size is ours to set: `FERROPTIM_NUM_THREADS`, then
//! [`set_num_threads`], else the machine's cores.
//!
//! A forked child (a DataLoader worker, say) inherits the pool's memory but
//! none of its threads, so handing it work would wait forever. A
//! `pthread_atfork` child handler marks the pool unusable in the child, which
//! then runs everything on the calling thread until it sizes a new pool.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// Environment variable for the pool size.
pub const ENV_VAR: &str = "FERROPTIM_NUM_THREADS";

/// Elements per chunk of parallel work: big enough to amortise scheduling,
/// small enough (~1.8 MB of Adam traffic in float32) to balance across cores.
pub const CHUNK_ELEMENTS: usize = 64 * 1024;

/// Chunk cuts inside a tensor fall on multiples of this many elements (the
/// widest vector, 16 float32 lanes, times an unroll of 4), so only a tensor's
/// real end has a scalar tail.
pub const CHUNK_ALIGN: usize = 64;

/// Work smaller than this runs on the calling thread: waking the pool costs
/// more than the step.
pub const INLINE_ELEMENTS: usize = 48 * 1024;

struct PoolState {
    threads: usize,
    pool: Option<Arc<ThreadPool>>,
}

static POOL: Mutex<PoolState> = Mutex::new(PoolState {
    threads: 0,
    pool: None,
});
static FORKED_CHILD: AtomicBool = AtomicBool::new(false);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Only an atomic store: this runs in the child between fork and return,
    // where little else is async-signal-safe.
    FORKED_CHILD.store(true, Ordering::SeqCst);
}

fn install_fork_handler() {
    ATFORK.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function that performs a single
        // atomic store; no locks, allocation or unwinding can happen in it.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
}

/// Thread count from the environment, if set to a positive integer.
pub fn threads_from_env() -> Result<Option<usize>, String> {
    match std::env::var(ENV_VAR) {
        Ok(value) if !value.trim().is_empty() => match value.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(format!(
                "{ENV_VAR}={value:?}: expected a positive integer number of threads"
            )),
        },
        _ => Ok(None),
    }
}

fn default_threads() -> usize {
    threads_from_env().ok().flatten().unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

fn lock_pool() -> std::sync::MutexGuard<'static, PoolState> {
    // A panic while holding the lock cannot leave PoolState inconsistent
    // (every write is a single assignment), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The number of threads steps run on (1 in a forked child until resized).
pub fn num_threads() -> usize {
    if FORKED_CHILD.load(Ordering::SeqCst) {
        return 1;
    }
    let mut state = lock_pool();
    if state.threads == 0 {
        state.threads = default_threads();
    }
    state.threads
}

/// Sets the pool size. Takes effect for the next step; also re-arms a forked child.
pub fn set_num_threads(threads: usize) -> Result<(), String> {
    if threads == 0 {
        return Err("the number of threads must be at least 1".to_string());
    }
    let mut state = lock_pool();
    if FORKED_CHILD.swap(false, Ordering::SeqCst) {
        // The inherited pool has no threads in this process; dropping it would
        // wait on them, so it is leaked.
        if let Some(stale) = state.pool.take() {
            std::mem::forget(stale);
        }
    }
    if state.threads != threads {
        state.threads = threads;
        state.pool = None;
    }
    Ok(())
}

/// The pool to run parallel work on, or `None` to run inline
/// (one thread configured, or a forked child).
fn pool() -> Option<Arc<ThreadPool>> {
    if FORKED_CHILD.load(Ordering::SeqCst) {
        return None;
    }
    let mut state = lock_pool();
    if state.threads == 0 {
        state.threads = default_threads();
    }
    if state.threads <= 1 {
        return None;
    }
    if state.pool.is_none() {
        install_fork_handler();
        let pool = ThreadPoolBuilder::new()
            .num_threads(state.threads)
            .thread_name(|i| format!("ferroptim-{i}"))
            .build()
            .ok()?;
        state.pool = Some(Arc::new(pool));
    }
    state.pool.clone()
}

/// A contiguous run of one tensor's elements inside a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub tensor: usize,
    pub range: Range<usize>,
}

/// Work cut into chunks of about `chunk` elements across all tensors.
///
/// Small tensors share a chunk; a large tensor is cut at multiples of `align`.
/// The plan depends only on the tensor lengths, never on the thread count, so
/// per-chunk partial results (reductions) combine in the same order however
/// many threads run them.
#[derive(Clone, Debug, Default)]
pub struct ChunkPlan {
    segments: Vec<Segment>,
    /// `segments[starts[c]..starts[c + 1]]` belong to chunk `c`.
    starts: Vec<usize>,
    total: usize,
}

impl ChunkPlan {
    pub fn new(lens: &[usize], chunk: usize, align: usize) -> ChunkPlan {
        assert!(chunk >= align && align > 0 && chunk.is_multiple_of(align));
        let mut segments = Vec::with_capacity(lens.len() + 1);
        let mut starts = vec![0];
        let mut filled = 0;
        let mut total = 0;
        for (tensor, &len) in lens.iter().enumerate() {
            total += len;
            let mut pos = 0;
            while pos < len {
                let room = chunk - filled;
                let mut take = (len - pos).min(room);
                if take < len - pos {
                    // Cutting inside the tensor: keep the cut aligned.
                    take -= take % align;
                }
                if take > 0 {
                    segments.push(Segment {
                        tensor,
                        range: pos..pos + take,
                    });
                    filled += take;
                    pos += take;
                }
                if filled >= chunk || (take == 0 && filled > 0) {
                    starts.push(segments.len());
                    filled = 0;
                }
            }
        }
        if filled > 0 {
            starts.push(segments.len());
        }
        ChunkPlan {
            segments,
            starts,
            total,
        }
    }

    pub fn for_lens(lens: &[usize]) -> ChunkPlan {
        ChunkPlan::new(lens, CHUNK_ELEMENTS, CHUNK_ALIGN)
    }

    pub fn num_chunks(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn total_elements(&self) -> usize {
        self.total
    }

    pub fn chunk(&self, index: usize) -> &[Segment] {
        &self.segments[self.starts[index]..self.starts[index + 1]]
    }

    /// Runs `work` on every chunk, in parallel on the pool when the work is big
    /// enough, and returns the per-chunk results in chunk order.
    pub fn run<R, F>(&self, work: F) -> Vec<R>
    where
        R: Send,
        F: Fn(&[Segment]) -> R + Sync,
    {
        let chunks = self.num_chunks();
        let parallel = if self.total >= INLINE_ELEMENTS && chunks > 1 {
            pool()
        } else {
            None
        };
        match parallel {
            Some(pool) => pool.install(|| {
                (0..chunks)
                    .into_par_iter()
                    .with_max_len(1)
                    .map(|c| work(self.chunk(c)))
                    .collect()
            }),
            None => (0..chunks).map(|c| work(self.chunk(c))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(plan: &ChunkPlan, lens: &[usize]) -> Vec<Vec<bool>> {
        let mut seen: Vec<Vec<bool>> = lens.iter().map(|&n| vec![false; n]).collect();
        for c in 0..plan.num_chunks() {
            let chunk = plan.chunk(c);
            assert!(!chunk.is_empty());
            for seg in chunk {
                assert!(!seg.range.is_empty());
                for i in seg.range.clone() {
                    assert!(!seen[seg.tensor][i], "element covered twice");
                    seen[seg.tensor][i] = true;
                }
            }
        }
        seen
    }

    #[test]
    fn plan_covers_every_element_once() {
        let lens = [0, 1, 63, 64, 65, 1000, 4096, 10_000, 0, 7];
        let plan = ChunkPlan::new(&lens, 256, 64);
        let seen = covered(&plan, &lens);
        assert!(seen.iter().all(|t| t.iter().all(|&x| x)));
        assert_eq!(plan.total_elements(), lens.iter().sum::<usize>());
    }

    #[test]
    fn cuts_inside_a_tensor_are_aligned_and_chunks_bounded() {
        let lens = [100, 5000, 3, 777];
        let plan = ChunkPlan::new(&lens, 512, 64);
        for c in 0..plan.num_chunks() {
            let chunk = plan.chunk(c);
            let size: usize = chunk.iter().map(|s| s.range.len()).sum();
            assert!(size <= 512);
            for seg in chunk {
                let len = lens[seg.tensor];
                assert!(seg.range.start % 64 == 0);
                assert!(seg.range.end == len || seg.range.end % 64 == 0);
            }
        }
    }

    #[test]
    fn small_tensors_share_chunks() {
        let lens = vec![1024; 1000];
        let plan = ChunkPlan::for_lens(&lens);
        assert_eq!(
            plan.num_chunks(),
            (1000 * 1024usize).div_ceil(CHUNK_ELEMENTS)
        );
    }

    #[test]
    fn run_returns_results_in_chunk_order() {
        let lens = vec![CHUNK_ELEMENTS; 8];
        let plan = ChunkPlan::for_lens(&lens);
        let firsts = plan.run(|chunk| chunk[0].tensor);
        assert_eq!(firsts, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn empty_plan_runs_nothing() {
        let plan = ChunkPlan::for_lens(&[0, 0]);
        assert_eq!(plan.num_chunks(), 0);
        assert!(plan.run(|_| 1).is_empty());
    }
}

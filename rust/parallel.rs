//! Our own rayon pool, the chunk planner, and the fork handler.
//!
//! The pool is separate from rayon's global pool (and from torch's OpenMP
//! pool) so its size is ours to set: `FERROPTIM_NUM_THREADS`, then
//! [`set_num_threads`], else the machine's cores. Both are capped at
//! [`max_threads`]: every configured thread is a real OS thread, and a typo'd
//! `10**6` would otherwise spawn threads until the machine stalls.
//!
//! Where torch's OpenMP runtime (GNU libgomp) is loaded and torch runs on as
//! many threads as ferroptim, chunks run on OpenMP's team instead (see
//! [`openmp`]): right after backward its workers are still spinning, hot,
//! and a helper of ours woken then would share a core with one of them.
//! `FERROPTIM_OPENMP=0` keeps every step on the pool.
//!
//! A forked child (a DataLoader worker, say) inherits the pool's memory but
//! none of its threads, so handing it work would wait forever. A
//! `pthread_atfork` child handler marks the pool unusable in the child, which
//! then runs everything on the calling thread until it sizes a new pool.

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// Environment variable for the pool size.
pub const ENV_VAR: &str = "FERROPTIM_NUM_THREADS";

/// Environment variable that, set to `0`, keeps steps off OpenMP's team (see [`openmp`]).
pub const OPENMP_ENV_VAR: &str = "FERROPTIM_OPENMP";

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
/// Set in a forked child for good: libgomp's team does not survive `fork`
/// (its threads are gone, its state says otherwise), so a child never uses it,
/// even after `set_num_threads` re-arms our pool.
static OPENMP_FORKED: AtomicBool = AtomicBool::new(false);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Only an atomic store: this runs in the child between fork and return,
    // where little else is async-signal-safe.
    FORKED_CHILD.store(true, Ordering::SeqCst);
    OPENMP_FORKED.store(true, Ordering::SeqCst);
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

/// The floor of [`max_threads`], whatever the machine: room to oversubscribe a
/// small machine (tests, benchmarks) without letting a typo spawn a million threads.
pub const MIN_MAX_THREADS: usize = 256;

/// The most threads the pool may be sized to: 4 per available core (as the OS
/// reports them to this process, affinity and cgroup limits included), and at
/// least [`MIN_MAX_THREADS`].
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cores.saturating_mul(4).max(MIN_MAX_THREADS)
}

/// Checks a requested thread count: at least 1, at most [`max_threads`].
pub fn check_threads(threads: usize) -> Result<usize, String> {
    if threads == 0 {
        return Err("the number of threads must be at least 1".to_string());
    }
    let max = max_threads();
    if threads > max {
        return Err(format!(
            "the number of threads must be at most {max} (4 per available core, at least \
             {MIN_MAX_THREADS}), got {threads}"
        ));
    }
    Ok(threads)
}

/// Thread count from the environment, if set to a positive integer no larger than
/// [`max_threads`].
pub fn threads_from_env() -> Result<Option<usize>, String> {
    match std::env::var(ENV_VAR) {
        Ok(value) if !value.trim().is_empty() => match value.trim().parse::<usize>() {
            Ok(n) if n >= 1 => check_threads(n)
                .map(Some)
                .map_err(|e| format!("{ENV_VAR}={value:?}: {e}")),
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
    lock(&POOL)
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
    let threads = check_threads(threads)?;
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

/// The pool of helpers (one thread fewer than configured: the calling thread
/// works too) and their number, or `None` to run inline (one thread
/// configured, or a forked child).
fn pool() -> Option<(Arc<ThreadPool>, usize)> {
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
            .num_threads(state.threads - 1)
            .thread_name(|i| format!("ferroptim-{i}"))
            .build()
            .ok()?;
        state.pool = Some(Arc::new(pool));
    }
    Some((state.pool.clone()?, state.threads - 1))
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

    /// Runs `work` on every chunk, in parallel when the work is big enough,
    /// and returns the per-chunk results in chunk order (so whatever thread
    /// ran a chunk, the caller combines results in the same order).
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
            Some((pool, helpers)) => {
                let slots: Vec<Mutex<Option<R>>> = (0..chunks).map(|_| Mutex::new(None)).collect();
                let task = |c: usize| {
                    let result = work(self.chunk(c));
                    *lock(&slots[c]) = Some(result);
                };
                let team = helpers.min(chunks - 1) + 1;
                if !openmp::run(team, helpers + 1, chunks, &task) {
                    run_shared(&pool, team - 1, chunks, &task);
                }
                slots
                    .into_iter()
                    .map(|slot| {
                        slot.into_inner()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .expect("every chunk ran")
                    })
                    .collect()
            }
            None => (0..chunks).map(|c| work(self.chunk(c))).collect(),
        }
    }
}

/// Locks `mutex`, poisoned or not: every lock in this module guards single
/// assignments and reads, so a panic elsewhere cannot leave its data half
/// written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Chunks `0..chunks` claimed one at a time by the calling thread and by
/// helpers on the pool.
///
/// The caller works instead of waiting: pool workers asleep since the last
/// step (the Python side of a step takes long enough for that) can take
/// hundreds of microseconds to wake on a busy or virtualised machine, and a
/// caller blocked in `ThreadPool::install` would wait for them. Helpers that
/// start late find the chunks gone and leave.
struct SharedRun {
    next: AtomicUsize,
    chunks: usize,
    /// Helpers between their check of `closed` and their exit: the only ones
    /// that may still call `task`.
    active: AtomicUsize,
    /// Set by the caller once it is done claiming; helpers arriving later
    /// never touch `task`.
    closed: AtomicBool,
    /// The caller's task, its lifetime erased (see `run_shared`).
    task: &'static (dyn Fn(usize) + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl SharedRun {
    fn claim_and_run(&self) {
        loop {
            let chunk = self.next.fetch_add(1, Ordering::Relaxed);
            if chunk >= self.chunks {
                return;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (self.task)(chunk))) {
                self.next.store(self.chunks, Ordering::Relaxed); // nobody claims more
                lock(&self.panic).get_or_insert(payload);
                return;
            }
        }
    }

    fn help(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
        if !self.closed.load(Ordering::SeqCst) {
            self.claim_and_run();
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes a shared run and waits until no helper can touch its task; runs
/// on unwinding too, so the task's borrows outlive every use.
struct CloseAndWait<'a>(&'a SharedRun);

impl Drop for CloseAndWait<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
        let mut spins = 0u32;
        // Helpers still active hold at most one chunk each: a short wait.
        while self.0.active.load(Ordering::SeqCst) != 0 {
            if spins < 1 << 12 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn run_shared(pool: &ThreadPool, helpers: usize, chunks: usize, task: &(dyn Fn(usize) + Sync)) {
    // SAFETY: the reference is used only by `SharedRun::claim_and_run`, called
    // on this thread below and by helpers inside `help` while they are counted
    // in `active`. `CloseAndWait` (dropped before this function returns, also
    // when unwinding) sets `closed` and then waits for `active` to reach zero;
    // with sequentially consistent ordering a helper either registered in
    // `active` before `closed` was set (and is waited for) or sees `closed`
    // and never calls the task. So no use outlives the borrow of `task`.
    let task: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
    let shared = Arc::new(SharedRun {
        next: AtomicUsize::new(0),
        chunks,
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        task,
        panic: Mutex::new(None),
    });
    {
        let _close = CloseAndWait(&shared);
        for _ in 0..helpers {
            let shared = Arc::clone(&shared);
            pool.spawn(move || shared.help());
        }
        shared.claim_and_run();
    }
    let panic = lock(&shared.panic).take();
    if let Some(payload) = panic {
        resume_unwind(payload);
    }
}

/// Chunks on the process's OpenMP team (torch's libgomp), claimed one at a time
/// by every member as on the pool.
///
/// Why: after backward, torch's OpenMP workers spin-wait (libgomp's
/// `GOMP_SPINCOUNT`, milliseconds on some CPUs) before they sleep. A helper of
/// ours woken then shares a core with a spinning worker; the scheduler keeps
/// it on that core while it is cache-hot, so a chunk it has claimed can stall
/// for a scheduler slice while the caller, out of chunks, waits for it. The
/// spinning workers themselves start at once and leave no core to share.
///
/// When: only where libgomp is already loaded (this module never loads it),
/// the calling thread is not inside an OpenMP region (`omp_in_parallel`), and
/// OpenMP's thread count for this thread (`torch.set_num_threads` sets it) is
/// ferroptim's: the team torch keeps is then the one we use, and a different
/// count would make libgomp start or idle threads behind torch's back. A
/// forked child never uses it (`OPENMP_FORKED`). Results do not
/// change: the chunks are the plan's, and each result goes to its chunk's slot.
///
/// Backing off: `GOMP_parallel` ends in a barrier, so the caller waits for every
/// member, and a member whose core another process holds arrives a scheduler
/// slice late (8 ms per step on a busy 2-core machine, where the pool's
/// helpers, which the caller never waits for once it has run every chunk
/// itself, took 1.5 ms). When the caller waits at the barrier longer than
/// [`LATE_TEAM`], steps go to the pool for [`BACKOFF`], then try the team again.
#[cfg(target_os = "linux")]
mod openmp {
    use super::{catch_unwind, lock, resume_unwind, Any, AssertUnwindSafe, AtomicUsize, Mutex};
    use super::{Ordering, OPENMP_ENV_VAR, OPENMP_FORKED};
    use std::ffi::{c_int, c_uint, c_void, CStr, CString};
    use std::sync::atomic::AtomicU64;
    use std::sync::OnceLock;
    use std::thread::{self, ThreadId};
    use std::time::{Duration, Instant};

    /// A wait at the closing barrier longer than this means a member was not
    /// running (a chunk takes tens of microseconds; waking a sleeping member,
    /// well under this).
    pub(super) const LATE_TEAM: Duration = Duration::from_micros(500);

    /// How long steps stay on the pool after a late team.
    pub(super) const BACKOFF: Duration = Duration::from_secs(1);

    /// Nanoseconds since [`epoch`] before which the team is not used.
    static BACKOFF_UNTIL: AtomicU64 = AtomicU64::new(0);

    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    fn nanos_since_epoch(at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a run that ended `barrier_wait` after the caller ran out of
    /// chunks should send the next steps to the pool.
    pub(super) fn team_was_late(barrier_wait: Duration) -> bool {
        barrier_wait > LATE_TEAM
    }

    type Body = extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
    type Query = unsafe extern "C" fn() -> c_int;

    /// The libgomp entry points used: `GOMP_parallel` (the call behind
    /// `#pragma omp parallel`: runs the body on every member, returns after
    /// the closing barrier), `omp_in_parallel` and `omp_get_max_threads`.
    struct Gomp {
        parallel: Parallel,
        in_parallel: Query,
        max_threads: Query,
    }

    static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();

    /// `dl_iterate_phdr` callback: the path of the first loaded `libgomp*`.
    unsafe extern "C" fn find_libgomp(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        found: *mut c_void,
    ) -> c_int {
        // SAFETY: `dl_iterate_phdr` passes a valid `info` whose `dlpi_name` is
        // null or a C string, and `found` is the `Option<CString>` `load` passed.
        unsafe {
            let name = (*info).dlpi_name;
            if name.is_null() {
                return 0;
            }
            let name = CStr::from_ptr(name);
            let file = name.to_bytes().rsplit(|&b| b == b'/').next().unwrap_or(b"");
            if file.starts_with(b"libgomp") {
                *found.cast::<Option<CString>>() = Some(name.to_owned());
                return 1;
            }
        }
        0
    }

    fn load() -> Option<Gomp> {
        let mut found: Option<CString> = None;
        // SAFETY: the callback only reads the entries and writes `found`.
        unsafe {
            libc::dl_iterate_phdr(Some(find_libgomp), (&raw mut found).cast());
        }
        let path = found?;
        // SAFETY: RTLD_NOLOAD returns a handle to the library only if it is
        // already loaded (it never loads one); the handle is kept for the
        // process's life (never `dlclose`d), so the symbols stay valid. The
        // symbols have libgomp's documented C signatures, as typed above.
        unsafe {
            let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if handle.is_null() {
                return None;
            }
            let symbol = |name: &CStr| libc::dlsym(handle, name.as_ptr());
            let (parallel, in_parallel, max_threads) = (
                symbol(c"GOMP_parallel"),
                symbol(c"omp_in_parallel"),
                symbol(c"omp_get_max_threads"),
            );
            if parallel.is_null() || in_parallel.is_null() || max_threads.is_null() {
                return None;
            }
            Some(Gomp {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
                in_parallel: std::mem::transmute::<*mut c_void, Query>(in_parallel),
                max_threads: std::mem::transmute::<*mut c_void, Query>(max_threads),
            })
        }
    }

    fn enabled() -> bool {
        // Read at every parallel run (a few hundred nanoseconds on runs of at
        // least `INLINE_ELEMENTS`), so a process can compare both schedulers.
        std::env::var(OPENMP_ENV_VAR).map_or(true, |v| v.trim() != "0")
    }

    struct Team<'a> {
        next: AtomicUsize,
        chunks: usize,
        task: &'a (dyn Fn(usize) + Sync),
        panic: Mutex<Option<Box<dyn Any + Send>>>,
        /// The calling thread, and when it ran out of chunks.
        caller: ThreadId,
        caller_done: Mutex<Option<Instant>>,
    }

    /// The body every member runs: claim chunks until none are left. Never
    /// unwinds (a panic must not cross libgomp's C frames): the first payload
    /// is kept for the caller and the remaining chunks are given up.
    extern "C" fn member(data: *mut c_void) {
        // SAFETY: `data` is the `Team` on `run`'s stack, alive until
        // `GOMP_parallel` returns, which is after every member has left here.
        let team = unsafe { &*data.cast_const().cast::<Team>() };
        loop {
            let chunk = team.next.fetch_add(1, Ordering::Relaxed);
            if chunk >= team.chunks {
                if thread::current().id() == team.caller {
                    *lock(&team.caller_done) = Some(Instant::now());
                }
                return;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (team.task)(chunk))) {
                team.next.store(team.chunks, Ordering::Relaxed);
                lock(&team.panic).get_or_insert(payload);
                return;
            }
        }
    }

    /// Runs chunks `0..chunks` on a team of `team` OpenMP threads and returns
    /// true, or returns false (nothing run) where OpenMP's team is not ours to
    /// use: see the module's conditions; `threads` is ferroptim's thread count.
    pub(super) fn run(
        team: usize,
        threads: usize,
        chunks: usize,
        task: &(dyn Fn(usize) + Sync),
    ) -> bool {
        if OPENMP_FORKED.load(Ordering::SeqCst) || !enabled() {
            return false;
        }
        if nanos_since_epoch(Instant::now()) < BACKOFF_UNTIL.load(Ordering::Relaxed) {
            return false; // a member was late recently: see the module's docs
        }
        let Some(gomp) = GOMP.get_or_init(load) else {
            return false;
        };
        // SAFETY: plain queries of the calling thread's OpenMP state.
        let (nested, omp_threads) = unsafe { ((gomp.in_parallel)(), (gomp.max_threads)()) };
        if nested != 0 || usize::try_from(omp_threads) != Ok(threads) {
            return false;
        }
        let Ok(team) = c_uint::try_from(team) else {
            return false;
        };
        let shared = Team {
            next: AtomicUsize::new(0),
            chunks,
            task,
            panic: Mutex::new(None),
            caller: thread::current().id(),
            caller_done: Mutex::new(None),
        };
        // SAFETY: every member (this thread included) runs `member` on `shared`,
        // which outlives the call: `GOMP_parallel` returns after the region's
        // closing barrier. `member` never unwinds. Flags 0: default binding.
        unsafe {
            (gomp.parallel)(member, (&raw const shared).cast_mut().cast(), team, 0);
        }
        let ended = Instant::now();
        let caller_done = lock(&shared.caller_done).take();
        if caller_done.is_some_and(|done| team_was_late(ended.saturating_duration_since(done))) {
            let until = nanos_since_epoch(ended + BACKOFF);
            BACKOFF_UNTIL.store(until, Ordering::Relaxed);
        }
        if let Some(payload) = lock(&shared.panic).take() {
            resume_unwind(payload);
        }
        true
    }
}

/// Off Linux there is no OpenMP path (torch's macOS wheels use LLVM's libomp,
/// untested here): every step runs on the pool.
#[cfg(not(target_os = "linux"))]
mod openmp {
    pub(super) fn run(
        _team: usize,
        _threads: usize,
        _chunks: usize,
        _task: &(dyn Fn(usize) + Sync),
    ) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_os = "linux")]
    use std::time::Duration;

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

    #[cfg(target_os = "linux")]
    #[test]
    fn a_team_is_late_only_past_a_scheduler_scale_wait() {
        // A barrier after balanced chunks, or a member waking: tens of microseconds.
        assert!(!openmp::team_was_late(Duration::from_micros(60)));
        // A member whose core another process held for a scheduler slice.
        assert!(openmp::team_was_late(Duration::from_millis(8)));
        assert!(openmp::LATE_TEAM < openmp::BACKOFF);
    }

    #[test]
    fn thread_counts_are_checked_against_the_cap() {
        let max = max_threads();
        assert!(max >= MIN_MAX_THREADS);
        assert!(check_threads(0).is_err());
        assert_eq!(check_threads(1), Ok(1));
        assert_eq!(check_threads(max), Ok(max));
        let err = check_threads(max + 1).unwrap_err();
        assert!(err.contains(&format!("at most {max}")), "{err}");
        assert!(check_threads(usize::MAX).is_err());
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
    fn every_chunk_runs_once_on_any_thread() {
        let lens = vec![CHUNK_ELEMENTS / 2; 64];
        let plan = ChunkPlan::for_lens(&lens);
        let runs: Vec<AtomicUsize> = (0..plan.num_chunks())
            .map(|_| AtomicUsize::new(0))
            .collect();
        let firsts = plan.run(|chunk| {
            let index = chunk[0].tensor / 2;
            runs[index].fetch_add(1, Ordering::SeqCst);
            index
        });
        assert_eq!(firsts, (0..32).collect::<Vec<_>>());
        assert!(runs.iter().all(|count| count.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_pool_survives() {
        let lens = vec![CHUNK_ELEMENTS; 16];
        let plan = ChunkPlan::for_lens(&lens);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            plan.run(|chunk| {
                if chunk[0].tensor == 5 {
                    panic!("chunk five");
                }
                chunk[0].tensor
            })
        }));
        let payload = caught.expect_err("the panic propagates");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"chunk five"));
        assert_eq!(
            plan.run(|chunk| chunk[0].tensor),
            (0..16).collect::<Vec<_>>()
        );
    }

    #[test]
    fn empty_plan_runs_nothing() {
        let plan = ChunkPlan::for_lens(&[0, 0]);
        assert_eq!(plan.num_chunks(), 0);
        assert!(plan.run(|_| 1).is_empty());
    }
}

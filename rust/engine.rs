//! The multi-tensor engine: a parameter group as raw buffers, checked once,
//! stepped in chunks across all of its tensors.
//!
//! A [`Group`] lists, for every tensor, the addresses of its parameter, its
//! gradient, its state buffers and its step counter. Building one is the
//! single `unsafe` promise the Python glue makes (the addresses are live
//! tensors of the stated dtype and length); the constructor then checks
//! everything it can check for itself (alignment, no written buffer overlaps
//! another buffer), so kernels can take ordinary slices. Chunks hand out
//! disjoint element ranges, so the slices of concurrent chunks never overlap.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use crate::parallel::{ChunkPlan, Segment};

/// Most state buffers any optimizer keeps per parameter (RMSprop: three).
pub const MAX_STATES: usize = 3;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }
}

/// A Rust type a buffer can be viewed as.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
}

/// A 0-d step counter tensor (torch keeps `state["step"]` as float32, or
/// float64 when the default dtype is float64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepCounter {
    pub addr: usize,
    pub dtype: DType,
}

impl StepCounter {
    fn read(self) -> f64 {
        match self.dtype {
            // SAFETY: `Group::new`'s contract: a live 0-d tensor of this dtype.
            DType::F32 => f64::from(unsafe { *(self.addr as *const f32) }),
            // SAFETY: as above.
            DType::F64 => unsafe { *(self.addr as *const f64) },
        }
    }

    fn add_one(self) -> f64 {
        match self.dtype {
            DType::F32 => {
                let counter = self.addr as *mut f32;
                // SAFETY: `Group::new`'s contract: a live 0-d tensor of this
                // dtype that nothing else touches while the group steps.
                unsafe { *counter += 1.0 };
                self.read()
            }
            DType::F64 => {
                let counter = self.addr as *mut f64;
                // SAFETY: as above.
                unsafe { *counter += 1.0 };
                self.read()
            }
        }
    }
}

/// Addresses of one parameter's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorBuffers {
    pub dtype: DType,
    pub len: usize,
    pub param: usize,
    /// `None` for a group without separate gradient buffers (gradient
    /// clipping writes the gradients themselves, as the `param` buffer).
    pub grad: Option<usize>,
    pub states: [usize; MAX_STATES],
    pub num_states: usize,
    pub step: Option<StepCounter>,
}

impl TensorBuffers {
    fn states(&self) -> &[usize] {
        &self.states[..self.num_states]
    }
}

/// Why a set of buffers was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineError {
    Misaligned { tensor: usize, what: &'static str },
    Null { tensor: usize, what: &'static str },
    Overlap { what: String },
    TooManyStates { tensor: usize, states: usize },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Misaligned { tensor, what } => {
                write!(
                    f,
                    "{what} of parameter {tensor} is not aligned to its dtype"
                )
            }
            EngineError::Null { tensor, what } => {
                write!(f, "{what} of parameter {tensor} has no data")
            }
            EngineError::Overlap { what } => write!(f, "buffers share memory: {what}"),
            EngineError::TooManyStates { tensor, states } => write!(
                f,
                "parameter {tensor} has {states} state buffers (at most {MAX_STATES})"
            ),
        }
    }
}

impl std::error::Error for EngineError {}

/// One parameter group, ready to step.
///
/// The lifetime ties the group to whatever keeps its buffers alive (the
/// borrowed slices in Rust tests, the held tensors in the Python glue).
pub struct Group<'a> {
    tensors: Vec<TensorBuffers>,
    plan: ChunkPlan,
    _buffers: PhantomData<&'a mut [u8]>,
}

// SAFETY: a Group only carries addresses of buffers the constructor's caller
// promised are valid and unaliased for 'a; chunks touch disjoint ranges.
unsafe impl Send for Group<'_> {}
// SAFETY: as above; shared access only creates slices over disjoint chunk ranges.
unsafe impl Sync for Group<'_> {}

impl<'a> Group<'a> {
    /// # Safety
    /// For the lifetime `'a`, every address in `tensors` must point to `len`
    /// live elements of `dtype` (the step counter to one element of its dtype)
    /// that nothing else reads or writes while the group is stepped. Overlaps
    /// *between* these buffers are detected and refused here.
    pub unsafe fn new(tensors: Vec<TensorBuffers>) -> Result<Group<'a>, EngineError> {
        check_buffers(&tensors)?;
        // SAFETY: the caller's promise, plus the check just made.
        Ok(unsafe { Group::new_prechecked(tensors) })
    }

    /// Like [`Group::new`] for buffers that already passed [`check_buffers`]
    /// (or [`WrittenSet`] for the parts that changed since).
    ///
    /// # Safety
    /// As [`Group::new`], and the buffers must not overlap as `check_buffers`
    /// defines it.
    pub unsafe fn new_prechecked(tensors: Vec<TensorBuffers>) -> Group<'a> {
        let lens: Vec<usize> = tensors.iter().map(|t| t.len).collect();
        Group {
            plan: ChunkPlan::for_lens(&lens),
            tensors,
            _buffers: PhantomData,
        }
    }

    pub fn tensors(&self) -> &[TensorBuffers] {
        &self.tensors
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn total_elements(&self) -> usize {
        self.plan.total_elements()
    }

    /// Adds one to every step counter (in the counter's own dtype, as torch's
    /// `step_t += 1`) and returns the new counts as float64, what torch's
    /// `_get_value(step)` yields, in tensor order.
    pub fn increment_steps(&mut self) -> Vec<f64> {
        self.tensors
            .iter()
            .map(|t| t.step.map_or(0.0, |counter| counter.add_one()))
            .collect()
    }

    /// Current step counts without changing them.
    pub fn steps(&self) -> Vec<f64> {
        self.tensors
            .iter()
            .map(|t| t.step.map_or(0.0, |counter| counter.read()))
            .collect()
    }

    /// Runs `work` over every element range of the group, chunk by chunk, on
    /// the pool when the group is big enough. Returns per-chunk results in
    /// chunk order (the same order for any thread count).
    pub fn for_each_chunk<R, F>(&self, work: F) -> Vec<R>
    where
        R: Send,
        F: Fn(&mut dyn Iterator<Item = ChunkSlices<'_>>) -> R + Sync,
    {
        self.plan.run(|segments: &[Segment]| {
            let mut views = segments.iter().map(|seg| ChunkSlices {
                tensor: &self.tensors[seg.tensor],
                index: seg.tensor,
                range: seg.range.clone(),
            });
            work(&mut views)
        })
    }
}

/// One segment of one tensor inside a chunk; turns into typed slices once.
pub struct ChunkSlices<'g> {
    tensor: &'g TensorBuffers,
    index: usize,
    range: Range<usize>,
}

/// Typed slices over one segment: the parameter and states are writable, the
/// gradient read-only. Unused state slots (and a missing gradient) are empty.
pub struct Slices<'s, T> {
    pub param: &'s mut [T],
    pub grad: &'s [T],
    pub states: [&'s mut [T]; MAX_STATES],
}

impl<'g> ChunkSlices<'g> {
    pub fn dtype(&self) -> DType {
        self.tensor.dtype
    }

    /// Index of the tensor in its group.
    pub fn tensor_index(&self) -> usize {
        self.index
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The segment's buffers as slices of `T`.
    ///
    /// # Panics
    /// If `T` is not the tensor's dtype.
    pub fn slices<T: Element>(self) -> Slices<'g, T> {
        assert_eq!(
            T::DTYPE,
            self.tensor.dtype,
            "buffer viewed with the wrong dtype"
        );
        let range = self.range;
        let empty = range.is_empty();
        let at = |addr: usize| {
            if empty {
                // A zero-size tensor's address may be null: never touched.
                return <&mut [T]>::default();
            }
            // SAFETY: `Group::new`'s contract makes `addr` valid for `len`
            // elements of T (dtype checked above) and `range` lies inside 0..len
            // (it comes from the chunk plan). The chunk plan gives each element
            // range to exactly one segment, `Group::new` refused overlapping
            // buffers, and `self` is consumed, so no other slice of these
            // elements exists while the returned ones live.
            unsafe {
                std::slice::from_raw_parts_mut((addr as *mut T).add(range.start), range.len())
            }
        };
        let mut states: [&'g mut [T]; MAX_STATES] = Default::default();
        for (slot, &addr) in states.iter_mut().zip(self.tensor.states()) {
            *slot = at(addr);
        }
        let grad: &'g [T] = match self.tensor.grad {
            None => &[],
            Some(addr) => at(addr),
        };
        Slices {
            param: at(self.tensor.param),
            grad,
            states,
        }
    }
}

/// Memory intervals of a group's buffers, for the overlap check.
struct Interval {
    start: usize,
    end: usize,
    written: bool,
    tensor: usize,
    what: &'static str,
}

const STATE_NAMES: [&str; MAX_STATES] = ["state 0", "state 1", "state 2"];

/// Checks every buffer of a group: non-null, aligned, and no buffer that is
/// written (parameter, state) shares memory with any other buffer. Gradients
/// may share memory with each other: they are only read.
pub fn check_buffers(tensors: &[TensorBuffers]) -> Result<(), EngineError> {
    let mut intervals = Vec::with_capacity(tensors.len() * (2 + MAX_STATES));
    for (index, t) in tensors.iter().enumerate() {
        if t.num_states > MAX_STATES {
            return Err(EngineError::TooManyStates {
                tensor: index,
                states: t.num_states,
            });
        }
        let bytes = t.len * t.dtype.size();
        let mut add = |addr: usize, written: bool, what: &'static str| {
            if bytes == 0 {
                return Ok(()); // a zero-size tensor: no memory to check or touch
            }
            if addr == 0 {
                return Err(EngineError::Null {
                    tensor: index,
                    what,
                });
            }
            if !addr.is_multiple_of(t.dtype.size()) {
                return Err(EngineError::Misaligned {
                    tensor: index,
                    what,
                });
            }
            intervals.push(Interval {
                start: addr,
                end: addr + bytes,
                written,
                tensor: index,
                what,
            });
            Ok(())
        };
        add(t.param, true, "param")?;
        if let Some(grad) = t.grad {
            add(grad, false, "grad")?;
        }
        for (k, &addr) in t.states().iter().enumerate() {
            add(addr, true, STATE_NAMES[k])?;
        }
        if let Some(step) = t.step {
            if step.addr == 0 || step.addr % step.dtype.size() != 0 {
                return Err(EngineError::Misaligned {
                    tensor: index,
                    what: "step",
                });
            }
        }
    }
    // Sorted by start, a buffer can only overlap buffers that start before the
    // furthest end seen so far; any overlap involving a written buffer is refused
    // (two gradients may share memory: both are only read).
    intervals.sort_unstable_by_key(|i| i.start);
    let mut reach: Option<&Interval> = None; // the interval reaching furthest
    let mut written_reach: Option<&Interval> = None;
    for current in &intervals {
        for earlier in [reach, written_reach].into_iter().flatten() {
            if earlier.end > current.start && (earlier.written || current.written) {
                return Err(EngineError::Overlap {
                    what: format!(
                        "{} of parameter {} and {} of parameter {}",
                        earlier.what, earlier.tensor, current.what, current.tensor
                    ),
                });
            }
        }
        if reach.is_none_or(|r| current.end > r.end) {
            reach = Some(current);
        }
        if current.written && written_reach.is_none_or(|r| current.end > r.end) {
            written_reach = Some(current);
        }
    }
    Ok(())
}

/// Whether a tensor of this shape and these strides covers exactly
/// `numel` consecutive elements (each once), in some dimension order.
pub fn is_dense(shape: &[usize], strides: &[isize]) -> bool {
    let mut dims: Vec<(usize, isize)> = shape
        .iter()
        .copied()
        .zip(strides.iter().copied())
        .filter(|&(size, _)| size != 1)
        .collect();
    if dims.iter().any(|&(size, _)| size == 0) {
        return true; // empty: nothing to step
    }
    dims.sort_by_key(|&(_, stride)| stride);
    let mut expected: isize = 1;
    for (size, stride) in dims {
        if stride != expected {
            return false;
        }
        expected *= size as isize;
    }
    true
}

/// The written buffers (parameters and states) of a group, sorted, so a
/// gradient that changes every step can be checked against them in
/// logarithmic time instead of re-checking the whole group.
#[derive(Clone, Debug, Default)]
pub struct WrittenSet {
    /// Disjoint `[start, end)` byte ranges, sorted by start.
    runs: Vec<(usize, usize)>,
}

impl WrittenSet {
    /// Collects the written buffers of `tensors`; refuses them as
    /// [`check_buffers`] would (ignoring gradients).
    pub fn new(tensors: &[TensorBuffers]) -> Result<WrittenSet, EngineError> {
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(tensors.len() * (1 + MAX_STATES));
        for t in tensors {
            let bytes = t.len * t.dtype.size();
            if bytes == 0 {
                continue;
            }
            runs.push((t.param, t.param + bytes));
            for &addr in t.states() {
                runs.push((addr, addr + bytes));
            }
        }
        runs.sort_unstable();
        if let Some(pair) = runs.windows(2).find(|w| w[0].1 > w[1].0) {
            return Err(EngineError::Overlap {
                what: format!("written buffers at {:#x} and {:#x}", pair[0].0, pair[1].0),
            });
        }
        if let Some(tensor) = tensors
            .iter()
            .position(|t| t.len > 0 && (t.param == 0 || t.states().contains(&0)))
        {
            return Err(EngineError::Null {
                tensor,
                what: "param or state",
            });
        }
        Ok(WrittenSet { runs })
    }

    /// Whether the byte range `[start, end)` touches any written buffer.
    pub fn overlaps(&self, start: usize, end: usize) -> bool {
        if start >= end {
            return false;
        }
        // The last run starting before `end` is the only candidate: runs are
        // disjoint and sorted, so earlier ones end before it starts.
        let after = self.runs.partition_point(|&(run_start, _)| run_start < end);
        after > 0 && self.runs[after - 1].1 > start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffers(param: &mut [f32], grad: &[f32], states: &mut [&mut [f32]]) -> TensorBuffers {
        let mut addrs = [0; MAX_STATES];
        for (slot, s) in addrs.iter_mut().zip(states.iter_mut()) {
            *slot = s.as_mut_ptr() as usize;
        }
        TensorBuffers {
            dtype: DType::F32,
            len: param.len(),
            param: param.as_mut_ptr() as usize,
            grad: Some(grad.as_ptr() as usize),
            states: addrs,
            num_states: states.len(),
            step: None,
        }
    }

    #[test]
    fn overlapping_written_buffers_are_refused() {
        let mut a = vec![0f32; 64];
        let g = vec![0f32; 64];
        let base = a.as_mut_ptr() as usize;
        let mut t = buffers(&mut a, &g, &mut []);
        t.len = 32;
        let mut shifted = t;
        shifted.param = base + 16 * 4; // overlaps the first param's second half
        shifted.grad = t.grad;
        // SAFETY: the buffers are live; the constructor must refuse the overlap.
        let result = unsafe { Group::new(vec![t, shifted]) };
        assert!(matches!(result, Err(EngineError::Overlap { .. })));
    }

    #[test]
    fn grad_aliasing_param_is_refused_but_shared_grads_are_fine() {
        let mut p = vec![0f32; 64];
        let mut q = vec![0f32; 64];
        let g = vec![0f32; 64];
        let mut aliased = buffers(&mut p, &g, &mut []);
        aliased.grad = Some(aliased.param);
        // SAFETY: live buffers; the overlap must be refused.
        assert!(unsafe { Group::new(vec![aliased]) }.is_err());
        let first = buffers(&mut p, &g, &mut []);
        let second = buffers(&mut q, &g, &mut []);
        // SAFETY: live, distinct written buffers; the shared grad is only read.
        assert!(unsafe { Group::new(vec![first, second]) }.is_ok());
    }

    #[test]
    fn dense_layouts() {
        assert!(is_dense(&[2, 3], &[3, 1]));
        assert!(is_dense(&[2, 3], &[1, 2])); // transposed
        assert!(is_dense(&[8, 3, 4, 4], &[48, 1, 12, 3])); // channels-last
        assert!(is_dense(&[1, 5], &[99, 1])); // size-1 dims do not matter
        assert!(!is_dense(&[2, 3], &[4, 1])); // gap after each row
        assert!(!is_dense(&[2, 3], &[0, 1])); // expanded: overlap
        assert!(is_dense(&[0, 3], &[3, 1]));
    }

    #[test]
    fn written_set_finds_overlaps() {
        let mut p = vec![0f32; 64];
        let mut s = vec![0f32; 64];
        let g = vec![0f32; 64];
        let t = buffers(&mut p, &g, &mut [&mut s]);
        let set = WrittenSet::new(&[t]).unwrap();
        let start = t.param;
        assert!(set.overlaps(start, start + 4));
        assert!(set.overlaps(start + 252, start + 300));
        assert!(set.overlaps(t.states[0] + 8, t.states[0] + 12));
        let grad = t.grad.unwrap();
        assert!(!set.overlaps(grad, grad + 256));
        assert!(!set.overlaps(start, start));
        let mut twice = t;
        twice.states[0] = t.param;
        assert!(WrittenSet::new(&[twice]).is_err());
        let mut empty = buffers(&mut [], &[], &mut []);
        empty.param = 0; // a zero-size tensor: no memory, null allowed
        assert!(WrittenSet::new(&[t, empty]).is_ok());
        empty.len = 1;
        assert!(WrittenSet::new(&[t, empty]).is_err());
    }

    #[test]
    fn misaligned_and_null_buffers_are_refused() {
        let mut p = vec![0f32; 8];
        let g = vec![0f32; 8];
        let mut t = buffers(&mut p, &g, &mut []);
        t.grad = t.grad.map(|g| g + 1);
        // SAFETY: the constructor must refuse before touching memory.
        let misaligned = unsafe { Group::new(vec![t]) };
        assert!(matches!(misaligned, Err(EngineError::Misaligned { .. })));
        t.grad = None; // allowed: a group without gradient buffers
        t.param = 0;
        // SAFETY: as above.
        let null = unsafe { Group::new(vec![t]) };
        assert!(matches!(null, Err(EngineError::Null { .. })));
    }

    #[test]
    fn zero_size_buffers_may_be_null_and_are_never_touched() {
        let mut p = vec![1f32; 8];
        let g = vec![1f32; 8];
        let mut step = 0f32;
        let full = buffers(&mut p, &g, &mut []);
        let mut empty = buffers(&mut [], &[], &mut []);
        empty.param = 0; // torch's data pointer of a zero-size tensor
        empty.grad = Some(0);
        empty.step = Some(StepCounter {
            addr: &mut step as *mut f32 as usize,
            dtype: DType::F32,
        });
        // SAFETY: live buffers; the empty one has no memory to touch.
        let mut group = unsafe { Group::new(vec![full, empty]) }.unwrap();
        assert_eq!(group.increment_steps(), vec![0.0, 1.0]);
        let seen: Vec<usize> = group
            .for_each_chunk(|segments| segments.map(|s| s.slices::<f32>().param.len()).sum())
            .into_iter()
            .collect();
        assert_eq!(seen.iter().sum::<usize>(), 8);
    }

    #[test]
    fn steps_increment_in_their_own_dtype() {
        let mut p = vec![0f32; 8];
        let g = vec![0f32; 8];
        let mut s32 = 16_777_216f32; // 2^24: +1 rounds back in float32
        let mut s64 = 3f64;
        let mut a = buffers(&mut p, &g, &mut []);
        a.step = Some(StepCounter {
            addr: &mut s32 as *mut f32 as usize,
            dtype: DType::F32,
        });
        let mut q = vec![0f32; 8];
        let mut b = buffers(&mut q, &g, &mut []);
        b.step = Some(StepCounter {
            addr: &mut s64 as *mut f64 as usize,
            dtype: DType::F64,
        });
        // SAFETY: all buffers are live locals, unaliased.
        let mut group = unsafe { Group::new(vec![a, b]) }.unwrap();
        assert_eq!(group.increment_steps(), vec![16_777_216.0, 4.0]);
        assert_eq!(group.steps(), vec![16_777_216.0, 4.0]);
    }
}

//! A parameter's buffers by role (param, grad, master copy, state k) and
//! per-tensor scalar state, each buffer in its own storage format; and the
//! checks that make raw addresses safe to turn into slices.

use std::fmt;

use super::format::{Compute, Format};

/// Most state buffers any optimizer keeps per parameter (Adan: four).
pub const MAX_STATES: usize = 4;

/// State buffer slots of a tensor: the kernel's, and one more for the
/// engine's exponential moving average of the parameter (`ema_decay`), kept
/// last.
pub const STATE_SLOTS: usize = MAX_STATES + 1;

/// Most per-tensor scalar slots (ASGD: `step`, `eta`, `mu`).
pub const MAX_SCALARS: usize = 3;

/// One buffer: where it starts and how its elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: usize,
    pub format: Format,
}

impl Buffer {
    pub const NONE: Buffer = Buffer {
        addr: 0,
        format: Format::F32,
    };

    pub fn new(addr: usize, format: Format) -> Buffer {
        Buffer { addr, format }
    }

    /// Bytes of `len` elements (codes, padding and scales, for blockwise
    /// formats: see [`super::quant::packed_len`]).
    pub fn bytes(&self, len: usize) -> usize {
        if self.format.is_quantized() {
            super::quant::packed_len(len)
        } else {
            len * self.format.size()
        }
    }
}

/// A 0-d tensor of per-tensor scalar state (`step`, NAdam's `mu_product`):
/// torch keeps them as float32, or float64 under a float64 default dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalarSlot {
    pub addr: usize,
    pub format: Format,
}

impl ScalarSlot {
    pub const NONE: ScalarSlot = ScalarSlot {
        addr: 0,
        format: Format::F64,
    };

    /// The value as float64 (torch's `_get_value`, `.item()`).
    pub fn get(self) -> f64 {
        match self.format {
            // SAFETY: `Group::new`'s contract: a live 0-d tensor of this format.
            Format::F32 => f64::from(unsafe { *(self.addr as *const f32) }),
            // SAFETY: as above.
            _ => unsafe { *(self.addr as *const f64) },
        }
    }

    /// Stores `value` rounded to the slot's dtype (an in-place op on the tensor).
    pub fn set(self, value: f64) {
        match self.format {
            // SAFETY: `Group::new`'s contract: a live 0-d tensor of this format
            // that nothing else touches while the group steps.
            Format::F32 => unsafe { *(self.addr as *mut f32) = value as f32 },
            // SAFETY: as above.
            _ => unsafe { *(self.addr as *mut f64) = value },
        }
    }
}

/// Whether a plan's gradients are read (optimizer steps) or written in place
/// (clipping's scale and clamp passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradAccess {
    Read,
    Write,
}

/// Addresses of one tensor's buffers, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorBuffers {
    pub len: usize,
    /// `None` in gradient-only plans (clipping).
    pub param: Option<Buffer>,
    pub grad: Option<Buffer>,
    pub grad_access: GradAccess,
    /// A float32 master copy of a low-precision parameter (room for it: the
    /// low-precision issue fills it in; plans refuse it until then).
    pub master: Option<Buffer>,
    pub states: [Buffer; STATE_SLOTS],
    pub num_states: usize,
    pub scalars: [ScalarSlot; MAX_SCALARS],
    pub num_scalars: usize,
    /// The tensor's stream of stochastic-rounding random numbers (its index in
    /// its param group: stable across steps, plans and checkpoints).
    pub stream: u64,
}

impl TensorBuffers {
    /// A parameter with its gradient and no state yet.
    pub fn param(len: usize, param: Buffer, grad: Option<Buffer>) -> TensorBuffers {
        TensorBuffers {
            len,
            param: Some(param),
            grad,
            grad_access: GradAccess::Read,
            master: None,
            states: [Buffer::NONE; STATE_SLOTS],
            num_states: 0,
            scalars: [ScalarSlot::NONE; MAX_SCALARS],
            num_scalars: 0,
            stream: 0,
        }
    }

    /// A gradient alone (clipping), written in place.
    pub fn grad_only(len: usize, grad: Buffer) -> TensorBuffers {
        TensorBuffers {
            param: None,
            grad: Some(grad),
            grad_access: GradAccess::Write,
            ..TensorBuffers::param(len, grad, None)
        }
    }

    /// With `master`, the last state buffer is the parameter's float32 master
    /// copy: moved to the master role (plans list it after the states).
    pub fn with_master_last(mut self, master: bool) -> TensorBuffers {
        if master && self.num_states > 0 {
            self.num_states -= 1;
            self.master = Some(self.states[self.num_states]);
            self.states[self.num_states] = Buffer::NONE;
        }
        self
    }

    pub fn with_stream(mut self, stream: u64) -> TensorBuffers {
        self.stream = stream;
        self
    }

    pub fn with_states(mut self, states: &[Buffer]) -> TensorBuffers {
        self.states[..states.len()].copy_from_slice(states);
        self.num_states = states.len();
        self
    }

    pub fn with_scalars(mut self, scalars: &[ScalarSlot]) -> TensorBuffers {
        self.scalars[..scalars.len()].copy_from_slice(scalars);
        self.num_scalars = scalars.len();
        self
    }

    pub fn states(&self) -> &[Buffer] {
        &self.states[..self.num_states]
    }

    pub fn scalars(&self) -> &[ScalarSlot] {
        &self.scalars[..self.num_scalars]
    }

    /// The buffer that defines the tensor's arithmetic: the param (its
    /// master copy when it has one), else the gradient.
    pub fn primary(&self) -> Buffer {
        self.master
            .or(self.param)
            .or(self.grad)
            .unwrap_or(Buffer::NONE)
    }

    pub fn compute(&self) -> Compute {
        self.primary().format.compute()
    }

    /// Every buffer with whether the step writes it and what to call it.
    fn roles(&self) -> impl Iterator<Item = (Buffer, bool, &'static str)> + '_ {
        let param = self.param.map(|b| (b, true, "param"));
        let grad = self
            .grad
            .map(|b| (b, self.grad_access == GradAccess::Write, "grad"));
        let master = self.master.map(|b| (b, true, "master copy"));
        let states = self
            .states()
            .iter()
            .zip(STATE_NAMES)
            .map(|(&b, name)| (b, true, name));
        param.into_iter().chain(grad).chain(master).chain(states)
    }
}

const STATE_NAMES: [&str; STATE_SLOTS] = ["state 0", "state 1", "state 2", "state 3", "state 4"];

/// Why a set of buffers was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineError {
    Misaligned {
        tensor: usize,
        what: &'static str,
    },
    Null {
        tensor: usize,
        what: &'static str,
    },
    Overlap {
        what: String,
    },
    TooMany {
        tensor: usize,
        what: &'static str,
    },
    /// A format this build cannot load or store (yet), or a combination of
    /// formats no kernel is compiled for.
    Unsupported {
        what: String,
    },
    /// The buffers do not match what the kernel needs (a bug in the glue).
    Mismatch {
        what: String,
    },
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
            EngineError::TooMany { tensor, what } => {
                write!(f, "parameter {tensor} has too many {what}")
            }
            EngineError::Unsupported { what } | EngineError::Mismatch { what } => f.write_str(what),
        }
    }
}

impl std::error::Error for EngineError {}

/// Memory intervals of a group's buffers, for the overlap check.
struct Interval {
    start: usize,
    end: usize,
    written: bool,
    tensor: usize,
    what: &'static str,
}

/// Checks every buffer of a group: non-null, aligned (blockwise formats to
/// their float32 scales), 8-bit blockwise formats only for states, and no buffer that is written shares
/// memory with any other buffer. Read-only buffers (gradients of a step) may
/// share memory with each other.
pub fn check_buffers(tensors: &[TensorBuffers]) -> Result<(), EngineError> {
    let mut intervals = Vec::with_capacity(tensors.len() * (2 + STATE_SLOTS));
    for (index, t) in tensors.iter().enumerate() {
        if t.num_states > STATE_SLOTS {
            return Err(EngineError::TooMany {
                tensor: index,
                what: "state buffers",
            });
        }
        if t.num_scalars > MAX_SCALARS {
            return Err(EngineError::TooMany {
                tensor: index,
                what: "scalar state slots",
            });
        }
        for (buffer, written, what) in t.roles() {
            if buffer.format.is_quantized() && !what.starts_with("state") {
                return Err(EngineError::Unsupported {
                    what: format!(
                        "{what} of parameter {index}: 8-bit blockwise storage is for states"
                    ),
                });
            }
            let bytes = buffer.bytes(t.len);
            if bytes == 0 {
                continue; // a zero-size tensor: no memory to check or touch
            }
            if buffer.addr == 0 {
                return Err(EngineError::Null {
                    tensor: index,
                    what,
                });
            }
            if !buffer.addr.is_multiple_of(buffer.format.align()) {
                return Err(EngineError::Misaligned {
                    tensor: index,
                    what,
                });
            }
            intervals.push(Interval {
                start: buffer.addr,
                end: buffer.addr + bytes,
                written,
                tensor: index,
                what,
            });
        }
        for slot in t.scalars() {
            if slot.addr == 0 || !slot.addr.is_multiple_of(slot.format.size()) {
                return Err(EngineError::Misaligned {
                    tensor: index,
                    what: "scalar state",
                });
            }
        }
    }
    // Sorted by start, a buffer can only overlap buffers that start before the
    // furthest end seen so far; any overlap involving a written buffer is refused.
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

/// The written buffers (params, master copies, states) of a group, sorted, so
/// a gradient that changes every step can be checked against them in
/// logarithmic time instead of re-checking the whole group.
#[derive(Clone, Debug, Default)]
pub struct WrittenSet {
    /// Disjoint `[start, end)` byte ranges, sorted by start.
    runs: Vec<(usize, usize)>,
}

impl WrittenSet {
    /// Collects the written buffers of `tensors` (their gradients are left
    /// out); refuses them as [`check_buffers`] would.
    pub fn new(tensors: &[TensorBuffers]) -> Result<WrittenSet, EngineError> {
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(tensors.len() * (1 + STATE_SLOTS));
        let without_grads: Vec<TensorBuffers> = tensors
            .iter()
            .map(|t| TensorBuffers { grad: None, ..*t })
            .collect();
        check_buffers(&without_grads)?;
        for t in &without_grads {
            for (buffer, _, _) in t.roles() {
                let bytes = buffer.bytes(t.len);
                if bytes > 0 {
                    runs.push((buffer.addr, buffer.addr + bytes));
                }
            }
        }
        runs.sort_unstable();
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

    fn f32_buffer(slice: &[f32]) -> Buffer {
        Buffer::new(slice.as_ptr() as usize, Format::F32)
    }

    fn buffers(param: &mut [f32], grad: &[f32], states: &mut [&mut [f32]]) -> TensorBuffers {
        let states: Vec<Buffer> = states.iter().map(|s| f32_buffer(s)).collect();
        TensorBuffers::param(param.len(), f32_buffer(param), Some(f32_buffer(grad)))
            .with_states(&states)
    }

    #[test]
    fn overlapping_written_buffers_are_refused() {
        let mut a = vec![0f32; 64];
        let g = vec![0f32; 64];
        let base = a.as_ptr() as usize;
        let mut t = buffers(&mut a, &g, &mut []);
        t.len = 32;
        let mut shifted = t;
        shifted.param = Some(Buffer::new(base + 16 * 4, Format::F32));
        assert!(matches!(
            check_buffers(&[t, shifted]),
            Err(EngineError::Overlap { .. })
        ));
    }

    #[test]
    fn grad_aliasing_param_is_refused_but_shared_grads_are_fine() {
        let mut p = vec![0f32; 64];
        let mut q = vec![0f32; 64];
        let g = vec![0f32; 64];
        let mut aliased = buffers(&mut p, &g, &mut []);
        aliased.grad = aliased.param;
        assert!(check_buffers(&[aliased]).is_err());
        let first = buffers(&mut p, &g, &mut []);
        let second = buffers(&mut q, &g, &mut []);
        assert!(check_buffers(&[first, second]).is_ok());
        // Written gradients (clipping) may not share memory.
        let a = TensorBuffers::grad_only(64, f32_buffer(&g));
        assert!(check_buffers(&[a, a]).is_err());
    }

    #[test]
    fn formats_set_sizes_and_alignment() {
        let mut p = vec![0f32; 64];
        let mut s = vec![0u16; 64];
        let g = vec![0f32; 64];
        let state = Buffer::new(s.as_mut_ptr() as usize, Format::BF16);
        let t =
            TensorBuffers::param(64, f32_buffer(&p), Some(f32_buffer(&g))).with_states(&[state]);
        assert!(check_buffers(&[t]).is_ok());
        // A bfloat16 state over the second half of the param's bytes overlaps it.
        let inside = Buffer::new(p.as_mut_ptr() as usize + 128, Format::BF16);
        let bad = TensorBuffers::param(64, f32_buffer(&p), None).with_states(&[inside]);
        assert!(check_buffers(&[bad]).is_err());
        let odd = Buffer::new(s.as_ptr() as usize + 1, Format::BF16);
        let misaligned = TensorBuffers::param(64, f32_buffer(&p), None).with_states(&[odd]);
        assert!(matches!(
            check_buffers(&[misaligned]),
            Err(EngineError::Misaligned { .. })
        ));
        // An 8-bit state: 64 codes and one scale (68 bytes) fit in `s`'s 128
        // bytes; the scales need 4-byte alignment; a quantised param is refused.
        let q8 = Buffer::new(s.as_ptr() as usize, Format::Q8Signed);
        let blockwise = TensorBuffers::param(64, f32_buffer(&p), None).with_states(&[q8]);
        assert!(check_buffers(&[blockwise]).is_ok());
        assert_eq!(q8.bytes(64), 68);
        let odd = Buffer::new(s.as_ptr() as usize + 2, Format::Q8Unsigned);
        let misaligned = TensorBuffers::param(64, f32_buffer(&p), None).with_states(&[odd]);
        assert!(matches!(
            check_buffers(&[misaligned]),
            Err(EngineError::Misaligned { .. })
        ));
        let as_param = TensorBuffers::param(64, q8, None);
        assert!(matches!(
            check_buffers(&[as_param]),
            Err(EngineError::Unsupported { .. })
        ));
        // Codes and scales of 64 elements reach 4 bytes past 64 bytes: a param
        // starting there overlaps.
        let next = Buffer::new(s.as_ptr() as usize + 64, Format::F32);
        let tight = TensorBuffers::param(1, next, None);
        let mut with_q8 = blockwise;
        with_q8.len = 64;
        assert!(check_buffers(&[with_q8, tight]).is_err());
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
        let start = t.param.unwrap().addr;
        assert!(set.overlaps(start, start + 4));
        assert!(set.overlaps(start + 252, start + 300));
        assert!(set.overlaps(t.states[0].addr + 8, t.states[0].addr + 12));
        let grad = t.grad.unwrap().addr;
        assert!(!set.overlaps(grad, grad + 256));
        assert!(!set.overlaps(start, start));
        let mut twice = t;
        twice.states[0] = t.param.unwrap();
        assert!(WrittenSet::new(&[twice]).is_err());
        let mut empty = buffers(&mut [], &[], &mut []);
        empty.param = Some(Buffer::new(0, Format::F32)); // zero-size: null allowed
        assert!(WrittenSet::new(&[t, empty]).is_ok());
        empty.len = 1;
        assert!(WrittenSet::new(&[t, empty]).is_err());
    }

    #[test]
    fn misaligned_and_null_buffers_are_refused() {
        let mut p = vec![0f32; 8];
        let g = vec![0f32; 8];
        let mut t = buffers(&mut p, &g, &mut []);
        t.grad = t.grad.map(|g| Buffer::new(g.addr + 1, Format::F32));
        assert!(matches!(
            check_buffers(&[t]),
            Err(EngineError::Misaligned { .. })
        ));
        t.grad = None; // allowed: nothing to read
        t.param = Some(Buffer::new(0, Format::F32));
        assert!(matches!(check_buffers(&[t]), Err(EngineError::Null { .. })));
    }

    #[test]
    fn scalar_slots_round_to_their_dtype() {
        let mut s32 = 0f32;
        let mut s64 = 0f64;
        let a = ScalarSlot {
            addr: &mut s32 as *mut f32 as usize,
            format: Format::F32,
        };
        let b = ScalarSlot {
            addr: &mut s64 as *mut f64 as usize,
            format: Format::F64,
        };
        a.set(0.1);
        b.set(0.1);
        assert_eq!(a.get(), f64::from(0.1f32));
        assert_eq!(b.get(), 0.1);
    }
}

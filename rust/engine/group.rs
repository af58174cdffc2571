//! A parameter group as raw buffers, checked once, stepped in chunks across
//! all of its tensors.
//!
//! Building a [`Group`] is the single `unsafe` promise the Python glue makes
//! (the addresses are live tensors of the stated formats and length); the
//! constructor checks everything it can check for itself (alignment, no
//! written buffer overlaps another buffer), so kernels take ordinary slices.
//! Chunks hand out disjoint element ranges, so the slices of concurrent chunks
//! never overlap.

use std::marker::PhantomData;
use std::ops::Range;

use super::buffers::{check_buffers, Buffer, EngineError, TensorBuffers, MAX_STATES};
use super::format::{Format, Storage, Q8_BLOCK};
use super::quant::{self, QMap};
use crate::parallel::{ChunkPlan, Segment, CHUNK_ALIGN, CHUNK_ELEMENTS};

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
    /// For the lifetime `'a`, every buffer in `tensors` must point to `len`
    /// live elements of its format (each scalar slot to one element) that
    /// nothing else reads or writes while the group is stepped. Overlaps
    /// *between* these buffers are detected and refused here.
    pub unsafe fn new(tensors: Vec<TensorBuffers>) -> Result<Group<'a>, EngineError> {
        check_buffers(&tensors)?;
        // SAFETY: the caller's promise, plus the check just made.
        Ok(unsafe { Group::new_prechecked(tensors) })
    }

    /// Like [`Group::new`] for buffers that already passed [`check_buffers`]
    /// (or `WrittenSet` for the parts that changed since).
    ///
    /// # Safety
    /// As [`Group::new`], and the buffers must not overlap as `check_buffers`
    /// defines it.
    pub unsafe fn new_prechecked(tensors: Vec<TensorBuffers>) -> Group<'a> {
        let lens: Vec<usize> = tensors.iter().map(|t| t.len).collect();
        // Blockwise formats need chunk cuts on their block boundaries.
        let block = tensors
            .iter()
            .flat_map(|t| t.states().iter().chain(t.param.as_ref()))
            .map(|b| b.format.block())
            .max()
            .unwrap_or(1);
        let align = CHUNK_ALIGN.max(block);
        Group {
            plan: ChunkPlan::new(&lens, CHUNK_ELEMENTS.max(align), align),
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
/// gradient read-only. Unused state slots are empty.
pub struct Slices<'s, P, S, G = P> {
    pub param: &'s mut [P],
    pub grad: &'s [G],
    pub states: [&'s mut [S]; MAX_STATES],
}

/// One state buffer of a segment whose tensor keeps 8-bit states.
#[derive(Default)]
pub enum BlockState<'s> {
    #[default]
    Unused,
    /// Kept in float32.
    Plain(&'s mut [f32]),
    /// 8-bit codes of the segment's elements and the scales of its blocks.
    Quantized {
        codes: &'s mut [u8],
        scales: &'s mut [f32],
        map: &'static QMap,
    },
}

/// The slices of [`ChunkSlices::quantized_slices`].
pub struct QuantizedSlices<'s, P, G> {
    pub param: &'s mut [P],
    pub grad: &'s [G],
    pub low: &'s mut [G],
    pub states: [BlockState<'s>; MAX_STATES],
    pub ema: Option<&'s mut [P]>,
}

impl<'g> ChunkSlices<'g> {
    pub fn buffers(&self) -> &'g TensorBuffers {
        self.tensor
    }

    /// Index of the tensor in its group.
    pub fn tensor_index(&self) -> usize {
        self.index
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// `buffer`'s elements of this segment as a slice of `T`.
    ///
    /// # Panics
    /// If `T` is not the buffer's format.
    fn slice<T: Storage>(&self, buffer: Buffer) -> &'g mut [T] {
        assert_eq!(
            T::FORMAT,
            buffer.format,
            "buffer viewed in the wrong format"
        );
        let range = self.range.clone();
        if range.is_empty() {
            // A zero-size tensor's address may be null: never touched.
            return <&mut [T]>::default();
        }
        // SAFETY: `Group::new`'s contract makes `buffer.addr` valid for `len`
        // elements of its format (checked against T above) and `range` lies
        // inside 0..len (it comes from the chunk plan). The chunk plan gives
        // each element range to exactly one segment, `Group::new` refused
        // overlapping buffers, and every caller consumes `self`, so no other
        // slice of these elements exists while the returned one lives.
        unsafe {
            std::slice::from_raw_parts_mut((buffer.addr as *mut T).add(range.start), range.len())
        }
    }

    /// The segment's parameter, gradient and states, the parameter and
    /// gradient stored as `P`, the states as `S`.
    ///
    /// # Panics
    /// If a buffer is missing or stored otherwise.
    pub fn slices<P: Storage, S: Storage>(self) -> Slices<'g, P, S> {
        self.slices_and_ema(false).0
    }

    /// As [`slices`](Self::slices); with `ema`, the tensor's last state buffer
    /// is the engine's moving average of the parameter (stored as `P`, like
    /// the parameter), handed out apart from the kernel's states.
    ///
    /// # Panics
    /// If a buffer is missing or stored otherwise.
    pub fn slices_and_ema<P: Storage, S: Storage>(
        self,
        ema: bool,
    ) -> (Slices<'g, P, S>, Option<&'g mut [P]>) {
        let t = self.tensor;
        let (kernel_states, ema_buffer) = match t.states().split_last() {
            Some((last, rest)) if ema => (rest, Some(*last)),
            _ => (t.states(), None),
        };
        let mut states: [&'g mut [S]; MAX_STATES] = Default::default();
        for (slot, &buffer) in states.iter_mut().zip(kernel_states) {
            *slot = self.slice(buffer);
        }
        let ema = ema_buffer.map(|buffer| self.slice(buffer));
        let slices = Slices {
            param: self.slice(t.param.expect("a parameter buffer")),
            grad: self.slice(t.grad.expect("a gradient buffer")),
            states,
        };
        (slices, ema)
    }

    /// The slices of a parameter with a float32 master copy: the master (stored
    /// as `M`) in the parameter's place, the gradient as `G` (the parameter's
    /// low precision), the states as `S`, and the low-precision parameter apart
    /// (written from the master).
    ///
    /// # Panics
    /// If a buffer is missing or stored otherwise.
    pub fn master_slices<M: Storage, G: Storage, S: Storage>(
        self,
    ) -> (Slices<'g, M, S, G>, &'g mut [G]) {
        let t = self.tensor;
        let mut states: [&'g mut [S]; MAX_STATES] = Default::default();
        for (slot, &buffer) in states.iter_mut().zip(t.states()) {
            *slot = self.slice(buffer);
        }
        let slices = Slices {
            param: self.slice(t.master.expect("a master copy")),
            grad: self.slice(t.grad.expect("a gradient buffer")),
            states,
        };
        (slices, self.slice(t.param.expect("a parameter buffer")))
    }

    /// The slices of a tensor with 8-bit blockwise states (the segment starts
    /// on a block boundary: chunk cuts respect blocks): the value updated
    /// (the parameter stored as `P`, or with `master` its float32 master copy),
    /// the gradient as `G`, the low-precision parameter apart under `master`,
    /// each state plain (float32) or quantised, and with `ema` the moving
    /// average (the last state buffer, stored as `P`).
    ///
    /// # Panics
    /// If a buffer is missing or stored otherwise, or the segment does not
    /// start on a block boundary.
    pub fn quantized_slices<P: Storage, G: Storage>(
        self,
        ema: bool,
        master: bool,
    ) -> QuantizedSlices<'g, P, G> {
        assert!(
            self.range.start.is_multiple_of(Q8_BLOCK),
            "a segment of 8-bit states cut inside a block"
        );
        let t = self.tensor;
        let (kernel_states, ema_buffer) = match t.states().split_last() {
            Some((last, rest)) if ema => (rest, Some(*last)),
            _ => (t.states(), None),
        };
        let mut states: [BlockState<'g>; MAX_STATES] = Default::default();
        for (slot, &buffer) in states.iter_mut().zip(kernel_states) {
            *slot = match buffer.format {
                Format::Q8Signed => self.quantized(buffer, quant::signed()),
                Format::Q8Unsigned => self.quantized(buffer, quant::unsigned()),
                _ => BlockState::Plain(self.slice(buffer)),
            };
        }
        let param = t.param.expect("a parameter buffer");
        let (updated, low) = if master {
            (t.master.expect("a master copy"), self.slice(param))
        } else {
            (param, <&mut [G]>::default())
        };
        QuantizedSlices {
            param: self.slice(updated),
            grad: self.slice(t.grad.expect("a gradient buffer")),
            low,
            states,
            ema: ema_buffer.map(|buffer| self.slice(buffer)),
        }
    }

    /// A quantised state's codes and block scales over this segment.
    fn quantized(&self, buffer: Buffer, map: &'static QMap) -> BlockState<'g> {
        let range = self.range.clone();
        if range.is_empty() {
            return BlockState::Quantized {
                codes: Default::default(),
                scales: Default::default(),
                map,
            };
        }
        let len = self.tensor.len;
        let blocks = range.start / Q8_BLOCK..range.end.div_ceil(Q8_BLOCK);
        // SAFETY: `Group::new`'s contract makes `buffer.addr` valid for
        // `packed_len(len)` bytes (`Buffer::bytes`, which the overlap check
        // covered): `len` codes, then from `scales_offset(len)` (4-byte
        // aligned: `check_buffers` checked the address's alignment) one float32
        // per block. `range` lies inside 0..len and its blocks inside the
        // scales; the chunk plan gives each block to exactly one segment (cuts
        // fall on block boundaries), so these slices alias nothing else.
        unsafe {
            let codes = std::slice::from_raw_parts_mut(
                (buffer.addr as *mut u8).add(range.start),
                range.len(),
            );
            let scales = std::slice::from_raw_parts_mut(
                ((buffer.addr + quant::scales_offset(len)) as *mut f32).add(blocks.start),
                blocks.len(),
            );
            BlockState::Quantized { codes, scales, map }
        }
    }

    /// The segment's gradient, read-only.
    pub fn grad<G: Storage>(self) -> &'g [G] {
        self.slice(self.tensor.grad.expect("a gradient buffer"))
    }

    /// The segment's gradient, for writing (gradient-only plans).
    ///
    /// # Panics
    /// If the plan's gradients are not marked written (their overlap check
    /// would not have covered writes).
    pub fn grad_mut<G: Storage>(self) -> &'g mut [G] {
        assert_eq!(
            self.tensor.grad_access,
            super::buffers::GradAccess::Write,
            "gradients written through a plan that reads them"
        );
        self.slice(self.tensor.grad.expect("a gradient buffer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_size_buffers_may_be_null_and_are_never_touched() {
        let mut p = vec![1f32; 8];
        let g = [1f32; 8];
        let full = TensorBuffers::param(
            8,
            Buffer::new(p.as_mut_ptr() as usize, Format::F32),
            Some(Buffer::new(g.as_ptr() as usize, Format::F32)),
        );
        let empty = TensorBuffers::param(
            0,
            Buffer::new(0, Format::F32),
            Some(Buffer::new(0, Format::F32)),
        );
        // SAFETY: live buffers; the empty one has no memory to touch.
        let group = unsafe { Group::new(vec![full, empty]) }.unwrap();
        let seen: Vec<usize> = group
            .for_each_chunk(|segments| segments.map(|s| s.slices::<f32, f32>().param.len()).sum());
        assert_eq!(seen.iter().sum::<usize>(), 8);
    }
}

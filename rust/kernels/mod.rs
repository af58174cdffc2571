//! Python-free optimizer kernels: stateless functions over slices plus a
//! hyperparameter record, one file per optimizer family.
//!
//! Each kernel rounds where torch's CPU kernels round, as measured element by
//! element against torch 2.15: `add(alpha=)`, `lerp` and the last
//! multiply-add of `addcmul` are single fused multiply-adds (torch's vectorised
//! loops are compiled with FMA contraction), while `mul`, `div` and `addcdiv`
//! round each operation. torch's vectorised float32 `sqrt` is not always
//! correctly rounded (about 0.7% of values are off by one ulp); ours is, so
//! the last bit can differ there.
//!
//! Kernels are generic over the *storage* type of a buffer ([`Storage`]) and
//! the *compute* type its arithmetic runs in ([`Real`]). Today float32 stores
//! and computes in float32 and float64 in float64; bfloat16 storage with
//! float32 math slots in as another `Storage` impl without touching the
//! kernels.

pub mod adagrad;
pub mod adam;
pub mod adamax;
pub mod clip;
pub mod nadam;
pub mod probe;
pub mod rmsprop;
pub mod sgd;
#[cfg(test)]
pub(crate) mod testing;

use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::engine::{DType, Element, Group, Slices};
use crate::simd::{dispatch, SimdLevel, SimdTask};

/// The arithmetic type a kernel computes in.
///
/// Every operation is correctly rounded IEEE arithmetic, so a kernel gives the
/// same bits at every SIMD level and on every chunking of its input.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    /// Rounds a float64 scalar to this type (how torch turns a Python float
    /// hyperparameter into the tensor's dtype).
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `self * a + b` with a single rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
    /// `torch.maximum`: the larger value, NaN if either is NaN.
    #[inline(always)]
    fn max_propagate_nan(self, other: Self) -> Self {
        if self.is_nan() || self > other {
            self
        } else {
            other
        }
    }
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}

impl_real!(f32);
impl_real!(f64);

/// How a buffer's elements are stored, and the type they are computed in.
pub trait Storage: Copy + Send + Sync + 'static {
    type Compute: Real;
    fn load(self) -> Self::Compute;
    fn store(value: Self::Compute) -> Self;
}

macro_rules! impl_identity_storage {
    ($t:ty) => {
        impl Storage for $t {
            type Compute = $t;
            #[inline(always)]
            fn load(self) -> $t {
                self
            }
            #[inline(always)]
            fn store(value: $t) -> $t {
                value
            }
        }
    };
}

impl_identity_storage!(f32);
impl_identity_storage!(f64);

/// `torch.lerp(start, end, weight)` as torch's vectorised CPU kernel computes
/// it: `start + weight * (end - start)` for small weights and
/// `end - (1 - weight) * (end - start)` otherwise, each with one fused
/// multiply-add. The choice depends only on the scalar weight, so it is made
/// once per call ([`Lerp::new`]), not per element.
#[derive(Clone, Copy, Debug)]
pub struct Lerp<C> {
    coefficient: C,
    from_start: bool,
}

impl<C: Real> Lerp<C> {
    pub fn new(weight: f64) -> Self {
        let weight = C::from_f64(weight);
        let from_start = weight.abs() < C::from_f64(0.5);
        Lerp {
            coefficient: if from_start { weight } else { weight - C::ONE },
            from_start,
        }
    }

    #[inline(always)]
    pub fn apply(self, start: C, end: C) -> C {
        let base = if self.from_start { start } else { end };
        self.coefficient.mul_add(end - start, base)
    }
}

/// How a kernel transforms each gradient as it reads it: GradScaler's unscale
/// (`grad * inv_scale`) then clipping's `grad * clip_coef`, each rounded to the
/// gradient's dtype as torch's in-place multiplications round them. A factor
/// of 1.0 leaves the gradient exactly as it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScale {
    pub unscale: f64,
    pub clip: f64,
}

impl Default for GradScale {
    fn default() -> Self {
        GradScale {
            unscale: 1.0,
            clip: 1.0,
        }
    }
}

/// [`GradScale`] rounded to a compute type.
#[derive(Clone, Copy, Debug)]
pub struct GradScaleOf<C> {
    unscale: C,
    clip: C,
}

impl<C: Real> GradScaleOf<C> {
    pub fn new(scale: &GradScale) -> Self {
        GradScaleOf {
            unscale: C::from_f64(scale.unscale),
            clip: C::from_f64(scale.clip),
        }
    }

    #[inline(always)]
    pub fn apply(self, grad: C) -> C {
        grad * self.unscale * self.clip
    }
}

/// Per-tensor constants from per-tensor step counts. Tensors of a group
/// usually share one step count, so each distinct run of equal counts is
/// computed once (the `pow` calls behind bias corrections are not free at a
/// thousand tensors per step).
pub fn per_step<T: Copy>(steps: &[f64], mut make: impl FnMut(f64) -> T) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(steps.len());
    let mut previous: Option<(f64, T)> = None;
    for &step in steps {
        let value = match previous {
            Some((s, value)) if s == step => value,
            _ => make(step),
        };
        previous = Some((step, value));
        out.push(value);
    }
    out
}

/// An element-wise update of one tensor's segment, for one storage type.
///
/// Implementations put `#[inline(always)]` on `apply` so that the body is
/// compiled inside the SIMD-level function [`run_segments`] dispatches to.
pub trait SegmentKernel<T>: Sync {
    /// Updates elements of tensor `tensor` (its index in the group).
    fn apply(&self, tensor: usize, slices: Slices<'_, T>);
}

/// A reduction over one tensor's segment (gradient norms).
pub trait SegmentReducer<T>: Sync {
    /// Partial result for the segment, in float64.
    fn reduce(&self, tensor: usize, slices: Slices<'_, T>) -> f64;
}

struct ApplyTask<'s, 'k, T, K> {
    tensor: usize,
    slices: Slices<'s, T>,
    kernel: &'k K,
}

impl<T, K: SegmentKernel<T>> SimdTask for ApplyTask<'_, '_, T, K> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        self.kernel.apply(self.tensor, self.slices)
    }
}

struct ReduceTask<'s, 'k, T, K> {
    tensor: usize,
    slices: Slices<'s, T>,
    kernel: &'k K,
}

impl<T, K: SegmentReducer<T>> SimdTask for ReduceTask<'_, '_, T, K> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        self.kernel.reduce(self.tensor, self.slices)
    }
}

/// Runs an element-wise kernel over every segment of a group: `f32` tensors
/// through `k32`, `f64` tensors through `k64`, at SIMD level `level`.
pub fn run_segments<K32, K64>(group: &Group<'_>, level: SimdLevel, k32: &K32, k64: &K64)
where
    K32: SegmentKernel<f32>,
    K64: SegmentKernel<f64>,
{
    group.for_each_chunk(|segments| {
        for segment in segments {
            let tensor = segment.tensor_index();
            match segment.dtype() {
                DType::F32 => dispatch(
                    level,
                    ApplyTask {
                        tensor,
                        slices: segment.slices(),
                        kernel: k32,
                    },
                ),
                DType::F64 => dispatch(
                    level,
                    ApplyTask {
                        tensor,
                        slices: segment.slices(),
                        kernel: k64,
                    },
                ),
            }
        }
    });
}

/// Runs a reduction over every segment of a group and combines the partial
/// results per tensor with `combine`, in chunk order: the same order for any
/// thread count, so the result is deterministic.
pub fn reduce_segments<K32, K64>(
    group: &Group<'_>,
    level: SimdLevel,
    k32: &K32,
    k64: &K64,
    identity: f64,
    combine: impl Fn(f64, f64) -> f64,
) -> Vec<f64>
where
    K32: SegmentReducer<f32>,
    K64: SegmentReducer<f64>,
{
    let partials: Vec<Vec<(usize, f64)>> = group.for_each_chunk(|segments| {
        segments
            .map(|segment| {
                let tensor = segment.tensor_index();
                let partial = match segment.dtype() {
                    DType::F32 => dispatch(
                        level,
                        ReduceTask {
                            tensor,
                            slices: segment.slices(),
                            kernel: k32,
                        },
                    ),
                    DType::F64 => dispatch(
                        level,
                        ReduceTask {
                            tensor,
                            slices: segment.slices(),
                            kernel: k64,
                        },
                    ),
                };
                (tensor, partial)
            })
            .collect()
    });
    let mut totals = vec![identity; group.len()];
    for (tensor, partial) in partials.into_iter().flatten() {
        totals[tensor] = combine(totals[tensor], partial);
    }
    totals
}

/// How far ahead of the current block the streaming passes (norms, the
/// finiteness scan, in-place scaling) prefetch. A core reading one stream
/// with nothing but the hardware prefetchers keeps too few cache-line fills in
/// flight: measured on this project's 2-core Xeon, 18 GB/s for a plain read
/// against 31-35 GB/s with a prefetch 4-16 KiB ahead. (The update kernels read
/// and write several streams at once and already run near the streaming floor
/// without it.)
const PREFETCH_BYTES: usize = 8 * 1024;

/// Hints every cache line of `block`, `PREFETCH_BYTES` further on, into cache.
#[inline(always)]
pub(crate) fn prefetch_ahead<B>(block: &B) {
    let start = (block as *const B).cast::<u8>();
    for offset in (0..std::mem::size_of::<B>()).step_by(64) {
        // `wrapping_add`: the address may lie past the slice (see `prefetch`).
        crate::simd::prefetch(start.wrapping_add(PREFETCH_BYTES + offset));
    }
}

/// How many blocks each of the two streams of `two_streams` gets: half of
/// those whose prefetch target still lies inside the slice (prefetching past
/// the end would fetch lines nobody reads, a whole tensor's worth for small
/// ones).
#[inline(always)]
fn stream_len<B>(blocks: usize) -> usize {
    let ahead = PREFETCH_BYTES.div_ceil(std::mem::size_of::<B>().max(1));
    blocks.saturating_sub(ahead) / 2
}

/// Splits `blocks` into two equal streams to read side by side, prefetching
/// (`first[i]` with `second[i]`), and the rest to read plainly. Two streams per
/// core keep more line fills in flight than one, even with prefetching: on this
/// project's 2-core Xeon a read-only pass over 128 MiB went from 33-35 GB/s
/// (prefetch alone) to 42-45 GB/s.
#[inline(always)]
pub(crate) fn two_streams<B>(blocks: &[B]) -> (&[B], &[B], &[B]) {
    let half = stream_len::<B>(blocks.len());
    let (first, rest) = blocks.split_at(half);
    let (second, rest) = rest.split_at(half);
    (first, second, rest)
}

/// `two_streams` for a pass that writes.
#[inline(always)]
pub(crate) fn two_streams_mut<B>(blocks: &mut [B]) -> (&mut [B], &mut [B], &mut [B]) {
    let half = stream_len::<B>(blocks.len());
    let (first, rest) = blocks.split_at_mut(half);
    let (second, rest) = rest.split_at_mut(half);
    (first, second, rest)
}

/// Per-tensor constants for the tensors of one element type, or nothing when
/// the group has no tensor of that type.
pub fn consts_for<T: Element, C: Copy>(
    group: &Group<'_>,
    steps: &[f64],
    make: impl FnMut(f64) -> C,
) -> Vec<C> {
    if group.tensors().iter().all(|t| t.dtype != T::DTYPE) {
        return Vec::new();
    }
    per_step(steps, make)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_propagates_nan_like_torch_maximum() {
        assert!(f32::NAN.max_propagate_nan(1.0).is_nan());
        assert!(1.0f32.max_propagate_nan(f32::NAN).is_nan());
        assert_eq!(2.0f32.max_propagate_nan(1.0), 2.0);
        assert_eq!(1.0f64.max_propagate_nan(2.0), 2.0);
    }

    #[test]
    fn per_step_computes_each_run_once() {
        let mut calls = 0;
        let out = per_step(&[1.0, 1.0, 2.0, 2.0, 1.0], |s| {
            calls += 1;
            s * 10.0
        });
        assert_eq!(out, vec![10.0, 10.0, 20.0, 20.0, 10.0]);
        assert_eq!(calls, 3);
    }

    #[test]
    fn lerp_uses_both_branches() {
        let small = Lerp::<f64>::new(0.1);
        assert_eq!(small.apply(1.0, 2.0), 1.1);
        let large = Lerp::<f64>::new(0.75);
        assert_eq!(large.apply(0.0, 4.0), 3.0);
        assert_eq!(Lerp::<f32>::new(1.0).apply(3.0, 5.0), 5.0);
    }
}

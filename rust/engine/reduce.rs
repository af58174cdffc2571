//! Passes over a group's gradients: reductions (norms, the finiteness scan)
//! combined per tensor in a fixed order, and in-place maps (clipping).
//!
//! Partial results are per segment and combined in chunk order, which depends
//! only on tensor lengths: the result is the same for any thread count.

use super::buffers::TensorBuffers;
use super::format::{Format, Real, Storage};
use super::group::{ChunkSlices, Group};
use crate::simd::{dispatch, SimdLevel, SimdTask};

/// A float type gradients are reduced in place of: float32 or float64, with
/// its bit pattern for integer-only scans.
pub trait FloatGrad: Real + Storage<Compute = Self> {
    type Bits: Copy + Ord + Default + Send;
    /// Bits of +inf; every inf/NaN pattern (sign cleared) is at least this.
    const INFINITY_BITS: Self::Bits;
    fn abs_bits(self) -> Self::Bits;
}

impl FloatGrad for f32 {
    type Bits = u32;
    const INFINITY_BITS: u32 = 0x7f80_0000;
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
}

impl FloatGrad for f64 {
    type Bits = u64;
    const INFINITY_BITS: u64 = 0x7ff0_0000_0000_0000;
    #[inline(always)]
    fn abs_bits(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
}

/// A reduction over one tensor's gradient segment.
///
/// Implementations put `#[inline(always)]` on `reduce` so that the body is
/// compiled inside the SIMD-level function the engine dispatches to.
pub trait GradReducer: Sync {
    /// Partial result for the segment, in float64.
    fn reduce<T: FloatGrad>(&self, grad: &[T]) -> f64;
}

/// An in-place map over one tensor's gradient segment.
pub trait GradMapper: Sync {
    fn map<T: FloatGrad>(&self, grad: &mut [T]);
}

struct ReduceTask<'s, 'r, R, T> {
    grad: &'s [T],
    reducer: &'r R,
}

impl<R: GradReducer, T: FloatGrad> SimdTask for ReduceTask<'_, '_, R, T> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        self.reducer.reduce(self.grad)
    }
}

struct MapTask<'s, 'r, M, T> {
    grad: &'s mut [T],
    mapper: &'r M,
}

impl<M: GradMapper, T: FloatGrad> SimdTask for MapTask<'_, '_, M, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        self.mapper.map(self.grad)
    }
}

fn grad_format(t: &TensorBuffers) -> Format {
    t.grad.map_or(Format::F32, |g| g.format)
}

/// Whether every tensor has a float32/float64 gradient (what the passes read).
pub fn check_grads(group: &Group<'_>) -> Result<(), super::EngineError> {
    match group
        .tensors()
        .iter()
        .position(|t| t.grad.is_none() || !matches!(grad_format(t), Format::F32 | Format::F64))
    {
        None => Ok(()),
        Some(index) => Err(super::EngineError::Unsupported {
            what: format!(
                "gradient of parameter {index}: only float32 and float64 gradients can be reduced"
            ),
        }),
    }
}

fn reduce_segment<R: GradReducer>(level: SimdLevel, reducer: &R, segment: ChunkSlices<'_>) -> f64 {
    match grad_format(segment.buffers()) {
        Format::F64 => dispatch(
            level,
            ReduceTask {
                grad: segment.grad::<f64>(),
                reducer,
            },
        ),
        _ => dispatch(
            level,
            ReduceTask {
                grad: segment.grad::<f32>(),
                reducer,
            },
        ),
    }
}

/// Runs a reduction over every gradient segment and combines the partial
/// results per tensor with `combine`, in chunk order.
///
/// # Panics
/// If a gradient is not float32/float64 (see [`check_grads`]).
pub fn reduce_grads<R: GradReducer>(
    group: &Group<'_>,
    level: SimdLevel,
    reducer: &R,
    identity: f64,
    combine: impl Fn(f64, f64) -> f64,
) -> Vec<f64> {
    let partials: Vec<Vec<(usize, f64)>> = group.for_each_chunk(|segments| {
        segments
            .map(|segment| {
                let tensor = segment.tensor_index();
                (tensor, reduce_segment(level, reducer, segment))
            })
            .collect()
    });
    let mut totals = vec![identity; group.len()];
    for (tensor, partial) in partials.into_iter().flatten() {
        totals[tensor] = combine(totals[tensor], partial);
    }
    totals
}

/// Runs an in-place map over every gradient of a gradient-only group.
///
/// # Panics
/// If a gradient is not float32/float64, or the group reads its gradients.
pub fn map_grads<M: GradMapper>(group: &Group<'_>, level: SimdLevel, mapper: &M) {
    group.for_each_chunk(|segments| {
        for segment in segments {
            match grad_format(segment.buffers()) {
                Format::F64 => dispatch(
                    level,
                    MapTask {
                        grad: segment.grad_mut::<f64>(),
                        mapper,
                    },
                ),
                _ => dispatch(
                    level,
                    MapTask {
                        grad: segment.grad_mut::<f32>(),
                        mapper,
                    },
                ),
            }
        }
    });
}

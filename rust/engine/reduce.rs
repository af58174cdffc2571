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

/// Which lines of a tensor viewed as a row-major `rows × cols` matrix a
/// reduction sums along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// One result per row (summing across its columns).
    Rows,
    /// One result per column (summing down its rows).
    Columns,
}

/// A per-element term of a row or column sum (`grad²` for Adafactor's
/// factored second moment).
pub trait ElementTerm: Sync {
    fn term<T: FloatGrad>(&self, grad: T) -> f64;
}

struct AxisTask<'s, 'r, E, T> {
    grad: &'s [T],
    /// Index of the segment's first element within its tensor.
    start: usize,
    cols: usize,
    axis: Axis,
    term: &'r E,
}

impl<E: ElementTerm, T: FloatGrad> SimdTask for AxisTask<'_, '_, E, T> {
    /// `(line, partial sum)` pairs in element order.
    type Output = Vec<(usize, f64)>;
    #[inline(always)]
    fn run(self) -> Vec<(usize, f64)> {
        let mut out = Vec::new();
        let mut index = self.start;
        let mut rest = self.grad;
        while !rest.is_empty() {
            // The part of the current row inside this segment.
            let col = index % self.cols;
            let take = (self.cols - col).min(rest.len());
            let (run, tail) = rest.split_at(take);
            match self.axis {
                Axis::Rows => {
                    let sum = run.iter().fold(0.0, |acc, &g| acc + self.term.term(g));
                    out.push((index / self.cols, sum));
                }
                Axis::Columns => {
                    out.extend(
                        run.iter()
                            .enumerate()
                            .map(|(k, &g)| (col + k, self.term.term(g))),
                    );
                }
            }
            index += take;
            rest = tail;
        }
        out
    }
}

/// A segment's tensor and its `(line, partial sum)` pairs.
type SegmentLines = (usize, Vec<(usize, f64)>);

/// Row or column sums of every tensor's gradient, each tensor viewed as a
/// row-major matrix with `cols[t]` columns, accumulated in float64 in element
/// order within a segment and segment by segment in chunk order: the same
/// bits for any thread count. Returns one vector per tensor (rows or columns).
///
/// # Panics
/// If a gradient is not float32/float64, a column count is zero or does not
/// divide its tensor's length.
pub fn reduce_axis<E: ElementTerm>(
    group: &Group<'_>,
    level: SimdLevel,
    term: &E,
    cols: &[usize],
    axis: Axis,
) -> Vec<Vec<f64>> {
    assert_eq!(cols.len(), group.len(), "one column count per tensor");
    let lines: Vec<usize> = group
        .tensors()
        .iter()
        .zip(cols)
        .map(|(t, &c)| {
            assert!(
                c > 0 && t.len % c == 0,
                "{c} columns do not tile {} elements",
                t.len
            );
            match axis {
                Axis::Rows => t.len / c,
                Axis::Columns => c,
            }
        })
        .collect();
    let partials: Vec<Vec<SegmentLines>> = group.for_each_chunk(|segments| {
        segments
            .map(|segment| {
                let tensor = segment.tensor_index();
                let start = segment.range().start;
                let cols = cols[tensor];
                let out = match grad_format(segment.buffers()) {
                    Format::F64 => dispatch(
                        level,
                        AxisTask {
                            grad: segment.grad::<f64>(),
                            start,
                            cols,
                            axis,
                            term,
                        },
                    ),
                    _ => dispatch(
                        level,
                        AxisTask {
                            grad: segment.grad::<f32>(),
                            start,
                            cols,
                            axis,
                            term,
                        },
                    ),
                };
                (tensor, out)
            })
            .collect()
    });
    let mut totals: Vec<Vec<f64>> = lines.iter().map(|&n| vec![0.0; n]).collect();
    for (tensor, pairs) in partials.into_iter().flatten() {
        for (line, value) in pairs {
            totals[tensor][line] += value;
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Buffer, TensorBuffers};

    struct Square;

    impl ElementTerm for Square {
        fn term<T: FloatGrad>(&self, grad: T) -> f64 {
            let g = grad.to_f64();
            g * g
        }
    }

    fn grad_group(grads: &mut [Vec<f32>]) -> Group<'_> {
        let tensors = grads
            .iter_mut()
            .map(|g| {
                TensorBuffers::grad_only(g.len(), Buffer::new(g.as_mut_ptr() as usize, Format::F32))
            })
            .collect();
        // SAFETY: each address points into a Vec borrowed mutably for the group's life.
        unsafe { Group::new(tensors) }.unwrap()
    }

    #[test]
    fn row_and_column_sums_match_a_plain_loop_for_any_thread_count() {
        // 300 x 700 spans several chunks, cut inside rows.
        let shapes = [(3usize, 5usize), (300, 700), (1, 9), (1000, 1)];
        let mut grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| {
                crate::kernels::testing::random(r * c, 40 + i as u64)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect()
            })
            .collect();
        let cols: Vec<usize> = shapes.iter().map(|&(_, c)| c).collect();
        let copies = grads.clone();
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            crate::parallel::set_num_threads(threads).unwrap();
            let group = grad_group(&mut grads);
            let rows = reduce_axis(&group, SimdLevel::detect(), &Square, &cols, Axis::Rows);
            let columns = reduce_axis(&group, SimdLevel::detect(), &Square, &cols, Axis::Columns);
            results.push((rows, columns));
        }
        crate::parallel::set_num_threads(2).unwrap();
        assert!(
            results.windows(2).all(|w| w[0] == w[1]),
            "thread counts differ"
        );
        let (rows, columns) = &results[0];
        for (t, (&(r, c), values)) in shapes.iter().zip(&copies).enumerate() {
            for row in 0..r {
                let want: f64 = values[row * c..(row + 1) * c]
                    .iter()
                    .map(|&g| f64::from(g) * f64::from(g))
                    .sum();
                assert!((rows[t][row] - want).abs() <= 1e-12 * want.max(1.0));
            }
            for col in 0..c {
                let want: f64 = (0..r)
                    .map(|row| f64::from(values[row * c + col]).powi(2))
                    .sum();
                assert!((columns[t][col] - want).abs() <= 1e-12 * want.max(1.0));
            }
        }
    }
}

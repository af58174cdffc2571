//! Adafactor (torch 2.15's `torch.optim.Adafactor`): factored second moments for
//! tensors with two or more dimensions (a row and a column variance over the last
//! two, batch dimensions kept), a full one for vectors and scalars; relative step
//! size, update clipping by the update's RMS, decoupled weight decay.
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/_adafactor.py::_single_tensor_adafactor`). Unlike the element-wise
//! kernels, a tensor's update needs two of its own reductions first, so the step is
//! three passes over the group, each chunked across all tensors on the pool (chunk
//! cuts depend only on tensor lengths; partial sums are combined in chunk order, in
//! float64, each in a fixed tree: the same bits for any thread count and SIMD
//! level):
//!
//! ```text
//! pass 1 (read p, g)        ‖p‖²; per row and per column Σ g² (factored)
//! between (per tensor)      step += 1; w = step ** beta2_decay
//!                           rho = min(lr, 1 / step ** 0.5)
//!                           alpha = max(eps2, ‖p‖ / numel ** 0.5) * rho      (param.norm(2).item())
//!                           row_var = lerp(row_var, ‖g_row‖² / cols, w)       (vector_norm(dim=-1).square_().div_(cols))
//!                           col_var = lerp(col_var, ‖g_col‖² / rows, w)
//!                           m = max(mean(row_var over rows), eps1)          (row_var.mean(dim=-2).clamp_(min=eps1))
//! pass 2 (read g; v rw)     factored: v = (row_var ⊗ col_var) / m           (row_var @ col_var, .div_)
//!                           full:     variance = lerp(variance, g * g, w);  v = variance
//!                           u = (1 / sqrt(max(v, eps1 * eps1))) * g          (clamp_(min=eps1²).rsqrt_().mul_(grad))
//!                           ‖u‖²
//! between                   denom = max(1, ‖u‖ / (numel ** 0.5 * d))
//! pass 3 (read g, v; p rw)  p = p * (1 - lr * weight_decay)   if weight_decay != 0
//!                           p = (-alpha / denom) * u + p   (fused; u recomputed as in pass 2)
//! ```
//!
//! Rounding: every tensor op of torch's rounds once to the param's dtype, and so do
//! ours, in the same order; the Python scalars (`w`, `rho`, `alpha`, `denom`) are
//! float64 as torch's Python computes them, and torch's `.item()` of a norm is the
//! norm rounded to the param's dtype first. Norms and means are accumulated in
//! float64 (torch accumulates in the param's dtype, or float64 for some reductions):
//! they are at least as close to the exact values as torch's. torch's `rsqrt` is
//! `1 / sqrt(x)` in the tensor's dtype (two roundings) on its vectorised path; ours is
//! the same two operations.
//!
//! `eps1 = None` is torch's `finfo(param.dtype).eps` of the *first* parameter with a
//! gradient in the group (its loop variable keeps that value for later params): the
//! caller resolves it and passes both epsilons.
//!
//! Bytes per element (float32): factored 8 + 4 + 12 = 24; full 4 + 12 + 16 = 32.

use super::Lerp;
use crate::engine::reduce::FloatGrad;
use crate::engine::{
    check_buffers, Buffer, ChunkSlices, EngineError, Format, Group, Real, StepContext,
    TensorBuffers, TensorScalar,
};
use crate::simd::{dispatch, SimdLevel, SimdTask};

crate::hyper_record! {
    /// Adafactor's hyperparameters read by name (the epsilons come separately:
    /// `eps[0]` may be `None`, resolved per group by the caller, see [`Epsilons`]).
    pub struct AdafactorHyper {
        /// torch's `_to_scalar(lr)`: a tensor lr is read as its Python float.
        lr: TensorScalar,
        beta2_decay: f64,
        d: f64,
        weight_decay: f64,
        maximize: bool,
    }
}

impl Default for AdafactorHyper {
    fn default() -> Self {
        AdafactorHyper {
            lr: TensorScalar::of(1e-2),
            beta2_decay: -0.8,
            d: 1.0,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl AdafactorHyper {
    /// `rho = min(lr, 1 / step ** 0.5)` and whether it is `lr` (Python's `min` keeps its
    /// first argument unless the second is smaller; a float32 tensor `lr` is compared in
    /// float32, and `rho` is then that tensor, which makes `alpha` one too).
    pub fn rho(&self, step: f64) -> (f64, bool) {
        let v = 1.0 / step.powf(0.5);
        let smaller = if self.lr.is_f32_tensor {
            (v as f32) < self.lr.value as f32
        } else {
            v < self.lr.value
        };
        if smaller {
            (v, false)
        } else {
            (self.lr.value, true)
        }
    }

    /// `1 - lr * weight_decay` (in float32 tensor arithmetic for a float32 tensor `lr`).
    pub fn decay(&self) -> f64 {
        if self.lr.is_f32_tensor {
            f64::from(1.0 - self.lr.value as f32 * self.weight_decay as f32)
        } else {
            1.0 - self.lr.value * self.weight_decay
        }
    }
}

/// torch's `eps1` (resolved: never `None`) and `eps2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epsilons {
    pub eps1: f64,
    pub eps2: f64,
}

/// Where one tensor keeps its second moment (torch's state keys in brackets).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Moment {
    /// `variance`: one value per element, laid out like the param.
    Full { variance: Buffer },
    /// `row_var` (`batch × rows`) and `col_var` (`batch × cols`) of a param viewed as
    /// `batch` row-major `rows × cols` matrices (its last two dimensions).
    Factored {
        batch: usize,
        rows: usize,
        cols: usize,
        row_var: Buffer,
        col_var: Buffer,
    },
}

impl Moment {
    /// The moment's buffers and their lengths, for a param of `len` elements.
    fn buffers(&self, len: usize) -> Vec<(Buffer, usize)> {
        match *self {
            Moment::Full { variance } => vec![(variance, len)],
            Moment::Factored {
                batch,
                rows,
                cols,
                row_var,
                col_var,
            } => vec![(row_var, batch * rows), (col_var, batch * cols)],
        }
    }
}

/// Refuses (before anything is written) a group the step cannot run: a param
/// without its gradient or step counter, formats other than float32/float64, a
/// moment of another dtype or size (`sizes[i]`: how many elements its buffers
/// really hold, as the caller read them), or any buffer overlapping one that is
/// written.
pub fn check(
    group: &Group<'_>,
    moments: &[Moment],
    sizes: &[[usize; 2]],
) -> Result<(), EngineError> {
    let mismatch = |what: String| Err(EngineError::Mismatch { what });
    if moments.len() != group.len() || sizes.len() != group.len() {
        return mismatch(format!(
            "adafactor: {} moments for {} parameters",
            moments.len(),
            group.len()
        ));
    }
    let mut all: Vec<TensorBuffers> = group.tensors().to_vec();
    for (index, (t, moment)) in group.tensors().iter().zip(moments).enumerate() {
        let (Some(param), Some(grad)) = (t.param, t.grad) else {
            return mismatch(format!("adafactor: parameter {index} lacks its gradient"));
        };
        if !matches!(param.format, Format::F32 | Format::F64) || grad.format != param.format {
            return Err(EngineError::Unsupported {
                what: format!("adafactor: parameter {index}: only float32 and float64"),
            });
        }
        if t.num_scalars != 1 || t.num_states != 0 {
            return mismatch(format!(
                "adafactor: parameter {index}: one step counter and no element-wise state"
            ));
        }
        if let Moment::Factored {
            batch, rows, cols, ..
        } = *moment
        {
            if batch.checked_mul(rows).and_then(|n| n.checked_mul(cols)) != Some(t.len) {
                return mismatch(format!(
                    "adafactor: parameter {index}: {batch} x {rows} x {cols} is not {} elements",
                    t.len
                ));
            }
        }
        for ((buffer, len), &held) in moment.buffers(t.len).into_iter().zip(&sizes[index]) {
            if len != held {
                return mismatch(format!(
                    "adafactor: parameter {index}: a second moment of {held} elements, not {len}"
                ));
            }
            if buffer.format != param.format {
                return mismatch(format!(
                    "adafactor: parameter {index}: its second moment is not {}",
                    param.format.name()
                ));
            }
            // Checked with the group's buffers as a written "parameter" of its own.
            all.push(TensorBuffers::param(len, buffer, None));
        }
    }
    check_buffers(&all)
}

/// Per-element arithmetic, shared by passes 2 and 3 (so both see the same `u`).
#[inline(always)]
fn clamp_min<T: Real>(value: T, min: T) -> T {
    // torch's clamp_(min=): NaN stays NaN.
    if value < min {
        min
    } else {
        value
    }
}

/// `u = rsqrt(clamp(v, eps1²)) * g` as torch's vectorised ops round it.
#[inline(always)]
fn update_of<T: Real>(v: T, eps1_sq: T, g: T) -> T {
    (T::ONE / clamp_min(v, eps1_sq).sqrt()) * g
}

/// Number of float64 accumulators of a lane sum (two AVX-512 registers).
const LANES: usize = 16;

/// The `LANES` accumulators of a lane sum combined in a fixed pairwise tree.
#[inline(always)]
fn tree(mut acc: [f64; LANES]) -> f64 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// Sum of `term(a[k], b[k])` over the common length: `LANES` accumulators over
/// consecutive elements (blocks of fixed size, so the loop vectorises), the tail
/// separately, combined in a fixed tree: the same result at every SIMD level.
#[inline(always)]
fn lane_sum2<A: Copy, B: Copy>(a: &[A], b: &[B], term: impl Fn(A, B) -> f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; LANES];
    let mut blocks_a = a.chunks_exact(LANES);
    let mut blocks_b = b.chunks_exact(LANES);
    for (block_a, block_b) in (&mut blocks_a).zip(&mut blocks_b) {
        let block_a: &[A; LANES] = block_a.try_into().expect("a full block");
        let block_b: &[B; LANES] = block_b.try_into().expect("a full block");
        // (terms first, then the adds: the two loops vectorise separately)
        let terms: [f64; LANES] = std::array::from_fn(|l| term(block_a[l], block_b[l]));
        for (a, t) in acc.iter_mut().zip(terms) {
            *a += t;
        }
    }
    let mut tail = 0.0;
    for (&x, &y) in blocks_a.remainder().iter().zip(blocks_b.remainder()) {
        tail += term(x, y);
    }
    tree(acc) + tail
}

/// [`lane_sum2`] over one slice.
#[inline(always)]
fn lane_sum<A: Copy>(a: &[A], term: impl Fn(A) -> f64) -> f64 {
    lane_sum2(a, a, |x, _| term(x))
}

#[inline(always)]
fn square<T: Real>(x: T) -> f64 {
    let x = x.to_f64();
    x * x
}

/// The row runs of a segment starting at element `start` of a tensor with `cols`
/// columns: `(line, first column, offset in the segment, length)`, where `line`
/// counts rows across the batch.
fn row_runs(
    start: usize,
    len: usize,
    cols: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let index = start + offset;
        let col = index % cols;
        let take = (cols - col).min(len - offset);
        let run = (index / cols, col, offset, take);
        offset += take;
        Some(run)
    })
}

/// A factored tensor's shape, for the passes.
#[derive(Clone, Copy, Debug)]
struct Shape {
    rows: usize,
    cols: usize,
}

/// Pass 1's result for one segment.
#[derive(Debug, Default)]
struct Sums {
    param_sq: f64,
    /// `(line, Σ g²)` of every row run.
    rows: Vec<(usize, f64)>,
    /// `(index into col_var of the first column, Σ g² per column)`.
    cols: Vec<(usize, Vec<f64>)>,
}

/// The gradient as the step reads it: GradScaler's unscale and the clip
/// coefficient, each rounded, then `maximize` (a sign: squares do not see it).
#[derive(Clone, Copy, Debug)]
struct GradPrep<T> {
    unscale: T,
    clip: T,
    negate: bool,
}

impl<T: Real> GradPrep<T> {
    #[inline(always)]
    fn get(&self, g: T) -> T {
        let g = g * self.unscale * self.clip;
        if self.negate {
            -g
        } else {
            g
        }
    }
}

struct Pass1<'s, T> {
    param: &'s [T],
    grad: &'s [T],
    start: usize,
    shape: Option<Shape>,
    prep: GradPrep<T>,
}

impl<T: FloatGrad> SimdTask for Pass1<'_, T> {
    type Output = Sums;

    #[inline(always)]
    fn run(self) -> Sums {
        let p = self.param;
        let mut sums = Sums {
            param_sq: lane_sum(p, square),
            ..Sums::default()
        };
        let Some(Shape { rows, cols }) = self.shape else {
            return sums;
        };
        let grad = &self.grad[..p.len()];
        let prep = self.prep;
        let end = self.start + grad.len();
        // Column partials: one vector per batch matrix the segment touches, over all
        // columns, or over the one run's columns if that is all the segment has of it.
        let mut current: Option<(usize, usize, Vec<f64>)> = None; // (batch, at, sums)
        for (line, col, offset, take) in row_runs(self.start, grad.len(), cols) {
            let g = &grad[offset..offset + take];
            sums.rows.push((line, lane_sum(g, |x| square(prep.get(x)))));
            let batch = line / rows;
            if current.as_ref().is_none_or(|(b, _, _)| *b != batch) {
                sums.cols.extend(current.take().map(|(_, at, v)| (at, v)));
                let in_batch = end.min((batch + 1) * rows * cols) - (self.start + offset);
                current = Some(if col + in_batch <= cols {
                    (batch, batch * cols + col, vec![0.0; in_batch])
                } else {
                    (batch, batch * cols, vec![0.0; cols])
                });
            }
            let (_, at, acc) = current.as_mut().expect("a column vector");
            let acc = &mut acc[batch * cols + col - *at..][..take];
            for (a, &x) in acc.iter_mut().zip(g) {
                *a += square(prep.get(x));
            }
        }
        sums.cols.extend(current.map(|(_, at, v)| (at, v)));
        sums
    }
}

/// Per-tensor values the element passes read (float64, exact copies of values
/// rounded to the tensor's dtype where torch's are tensors).
#[derive(Clone, Copy, Debug, Default)]
struct TensorConsts {
    /// `one_minus_beta2_t`.
    weight: f64,
    /// `-alpha / denom` (after pass 2).
    step_scale: f64,
    alpha: f64,
    /// `alpha` is a float32 0-d tensor (`rho` was a float32 tensor `lr`): torch divides
    /// it by `denom` in float32.
    alpha_is_f32_tensor: bool,
}

/// Views `len` elements of `buffer` from element `start`.
///
/// # Safety
/// The buffer must hold at least `start + len` elements of `T` that nothing else
/// accesses while the slice lives (checked by [`check`]; chunks hand out
/// disjoint ranges).
#[allow(clippy::mut_from_ref)]
unsafe fn view<'a, T>(buffer: Buffer, start: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts_mut((buffer.addr as *mut T).add(start), len) }
}

struct Pass2<'s, T> {
    grad: &'s [T],
    start: usize,
    moment: Moment,
    /// Factored: per batch `max(mean(row_var), eps1)`.
    means: &'s [f64],
    lerp: Lerp<T>,
    eps1_sq: T,
    prep: GradPrep<T>,
}

impl<T: FloatGrad> SimdTask for Pass2<'_, T> {
    type Output = f64;

    #[inline(always)]
    fn run(self) -> f64 {
        let grad = self.grad;
        let (prep, eps1_sq) = (self.prep, self.eps1_sq);
        match self.moment {
            Moment::Full { variance } => {
                // SAFETY: `check` covered the variance (the param's length, written
                // by this step only); this segment's range is its own.
                let v: &mut [T] = unsafe { view(variance, self.start, grad.len()) };
                let lerp = self.lerp;
                for (v, &g) in v.iter_mut().zip(grad) {
                    let g = prep.get(g);
                    *v = lerp.apply(*v, g * g);
                }
                lane_sum2(v, grad, |v, g| square(update_of(v, eps1_sq, prep.get(g))))
            }
            Moment::Factored {
                batch,
                rows,
                cols,
                row_var,
                col_var,
            } => {
                // SAFETY: `check` covered both (read-only while the passes run).
                let (rv, cv): (&[T], &[T]) = unsafe {
                    (
                        view(row_var, 0, batch * rows),
                        view(col_var, 0, batch * cols),
                    )
                };
                let mut total = 0.0;
                for (line, col, offset, take) in row_runs(self.start, grad.len(), cols) {
                    let b = line / rows;
                    let (r, m) = (rv[line], T::from_f64(self.means[b]));
                    let c = &cv[b * cols + col..][..take];
                    let g = &grad[offset..][..take];
                    total += lane_sum2(c, g, |c, g| {
                        square(update_of((r * c) / m, eps1_sq, prep.get(g)))
                    });
                }
                total
            }
        }
    }
}

struct Pass3<'s, T> {
    param: &'s mut [T],
    grad: &'s [T],
    start: usize,
    moment: Moment,
    means: &'s [f64],
    eps1_sq: T,
    decay: Option<T>,
    step_scale: T,
    prep: GradPrep<T>,
}

impl<T: FloatGrad> SimdTask for Pass3<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let n = self.param.len();
        let (grad, param) = (&self.grad[..n], self.param);
        let (prep, eps1_sq, scale) = (self.prep, self.eps1_sq, self.step_scale);
        let decay = self.decay;
        let apply = |p: &mut T, u: T| {
            let q = match decay {
                Some(decay) => *p * decay,
                None => *p,
            };
            *p = scale.mul_add(u, q);
        };
        match self.moment {
            Moment::Full { variance } => {
                // SAFETY: as in pass 2 (read-only now).
                let v: &[T] = unsafe { view(variance, self.start, n) };
                for ((p, &v), &g) in param.iter_mut().zip(v).zip(grad) {
                    apply(p, update_of(v, eps1_sq, prep.get(g)));
                }
            }
            Moment::Factored {
                batch,
                rows,
                cols,
                row_var,
                col_var,
            } => {
                // SAFETY: as in pass 2.
                let (rv, cv): (&[T], &[T]) = unsafe {
                    (
                        view(row_var, 0, batch * rows),
                        view(col_var, 0, batch * cols),
                    )
                };
                for (line, col, offset, take) in row_runs(self.start, n, cols) {
                    let b = line / rows;
                    let (r, m) = (rv[line], T::from_f64(self.means[b]));
                    let c = &cv[b * cols + col..][..take];
                    let g = &grad[offset..][..take];
                    let p = &mut param[offset..][..take];
                    for ((p, &c), &g) in p.iter_mut().zip(c).zip(g) {
                        apply(p, update_of((r * c) / m, eps1_sq, prep.get(g)));
                    }
                }
            }
        }
    }
}

fn shape_of(moment: &Moment) -> Option<Shape> {
    match *moment {
        Moment::Factored { rows, cols, .. } => Some(Shape { rows, cols }),
        Moment::Full { .. } => None,
    }
}

fn is_f64(segment: &ChunkSlices<'_>) -> bool {
    segment
        .buffers()
        .param
        .is_some_and(|b| b.format == Format::F64)
}

fn prep_of<T: Real>(h: &AdafactorHyper, ctx: &StepContext) -> GradPrep<T> {
    GradPrep {
        unscale: T::from_f64(ctx.unscale),
        clip: T::from_f64(ctx.clip),
        negate: h.maximize,
    }
}

fn run_pass1<T: FloatGrad>(
    level: SimdLevel,
    segment: ChunkSlices<'_>,
    moment: &Moment,
    prep: GradPrep<T>,
) -> Sums {
    let start = segment.range().start;
    let s = segment.slices::<T, T>();
    dispatch(
        level,
        Pass1 {
            param: s.param,
            grad: s.grad,
            start,
            shape: shape_of(moment),
            prep,
        },
    )
}

/// Combines pass 1 into each tensor's squared param norm, and row and column sums.
struct Totals {
    param_sq: Vec<f64>,
    rows: Vec<Vec<f64>>,
    cols: Vec<Vec<f64>>,
}

fn pass1(
    group: &Group<'_>,
    moments: &[Moment],
    h: &AdafactorHyper,
    ctx: &StepContext,
    level: SimdLevel,
) -> Totals {
    let partials: Vec<Vec<(usize, Sums)>> = group.for_each_chunk(|segments| {
        segments
            .map(|segment| {
                let i = segment.tensor_index();
                let sums = if is_f64(&segment) {
                    run_pass1::<f64>(level, segment, &moments[i], prep_of(h, ctx))
                } else {
                    run_pass1::<f32>(level, segment, &moments[i], prep_of(h, ctx))
                };
                (i, sums)
            })
            .collect()
    });
    let mut totals = Totals {
        param_sq: vec![0.0; group.len()],
        rows: Vec::with_capacity(group.len()),
        cols: Vec::with_capacity(group.len()),
    };
    for moment in moments {
        let (rows, cols) = match *moment {
            Moment::Factored {
                batch, rows, cols, ..
            } => (batch * rows, batch * cols),
            Moment::Full { .. } => (0, 0),
        };
        totals.rows.push(vec![0.0; rows]);
        totals.cols.push(vec![0.0; cols]);
    }
    for (i, sums) in partials.into_iter().flatten() {
        totals.param_sq[i] += sums.param_sq;
        for (line, value) in sums.rows {
            totals.rows[i][line] += value;
        }
        for (at, values) in sums.cols {
            for (total, value) in totals.cols[i][at..].iter_mut().zip(values) {
                *total += value;
            }
        }
    }
    totals
}

/// `x.norm(2).item()` of a tensor of dtype `T` whose squared norm is `sq`.
fn norm_item<T: Real>(sq: f64) -> f64 {
    T::from_f64(sq.sqrt()).to_f64()
}

/// Python's `min(a, b)` / `max(a, b)`: the first unless the second is smaller/larger.
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// The factored moments' update between passes 1 and 2 (in place, rounded to `T`):
/// `row_var`, `col_var`, and per batch `max(mean(row_var), eps1)` (returned).
fn update_factors<T: FloatGrad>(
    moment: &Moment,
    rows_sq: &[f64],
    cols_sq: &[f64],
    weight: f64,
    eps1: f64,
) -> Vec<f64> {
    let Moment::Factored {
        batch,
        rows,
        cols,
        row_var,
        col_var,
    } = *moment
    else {
        return Vec::new();
    };
    let lerp = Lerp::<T>::new(weight);
    // SAFETY: `check` covered both buffers; no pass is running.
    let (rv, cv): (&mut [T], &mut [T]) = unsafe {
        (
            view(row_var, 0, batch * rows),
            view(col_var, 0, batch * cols),
        )
    };
    let mean_of = |sq: f64, n: usize| {
        let norm = T::from_f64(sq.sqrt());
        (norm * norm) / T::from_f64(n as f64)
    };
    for (r, &sq) in rv.iter_mut().zip(rows_sq) {
        *r = lerp.apply(*r, mean_of(sq, cols));
    }
    for (c, &sq) in cv.iter_mut().zip(cols_sq) {
        *c = lerp.apply(*c, mean_of(sq, rows));
    }
    let eps1 = T::from_f64(eps1);
    (0..batch)
        .map(|b| {
            let sum: f64 = rv[b * rows..(b + 1) * rows]
                .iter()
                .map(|r| r.to_f64())
                .sum();
            clamp_min(T::from_f64(sum / rows as f64), eps1).to_f64()
        })
        .collect()
}

/// One Adafactor step of `group` (see the module docs). Errors before anything is
/// written when [`check`] refuses the buffers.
pub fn step(
    group: &Group<'_>,
    moments: &[Moment],
    sizes: &[[usize; 2]],
    h: &AdafactorHyper,
    eps: Epsilons,
    ctx: &StepContext,
    level: SimdLevel,
) -> Result<(), EngineError> {
    check(group, moments, sizes)?;
    let totals = pass1(group, moments, h, ctx, level);

    let mut consts = vec![TensorConsts::default(); group.len()];
    let mut means: Vec<Vec<f64>> = Vec::with_capacity(group.len());
    for (i, t) in group.tensors().iter().enumerate() {
        let slot = t.scalars()[0];
        slot.set(slot.get() + 1.0);
        let step = slot.get();
        let weight = step.powf(h.beta2_decay);
        let (rho, rho_is_lr) = h.rho(step);
        let f64_tensor = t.param.is_some_and(|b| b.format == Format::F64);
        let norm = if f64_tensor {
            norm_item::<f64>(totals.param_sq[i])
        } else {
            norm_item::<f32>(totals.param_sq[i])
        };
        let scale = py_max(eps.eps2, norm / (t.len as f64).powf(0.5));
        let alpha = if rho_is_lr && h.lr.is_f32_tensor {
            f64::from(scale as f32 * rho as f32) // a float32 tensor times a Python float
        } else {
            scale * rho
        };
        consts[i] = TensorConsts {
            weight,
            alpha,
            step_scale: 0.0,
            alpha_is_f32_tensor: rho_is_lr && h.lr.is_f32_tensor,
        };
        means.push(if f64_tensor {
            update_factors::<f64>(
                &moments[i],
                &totals.rows[i],
                &totals.cols[i],
                weight,
                eps.eps1,
            )
        } else {
            update_factors::<f32>(
                &moments[i],
                &totals.rows[i],
                &totals.cols[i],
                weight,
                eps.eps1,
            )
        });
    }

    let eps1_sq = eps.eps1 * eps.eps1;
    let partials: Vec<Vec<(usize, f64)>> = group.for_each_chunk(|segments| {
        segments
            .map(|segment| {
                let i = segment.tensor_index();
                let start = segment.range().start;
                let k = &consts[i];
                let sq = if is_f64(&segment) {
                    dispatch(
                        level,
                        Pass2::<f64> {
                            grad: segment.grad::<f64>(),
                            start,
                            moment: moments[i],
                            means: &means[i],
                            lerp: Lerp::new(k.weight),
                            eps1_sq,
                            prep: prep_of(h, ctx),
                        },
                    )
                } else {
                    dispatch(
                        level,
                        Pass2::<f32> {
                            grad: segment.grad::<f32>(),
                            start,
                            moment: moments[i],
                            means: &means[i],
                            lerp: Lerp::new(k.weight),
                            eps1_sq: eps1_sq as f32,
                            prep: prep_of(h, ctx),
                        },
                    )
                };
                (i, sq)
            })
            .collect()
    });
    let mut update_sq = vec![0.0; group.len()];
    for (i, sq) in partials.into_iter().flatten() {
        update_sq[i] += sq;
    }
    for (i, t) in group.tensors().iter().enumerate() {
        let f64_tensor = t.param.is_some_and(|b| b.format == Format::F64);
        let norm = if f64_tensor {
            norm_item::<f64>(update_sq[i])
        } else {
            norm_item::<f32>(update_sq[i])
        };
        let denom = py_max(1.0, norm / ((t.len as f64).powf(0.5) * h.d));
        let k = &mut consts[i];
        k.step_scale = if k.alpha_is_f32_tensor {
            f64::from(-(k.alpha as f32) / denom as f32)
        } else {
            -k.alpha / denom
        };
    }

    let decay = (h.weight_decay != 0.0).then_some(h.decay());
    group.for_each_chunk(|segments| {
        for segment in segments {
            let i = segment.tensor_index();
            let start = segment.range().start;
            let k = &consts[i];
            if is_f64(&segment) {
                let s = segment.slices::<f64, f64>();
                dispatch(
                    level,
                    Pass3::<f64> {
                        param: s.param,
                        grad: s.grad,
                        start,
                        moment: moments[i],
                        means: &means[i],
                        eps1_sq,
                        decay,
                        step_scale: k.step_scale,
                        prep: prep_of(h, ctx),
                    },
                );
            } else {
                let s = segment.slices::<f32, f32>();
                dispatch(
                    level,
                    Pass3::<f32> {
                        param: s.param,
                        grad: s.grad,
                        start,
                        moment: moments[i],
                        means: &means[i],
                        eps1_sq: eps1_sq as f32,
                        decay: decay.map(|d| d as f32),
                        step_scale: k.step_scale as f32,
                        prep: prep_of(h, ctx),
                    },
                );
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ScalarSlot, Storage};
    use crate::kernels::testing::{assert_close, random, stored};

    /// One test tensor: its shape (`[]`, `[n]`, `[rows, cols]`, `[batch.., rows, cols]`)
    /// and buffers.
    struct Tensor<T> {
        shape: Vec<usize>,
        p: Vec<T>,
        g: Vec<T>,
        /// variance, or row_var then col_var.
        moments: Vec<Vec<T>>,
        step: T,
    }

    const SHAPES: &[&[usize]] = &[
        &[],
        &[1],
        &[37],
        &[3, 5],
        &[1, 131],
        &[131, 1],
        &[300, 700],
        &[2, 3, 33, 17],
        &[4, 1, 1000],
        &[70_001],
    ];

    fn tensors<T: Storage>() -> Vec<Tensor<T>> {
        SHAPES
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let n: usize = shape.iter().product();
                let moments = if shape.len() > 1 {
                    let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                    let batch = n / (rows * cols);
                    vec![
                        vec![stored(0.0); batch * rows],
                        vec![stored(0.0); batch * cols],
                    ]
                } else {
                    vec![vec![stored(0.0); n]]
                };
                Tensor {
                    shape: shape.to_vec(),
                    p: random(n, i as u64).into_iter().map(stored).collect(),
                    g: vec![stored(0.0); n],
                    moments,
                    step: stored(0.0),
                }
            })
            .collect()
    }

    fn buffer<T: Storage>(v: &[T]) -> Buffer {
        Buffer::new(v.as_ptr() as usize, T::FORMAT)
    }

    fn run_step<T: Storage>(
        ts: &mut [Tensor<T>],
        h: &AdafactorHyper,
        eps: Epsilons,
        ctx: &StepContext,
        level: SimdLevel,
    ) {
        let mut moments = Vec::new();
        let sizes: Vec<[usize; 2]> = ts
            .iter()
            .map(|t| [t.moments[0].len(), t.moments.get(1).map_or(0, Vec::len)])
            .collect();
        let buffers: Vec<TensorBuffers> = ts
            .iter_mut()
            .map(|t| {
                moments.push(if t.shape.len() > 1 {
                    let k = t.shape.len();
                    let (rows, cols) = (t.shape[k - 2], t.shape[k - 1]);
                    Moment::Factored {
                        batch: t.p.len() / (rows * cols),
                        rows,
                        cols,
                        row_var: buffer(&t.moments[0]),
                        col_var: buffer(&t.moments[1]),
                    }
                } else {
                    Moment::Full {
                        variance: buffer(&t.moments[0]),
                    }
                });
                let slot = ScalarSlot {
                    addr: &mut t.step as *mut T as usize,
                    format: T::FORMAT,
                };
                TensorBuffers::param(t.p.len(), buffer(&t.p), Some(buffer(&t.g)))
                    .with_scalars(&[slot])
            })
            .collect();
        // SAFETY: every address points into a Vec (or field) of `ts`, borrowed for the call.
        let group = unsafe { Group::new(buffers) }.unwrap();
        step(&group, &moments, &sizes, h, eps, ctx, level).unwrap();
    }

    fn set_grads<T: Storage>(ts: &mut [Tensor<T>], step: u64, scale: f64) {
        for (i, t) in ts.iter_mut().enumerate() {
            t.g = random(t.p.len(), 1000 + step * 31 + i as u64)
                .into_iter()
                .map(|x| stored(x * scale))
                .collect();
        }
    }

    /// torch's `_single_tensor_adafactor` for one float64 tensor, transcribed.
    fn reference_step(t: &mut Tensor<f64>, h: &AdafactorHyper, eps: Epsilons, ctx: &StepContext) {
        let n = t.p.len();
        let g: Vec<f64> =
            t.g.iter()
                .map(|&g| {
                    let g = g * ctx.unscale * ctx.clip;
                    if h.maximize {
                        -g
                    } else {
                        g
                    }
                })
                .collect();
        t.step += 1.0;
        let step = t.step;
        let w = step.powf(h.beta2_decay);
        let lr = h.lr.value;
        let rho = lr.min(1.0 / step.sqrt());
        let pnorm = t.p.iter().map(|x| x * x).sum::<f64>().sqrt();
        let alpha = eps.eps2.max(pnorm / (n as f64).sqrt()) * rho;
        if h.weight_decay != 0.0 {
            for p in &mut t.p {
                *p *= 1.0 - lr * h.weight_decay;
            }
        }
        let lerp = |a: f64, b: f64| a + w * (b - a);
        let var: Vec<f64> = if t.shape.len() > 1 {
            let k = t.shape.len();
            let (rows, cols) = (t.shape[k - 2], t.shape[k - 1]);
            let batch = n / (rows * cols);
            let at = |b: usize, i: usize, j: usize| b * rows * cols + i * cols + j;
            for b in 0..batch {
                for i in 0..rows {
                    let m = (0..cols).map(|j| g[at(b, i, j)].powi(2)).sum::<f64>() / cols as f64;
                    t.moments[0][b * rows + i] = lerp(t.moments[0][b * rows + i], m);
                }
                for j in 0..cols {
                    let m = (0..rows).map(|i| g[at(b, i, j)].powi(2)).sum::<f64>() / rows as f64;
                    t.moments[1][b * cols + j] = lerp(t.moments[1][b * cols + j], m);
                }
            }
            let mut var = vec![0.0; n];
            for b in 0..batch {
                let mean = t.moments[0][b * rows..(b + 1) * rows].iter().sum::<f64>() / rows as f64;
                let mean = mean.max(eps.eps1);
                for i in 0..rows {
                    for j in 0..cols {
                        var[at(b, i, j)] =
                            t.moments[0][b * rows + i] * t.moments[1][b * cols + j] / mean;
                    }
                }
            }
            var
        } else {
            for (v, &g) in t.moments[0].iter_mut().zip(&g) {
                *v = lerp(*v, g * g);
            }
            t.moments[0].clone()
        };
        let u: Vec<f64> = var
            .iter()
            .zip(&g)
            .map(|(&v, &g)| g / v.max(eps.eps1 * eps.eps1).sqrt())
            .collect();
        let unorm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let denom = 1.0f64.max(unorm / ((n as f64).sqrt() * h.d));
        for (p, u) in t.p.iter_mut().zip(&u) {
            *p -= alpha / denom * u;
        }
    }

    fn hypers() -> Vec<AdafactorHyper> {
        let base = AdafactorHyper::default();
        vec![
            base,
            AdafactorHyper {
                maximize: true,
                weight_decay: 0.1,
                ..base
            },
            AdafactorHyper {
                lr: TensorScalar::of(0.5),
                beta2_decay: -0.5,
                d: 4.0,
                ..base
            },
        ]
    }

    #[test]
    fn float64_matches_a_transcription_of_torchs_for_loop() {
        let eps = Epsilons {
            eps1: 1e-30,
            eps2: 1e-3,
        };
        for h in hypers() {
            for ctx in [
                StepContext::default(),
                StepContext {
                    unscale: 0.5,
                    clip: 0.25,
                    ..StepContext::default()
                },
            ] {
                let mut ours = tensors::<f64>();
                let mut want = tensors::<f64>();
                for s in 1..=20 {
                    set_grads(&mut ours, s, 1.0);
                    set_grads(&mut want, s, 1.0);
                    run_step(&mut ours, &h, eps, &ctx, SimdLevel::detect());
                    for t in &mut want {
                        reference_step(t, &h, eps, &ctx);
                    }
                }
                for (a, b) in ours.iter().zip(&want) {
                    let what = format!("{:?} {h:?}", a.shape);
                    assert_close(&a.p, &b.p, 1e-12, &what);
                    for (x, y) in a.moments.iter().zip(&b.moments) {
                        assert_close(x, y, 1e-12, &what);
                    }
                    assert_eq!(a.step, 20.0);
                }
            }
        }
    }

    #[test]
    fn bitwise_equal_at_every_simd_level_and_thread_count() {
        let eps = Epsilons {
            eps1: f64::from(f32::EPSILON),
            eps2: 1e-3,
        };
        for h in hypers() {
            let run = |level| {
                let mut ts = tensors::<f32>();
                for s in 1..=4 {
                    set_grads(&mut ts, s, 1e-2);
                    run_step(&mut ts, &h, eps, &StepContext::default(), level);
                }
                ts.into_iter()
                    .map(|t| (t.p, t.moments, t.step))
                    .collect::<Vec<_>>()
            };
            let want = run(SimdLevel::Scalar);
            for level in SimdLevel::supported() {
                assert!(run(level) == want, "{level}: differs ({h:?})");
            }
            for threads in [1, 3] {
                crate::parallel::set_num_threads(threads).unwrap();
                let got = run(SimdLevel::detect());
                crate::parallel::set_num_threads(2).unwrap();
                assert!(got == want, "{threads} threads: differs ({h:?})");
            }
        }
    }

    #[test]
    fn refuses_moments_of_the_wrong_size_before_writing() {
        let mut ts = tensors::<f32>();
        let t = &mut ts[3]; // 3 x 5
        let before = t.p.clone();
        let buffers = vec![TensorBuffers::param(15, buffer(&t.p), Some(buffer(&t.g)))
            .with_scalars(&[ScalarSlot {
                addr: &mut t.step as *mut f32 as usize,
                format: Format::F32,
            }])];
        // SAFETY: the buffers are the tensor's, borrowed for the test.
        let group = unsafe { Group::new(buffers) }.unwrap();
        let wrong = Moment::Factored {
            batch: 1,
            rows: 5,
            cols: 5,
            row_var: buffer(&t.moments[0]),
            col_var: buffer(&t.moments[1]),
        };
        let eps = Epsilons {
            eps1: 1e-6,
            eps2: 1e-3,
        };
        let result = step(
            &group,
            &[wrong],
            &[[5, 5]],
            &AdafactorHyper::default(),
            eps,
            &StepContext::default(),
            SimdLevel::detect(),
        );
        assert!(result.is_err());
        assert_eq!(t.p, before);
        assert_eq!(t.step, 0.0);
    }
}

//! L-BFGS's vector work (torch.optim.LBFGS semantics): the two-loop recursion
//! over the history, its dot products, and the parameter update.
//!
//! Reference: `torch/optim/lbfgs.py::LBFGS.step`. torch keeps the whole
//! parameter vector flat (`flat_grad`, `d`, `old_dirs[i]` = y, `old_stps[i]` =
//! s) and every scalar as a 0-d tensor of the parameters' dtype `C`, so each
//! scalar operation rounds to `C`:
//!
//! ```text
//! ys = y.dot(s); yy = y.dot(y)           dot_pair: C(Σ y*s), C(Σ y*y)
//! q = flat_grad.neg()                    (Python: torch's neg, exact)
//! for i = n-1 .. 0:
//!   al[i] = old_stps[i].dot(q) * ro[i]   C(C(Σ s_i*q) * ro_i)
//!   q.add_(old_dirs[i], alpha=-al[i])    q = fma(-al_i, y_i, q)
//! d = r = torch.mul(q, H_diag)           r = C(q * H)
//! for i = 0 .. n-1:
//!   be_i = old_dirs[i].dot(r) * ro[i]    C(C(Σ y_i*r) * ro_i)
//!   r.add_(old_stps[i], alpha=al[i] - be_i)   r = fma(C(al_i - be_i), s_i, r)
//! gtd = flat_grad.dot(d)                 C(Σ g*d)
//! p.add_(d[segment], alpha=t)            p = fma(t, d, p)       (`add_scaled`)
//! flat_grad.abs().max(), .abs().sum()    `abs_max`, `abs_sum`
//! ```
//!
//! `add(alpha=)` is one fused multiply-add (as torch's vectorised loop computes
//! it, see `kernels/mod.rs`); `mul` rounds once. Dot products and sums are
//! accumulated in float64 (products of float32 values are exact there): each
//! chunk sums element `i` into lane `i % 16` (chunks start at multiples of 64),
//! folds its 16 lanes in a fixed tree, and chunks are added in order. The
//! chunking depends only on the length, so results are bitwise identical for
//! every thread count and SIMD level. torch's own dot (BLAS) sums in another
//! order, so ours can differ from torch's in the last bits of a dot product;
//! everything else is torch's arithmetic.
//!
//! The whole recursion is `2n + 1` passes over memory (each update fused with
//! the dot product that reads its result) where torch makes `4n + 2`.

use std::ops::Range;
use std::sync::Mutex;

use crate::engine::Real;
use crate::parallel::{ChunkPlan, CHUNK_ELEMENTS};
use crate::simd::{dispatch, SimdLevel, SimdTask};

const LANES: usize = 16;

/// A per-element update of a fused pass: `q = op(q, x)`.
trait ElemOp<C>: Copy + Send + Sync {
    fn apply(self, q: C, x: C) -> C;
}

/// `q.add_(x, alpha=a)`: one fused multiply-add.
#[derive(Clone, Copy)]
struct Axpy<C>(C);

impl<C: Real> ElemOp<C> for Axpy<C> {
    #[inline(always)]
    fn apply(self, q: C, x: C) -> C {
        self.0.mul_add(x, q)
    }
}

/// `q.add_(x, alpha=a)` then `torch.mul(q, h)`: two roundings.
#[derive(Clone, Copy)]
struct AxpyScale<C>(C, C);

impl<C: Real> ElemOp<C> for AxpyScale<C> {
    #[inline(always)]
    fn apply(self, q: C, x: C) -> C {
        self.0.mul_add(x, q) * self.1
    }
}

/// `torch.mul(q, h)`.
#[derive(Clone, Copy)]
struct Scale<C>(C);

impl<C: Real> ElemOp<C> for Scale<C> {
    #[inline(always)]
    fn apply(self, q: C, _x: C) -> C {
        q * self.0
    }
}

// The SIMD tasks: each body is `#[inline(always)]`, so it is compiled inside the
// target-feature function `dispatch` picks (as the engine's tasks are).

struct DotTask<'s, C> {
    a: &'s [C],
    b: &'s [C],
}

impl<C: Real> SimdTask for DotTask<'_, C> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        dot_lanes(self.a, self.b)
    }
}

struct DotPairTask<'s, C> {
    y: &'s [C],
    s: &'s [C],
}

impl<C: Real> SimdTask for DotPairTask<'_, C> {
    type Output = (f64, f64);
    #[inline(always)]
    fn run(self) -> (f64, f64) {
        (dot_lanes(self.y, self.s), dot_lanes(self.y, self.y))
    }
}

struct MapDotTask<'s, C, O> {
    q: &'s mut [C],
    x: &'s [C],
    w: &'s [C],
    op: O,
}

impl<C: Real, O: ElemOp<C>> SimdTask for MapDotTask<'_, C, O> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        map_dot_lanes(self.q, self.x, self.w, self.op)
    }
}

struct AbsMaxTask<'s, C>(&'s [C]);

impl<C: AbsBits> SimdTask for AbsMaxTask<'_, C> {
    type Output = C;
    #[inline(always)]
    fn run(self) -> C {
        // On magnitudes' bit patterns (sign cleared) an integer max orders like the
        // values, and every NaN's pattern exceeds infinity's: NaN propagates, and the
        // loop vectorises (as clip.rs's max norm).
        let (blocks, tail) = self.0.as_chunks::<LANES>();
        let mut lanes = [C::Bits::default(); LANES];
        for block in blocks {
            for l in 0..LANES {
                lanes[l] = lanes[l].max(block[l].abs_bits());
            }
        }
        let best = lanes
            .into_iter()
            .chain(tail.iter().map(|v| v.abs_bits()))
            .max()
            .unwrap_or_default();
        C::from_abs_bits(best)
    }
}

struct AbsSumTask<'s, C>(&'s [C]);

impl<C: Real> SimdTask for AbsSumTask<'_, C> {
    type Output = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        let (blocks, tail) = self.0.as_chunks::<LANES>();
        let mut lanes = [0.0f64; LANES];
        for block in blocks {
            for l in 0..LANES {
                lanes[l] += block[l].to_f64().abs();
            }
        }
        let mut lanes = std::hint::black_box(lanes);
        for (l, v) in tail.iter().enumerate() {
            lanes[l] += v.to_f64().abs();
        }
        fold_lanes(lanes)
    }
}

struct AddTask<'s, C> {
    p: &'s mut [C],
    x: &'s [C],
    t: C,
}

impl<C: Real> SimdTask for AddTask<'_, C> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (p, x) in self.p.iter_mut().zip(self.x) {
            *p = self.t.mul_add(*x, *p);
        }
    }
}

/// float32/float64 with their magnitudes' bit patterns (for `abs_max`).
pub trait AbsBits: Real + Send + Sync {
    type Bits: Copy + Ord + Default + Send;
    fn abs_bits(self) -> Self::Bits;
    fn from_abs_bits(bits: Self::Bits) -> Self;
}

impl AbsBits for f32 {
    type Bits = u32;
    #[inline(always)]
    fn abs_bits(self) -> u32 {
        self.to_bits() & 0x7fff_ffff
    }
    #[inline(always)]
    fn from_abs_bits(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
}

impl AbsBits for f64 {
    type Bits = u64;
    #[inline(always)]
    fn abs_bits(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
    #[inline(always)]
    fn from_abs_bits(bits: u64) -> f64 {
        f64::from_bits(bits)
    }
}

/// Folds the 16 lanes pairwise in a fixed order.
#[inline(always)]
fn fold_lanes(mut lanes: [f64; LANES]) -> f64 {
    for i in 0..8 {
        lanes[i] += lanes[i + 8];
    }
    for i in 0..4 {
        lanes[i] += lanes[i + 4];
    }
    for i in 0..2 {
        lanes[i] += lanes[i + 2];
    }
    lanes[0] + lanes[1]
}

/// `Σ a[j] * b[j]` in float64, element `j` into lane `j % 16`.
#[inline(always)]
fn dot_lanes<C: Real>(a: &[C], b: &[C]) -> f64 {
    let (a_blocks, a_tail) = a.as_chunks::<LANES>();
    let (b_blocks, b_tail) = b.as_chunks::<LANES>();
    let mut lanes = [0.0f64; LANES];
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for l in 0..LANES {
            lanes[l] += x[l].to_f64() * y[l].to_f64();
        }
    }
    // Keeps LLVM from narrowing the loop to the tree's pairs (see clip.rs).
    let mut lanes = std::hint::black_box(lanes);
    for (l, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        lanes[l] += x.to_f64() * y.to_f64();
    }
    fold_lanes(lanes)
}

/// `buf[j] = f(buf[j], x[j])`, then `Σ w[j] * buf[j]` (new values) in float64.
#[inline(always)]
fn map_dot_lanes<C: Real, O: ElemOp<C>>(buf: &mut [C], x: &[C], w: &[C], op: O) -> f64 {
    let (buf_blocks, buf_tail) = buf.as_chunks_mut::<LANES>();
    let (x_blocks, x_tail) = x.as_chunks::<LANES>();
    let (w_blocks, w_tail) = w.as_chunks::<LANES>();
    let mut lanes = [0.0f64; LANES];
    for ((b, xx), ww) in buf_blocks.iter_mut().zip(x_blocks).zip(w_blocks) {
        // The update of a whole block first, then its products: two straight loops
        // LLVM turns into full-width vector code.
        let mut v = [C::ZERO; LANES];
        for l in 0..LANES {
            v[l] = op.apply(b[l], xx[l]);
        }
        *b = v;
        for l in 0..LANES {
            lanes[l] += ww[l].to_f64() * v[l].to_f64();
        }
    }
    let mut lanes = std::hint::black_box(lanes);
    for (l, ((b, xx), ww)) in buf_tail.iter_mut().zip(x_tail).zip(w_tail).enumerate() {
        let v = op.apply(*b, *xx);
        *b = v;
        lanes[l] += ww.to_f64() * v.to_f64();
    }
    fold_lanes(lanes)
}

/// Runs `work` on every chunk of `0..len` (the engine's chunk plan: its
/// boundaries depend on `len` only) and returns the per-chunk results in order.
fn chunks<R: Send>(len: usize, work: impl Fn(Range<usize>) -> R + Sync) -> Vec<R> {
    if len <= CHUNK_ELEMENTS {
        // One chunk (what the plan makes of it): no plan, no allocation.
        return if len == 0 {
            Vec::new()
        } else {
            vec![work(0..len)]
        };
    }
    let plan = ChunkPlan::for_lens(&[len]);
    plan.run(|segments| {
        let start = segments.first().map_or(0, |s| s.range.start);
        let end = segments.last().map_or(0, |s| s.range.end);
        work(start..end)
    })
}

/// As [`chunks`], handing each chunk its own disjoint part of `buf` to write.
fn chunks_mut<C: Send, R: Send>(
    buf: &mut [C],
    work: impl Fn(Range<usize>, &mut [C]) -> R + Sync,
) -> Vec<R> {
    let len = buf.len();
    if len <= CHUNK_ELEMENTS {
        return if len == 0 {
            Vec::new()
        } else {
            vec![work(0..len, buf)]
        };
    }
    let plan = ChunkPlan::for_lens(&[len]);
    let mut parts = Vec::with_capacity(plan.num_chunks());
    let mut rest = buf;
    for c in 0..plan.num_chunks() {
        let segments = plan.chunk(c);
        let len: usize = segments.iter().map(|s| s.range.len()).sum();
        let (head, tail) = rest.split_at_mut(len);
        parts.push(Mutex::new(head));
        rest = tail;
    }
    let starts: Vec<usize> = (0..plan.num_chunks())
        .map(|c| plan.chunk(c)[0].range.start)
        .collect();
    plan.run(|segments| {
        let start = segments[0].range.start;
        let index = starts
            .binary_search(&start)
            .expect("a chunk starts where the plan says");
        let mut part = parts[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let range = start..start + part.len();
        work(range, &mut part)
    })
}

/// `Σ a * b`, exact float64 products summed in the fixed tree (not rounded
/// to `C`: callers round where torch does).
pub fn dot<C: Real + Send + Sync>(level: SimdLevel, a: &[C], b: &[C]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    chunks(a.len(), |r| {
        dispatch(
            level,
            DotTask {
                a: &a[r.clone()],
                b: &b[r],
            },
        )
    })
    .into_iter()
    .sum()
}

/// `(Σ y * s, Σ y * y)`, each rounded to `C` (torch's `ys` and `y.dot(y)`), in one pass.
pub fn dot_pair<C: Real + Send + Sync>(level: SimdLevel, y: &[C], s: &[C]) -> (C, C) {
    assert_eq!(y.len(), s.len(), "dot_pair: lengths differ");
    let parts = chunks(y.len(), |r| {
        dispatch(
            level,
            DotPairTask {
                y: &y[r.clone()],
                s: &s[r],
            },
        )
    });
    let (ys, yy) = parts
        .into_iter()
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d));
    (C::from_f64(ys), C::from_f64(yy))
}

/// `x.abs().max()`: the largest magnitude, NaN if any element is NaN, 0 for
/// an empty vector (where torch raises; the caller never asks then).
pub fn abs_max<C: AbsBits>(level: SimdLevel, x: &[C]) -> C {
    let parts = chunks(x.len(), |r| dispatch(level, AbsMaxTask(&x[r])));
    // A maximum is exact in any order.
    parts
        .into_iter()
        .fold(C::ZERO, |a, b| a.max_propagate_nan(b))
}

/// `Σ |x|` in float64 (torch's `flat_grad.abs().sum()` before rounding to `C`).
pub fn abs_sum<C: Real + Send + Sync>(level: SimdLevel, x: &[C]) -> f64 {
    chunks(x.len(), |r| dispatch(level, AbsSumTask(&x[r])))
        .into_iter()
        .sum()
}

/// `p.add_(x, alpha=t)`: `p = fma(t, x, p)`.
pub fn add_scaled<C: Real + Send + Sync>(level: SimdLevel, p: &mut [C], t: C, x: &[C]) {
    assert_eq!(p.len(), x.len(), "add_scaled: lengths differ");
    chunks_mut(p, |r, p| dispatch(level, AddTask { p, x: &x[r], t }));
}

/// One fused pass: `q[j] = op(q[j], x[j])`, returning `Σ w * q` (new values).
fn map_dot<C: Real + Send + Sync, O: ElemOp<C>>(
    level: SimdLevel,
    q: &mut [C],
    x: &[C],
    w: &[C],
    op: O,
) -> f64 {
    chunks_mut(q, |r, q| {
        dispatch(
            level,
            MapDotTask {
                q,
                x: &x[r.clone()],
                w: &w[r],
                op,
            },
        )
    })
    .into_iter()
    .sum()
}

/// The curvature history, oldest first: `old_dirs` (y), `old_stps` (s) and
/// `ro` (`1 / y·s`, rounded to `C`).
pub struct History<'a, C> {
    pub dirs: Vec<&'a [C]>,
    pub stps: Vec<&'a [C]>,
    pub ro: Vec<C>,
}

/// The two-loop recursion: `q` holds `-flat_grad` on entry and the new
/// direction `d` on return; `al[i]` receives torch's `al[i]`. Returns
/// `gtd = flat_grad.dot(d)` rounded to `C`.
///
/// # Panics
/// If the lengths disagree (the glue checks them first).
pub fn direction<C: Real + Send + Sync>(
    level: SimdLevel,
    q: &mut [C],
    grad: &[C],
    history: &History<'_, C>,
    h_diag: C,
    al: &mut [C],
) -> C {
    let n = history.dirs.len();
    assert!(history.stps.len() == n && history.ro.len() == n && al.len() >= n);
    assert!(grad.len() == q.len());
    assert!(history
        .dirs
        .iter()
        .chain(&history.stps)
        .all(|v| v.len() == q.len()));
    if n == 0 {
        let gtd = map_dot(level, q, grad, grad, Scale(h_diag));
        return C::from_f64(gtd);
    }
    let (y, s, ro) = (&history.dirs, &history.stps, &history.ro);
    let mut dot = C::from_f64(self::dot(level, s[n - 1], q));
    for i in (0..n).rev() {
        al[i] = dot * ro[i];
        let neg_al = -al[i];
        dot = C::from_f64(if i > 0 {
            map_dot(level, q, y[i], s[i - 1], Axpy(neg_al))
        } else {
            // The last update of the first loop, then `r = q * H_diag`, then
            // the first dot product of the second loop.
            map_dot(level, q, y[0], y[0], AxpyScale(neg_al, h_diag))
        });
    }
    // `dot` is now `y_0 · r`.
    for i in 0..n {
        let be = dot * ro[i];
        let coef = al[i] - be;
        let next = if i + 1 < n { y[i + 1] } else { grad };
        dot = C::from_f64(map_dot(level, q, s[i], next, Axpy(coef)));
    }
    dot
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::random;

    /// torch's two-loop in float64 with plain sequential dot products.
    fn reference(
        grad: &[f64],
        dirs: &[Vec<f64>],
        stps: &[Vec<f64>],
        ro: &[f64],
        h: f64,
    ) -> (Vec<f64>, Vec<f64>, f64) {
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let n = dirs.len();
        let mut q: Vec<f64> = grad.iter().map(|g| -g).collect();
        let mut al = vec![0.0; n];
        for i in (0..n).rev() {
            al[i] = dot(&stps[i], &q) * ro[i];
            for (q, y) in q.iter_mut().zip(&dirs[i]) {
                *q = (-al[i]).mul_add(*y, *q);
            }
        }
        for v in q.iter_mut() {
            *v *= h;
        }
        for i in 0..n {
            let be = dot(&dirs[i], &q) * ro[i];
            for (r, s) in q.iter_mut().zip(&stps[i]) {
                *r = (al[i] - be).mul_add(*s, *r);
            }
        }
        let gtd = dot(grad, &q);
        (q, al, gtd)
    }

    struct Problem {
        grad: Vec<f64>,
        dirs: Vec<Vec<f64>>,
        stps: Vec<Vec<f64>>,
        ro: Vec<f64>,
    }

    fn problem(len: usize, n: usize) -> Problem {
        let grad = random(len, 1);
        let stps: Vec<Vec<f64>> = (0..n).map(|i| random(len, 10 + i as u64)).collect();
        // y close to s (a positive-definite-looking history) so ro stays tame.
        let dirs: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                let noise = random(len, 100 + i as u64);
                stps[i]
                    .iter()
                    .zip(noise)
                    .map(|(s, e)| s * 1.5 + 0.1 * e)
                    .collect()
            })
            .collect();
        let ro = (0..n)
            .map(|i| {
                1.0 / dirs[i]
                    .iter()
                    .zip(&stps[i])
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
            })
            .collect();
        Problem {
            grad,
            dirs,
            stps,
            ro,
        }
    }

    fn run<C: Real + Send + Sync>(p: &Problem, h: f64, level: SimdLevel) -> (Vec<C>, Vec<C>, C) {
        let cast = |v: &[f64]| v.iter().map(|x| C::from_f64(*x)).collect::<Vec<C>>();
        let grad = cast(&p.grad);
        let dirs: Vec<Vec<C>> = p.dirs.iter().map(|v| cast(v)).collect();
        let stps: Vec<Vec<C>> = p.stps.iter().map(|v| cast(v)).collect();
        let history = History {
            dirs: dirs.iter().map(|v| v.as_slice()).collect(),
            stps: stps.iter().map(|v| v.as_slice()).collect(),
            ro: cast(&p.ro),
        };
        let mut q: Vec<C> = grad.iter().map(|g| -*g).collect();
        let mut al = vec![C::ZERO; p.dirs.len()];
        let gtd = direction(level, &mut q, &grad, &history, C::from_f64(h), &mut al);
        (q, al, gtd)
    }

    #[test]
    fn two_loop_matches_float64_reference() {
        for (len, n) in [(1, 0), (37, 1), (1000, 3), (70_001, 5)] {
            let p = problem(len, n);
            let (want_q, want_al, want_gtd) = reference(&p.grad, &p.dirs, &p.stps, &p.ro, 0.7);
            let (q, al, gtd) = run::<f64>(&p, 0.7, SimdLevel::detect());
            let rel = |a: f64, b: f64| (a - b).abs() <= 1e-10 * (1.0 + b.abs());
            assert!(
                q.iter().zip(&want_q).all(|(a, b)| rel(*a, *b)),
                "{len}/{n}: d"
            );
            assert!(
                al.iter().zip(&want_al).all(|(a, b)| rel(*a, *b)),
                "{len}/{n}: al"
            );
            assert!(rel(gtd, want_gtd), "{len}/{n}: gtd {gtd} vs {want_gtd}");
        }
    }

    #[test]
    fn bitwise_across_levels_and_threads() {
        let p = problem(64 * 1024 * 2 + 77, 4);
        let want32 = run::<f32>(&p, 0.3, SimdLevel::Scalar);
        let want64 = run::<f64>(&p, 0.3, SimdLevel::Scalar);
        let mut runs = Vec::new();
        for level in SimdLevel::supported() {
            runs.push((run::<f32>(&p, 0.3, level), run::<f64>(&p, 0.3, level)));
        }
        for threads in [1, 3] {
            crate::parallel::set_num_threads(threads).unwrap();
            runs.push((
                run::<f32>(&p, 0.3, SimdLevel::detect()),
                run::<f64>(&p, 0.3, SimdLevel::detect()),
            ));
        }
        crate::parallel::set_num_threads(2).unwrap();
        for (got32, got64) in runs {
            let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits32(&got32.0), bits32(&want32.0));
            assert_eq!(bits32(&got32.1), bits32(&want32.1));
            assert_eq!(got32.2.to_bits(), want32.2.to_bits());
            assert_eq!(bits64(&got64.0), bits64(&want64.0));
            assert_eq!(got64.2.to_bits(), want64.2.to_bits());
        }
    }

    #[test]
    fn reductions_and_update() {
        let x: Vec<f32> = random(70_001, 5).iter().map(|v| *v as f32).collect();
        let mut with_nan = x.clone();
        with_nan[65_000] = f32::NAN;
        let level = SimdLevel::detect();
        let want_max = x.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        assert_eq!(abs_max(level, &x), want_max);
        assert!(abs_max(level, &with_nan).is_nan());
        let want_sum: f64 = x.iter().map(|v| (*v as f64).abs()).sum();
        assert!((abs_sum(level, &x) - want_sum).abs() <= 1e-9 * want_sum);
        let (ys, yy) = dot_pair(level, &x, &x);
        assert_eq!(ys, yy);
        let mut p = vec![1.0f32; x.len()];
        add_scaled(level, &mut p, 0.5, &x);
        assert!(p.iter().zip(&x).all(|(p, x)| *p == 0.5f32.mul_add(*x, 1.0)));
        assert_eq!(abs_max::<f32>(level, &[]), 0.0);
    }
}

//! LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT
//! in 76 minutes"), exactly as the reference implementation `pytorch-optimizer`
//! (`pytorch_optimizer.Lamb`, 4.1.0) computes it.
//!
//! Reference: `pytorch_optimizer/optimizer/lamb.py::Lamb._step_foreach`, its
//! default flavour on CPU (its per-parameter `update`, taken with `rectify`,
//! `adanorm` or `foreach=False`, divides where this one multiplies by a
//! reciprocal: the Python layer steps those groups with torch ops). The step
//! counter lives in the param group; the Python side passes the step size
//! (`lr / (1 - beta1**step)`, or `lr` with `adam_debias`) in float64 as the
//! reference's Python computes it, and the pre-norm factor (`pre_norm=True`:
//! the reference's global gradient-norm scale, a float32 0-d tensor; else 1).
//! Per element, each line one torch op in the reference's order (Python
//! scalars rounded to the tensor's dtype by the op):
//!
//! ```text
//! (grad * unscale * clip, then:)
//! g = -g                          if maximize            torch._foreach_neg_(grads)
//! g = g * pre                                            torch._foreach_mul_(grads, grad_norm)
//! p = p * (1 - wd*(1 if fixed_decay else lr))            (weight_decouple, wd != 0) _foreach_mul_(params, factor)
//! m = m * beta1                                          _foreach_mul_(exp_avgs, beta1)
//! m = g*beta3 + m       (fused)                          _foreach_add_(exp_avgs, grads, alpha=beta3)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)               _foreach_mul_(v, beta2); _foreach_addcmul_(v, g, g, 1 - beta2)
//! u = (1 / (sqrt(v) + eps)) * m                          sqrt, add_(eps), reciprocal_, mul_(exp_avgs)
//! u = p*wd + u          (fused)  coupled decay, wd > 0   _foreach_add_(updates, params, alpha=wd)
//! wn = min(||p||, 10); un = ||u||                        _foreach_norm(params).clamp_(max=10); _foreach_norm(updates)
//! r = wn / (un + eps) if wn != 0 and un != 0, else 1     torch.where(...)
//! u = u * r             unless adam                      _foreach_mul_(updates, trust_ratios)
//! p = u*(-step_size) + p  (fused)                        foreach_add_(params, updates, alpha=-step_size)
//! ```
//!
//! with `beta3 = 1 - beta1` (`grad_averaging`) or 1.
//!
//! Two passes over memory. Pass 1 reads p, g, m, v, writes m, v and reduces
//! `||p||²` (the decayed param) and `||u||²` per tensor: float64 partial sums,
//! 16 lanes per segment combined in a fixed tree, segments in chunk order, so
//! the sums are the same at every SIMD level and thread count. The norms are
//! rounded to the tensor's dtype (correctly rounded; torch's float32
//! `_foreach_norm` may differ in its last bit) and the trust ratio computed in
//! the tensor's dtype, as the reference's tensor arithmetic does. Pass 2 reads
//! p, m, v, recomputes the same `u` and writes p (the decoupled decay is
//! applied there, so pass 1 does not write p): 40 bytes/element in float32.
//!
//! Unlike the reference, the gradient is read, never written (the reference
//! negates it in place for `maximize` and scales it for `pre_norm`).

use crate::engine::group::{ChunkSlices, Group};
use crate::engine::reduce::FloatGrad;
use crate::engine::{EngineError, Format, Real, StepContext};
use crate::simd::{dispatch, SimdLevel, SimdTask};

crate::hyper_record! {
    /// LAMB's hyperparameters, under the reference's param-group names (plus
    /// `maximize`, kept in the group as torch's optimizers keep it).
    pub struct LambHyper {
        lr: f64,
        betas: [f64; 2],
        weight_decay: f64,
        /// Decay the param (`p *= 1 - wd*lr`) instead of adding `wd*p` to the update.
        weight_decouple: bool,
        /// Decoupled decay not scaled by `lr` (`p *= 1 - wd`).
        fixed_decay: bool,
        /// Scale the new gradient's contribution to `exp_avg` by `1 - beta1`.
        grad_averaging: bool,
        /// A trust ratio of 1 in the update (the ratio is still computed and kept).
        adam: bool,
        eps: f64,
        maximize: bool,
    }
}

impl Default for LambHyper {
    fn default() -> Self {
        LambHyper {
            lr: 1e-3,
            betas: [0.9, 0.999],
            weight_decay: 0.0,
            weight_decouple: true,
            fixed_decay: false,
            grad_averaging: true,
            adam: false,
            eps: 1e-6,
            maximize: false,
        }
    }
}

/// What the Python layer computes for the step, in float64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambStep {
    /// `lr / bias_correction1` (or `lr` with the reference's `adam_debias`).
    pub step_size: f64,
    /// The reference's `pre_norm` gradient scale (1.0: off).
    pub pre_scale: f64,
}

/// The weight norm's upper clamp (the reference's `Lamb.clamp`).
const CLAMP: f64 = 10.0;

/// The constants of one step, rounded to the tensor's dtype.
#[derive(Clone, Copy, Debug)]
struct Consts<T> {
    unscale: T,
    clip: T,
    pre: T,
    negate: bool,
    /// Decoupled decay factor (`None`: no decoupled decay).
    decay: Option<T>,
    beta1: T,
    beta3: T,
    beta2: T,
    one_minus_beta2: T,
    eps: T,
    /// Coupled decay (`u += wd*p`; `None`: off).
    coupled: Option<T>,
    neg_step_size: T,
    adam: bool,
}

impl<T: Real> Consts<T> {
    fn new(h: &LambHyper, s: &LambStep, ctx: &StepContext) -> Consts<T> {
        let [beta1, beta2] = h.betas;
        let decoupled = h.weight_decouple && h.weight_decay != 0.0;
        let factor = 1.0 - h.weight_decay * if h.fixed_decay { 1.0 } else { h.lr };
        let coupled = !h.weight_decouple && h.weight_decay > 0.0;
        Consts {
            unscale: T::from_f64(ctx.unscale),
            clip: T::from_f64(ctx.clip),
            pre: T::from_f64(s.pre_scale),
            negate: h.maximize,
            decay: decoupled.then(|| T::from_f64(factor)),
            beta1: T::from_f64(beta1),
            beta3: T::from_f64(if h.grad_averaging { 1.0 - beta1 } else { 1.0 }),
            beta2: T::from_f64(beta2),
            one_minus_beta2: T::from_f64(1.0 - beta2),
            eps: T::from_f64(h.eps),
            coupled: coupled.then(|| T::from_f64(h.weight_decay)),
            neg_step_size: T::from_f64(-s.step_size),
            adam: h.adam,
        }
    }

    /// The gradient as the reference's update reads it.
    #[inline(always)]
    fn grad(&self, g: T) -> T {
        let g = g * self.unscale * self.clip;
        let g = if self.negate { -g } else { g };
        g * self.pre
    }

    /// The param after the decoupled decay.
    #[inline(always)]
    fn decayed(&self, p: T) -> T {
        match self.decay {
            Some(decay) => p * decay,
            None => p,
        }
    }

    /// The Adam update `u` of a (decayed) param and its new moments.
    #[inline(always)]
    fn update(&self, p: T, m: T, v: T) -> T {
        let u = (T::ONE / (v.sqrt() + self.eps)) * m;
        match self.coupled {
            Some(wd) => p.mul_add(wd, u),
            None => u,
        }
    }
}

/// Number of float64 accumulators of a lane sum (two AVX-512 registers).
const LANES: usize = 16;

/// The `LANES` accumulators combined in a fixed pairwise tree.
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

#[inline(always)]
fn square<T: Real>(x: T) -> f64 {
    let x = x.to_f64();
    x * x
}

/// Pass 1 over one segment: the moments updated in place; `(Σ p², Σ u²)`.
struct Pass1<'s, T> {
    param: &'s [T],
    grad: &'s [T],
    exp_avg: &'s mut [T],
    exp_avg_sq: &'s mut [T],
    k: Consts<T>,
}

impl<T: Real> Consts<T> {
    /// One element of pass 1: `(p², u²)`.
    #[inline(always)]
    fn moments(&self, p: T, g: T, m: &mut T, v: &mut T) -> (f64, f64) {
        let g = self.grad(g);
        let p = self.decayed(p);
        let new_m = self.beta3.mul_add(g, *m * self.beta1);
        let new_v = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
        *m = new_m;
        *v = new_v;
        (square(p), square(self.update(p, new_m, new_v)))
    }
}

impl<T: FloatGrad> SimdTask for Pass1<'_, T> {
    type Output = (f64, f64);

    #[inline(always)]
    fn run(self) -> (f64, f64) {
        let n = self.param.len();
        let (p, g) = (self.param, &self.grad[..n]);
        let (m, v) = (&mut self.exp_avg[..n], &mut self.exp_avg_sq[..n]);
        let k = self.k;
        let (mut acc_p, mut acc_u) = ([0.0f64; LANES], [0.0f64; LANES]);
        let mut blocks = p
            .chunks_exact(LANES)
            .zip(g.chunks_exact(LANES))
            .zip(m.chunks_exact_mut(LANES).zip(v.chunks_exact_mut(LANES)));
        for ((p, g), (m, v)) in &mut blocks {
            // (terms first, then the adds: the loops vectorise separately)
            let mut terms_p = [0.0f64; LANES];
            let mut terms_u = [0.0f64; LANES];
            for l in 0..LANES {
                (terms_p[l], terms_u[l]) = k.moments(p[l], g[l], &mut m[l], &mut v[l]);
            }
            for l in 0..LANES {
                acc_p[l] += terms_p[l];
                acc_u[l] += terms_u[l];
            }
        }
        let done = n - n % LANES;
        let (mut tail_p, mut tail_u) = (0.0, 0.0);
        for i in done..n {
            let (sp, su) = k.moments(p[i], g[i], &mut m[i], &mut v[i]);
            tail_p += sp;
            tail_u += su;
        }
        (tree(acc_p) + tail_p, tree(acc_u) + tail_u)
    }
}

/// Pass 2 over one segment: `p = u*r*(-step_size) + p`.
struct Pass2<'s, T> {
    param: &'s mut [T],
    exp_avg: &'s [T],
    exp_avg_sq: &'s [T],
    k: Consts<T>,
    ratio: T,
}

impl<T: FloatGrad> SimdTask for Pass2<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let n = self.param.len();
        let (m, v) = (&self.exp_avg[..n], &self.exp_avg_sq[..n]);
        let (k, ratio) = (self.k, self.ratio);
        for ((p, &m), &v) in self.param.iter_mut().zip(m).zip(v) {
            let q = k.decayed(*p);
            let u = k.update(q, m, v);
            let u = if k.adam { u } else { u * ratio };
            *p = u.mul_add(k.neg_step_size, q);
        }
    }
}

/// `(weight_norm, adam_norm, trust_ratio)` of a tensor of dtype `T` from its
/// squared norms, in `T`'s arithmetic (as float64 values).
pub fn trust_ratio<T: Real>(param_sq: f64, update_sq: f64, eps: f64) -> [f64; 3] {
    let weight_norm = T::from_f64(param_sq.sqrt());
    let clamp = T::from_f64(CLAMP);
    // clamp_(max=10): NaN stays NaN
    let weight_norm = if weight_norm > clamp {
        clamp
    } else {
        weight_norm
    };
    let adam_norm = T::from_f64(update_sq.sqrt());
    let ratio = if weight_norm != T::ZERO && adam_norm != T::ZERO {
        weight_norm / (adam_norm + T::from_f64(eps))
    } else {
        T::ONE
    };
    [weight_norm.to_f64(), adam_norm.to_f64(), ratio.to_f64()]
}

/// Refuses, before anything is written, a group the passes cannot step: every
/// tensor needs a float32/float64 param, a gradient and two states of its format.
pub fn check(group: &Group<'_>) -> Result<(), EngineError> {
    for (i, t) in group.tensors().iter().enumerate() {
        let format = t.param.map(|b| b.format);
        let ok = matches!(format, Some(Format::F32 | Format::F64))
            && t.grad.map(|b| b.format) == format
            && t.states().len() == 2
            && t.states().iter().all(|b| Some(b.format) == format);
        if !ok {
            return Err(EngineError::Unsupported {
                what: format!(
                    "parameter {i}: LAMB steps float32/float64 params whose gradient, \
                     exp_avg and exp_avg_sq have the param's dtype"
                ),
            });
        }
    }
    Ok(())
}

fn is_f64(segment: &ChunkSlices<'_>) -> bool {
    segment
        .buffers()
        .param
        .is_some_and(|b| b.format == Format::F64)
}

fn run_pass1<T: FloatGrad>(level: SimdLevel, segment: ChunkSlices<'_>, k: Consts<T>) -> (f64, f64) {
    let s = segment.slices::<T, T>();
    let [exp_avg, exp_avg_sq, ..] = s.states;
    dispatch(
        level,
        Pass1 {
            param: s.param,
            grad: s.grad,
            exp_avg,
            exp_avg_sq,
            k,
        },
    )
}

fn run_pass2<T: FloatGrad>(level: SimdLevel, segment: ChunkSlices<'_>, k: Consts<T>, ratio: f64) {
    let s = segment.slices::<T, T>();
    let [exp_avg, exp_avg_sq, ..] = s.states;
    dispatch(
        level,
        Pass2 {
            param: s.param,
            exp_avg,
            exp_avg_sq,
            k,
            ratio: T::from_f64(ratio),
        },
    )
}

/// One LAMB step of `group` (param, grad, `exp_avg`, `exp_avg_sq` per tensor).
/// Returns each tensor's `[weight_norm, adam_norm, trust_ratio]` (rounded to its
/// dtype), tensor after tensor. Errors before anything is written when [`check`]
/// refuses the buffers.
pub fn step(
    group: &Group<'_>,
    h: &LambHyper,
    s: &LambStep,
    ctx: &StepContext,
    level: SimdLevel,
) -> Result<Vec<[f64; 3]>, EngineError> {
    check(group)?;
    let (k32, k64) = (Consts::<f32>::new(h, s, ctx), Consts::<f64>::new(h, s, ctx));
    let partials: Vec<Vec<(usize, (f64, f64))>> = group.for_each_chunk(|segments| {
        segments
            .map(|segment| {
                let i = segment.tensor_index();
                let sums = if is_f64(&segment) {
                    run_pass1(level, segment, k64)
                } else {
                    run_pass1(level, segment, k32)
                };
                (i, sums)
            })
            .collect()
    });
    let mut sums = vec![(0.0f64, 0.0f64); group.len()];
    for (i, (sp, su)) in partials.into_iter().flatten() {
        sums[i].0 += sp;
        sums[i].1 += su;
    }
    let norms: Vec<[f64; 3]> = group
        .tensors()
        .iter()
        .zip(&sums)
        .map(|(t, &(sp, su))| {
            if t.param.is_some_and(|b| b.format == Format::F64) {
                trust_ratio::<f64>(sp, su, h.eps)
            } else {
                trust_ratio::<f32>(sp, su, h.eps)
            }
        })
        .collect();
    group.for_each_chunk(|segments| {
        for segment in segments {
            let ratio = norms[segment.tensor_index()][2];
            if is_f64(&segment) {
                run_pass2(level, segment, k64, ratio);
            } else {
                run_pass2(level, segment, k32, ratio);
            }
        }
    });
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Buffer, TensorBuffers};
    use crate::simd::SimdLevel;

    struct Tensor<T> {
        p: Vec<T>,
        g: Vec<T>,
        m: Vec<T>,
        v: Vec<T>,
    }

    fn tensors<T: Real>(lens: &[usize]) -> Vec<Tensor<T>> {
        lens.iter()
            .enumerate()
            .map(|(t, &n)| {
                let f = |i: usize, k: f64| T::from_f64(((i * 7 + t * 13) % 23) as f64 * k - 0.3);
                Tensor {
                    p: (0..n).map(|i| f(i, 0.05)).collect(),
                    g: (0..n).map(|i| f(i + 5, 0.011)).collect(),
                    m: (0..n).map(|i| f(i + 1, 0.001)).collect(),
                    v: (0..n)
                        .map(|i| square(f(i + 2, 0.001)))
                        .map(T::from_f64)
                        .collect(),
                }
            })
            .collect()
    }

    fn buffer<T: crate::engine::Storage>(v: &[T]) -> Buffer {
        Buffer::new(v.as_ptr() as usize, T::FORMAT)
    }

    fn run<T: FloatGrad + crate::engine::Storage>(
        ts: &mut [Tensor<T>],
        h: &LambHyper,
        s: &LambStep,
        level: SimdLevel,
    ) -> Vec<[f64; 3]> {
        let bufs: Vec<TensorBuffers> = ts
            .iter_mut()
            .map(|t| {
                TensorBuffers::param(t.p.len(), buffer(&t.p), Some(buffer(&t.g)))
                    .with_states(&[buffer(&t.m), buffer(&t.v)])
            })
            .collect();
        // SAFETY: every buffer is a live, distinct Vec of its length.
        let group = unsafe { Group::new(bufs) }.unwrap();
        step(&group, h, s, &StepContext::default(), level).unwrap()
    }

    /// The reference's `_step_foreach`, op for op, on float64 values (indexed element
    /// by element, as a transcription reads best).
    #[allow(clippy::needless_range_loop)]
    fn reference(t: &mut Tensor<f64>, h: &LambHyper, s: &LambStep) -> [f64; 3] {
        let [b1, b2] = h.betas;
        let b3 = if h.grad_averaging { 1.0 - b1 } else { 1.0 };
        let mut u = vec![0.0; t.p.len()];
        for i in 0..t.p.len() {
            let mut g = t.g[i];
            if h.maximize {
                g = -g;
            }
            g *= s.pre_scale;
            if h.weight_decouple && h.weight_decay != 0.0 {
                t.p[i] *= 1.0 - h.weight_decay * if h.fixed_decay { 1.0 } else { h.lr };
            }
            t.m[i] = b3.mul_add(g, t.m[i] * b1);
            t.v[i] = ((1.0 - b2) * g).mul_add(g, t.v[i] * b2);
            u[i] = (1.0 / (t.v[i].sqrt() + h.eps)) * t.m[i];
            if !h.weight_decouple && h.weight_decay > 0.0 {
                u[i] = t.p[i].mul_add(h.weight_decay, u[i]);
            }
        }
        let wn = t.p.iter().map(|x| x * x).sum::<f64>().sqrt().min(CLAMP);
        let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let r = if wn != 0.0 && un != 0.0 {
            wn / (un + h.eps)
        } else {
            1.0
        };
        for i in 0..t.p.len() {
            let ui = if h.adam { u[i] } else { u[i] * r };
            t.p[i] = ui.mul_add(-s.step_size, t.p[i]);
        }
        [wn, un, r]
    }

    fn hypers() -> Vec<LambHyper> {
        let d = LambHyper::default();
        vec![
            d,
            LambHyper {
                weight_decay: 0.1,
                maximize: true,
                ..d
            },
            LambHyper {
                weight_decay: 0.1,
                fixed_decay: true,
                grad_averaging: false,
                ..d
            },
            LambHyper {
                weight_decay: 0.05,
                weight_decouple: false,
                adam: true,
                ..d
            },
        ]
    }

    const LENS: &[usize] = &[1, 17, 100_003, 0, 33];

    #[test]
    fn float64_matches_a_transcription_of_the_reference() {
        let s = LambStep {
            step_size: 0.01,
            pre_scale: 0.75,
        };
        for h in hypers() {
            let mut ours = tensors::<f64>(LENS);
            let mut theirs = tensors::<f64>(LENS);
            for _ in 0..3 {
                let got = run(&mut ours, &h, &s, SimdLevel::Scalar);
                for (t, norms) in theirs.iter_mut().zip(got) {
                    let want = reference(t, &h, &s);
                    for (a, b) in norms.iter().zip(want) {
                        assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
                    }
                }
            }
            for (a, b) in ours.iter().zip(&theirs) {
                for (x, y) in a.p.iter().zip(&b.p) {
                    assert!(
                        (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                        "{x} vs {y} ({h:?})"
                    );
                }
                assert_eq!(a.m, b.m);
                assert_eq!(a.v, b.v);
            }
        }
    }

    #[test]
    fn bitwise_equal_at_every_simd_level_and_thread_count() {
        let s = LambStep {
            step_size: 0.003,
            pre_scale: 1.0,
        };
        for h in hypers() {
            let run_all = |level| {
                let mut ts = tensors::<f32>(LENS);
                run(&mut ts, &h, &s, level);
                let norms = run(&mut ts, &h, &s, level);
                (
                    ts.into_iter().map(|t| (t.p, t.m, t.v)).collect::<Vec<_>>(),
                    norms,
                )
            };
            let want = run_all(SimdLevel::Scalar);
            for level in SimdLevel::supported() {
                assert!(run_all(level) == want, "{level}: differs ({h:?})");
            }
            for threads in [1, 3] {
                crate::parallel::set_num_threads(threads).unwrap();
                let got = run_all(SimdLevel::detect());
                crate::parallel::set_num_threads(2).unwrap();
                assert!(got == want, "{threads} threads: differs ({h:?})");
            }
        }
    }

    #[test]
    fn refuses_missing_states_before_writing() {
        let mut p = vec![1.0f32; 8];
        let g = vec![1.0f32; 8];
        let b = TensorBuffers::param(8, buffer(&p), Some(buffer(&g)));
        // SAFETY: live, distinct buffers.
        let group = unsafe { Group::new(vec![b]) }.unwrap();
        let h = LambHyper::default();
        let s = LambStep {
            step_size: 1.0,
            pre_scale: 1.0,
        };
        assert!(step(&group, &h, &s, &StepContext::default(), SimdLevel::Scalar).is_err());
        p[0] += 0.0;
        assert_eq!(p, vec![1.0f32; 8]);
    }
}

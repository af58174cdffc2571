//! Adam and AdamW (torch.optim semantics, including AMSGrad and maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/adam.py::_single_tensor_adam`, non-capturable branch). Each
//! element goes through the same operations in the same order, with scalars
//! computed in float64 and rounded to the tensor's dtype exactly where torch
//! rounds them:
//!
//! ```text
//! grad = grad * inv_scale * clip_coef         (GradScaler unscale, clipping; 1.0 when off)
//! g = -grad if maximize else grad
//! AdamW:  p = p * (1 - lr*wd)                 param.mul_(1 - lr * weight_decay)
//! Adam:   g = p*wd + g   (fused)              grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! vmax = maximum(vmax, v)                     (amsgrad)
//! denom = sqrt(v or vmax) / sqrt(bc2) + eps
//! p = p + (-lr/bc1 * m) / denom               param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//!
//! One pass over memory: read p, g, m, v (vmax); write p, m, v (vmax).

use super::{consts_for, run_segments, GradScale, GradScaleOf, Lerp, Real, SegmentKernel, Storage};
use crate::engine::{Group, Slices};
use crate::simd::SimdLevel;

/// Hyperparameters of one parameter group, as torch keeps them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay (`param *= 1 - lr * wd`) instead of L2 (`grad += wd * param`).
    pub decoupled_weight_decay: bool,
    pub amsgrad: bool,
    pub maximize: bool,
    /// Unscaling and clipping applied to every gradient as it is read.
    pub grad_scale: GradScale,
    /// `lr` is a float32 tensor: torch then computes `lr / bc1` and
    /// `1 - lr * wd` in float32 tensor arithmetic.
    pub lr_is_f32: bool,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            amsgrad: false,
            maximize: false,
            grad_scale: GradScale::default(),
            lr_is_f32: false,
        }
    }
}

/// Weight-decay variants, specialised at compile time.
const WD_NONE: u8 = 0;
const WD_L2: u8 = 1;
const WD_DECOUPLED: u8 = 2;

impl AdamHyper {
    /// Number of state buffers per parameter: exp_avg, exp_avg_sq (, max_exp_avg_sq).
    pub fn num_states(&self) -> usize {
        if self.amsgrad {
            3
        } else {
            2
        }
    }

    fn weight_decay_mode(&self) -> u8 {
        if self.weight_decay == 0.0 {
            WD_NONE
        } else if self.decoupled_weight_decay {
            WD_DECOUPLED
        } else {
            WD_L2
        }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts<C> {
    grad_scale: GradScaleOf<C>,
    lerp: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    eps: C,
    /// L2: `alpha` of `grad.add(param, alpha=wd)`; decoupled: `1 - lr * wd`.
    weight_decay: C,
    neg_step_size: C,
    bias_correction2_sqrt: C,
}

impl<C: Real> AdamConsts<C> {
    /// Constants for step number `step` (already incremented), computed in
    /// float64 exactly as torch's Python code computes them.
    pub fn new(h: &AdamHyper, step: f64) -> Self {
        let bias_correction1 = 1.0 - h.beta1.powf(step);
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let step_size = if h.lr_is_f32 {
            f64::from(h.lr as f32 / bias_correction1 as f32)
        } else {
            h.lr / bias_correction1
        };
        // Python's `bias_correction2 ** 0.5` is libm's pow, which LLVM would
        // otherwise rewrite to sqrt for a literal 0.5.
        let bias_correction2_sqrt = bias_correction2.powf(std::hint::black_box(0.5));
        let weight_decay = if h.decoupled_weight_decay && h.lr_is_f32 {
            f64::from(1.0 - h.lr as f32 * h.weight_decay as f32)
        } else if h.decoupled_weight_decay {
            1.0 - h.lr * h.weight_decay
        } else {
            h.weight_decay
        };
        AdamConsts {
            grad_scale: GradScaleOf::new(&h.grad_scale),
            lerp: Lerp::new(1.0 - h.beta1),
            beta2: C::from_f64(h.beta2),
            one_minus_beta2: C::from_f64(1.0 - h.beta2),
            eps: C::from_f64(h.eps),
            weight_decay: C::from_f64(weight_decay),
            neg_step_size: C::from_f64(-step_size),
            bias_correction2_sqrt: C::from_f64(bias_correction2_sqrt),
        }
    }
}

/// One tensor's slices for [`adam_update`]; `max_exp_avg_sq` is empty unless AMSGrad.
pub struct AdamSlices<'a, S> {
    pub param: &'a mut [S],
    pub grad: &'a [S],
    pub exp_avg: &'a mut [S],
    pub exp_avg_sq: &'a mut [S],
    pub max_exp_avg_sq: &'a mut [S],
}

#[inline(always)]
fn element<C: Real, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    k: &AdamConsts<C>,
    param: C,
    grad: C,
    exp_avg: C,
    exp_avg_sq: C,
    max_exp_avg_sq: C,
) -> (C, C, C, C) {
    let mut p = param;
    let grad = k.grad_scale.apply(grad);
    let mut g = if MAXIMIZE { -grad } else { grad };
    if WD == WD_DECOUPLED {
        p = p * k.weight_decay;
    } else if WD == WD_L2 {
        g = p.mul_add(k.weight_decay, g);
    }
    let m = k.lerp.apply(exp_avg, g);
    let v = (k.one_minus_beta2 * g).mul_add(g, exp_avg_sq * k.beta2);
    let (vmax, second) = if AMSGRAD {
        let vmax = max_exp_avg_sq.max_propagate_nan(v);
        (vmax, vmax)
    } else {
        (max_exp_avg_sq, v)
    };
    let denom = second.sqrt() / k.bias_correction2_sqrt + k.eps;
    p = p + k.neg_step_size * m / denom;
    (p, m, v, vmax)
}

/// Updates one tensor (or one range of it) in a single pass.
#[inline(always)]
pub fn adam_update<S: Storage, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    s: AdamSlices<'_, S>,
    k: &AdamConsts<S::Compute>,
) {
    let n = s.param.len();
    let grad = &s.grad[..n];
    let exp_avg = &mut s.exp_avg[..n];
    let exp_avg_sq = &mut s.exp_avg_sq[..n];
    let param = &mut s.param[..n];
    if AMSGRAD {
        let max_exp_avg_sq = &mut s.max_exp_avg_sq[..n];
        for i in 0..n {
            let (p, m, v, vmax) = element::<_, true, MAXIMIZE, WD>(
                k,
                param[i].load(),
                grad[i].load(),
                exp_avg[i].load(),
                exp_avg_sq[i].load(),
                max_exp_avg_sq[i].load(),
            );
            param[i] = S::store(p);
            exp_avg[i] = S::store(m);
            exp_avg_sq[i] = S::store(v);
            max_exp_avg_sq[i] = S::store(vmax);
        }
    } else {
        for i in 0..n {
            let zero = <S::Compute as Real>::ZERO;
            let (p, m, v, _) = element::<_, false, MAXIMIZE, WD>(
                k,
                param[i].load(),
                grad[i].load(),
                exp_avg[i].load(),
                exp_avg_sq[i].load(),
                zero,
            );
            param[i] = S::store(p);
            exp_avg[i] = S::store(m);
            exp_avg_sq[i] = S::store(v);
        }
    }
}

/// Adam over a group's segments, one constant set per tensor.
struct AdamKernel<C, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8> {
    consts: Vec<AdamConsts<C>>,
}

impl<T, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8> SegmentKernel<T>
    for AdamKernel<T, AMSGRAD, MAXIMIZE, WD>
where
    T: Storage<Compute = T> + Real,
{
    #[inline(always)]
    fn apply(&self, tensor: usize, s: Slices<'_, T>) {
        let [exp_avg, exp_avg_sq, max_exp_avg_sq] = s.states;
        let slices = AdamSlices {
            param: s.param,
            grad: s.grad,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
        };
        adam_update::<T, AMSGRAD, MAXIMIZE, WD>(slices, &self.consts[tensor]);
    }
}

/// Steps a whole group: increments every step counter, then updates all
/// tensors chunk by chunk on the pool. Returns the new step counts.
///
/// # Panics
/// If a tensor of the group does not carry the `h.num_states()` buffers
/// exp_avg, exp_avg_sq (, max_exp_avg_sq) in that order, or no step counter.
pub fn adam_step(group: &mut Group<'_>, h: &AdamHyper, level: SimdLevel) -> Vec<f64> {
    for t in group.tensors() {
        assert_eq!(t.num_states, h.num_states(), "Adam state buffers missing");
        assert!(t.step.is_some(), "Adam needs a step counter per parameter");
    }
    let steps = group.increment_steps();
    let group = &*group;
    crate::const_bool!(h.amsgrad, AMSGRAD, {
        crate::const_bool!(h.maximize, MAXIMIZE, {
            match h.weight_decay_mode() {
                WD_NONE => run::<AMSGRAD, MAXIMIZE, WD_NONE>(group, h, &steps, level),
                WD_L2 => run::<AMSGRAD, MAXIMIZE, WD_L2>(group, h, &steps, level),
                _ => run::<AMSGRAD, MAXIMIZE, WD_DECOUPLED>(group, h, &steps, level),
            }
        })
    });
    steps
}

fn run<const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    group: &Group<'_>,
    h: &AdamHyper,
    steps: &[f64],
    level: SimdLevel,
) {
    let k32 = AdamKernel::<f32, AMSGRAD, MAXIMIZE, WD> {
        consts: consts_for::<f32, _>(group, steps, |step| AdamConsts::new(h, step)),
    };
    let k64 = AdamKernel::<f64, AMSGRAD, MAXIMIZE, WD> {
        consts: consts_for::<f64, _>(group, steps, |step| AdamConsts::new(h, step)),
    };
    run_segments(group, level, &k32, &k64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, group_of, set_grads,
    };

    /// A straightforward transcription of torch's `_single_tensor_adam`
    /// (non-capturable branch) in float64, one operation per line.
    fn reference_step(h: &AdamHyper, step: f64, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let [m, v, vmax] = s else { unreachable!() };
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                if h.decoupled_weight_decay {
                    p[i] *= 1.0 - h.lr * h.weight_decay;
                } else {
                    grad = p[i].mul_add(h.weight_decay, grad);
                }
            }
            m[i] = (1.0 - h.beta1).mul_add(grad - m[i], m[i]);
            v[i] = ((1.0 - h.beta2) * grad).mul_add(grad, v[i] * h.beta2);
            let bc1 = 1.0 - h.beta1.powf(step);
            let bc2 = 1.0 - h.beta2.powf(step);
            let step_size = h.lr / bc1;
            let second = if h.amsgrad {
                vmax[i] = vmax[i].max(v[i]);
                vmax[i]
            } else {
                v[i]
            };
            let denom = second.sqrt() / bc2.powf(0.5) + h.eps;
            p[i] += -step_size * m[i] / denom;
        }
    }

    fn all_hypers() -> Vec<AdamHyper> {
        let mut out = Vec::new();
        for amsgrad in [false, true] {
            for maximize in [false, true] {
                for (weight_decay, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
                    out.push(AdamHyper {
                        lr: 0.01,
                        amsgrad,
                        maximize,
                        weight_decay,
                        decoupled_weight_decay: decoupled,
                        ..AdamHyper::default()
                    });
                }
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64>(&lens, h.num_states(), 0.0);
            let mut reference = buffers::<f64>(&lens, 3, 0.0);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                let steps = adam_step(&mut group_of(&mut ours, true), &h, SimdLevel::detect());
                assert!(steps.iter().all(|&s| s == step as f64));
                for r in reference.iter_mut() {
                    reference_step(&h, step as f64, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-13, &format!("{h:?}"));
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere(h.num_states(), 0.0, &|group, level| {
                adam_step(group, &h, level);
            });
        }
    }

    #[test]
    fn grad_scale_equals_prescaled_grads() {
        let h = AdamHyper {
            grad_scale: GradScale {
                unscale: 0.5,
                clip: 0.5,
            },
            ..AdamHyper::default()
        };
        let mut scaled = buffers::<f32>(&[1000], 2, 0.0);
        let mut prescaled = buffers::<f32>(&[1000], 2, 0.0);
        for step in 1..=5 {
            set_grads(&mut scaled, step);
            set_grads(&mut prescaled, step);
            prescaled[0].g.iter_mut().for_each(|g| *g *= 0.25);
            adam_step(&mut group_of(&mut scaled, true), &h, SimdLevel::detect());
            let plain = AdamHyper::default();
            adam_step(
                &mut group_of(&mut prescaled, true),
                &plain,
                SimdLevel::detect(),
            );
        }
        assert_eq!(scaled[0].p, prescaled[0].p);
    }

    #[test]
    fn amsgrad_keeps_nan_like_torch_maximum() {
        let h = AdamHyper {
            amsgrad: true,
            ..AdamHyper::default()
        };
        let mut bufs = buffers::<f64>(&[4], 3, 0.0);
        bufs[0].g = vec![f64::NAN, 1.0, 1.0, 1.0];
        adam_step(&mut group_of(&mut bufs, true), &h, SimdLevel::detect());
        assert!(bufs[0].states[2][0].is_nan());
        assert!(bufs[0].p[0].is_nan());
        assert!(bufs[0].p[1].is_finite());
    }
}

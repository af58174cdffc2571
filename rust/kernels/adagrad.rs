//! Adagrad with learning-rate decay and weight decay (torch.optim semantics, dense grads).
//!
//! Reference: `torch/optim/adagrad.py::_single_tensor_adagrad`, per element:
//!
//! ```text
//! grad = grad * inv_scale * clip_coef         (GradScaler unscale, clipping; 1.0 when off)
//! g = -grad if maximize else grad
//! g = p*wd + g   (fused)                        grad.add(param, alpha=weight_decay)
//! clr = lr / (1 + (step - 1) * lr_decay)        (float64, per tensor)
//! sum = g*g + sum   (fused)                     state_sum.addcmul_(grad, grad, value=1)
//! std = sqrt(sum) + eps                         state_sum.sqrt().add_(eps)
//! p = p + (-clr*g)/std                          param.addcdiv_(grad, std, value=-clr)
//! ```
//!
//! Sparse gradients take torch's own path (see the Python layer).

use super::{consts_for, run_segments, GradScale, GradScaleOf, Real, SegmentKernel, Storage};
use crate::engine::{Group, Slices};
use crate::simd::SimdLevel;

/// Hyperparameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradHyper {
    pub lr: f64,
    pub lr_decay: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub maximize: bool,
    /// Unscaling and clipping applied to every gradient as it is read.
    pub grad_scale: GradScale,
    /// `lr` is a float32 tensor: torch then computes `clr` in float32.
    pub lr_is_f32: bool,
}

impl Default for AdagradHyper {
    fn default() -> Self {
        AdagradHyper {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            eps: 1e-10,
            maximize: false,
            grad_scale: GradScale::default(),
            lr_is_f32: false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct AdagradConsts<C> {
    grad_scale: GradScaleOf<C>,
    weight_decay: C,
    eps: C,
    neg_clr: C,
}

impl<C: Real> AdagradConsts<C> {
    fn new(h: &AdagradHyper, step: f64) -> Self {
        let decay = 1.0 + (step - 1.0) * h.lr_decay;
        let clr = if h.lr_is_f32 {
            f64::from(h.lr as f32 / decay as f32)
        } else {
            h.lr / decay
        };
        AdagradConsts {
            grad_scale: GradScaleOf::new(&h.grad_scale),
            weight_decay: C::from_f64(h.weight_decay),
            eps: C::from_f64(h.eps),
            neg_clr: C::from_f64(-clr),
        }
    }
}

struct AdagradKernel<C, const MAXIMIZE: bool, const WD: bool> {
    consts: Vec<AdagradConsts<C>>,
}

impl<T, const MAXIMIZE: bool, const WD: bool> SegmentKernel<T> for AdagradKernel<T, MAXIMIZE, WD>
where
    T: Storage<Compute = T> + Real,
{
    #[inline(always)]
    fn apply(&self, tensor: usize, s: Slices<'_, T>) {
        let k = &self.consts[tensor];
        let n = s.param.len();
        let param = &mut s.param[..n];
        let grad = &s.grad[..n];
        let [sum, _, _] = s.states;
        let sum = &mut sum[..n];
        for i in 0..n {
            let p = param[i];
            let grad = k.grad_scale.apply(grad[i]);
            let mut g = if MAXIMIZE { -grad } else { grad };
            if WD {
                g = p.mul_add(k.weight_decay, g);
            }
            let total = g.mul_add(g, sum[i]);
            sum[i] = total;
            let std = total.sqrt() + k.eps;
            param[i] = p + k.neg_clr * g / std;
        }
    }
}

/// Steps a whole group: increments the step counters, then updates every tensor.
///
/// # Panics
/// If a tensor lacks its `sum` buffer or step counter.
pub fn adagrad_step(group: &mut Group<'_>, h: &AdagradHyper, level: SimdLevel) {
    for t in group.tensors() {
        assert_eq!(t.num_states, 1, "Adagrad needs its `sum` buffer");
        assert!(
            t.step.is_some(),
            "Adagrad needs a step counter per parameter"
        );
    }
    let steps = group.increment_steps();
    let group = &*group;
    crate::const_bool!(h.maximize, MAXIMIZE, {
        crate::const_bool!(h.weight_decay != 0.0, WD, {
            let k32 = AdagradKernel::<f32, MAXIMIZE, WD> {
                consts: consts_for::<f32, _>(group, &steps, |step| AdagradConsts::new(h, step)),
            };
            let k64 = AdagradKernel::<f64, MAXIMIZE, WD> {
                consts: consts_for::<f64, _>(group, &steps, |step| AdagradConsts::new(h, step)),
            };
            run_segments(group, level, &k32, &k64);
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, group_of, set_grads,
    };

    /// torch's `_single_tensor_adagrad` (dense branch), transcribed in float64.
    fn reference_step(h: &AdagradHyper, step: f64, p: &mut [f64], g: &[f64], sum: &mut [f64]) {
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                grad = p[i].mul_add(h.weight_decay, grad);
            }
            let clr = h.lr / (1.0 + (step - 1.0) * h.lr_decay);
            sum[i] = grad.mul_add(grad, sum[i]);
            let std = sum[i].sqrt() + h.eps;
            p[i] += -clr * grad / std;
        }
    }

    fn all_hypers() -> Vec<AdagradHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.05] {
                for lr_decay in [0.0, 0.01] {
                    out.push(AdagradHyper {
                        maximize,
                        weight_decay,
                        lr_decay,
                        ..AdagradHyper::default()
                    });
                }
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64>(&lens, 1, 0.1);
            let mut reference = buffers::<f64>(&lens, 1, 0.1);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                adagrad_step(&mut group_of(&mut ours, true), &h, SimdLevel::detect());
                for r in reference.iter_mut() {
                    reference_step(&h, step as f64, &mut r.p, &r.g, &mut r.states[0]);
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
            assert_bitwise_everywhere(1, 0.1, &|group, level| adagrad_step(group, &h, level));
        }
    }
}

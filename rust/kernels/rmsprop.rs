//! RMSprop, plain or centered, with momentum and weight decay (torch.optim semantics).
//!
//! Reference: `torch/optim/rmsprop.py::_single_tensor_rmsprop`, per element:
//!
//! ```text
//! grad = grad * inv_scale * clip_coef         (GradScaler unscale, clipping; 1.0 when off)
//! g = -grad if maximize else grad
//! g = p*wd + g   (fused)                        grad.add(param, alpha=weight_decay)
//! sq = ((1 - alpha)*g)*g + sq*alpha  (fused)   square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
//! centered:  ga = lerp(ga, g, 1 - alpha)        grad_avg.lerp_(grad, 1 - alpha)
//!            avg = sqrt((-ga)*ga + sq) (fused) square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
//! else:      avg = sqrt(sq)
//! avg = avg + eps
//! momentum:  buf = buf*momentum + g/avg         buf.mul_(momentum).addcdiv_(grad, avg)
//!            p = buf*(-lr) + p   (fused)        param.add_(buf, alpha=-lr)
//! else:      p = p + (-lr*g)/avg                param.addcdiv_(grad, avg, value=-lr)
//! ```
//!
//! State buffers, in order: square_avg, momentum_buffer (momentum > 0),
//! grad_avg (centered).

use super::{run_segments, GradScale, GradScaleOf, Lerp, Real, SegmentKernel, Storage};
use crate::engine::{Group, Slices};
use crate::simd::SimdLevel;

/// Hyperparameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmspropHyper {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
    pub maximize: bool,
    /// Unscaling and clipping applied to every gradient as it is read.
    pub grad_scale: GradScale,
}

impl Default for RmspropHyper {
    fn default() -> Self {
        RmspropHyper {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            maximize: false,
            grad_scale: GradScale::default(),
        }
    }
}

impl RmspropHyper {
    pub fn num_states(&self) -> usize {
        1 + usize::from(self.momentum > 0.0) + usize::from(self.centered)
    }
}

#[derive(Clone, Copy, Debug)]
struct RmspropConsts<C> {
    grad_scale: GradScaleOf<C>,
    weight_decay: C,
    alpha: C,
    one_minus_alpha: C,
    lerp: Lerp<C>,
    eps: C,
    momentum: C,
    neg_lr: C,
}

impl<C: Real> RmspropConsts<C> {
    fn new(h: &RmspropHyper) -> Self {
        RmspropConsts {
            grad_scale: GradScaleOf::new(&h.grad_scale),
            weight_decay: C::from_f64(h.weight_decay),
            alpha: C::from_f64(h.alpha),
            one_minus_alpha: C::from_f64(1.0 - h.alpha),
            lerp: Lerp::new(1.0 - h.alpha),
            eps: C::from_f64(h.eps),
            momentum: C::from_f64(h.momentum),
            neg_lr: C::from_f64(-h.lr),
        }
    }
}

struct RmspropKernel<
    C,
    const MAXIMIZE: bool,
    const WD: bool,
    const CENTERED: bool,
    const MOMENTUM: bool,
> {
    consts: RmspropConsts<C>,
}

impl<T, const MAXIMIZE: bool, const WD: bool, const CENTERED: bool, const MOMENTUM: bool>
    SegmentKernel<T> for RmspropKernel<T, MAXIMIZE, WD, CENTERED, MOMENTUM>
where
    T: Storage<Compute = T> + Real,
{
    #[inline(always)]
    fn apply(&self, _tensor: usize, s: Slices<'_, T>) {
        let k = &self.consts;
        let n = s.param.len();
        let param = &mut s.param[..n];
        let grad = &s.grad[..n];
        let [square_avg, second, third] = s.states;
        let square_avg = &mut square_avg[..n];
        // Optional buffers sit after square_avg in the order momentum, grad_avg.
        let (momentum_buffer, grad_avg): (&mut [T], &mut [T]) = match (MOMENTUM, CENTERED) {
            (true, true) => (&mut second[..n], &mut third[..n]),
            (true, false) => (&mut second[..n], &mut []),
            (false, true) => (&mut [], &mut second[..n]),
            (false, false) => (&mut [], &mut []),
        };
        for i in 0..n {
            let p = param[i];
            let grad = k.grad_scale.apply(grad[i]);
            let mut g = if MAXIMIZE { -grad } else { grad };
            if WD {
                g = p.mul_add(k.weight_decay, g);
            }
            let sq = (k.one_minus_alpha * g).mul_add(g, square_avg[i] * k.alpha);
            square_avg[i] = sq;
            let avg = if CENTERED {
                let ga = k.lerp.apply(grad_avg[i], g);
                grad_avg[i] = ga;
                (-ga).mul_add(ga, sq).sqrt()
            } else {
                sq.sqrt()
            } + k.eps;
            param[i] = if MOMENTUM {
                let buf = momentum_buffer[i] * k.momentum + g / avg;
                momentum_buffer[i] = buf;
                buf.mul_add(k.neg_lr, p)
            } else {
                p + k.neg_lr * g / avg
            };
        }
    }
}

/// Steps a whole group: increments the step counters (torch keeps one for
/// RMSprop, though the update does not use it), then updates every tensor.
///
/// # Panics
/// If tensors do not carry `h.num_states()` state buffers.
pub fn rmsprop_step(group: &mut Group<'_>, h: &RmspropHyper, level: SimdLevel) {
    for t in group.tensors() {
        assert_eq!(
            t.num_states,
            h.num_states(),
            "RMSprop state buffers missing"
        );
    }
    group.increment_steps();
    let group = &*group;
    crate::const_bool!(h.maximize, MAXIMIZE, {
        crate::const_bool!(h.weight_decay != 0.0, WD, {
            crate::const_bool!(h.centered, CENTERED, {
                crate::const_bool!(h.momentum > 0.0, MOMENTUM, {
                    let k32 = RmspropKernel::<f32, MAXIMIZE, WD, CENTERED, MOMENTUM> {
                        consts: RmspropConsts::new(h),
                    };
                    let k64 = RmspropKernel::<f64, MAXIMIZE, WD, CENTERED, MOMENTUM> {
                        consts: RmspropConsts::new(h),
                    };
                    run_segments(group, level, &k32, &k64);
                })
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, group_of, set_grads,
    };

    /// torch's `_single_tensor_rmsprop`, transcribed in float64 (states:
    /// square_avg, momentum_buffer, grad_avg — all always present here).
    fn reference_step(h: &RmspropHyper, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let [sq, buf, ga] = s else { unreachable!() };
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                grad = p[i].mul_add(h.weight_decay, grad);
            }
            sq[i] = ((1.0 - h.alpha) * grad).mul_add(grad, sq[i] * h.alpha);
            let mut avg = if h.centered {
                ga[i] = (1.0 - h.alpha).mul_add(grad - ga[i], ga[i]);
                (-ga[i]).mul_add(ga[i], sq[i]).sqrt()
            } else {
                sq[i].sqrt()
            };
            avg += h.eps;
            if h.momentum > 0.0 {
                buf[i] = buf[i] * h.momentum + grad / avg;
                p[i] = buf[i].mul_add(-h.lr, p[i]);
            } else {
                p[i] += -h.lr * grad / avg;
            }
        }
    }

    fn all_hypers() -> Vec<RmspropHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.05] {
                for centered in [false, true] {
                    for momentum in [0.0, 0.9] {
                        out.push(RmspropHyper {
                            maximize,
                            weight_decay,
                            centered,
                            momentum,
                            ..RmspropHyper::default()
                        });
                    }
                }
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64>(&lens, h.num_states(), 0.0);
            let mut reference = buffers::<f64>(&lens, 3, 0.0);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                rmsprop_step(&mut group_of(&mut ours, true), &h, SimdLevel::detect());
                for r in reference.iter_mut() {
                    reference_step(&h, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-12, &format!("{h:?}"));
                assert_eq!(b.step, 20.0);
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere(h.num_states(), 0.0, &|group, level| {
                rmsprop_step(group, &h, level);
            });
        }
    }
}

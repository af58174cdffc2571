//! RMSprop, plain or centered, with momentum and weight decay (torch.optim semantics).
//!
//! Reference: `torch/optim/rmsprop.py::_single_tensor_rmsprop`, per element:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay g = p*wd + g)
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

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// RMSprop's hyperparameters, under torch's param-group names.
    pub struct RmspropHyper {
        lr: f64,
        alpha: f64,
        eps: f64,
        weight_decay: f64,
        momentum: f64,
        centered: bool,
        maximize: bool,
    }
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
        }
    }
}

/// A momentum buffer is kept (`momentum > 0`).
const MOMENTUM: u32 = 1 << 2;
/// Centered: a running mean of the gradient is kept and subtracted.
const CENTERED: u32 = 1 << 3;

#[derive(Clone, Copy, Debug)]
pub struct RmspropConsts<C> {
    alpha: C,
    one_minus_alpha: C,
    lerp: Lerp<C>,
    eps: C,
    momentum: C,
    neg_lr: C,
}

/// RMSprop.
pub struct Rmsprop;

impl Elementwise for Rmsprop {
    const NAME: &'static str = "rmsprop";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = RmspropHyper;
    type Consts<C: Real> = RmspropConsts<C>;

    fn state_keys(h: &RmspropHyper) -> &'static [&'static str] {
        match (h.momentum > 0.0, h.centered) {
            (true, true) => &["square_avg", "momentum_buffer", "grad_avg"],
            (true, false) => &["square_avg", "momentum_buffer"],
            (false, true) => &["square_avg", "grad_avg"],
            (false, false) => &["square_avg"],
        }
    }

    fn grad_prep(h: &RmspropHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &RmspropHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
            | if h.momentum > 0.0 { MOMENTUM } else { 0 }
            | if h.centered { CENTERED } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        const MC: u32 = MOMENTUM | CENTERED;
        crate::flag_match!(
            flags,
            runner,
            [
                0,
                L2,
                MOMENTUM,
                L2 | MOMENTUM,
                CENTERED,
                L2 | CENTERED,
                MC,
                L2 | MC,
            ]
        )
    }

    #[inline(always)]
    fn num_states(flags: u32) -> usize {
        1 + usize::from(has(flags, MOMENTUM)) + usize::from(has(flags, CENTERED))
    }

    fn consts<C: Real>(h: &RmspropHyper, _scalars: &[f64]) -> RmspropConsts<C> {
        RmspropConsts {
            alpha: C::from_f64(h.alpha),
            one_minus_alpha: C::from_f64(1.0 - h.alpha),
            lerp: Lerp::new(1.0 - h.alpha),
            eps: C::from_f64(h.eps),
            momentum: C::from_f64(h.momentum),
            neg_lr: C::from_f64(-h.lr),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_rmsprop` on a bfloat16/float16 param, op by op.
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &RmspropConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        const fn grad_avg_slot(flags: u32) -> usize {
            if has(flags, MOMENTUM) {
                2
            } else {
                1
            }
        }
        let p = *param;
        // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        let sq = rounded_square_average(s[0], k.alpha, k.one_minus_alpha, g, round);
        s[0] = sq;
        let avg = if has(FLAGS, CENTERED) {
            let slot = grad_avg_slot(FLAGS);
            let ga = round(k.lerp.apply(s[slot], g)); // grad_avg.lerp_(grad, 1 - alpha)
            s[slot] = ga;
            // square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
            round(round((-ga).mul_add(ga, sq)).sqrt())
        } else {
            round(sq.sqrt())
        };
        let avg = round(avg + round(k.eps)); // avg.add_(eps)
        *param = if has(FLAGS, MOMENTUM) {
            // buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            let buf = round(round(s[1] * k.momentum) + g / avg);
            s[1] = buf;
            round(buf.mul_add(round(k.neg_lr), p))
        } else {
            round(p + k.neg_lr * g / avg) // param.addcdiv_(grad, avg, value=-lr)
        };
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &RmspropConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        // Optional buffers sit after square_avg in the order momentum, grad_avg.
        const fn grad_avg_slot(flags: u32) -> usize {
            if has(flags, MOMENTUM) {
                2
            } else {
                1
            }
        }
        let p = *param;
        let sq = (k.one_minus_alpha * g).mul_add(g, s[0] * k.alpha);
        s[0] = sq;
        let avg = if has(FLAGS, CENTERED) {
            let slot = grad_avg_slot(FLAGS);
            let ga = k.lerp.apply(s[slot], g);
            s[slot] = ga;
            (-ga).mul_add(ga, sq).sqrt()
        } else {
            sq.sqrt()
        } + k.eps;
        *param = if has(FLAGS, MOMENTUM) {
            let buf = s[1] * k.momentum + g / avg;
            s[1] = buf;
            buf.mul_add(k.neg_lr, p)
        } else {
            p + k.neg_lr * g / avg
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StepContext;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, set_grads, step_with,
    };
    use crate::simd::SimdLevel;

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
            let mut ours = buffers::<f64, f64>(&lens, Rmsprop::state_keys(&h).len(), 0.0, &[0.0]);
            let mut reference = buffers::<f64, f64>(&lens, 3, 0.0, &[0.0]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Rmsprop, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    reference_step(&h, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-12, &format!("{h:?}"));
                assert_eq!(b.scalars, vec![20.0]);
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Rmsprop>(&h, 0.0, &[0.0]);
        }
    }
}

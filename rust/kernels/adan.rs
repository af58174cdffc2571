//! Adan (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster
//! Optimizing Deep Models"), exactly as the reference implementation
//! `pytorch-optimizer` computes it.
//!
//! Reference: `pytorch_optimizer/optimizer/adan.py::Adan` (its per-parameter loop;
//! the default CPU flavour, `torch._foreach_*` over the same ops, rounds alike). The
//! step counter lives in the param group (`group['step']`): the Python side passes
//! the steps taken before this one. `previous_grad` holds the negated previous
//! gradient; the reference creates it on a param's first step as `-grad` (of the
//! gradient before `maximize`), which this kernel writes on the plan's fresh step.
//! Per element, each line one torch op in the reference's order:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize)
//! prev = fresh ? -g_raw : prev                     state['previous_grad'] = grad.clone().mul_(-1)
//! d = prev + g                                     grad_diff.add_(grad)
//! m = lerp(m, g, 1 - beta1)                        exp_avg.lerp_(grad, 1 - beta1)
//! n = lerp(n, d, 1 - beta2)                        exp_avg_diff.lerp_(grad_diff, 1 - beta2)
//! d = d * beta2;  d = d + g                        grad_diff.mul_(beta2).add_(grad)
//! v = ((1 - beta3)*d)*d + v*beta3  (fused)         exp_avg_sq.mul_(beta3).addcmul_(d, d, value=1 - beta3)
//! q = sqrt(v) / sqrt(bc3) + eps                    exp_avg_sq.sqrt().div_(bc3_sq).add_(eps)
//! decoupled: p = p * (1 - lr*wd)                   p.mul_(1 - lr * wd)
//! p = p + (-lr/bc1 * m) / q                        p.addcdiv_(exp_avg, de_nom, value=-lr / bc1)
//! p = p + (-lr*beta2/bc2 * n) / q                  p.addcdiv_(exp_avg_diff, de_nom, value=-lr * beta2 / bc2)
//! otherwise (wd != 0): p = p / (1 + lr*wd)         p.div_(1 + lr * wd)
//! prev = -g                                        previous_grad.copy_(grad.neg_())
//! ```
//!
//! One pass over memory: read p, g, m, v, n, prev; write p, m, v, n, prev (44
//! bytes/element in float32).

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::hyper::GroupStep;
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// Adan's hyperparameters, under the reference's param-group names (plus torch's
    /// `maximize`), and the group's step counter.
    pub struct AdanHyper {
        /// A float32 tensor `lr` makes the reference compute its scalars (`1 - lr*wd`,
        /// `-lr / bc1`, ...) in float32 tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 3],
        weight_decay: f64,
        /// Decay the param (`p *= 1 - lr*wd`) before the update instead of dividing
        /// it by `1 + lr*wd` after.
        weight_decouple: bool,
        eps: f64,
        maximize: bool,
        /// The steps this group took before this one (`group['step']`).
        step: GroupStep,
    }
}

impl Default for AdanHyper {
    fn default() -> Self {
        AdanHyper {
            lr: TensorScalar::of(1e-3),
            betas: [0.98, 0.92, 0.99],
            weight_decay: 0.0,
            weight_decouple: false,
            eps: 1e-8,
            maximize: false,
            step: GroupStep(0.0),
        }
    }
}

/// Decoupled weight decay (`p *= 1 - lr*wd` before the update).
const DECOUPLED: u32 = 1 << 2;
/// The reference's other decay (`p /= 1 + lr*wd` after the update).
const DIVIDED: u32 = 1 << 3;
/// The param's first step: `previous_grad` is written, not read.
const FIRST: u32 = 1 << 4;

/// The constants of one step, rounded to the compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdanConsts<C> {
    fast: Lerp<C>,
    diff: Lerp<C>,
    beta2: C,
    beta3: C,
    one_minus_beta3: C,
    bias_correction3_sqrt: C,
    eps: C,
    decay: C,
    divisor: C,
    neg_step_size: C,
    neg_diff_step_size: C,
    /// The first step's `previous_grad` per unit of the prepared gradient: the
    /// reference takes it from the gradient before `maximize` negates it, so
    /// -1 (its negation) normally and +1 under `maximize` (exact either way).
    first_previous: C,
}

/// Adan.
pub struct Adan;

impl Elementwise for Adan {
    const NAME: &'static str = "adan";
    /// The reference counts steps per group, not per tensor.
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = AdanHyper;
    type Consts<C: Real> = AdanConsts<C>;

    fn state_keys(_h: &AdanHyper) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad"]
    }

    fn grad_prep(h: &AdanHyper) -> GradPrep {
        // (Adan's weight decay acts on the param, never on the gradient)
        GradPrep {
            maximize: h.maximize,
            l2: 0.0,
        }
    }

    fn flags(h: &AdanHyper, ctx: &StepContext) -> u32 {
        let decay = match (h.weight_decay != 0.0, h.weight_decouple) {
            (false, _) => 0,
            (true, true) => DECOUPLED,
            (true, false) => DIVIDED,
        };
        Self::grad_prep(h).flags() | decay | if ctx.fresh { FIRST } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(
            flags,
            runner,
            [
                0,
                DECOUPLED,
                DIVIDED,
                FIRST,
                DECOUPLED | FIRST,
                DIVIDED | FIRST,
            ]
        )
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        4
    }

    fn consts<C: Real>(h: &AdanHyper, _scalars: &[f64]) -> AdanConsts<C> {
        let step = h.step.0 + 1.0;
        let [beta1, beta2, beta3] = h.betas;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let lr = h.lr.value;
        let wd = h.weight_decay;
        let [decay, divisor, neg_step_size, neg_diff_step_size] = if h.lr.is_f32_tensor {
            // Each scalar a float32 0-d tensor op, the Python floats rounded to float32.
            let (lr, wd) = (lr as f32, wd as f32);
            [
                1.0 - wd * lr,
                1.0 + lr * wd,
                -lr / bias_correction1 as f32,
                -lr * beta2 as f32 / bias_correction2 as f32,
            ]
            .map(f64::from)
        } else {
            [
                1.0 - lr * wd,
                1.0 + lr * wd,
                -lr / bias_correction1,
                -lr * beta2 / bias_correction2,
            ]
        };
        AdanConsts {
            fast: Lerp::new(1.0 - beta1),
            diff: Lerp::new(1.0 - beta2),
            beta2: C::from_f64(beta2),
            beta3: C::from_f64(beta3),
            one_minus_beta3: C::from_f64(1.0 - beta3),
            bias_correction3_sqrt: C::from_f64((1.0 - beta3.powf(step)).sqrt()),
            eps: C::from_f64(h.eps),
            decay: C::from_f64(decay),
            divisor: C::from_f64(divisor),
            neg_step_size: C::from_f64(neg_step_size),
            neg_diff_step_size: C::from_f64(neg_diff_step_size),
            first_previous: C::from_f64(if h.maximize { 1.0 } else { -1.0 }),
        }
    }

    const ROUNDED: bool = true;

    /// The reference's per-parameter loop on a bfloat16/float16 param, each op's
    /// result rounded to the param's dtype (its foreach flavour rounds alike).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AdanConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        // (a negation is exact: the first step's `previous_grad` needs no rounding)
        let previous = if has(FLAGS, FIRST) {
            k.first_previous * g
        } else {
            s[3]
        };
        let grad_diff = round(previous + g); // grad_diff.add_(grad)
        let m = round(k.fast.apply(s[0], g)); // exp_avg.lerp_(grad, 1 - beta1)
        let n = round(k.diff.apply(s[2], grad_diff)); // exp_avg_diff.lerp_(grad_diff, 1 - beta2)
        let grad_diff = round(round(grad_diff * k.beta2) + g); // grad_diff.mul_(beta2).add_(grad)
                                                               // exp_avg_sq.mul_(beta3).addcmul_(grad_diff, grad_diff, value=1 - beta3)
        let v = rounded_square_average(s[1], k.beta3, k.one_minus_beta3, grad_diff, round);
        // exp_avg_sq.sqrt().div_(bias_correction3_sq).add_(eps)
        let denom = round(round(round(v.sqrt()) / k.bias_correction3_sqrt) + round(k.eps));
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = round(p * k.decay); // p.mul_(1 - lr * wd)
        }
        p = round(p + k.neg_step_size * m / denom); // p.addcdiv_(exp_avg, de_nom, value=…)
        p = round(p + k.neg_diff_step_size * n / denom); // p.addcdiv_(exp_avg_diff, de_nom, …)
        if has(FLAGS, DIVIDED) {
            p = round(p / k.divisor); // p.div_(1 + lr * wd)
        }
        *param = p;
        s[0] = m;
        s[1] = v;
        s[2] = n;
        s[3] = -g;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AdanConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let previous = if has(FLAGS, FIRST) {
            k.first_previous * g
        } else {
            s[3]
        };
        let grad_diff = previous + g;
        let m = k.fast.apply(s[0], g);
        let n = k.diff.apply(s[2], grad_diff);
        let grad_diff = grad_diff * k.beta2 + g;
        let v = (k.one_minus_beta3 * grad_diff).mul_add(grad_diff, s[1] * k.beta3);
        let denom = v.sqrt() / k.bias_correction3_sqrt + k.eps;
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = p * k.decay;
        }
        p = p + k.neg_step_size * m / denom;
        p = p + k.neg_diff_step_size * n / denom;
        if has(FLAGS, DIVIDED) {
            p = p / k.divisor;
        }
        *param = p;
        s[0] = m;
        s[1] = v;
        s[2] = n;
        s[3] = -g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::elementwise::StepContext;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, set_grads, step_with,
    };
    use crate::simd::SimdLevel;

    /// The reference's per-parameter loop in float64, one tensor op per line.
    fn reference_step(h: &AdanHyper, first: bool, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let step = h.step.0 + 1.0;
        let [beta1, beta2, beta3] = h.betas;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let bias_correction3_sqrt = (1.0 - beta3.powf(step)).sqrt();
        for i in 0..p.len() {
            if first {
                s[3][i] = -g[i];
            }
            let grad = if h.maximize { -g[i] } else { g[i] };
            let mut grad_diff = s[3][i] + grad;
            s[0][i] += (1.0 - beta1) * (grad - s[0][i]);
            s[2][i] += (1.0 - beta2) * (grad_diff - s[2][i]);
            grad_diff = grad_diff * beta2 + grad;
            s[1][i] = s[1][i] * beta3 + (1.0 - beta3) * grad_diff * grad_diff;
            let denom = s[1][i].sqrt() / bias_correction3_sqrt + h.eps;
            let lr = h.lr.value;
            if h.weight_decay != 0.0 && h.weight_decouple {
                p[i] *= 1.0 - lr * h.weight_decay;
            }
            p[i] += -lr / bias_correction1 * s[0][i] / denom;
            p[i] += -lr * beta2 / bias_correction2 * s[2][i] / denom;
            if h.weight_decay != 0.0 && !h.weight_decouple {
                p[i] /= 1.0 + lr * h.weight_decay;
            }
            s[3][i] = -grad;
        }
    }

    fn all_hypers() -> Vec<AdanHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for (weight_decay, weight_decouple) in [(0.0, false), (0.1, false), (0.1, true)] {
                out.push(AdanHyper {
                    lr: TensorScalar::of(0.01),
                    betas: [0.9, 0.8, 0.99],
                    weight_decay,
                    weight_decouple,
                    maximize,
                    ..AdanHyper::default()
                });
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 64, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64, f64>(&lens, 4, 0.0, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 4, 0.0, &[]);
            for step in 0..20 {
                let h = AdanHyper {
                    step: GroupStep(step as f64),
                    ..h
                };
                set_grads(&mut ours, step + 1);
                set_grads(&mut reference, step + 1);
                let ctx = StepContext {
                    fresh: step == 0,
                    ..StepContext::default()
                };
                step_with::<Adan, _, _>(&mut ours, &h, &ctx, SimdLevel::detect());
                for r in reference.iter_mut() {
                    reference_step(&h, step == 0, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-12, &format!("{h:?}"));
                for (x, y) in b.states.iter().zip(&r.states) {
                    assert_close(x, y, 1e-12, &format!("{h:?}"));
                }
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Adan>(&h, 0.0, &[]);
        }
    }
}

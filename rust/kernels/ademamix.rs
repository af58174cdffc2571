//! AdEMAMix (Pagliardini et al., "The AdEMAMix Optimizer: Better, Faster, Older"),
//! exactly as the reference implementation `pytorch-optimizer` computes it.
//!
//! Reference: `pytorch_optimizer/optimizer/ademamix.py::AdEMAMix.step` (the
//! per-parameter loop; its default CPU flavour, `torch._foreach_*` over the same
//! ops, runs the same CPU kernels). The step counter lives in the param group
//! (`group['step']`, a Python int): the Python side passes the count of steps
//! taken before this one as the `step` hyperparameter and increments the group's
//! counter once the step has run. Per element, each line one torch op in the
//! reference's order (scalars in float64 as its Python computes them, rounded to
//! the tensor's dtype by the op):
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay g = p*wd + g (fused))
//! decoupled: p = p * (1 - wd*(1 if fixed_decay else lr))    p.mul_(...)
//! m = lerp(m, g, 1 - beta1)                                exp_avg.lerp_(grad, 1 - beta1)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)                 exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! s = lerp(s, g, 1 - beta3_t)                              exp_avg_slow.lerp_(grad, 1 - beta3_t)
//! d = sqrt(v) / sqrt(bc2) + eps                            exp_avg_sq.sqrt().div_(bc2_sq).add_(eps)
//! u = m / bc1                                              exp_avg.div(bias_correction1)
//! u = s*alpha_t + u  (fused)                               update.add_(exp_avg_slow, alpha=alpha_t)
//! p = p + (-lr * u) / d                                    p.addcdiv_(update, de_nom, value=-lr)
//! ```
//!
//! with `bc1 = 1 - beta1**step`, `bc2_sq = sqrt(1 - beta2**step)` and, with a
//! warmup `t_alpha_beta3`, `alpha_t = min(step*alpha/t, alpha)` and
//! `beta3_t = min(exp(ln b1 * ln b3 / ((1 - step/t) ln b3 + (step/t) ln b1)), b3)`.
//! L2 decay applies only for `weight_decay > 0` (the reference's condition).
//!
//! One pass over memory: read p, g, m, v, s; write p, m, v, s (36 bytes/element in
//! float32).

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::hyper::GroupStep;
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// AdEMAMix's hyperparameters, under the reference's param-group names (plus
    /// torch's `maximize`), and the group's step counter.
    pub struct AdemamixHyper {
        /// A float32 tensor `lr` makes the reference compute the decoupled decay
        /// `1 - wd*lr` in float32 tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 3],
        weight_decay: f64,
        /// Decay the param (`p *= 1 - wd*lr`) instead of adding `wd*p` to the grad.
        weight_decouple: bool,
        /// Decoupled decay not scaled by `lr` (`p *= 1 - wd`).
        fixed_decay: bool,
        alpha: f64,
        /// Steps over which `alpha` and `beta3` warm up; `None`: no warmup.
        t_alpha_beta3: Option<f64>,
        eps: f64,
        maximize: bool,
        /// The steps this group took before this one (`group['step']`).
        step: GroupStep,
    }
}

impl Default for AdemamixHyper {
    fn default() -> Self {
        AdemamixHyper {
            lr: TensorScalar::of(1e-3),
            betas: [0.9, 0.999, 0.9999],
            weight_decay: 0.0,
            weight_decouple: false,
            fixed_decay: false,
            alpha: 5.0,
            t_alpha_beta3: None,
            eps: 1e-8,
            maximize: false,
            step: GroupStep(0.0),
        }
    }
}

/// Decoupled weight decay (`p *= decay` before the update).
const DECOUPLED: u32 = 1 << 2;

/// The constants of one step, rounded to the compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdemamixConsts<C> {
    decay: C,
    fast: Lerp<C>,
    slow: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    bias_correction1: C,
    bias_correction2_sqrt: C,
    eps: C,
    alpha: C,
    neg_lr: C,
}

/// AdEMAMix.
pub struct Ademamix;

impl Ademamix {
    /// `(alpha_t, beta3_t)` of step `step`: the reference's `schedule_alpha` and
    /// `schedule_beta3`, in float64 as its Python computes them.
    pub fn schedule(h: &AdemamixHyper, step: f64) -> (f64, f64) {
        let [beta1, _, beta3] = h.betas;
        let Some(t) = h.t_alpha_beta3 else {
            return (h.alpha, beta3);
        };
        let alpha = (step * h.alpha / t).min(h.alpha);
        let (log_beta1, log_beta3) = (beta1.ln(), beta3.ln());
        let mixed = (1.0 - step / t) * log_beta3 + (step / t) * log_beta1;
        let beta3 = (log_beta1 * log_beta3 / mixed).exp().min(beta3);
        (alpha, beta3)
    }
}

impl Elementwise for Ademamix {
    const NAME: &'static str = "ademamix";
    /// The reference counts steps per group, not per tensor.
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = AdemamixHyper;
    type Consts<C: Real> = AdemamixConsts<C>;

    fn state_keys(_h: &AdemamixHyper) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq", "exp_avg_slow"]
    }

    fn grad_prep(h: &AdemamixHyper) -> GradPrep {
        let l2 = !h.weight_decouple && h.weight_decay > 0.0;
        GradPrep {
            maximize: h.maximize,
            l2: if l2 { h.weight_decay } else { 0.0 },
        }
    }

    fn flags(h: &AdemamixHyper, _ctx: &StepContext) -> u32 {
        let decoupled = h.weight_decouple && h.weight_decay != 0.0;
        Self::grad_prep(h).flags() | if decoupled { DECOUPLED } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, L2, DECOUPLED])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        3
    }

    fn consts<C: Real>(h: &AdemamixHyper, _scalars: &[f64]) -> AdemamixConsts<C> {
        let step = h.step.0 + 1.0;
        let [beta1, beta2, _] = h.betas;
        let (alpha, beta3) = Self::schedule(h, step);
        let lr = h.lr.value;
        let decay = if h.fixed_decay {
            1.0 - h.weight_decay
        } else if h.lr.is_f32_tensor {
            // `1.0 - weight_decay * lr` on a float32 0-d tensor: `weight_decay` rounded
            // to float32, each operation rounded to float32.
            f64::from(1.0 - h.weight_decay as f32 * lr as f32)
        } else {
            1.0 - h.weight_decay * lr
        };
        AdemamixConsts {
            decay: C::from_f64(decay),
            fast: Lerp::new(1.0 - beta1),
            slow: Lerp::new(1.0 - beta3),
            beta2: C::from_f64(beta2),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            bias_correction1: C::from_f64(1.0 - beta1.powf(step)),
            bias_correction2_sqrt: C::from_f64((1.0 - beta2.powf(step)).sqrt()),
            eps: C::from_f64(h.eps),
            alpha: C::from_f64(alpha),
            neg_lr: C::from_f64(-lr),
        }
    }

    const ROUNDED: bool = true;

    /// The reference's per-parameter loop on a bfloat16/float16 param, each op's
    /// result rounded to the param's dtype; its half-precision branch divides the
    /// update by the denominator, then adds it (`alpha` rounded to the dtype).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AdemamixConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = round(p * k.decay); // p.mul_(1 - weight_decay * lr)
        }
        let m = round(k.fast.apply(s[0], g)); // exp_avg.lerp_(grad, 1 - beta1)
                                              // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let v = rounded_square_average(s[1], k.beta2, k.one_minus_beta2, g, round);
        let slow = round(k.slow.apply(s[2], g)); // exp_avg_slow.lerp_(grad, 1 - beta3_t)
                                                 // exp_avg_sq.sqrt().div_(bias_correction2_sq).add_(eps)
        let denom = round(round(round(v.sqrt()) / k.bias_correction2_sqrt) + round(k.eps));
        let corrected = round(m / k.bias_correction1); // exp_avg.div(bias_correction1)
        let update = round(slow.mul_add(round(k.alpha), corrected)); // update.add_(exp_avg_slow, alpha=alpha_t)
        let update = round(update / denom); // update.div_(de_nom)
        *param = round(update.mul_add(round(k.neg_lr), p)); // p.add_(update, alpha=-lr)
        s[0] = m;
        s[1] = v;
        s[2] = slow;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AdemamixConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = p * k.decay;
        }
        let m = k.fast.apply(s[0], g);
        let v = (k.one_minus_beta2 * g).mul_add(g, s[1] * k.beta2);
        let slow = k.slow.apply(s[2], g);
        let denom = v.sqrt() / k.bias_correction2_sqrt + k.eps;
        let update = slow.mul_add(k.alpha, m / k.bias_correction1);
        *param = p + k.neg_lr * update / denom;
        s[0] = m;
        s[1] = v;
        s[2] = slow;
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
    fn reference_step(h: &AdemamixHyper, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let step = h.step.0 + 1.0;
        let [beta1, beta2, _] = h.betas;
        let (alpha, beta3) = Ademamix::schedule(h, step);
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2_sqrt = (1.0 - beta2.powf(step)).sqrt();
        let (m, rest) = s.split_first_mut().unwrap();
        let (v, rest) = rest.split_first_mut().unwrap();
        let slow = &mut rest[0];
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                if h.weight_decouple {
                    let scale = if h.fixed_decay { 1.0 } else { h.lr.value };
                    p[i] *= 1.0 - h.weight_decay * scale;
                } else if h.weight_decay > 0.0 {
                    grad += h.weight_decay * p[i];
                }
            }
            m[i] += (1.0 - beta1) * (grad - m[i]);
            v[i] = v[i] * beta2 + (1.0 - beta2) * grad * grad;
            slow[i] += (1.0 - beta3) * (grad - slow[i]);
            let denom = v[i].sqrt() / bias_correction2_sqrt + h.eps;
            let update = m[i] / bias_correction1 + alpha * slow[i];
            p[i] += -h.lr.value * update / denom;
        }
    }

    fn all_hypers() -> Vec<AdemamixHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for (weight_decay, weight_decouple, fixed_decay) in [
                (0.0, false, false),
                (0.1, false, false),
                (0.1, true, false),
                (0.1, true, true),
            ] {
                for t_alpha_beta3 in [None, Some(12.0)] {
                    out.push(AdemamixHyper {
                        lr: TensorScalar::of(0.01),
                        betas: [0.8, 0.99, 0.999],
                        weight_decay,
                        weight_decouple,
                        fixed_decay,
                        t_alpha_beta3,
                        maximize,
                        ..AdemamixHyper::default()
                    });
                }
            }
        }
        out
    }

    #[test]
    fn the_warmup_reaches_the_final_values_and_stays() {
        let h = AdemamixHyper {
            t_alpha_beta3: Some(10.0),
            ..AdemamixHyper::default()
        };
        let (alpha, beta3) = Ademamix::schedule(&h, 1.0);
        assert!(alpha < h.alpha && beta3 < h.betas[2]);
        assert!(beta3 >= h.betas[0]);
        for step in [10.0, 11.0, 1000.0] {
            let (alpha, beta3) = Ademamix::schedule(&h, step);
            assert_eq!(alpha, h.alpha);
            assert!((beta3 - h.betas[2]).abs() < 1e-12, "{step}: {beta3}");
        }
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 64, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64, f64>(&lens, 3, 0.0, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 3, 0.0, &[]);
            for step in 0..20 {
                let h = AdemamixHyper {
                    step: GroupStep(step as f64),
                    ..h
                };
                set_grads(&mut ours, step + 1);
                set_grads(&mut reference, step + 1);
                step_with::<Ademamix, _, _>(
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
                for (x, y) in b.states.iter().zip(&r.states) {
                    assert_close(x, y, 1e-12, &format!("{h:?}"));
                }
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Ademamix>(&h, 0.0, &[]);
        }
    }
}

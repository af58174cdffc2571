//! NAdam (torch.optim semantics: L2 or decoupled weight decay, maximize, the
//! momentum schedule `mu_t` and its running product `mu_product`).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/nadam.py::_single_tensor_nadam`, non-capturable, non-differentiable
//! branch). Each element goes through the same operations in the same order, with
//! scalars computed in float64 as torch's Python computes them and rounded where
//! torch rounds them:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay — see engine::elementwise)
//! decoupled: p = p * (1 - lr*wd)              param.mul_(1 - lr * weight_decay)
//! L2:        g = p*wd + g   (fused)           grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! denom = sqrt(v / bc2) + eps                 exp_avg_sq.div(bias_correction2).sqrt(); denom.add_(eps)
//! p = p + (c1 * g) / denom                    param.addcdiv_(grad, denom, value=c1)
//! p = p + (c2 * m) / denom                    param.addcdiv_(exp_avg, denom, value=c2)
//! ```
//!
//! with the per-tensor scalars (Python floats, except `mu_product`):
//!
//! ```text
//! bc2 = 1 - beta2 ** step
//! mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))
//! mu_next = beta1 * (1 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
//! mu_product *= mu                            a 0-d tensor op: `mu` and the product rounded to
//!                                             the tensor's dtype (float32 unless torch's default
//!                                             dtype is float64): [`Nadam::advance`]
//! c1 = -lr * (1 - mu) / (1 - mu_product)
//! c2 = (-lr * mu_next) / (1 - mu_product * mu_next)
//! ```
//!
//! Complex params step as their real views (torch takes `view_as_real` before the
//! weight decay, so the L2 term is the same fused multiply-add as for real params).
//! A float32 tensor `lr` makes torch compute `1 - lr*wd`, `c1` and `c2` in float32
//! tensor arithmetic (`lr.is_f32_tensor`).
//!
//! Rounding checked element by element against torch 2.15's float32 for-loop
//! (30 steps, sizes 1..4099, every flag): bitwise equal where torch's vectorised
//! `sqrt` is correctly rounded (it is off by one ulp on ~0.65% of inputs), and
//! `mu_product` bitwise equal always.
//!
//! One pass over memory: read p, g, m, v; write p, m, v.

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{
    decays_param, has, Elementwise, FlagRunner, GradPrep, StepContext, L2,
};
use crate::engine::{Format, Real, ScalarSlot, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// NAdam's hyperparameters, under torch's param-group names.
    pub struct NadamHyper {
        /// A float32 tensor `lr` makes torch compute `1 - lr * wd`, `c1` and `c2`
        /// in float32 tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        momentum_decay: f64,
        /// NAdamW: `param *= 1 - lr * wd` instead of L2 (`grad += wd * param`).
        decoupled_weight_decay: bool,
        maximize: bool,
    }
}

impl Default for NadamHyper {
    fn default() -> Self {
        NadamHyper {
            lr: TensorScalar::of(2e-3),
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            momentum_decay: 4e-3,
            decoupled_weight_decay: false,
            maximize: false,
        }
    }
}

impl NadamHyper {
    /// `mu_t` of step `step`: `beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))`.
    pub fn mu(&self, step: f64) -> f64 {
        self.betas[0] * (1.0 - 0.5 * 0.96f64.powf(step * self.momentum_decay))
    }

    /// `mu_product` after step `step` (`mu_product *= mu`), from its value before, in
    /// the dtype of torch's 0-d tensor: the Python float `mu` is rounded to that dtype,
    /// the product too.
    pub fn next_mu_product(&self, step: f64, previous: f64, format: Format) -> f64 {
        let mu = self.mu(step);
        match format {
            Format::F32 => f64::from(previous as f32 * mu as f32),
            _ => previous * mu,
        }
    }
}

/// Decoupled weight decay (`param *= 1 - lr * wd` before the update).
const DECOUPLED: u32 = 1 << 2;

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct NadamConsts<C> {
    lerp: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    eps: C,
    /// `1 - lr * wd` (decoupled decay).
    decay: C,
    bias_correction2: C,
    /// `value` of the first `addcdiv_` (on the gradient).
    grad_coefficient: C,
    /// `value` of the second `addcdiv_` (on exp_avg).
    exp_avg_coefficient: C,
}

/// NAdam (and NAdamW with `decoupled_weight_decay`).
pub struct Nadam;

impl Elementwise for Nadam {
    const NAME: &'static str = "nadam";
    const SCALARS: &'static [&'static str] = &["step", "mu_product"];
    type Hyper = NadamHyper;
    type Consts<C: Real> = NadamConsts<C>;

    fn state_keys(_h: &NadamHyper) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn grad_prep(h: &NadamHyper) -> GradPrep {
        GradPrep::with_weight_decay(h.maximize, h.weight_decay, h.decoupled_weight_decay)
    }

    fn flags(h: &NadamHyper, _ctx: &StepContext) -> u32 {
        let decoupled = decays_param(h.decoupled_weight_decay, h.weight_decay);
        Self::grad_prep(h).flags() | if decoupled { DECOUPLED } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, L2, DECOUPLED])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    /// `mu_product *= mu`, in the slot's dtype (the step counter is already
    /// incremented).
    fn advance(h: &NadamHyper, scalars: &[ScalarSlot]) {
        let [step, mu_product] = [scalars[0], scalars[1]];
        mu_product.set(h.next_mu_product(step.get(), mu_product.get(), mu_product.format));
    }

    /// Computed in float64 exactly as torch's Python code computes them, from the
    /// step number (already incremented) and `mu_product` (already advanced).
    fn consts<C: Real>(h: &NadamHyper, scalars: &[f64]) -> NadamConsts<C> {
        let [step, mu_product] = [scalars[0], scalars[1]];
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let bias_correction2 = 1.0 - beta2.powf(step);
        let mu = h.mu(step);
        let mu_next = h.mu(step + 1.0);
        let mu_product_next = mu_product * mu_next;
        let (decay, grad_coefficient, exp_avg_coefficient) = if h.lr.is_f32_tensor {
            // Tensor arithmetic on a 0-d float32 `lr`: each Python float operand is
            // rounded to float32, each operation's result too.
            let lr = lr as f32;
            let decay = 1.0 - lr * h.weight_decay as f32;
            let c1 = -lr * (1.0 - mu) as f32 / (1.0 - mu_product) as f32;
            let c2 = -lr * mu_next as f32 / (1.0 - mu_product_next) as f32;
            (f64::from(decay), f64::from(c1), f64::from(c2))
        } else {
            (
                1.0 - lr * h.weight_decay,
                -lr * (1.0 - mu) / (1.0 - mu_product),
                (-lr * mu_next) / (1.0 - mu_product_next),
            )
        };
        NadamConsts {
            lerp: Lerp::new(1.0 - beta1),
            beta2: C::from_f64(beta2),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            eps: C::from_f64(h.eps),
            decay: C::from_f64(decay),
            bias_correction2: C::from_f64(bias_correction2),
            grad_coefficient: C::from_f64(grad_coefficient),
            exp_avg_coefficient: C::from_f64(exp_avg_coefficient),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_nadam` on a bfloat16/float16 param, op by op (see
    /// [`Elementwise::update_rounded`]; `add_(eps)` adds eps in the param's dtype).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &NadamConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = round(p * k.decay); // param.mul_(1 - lr * weight_decay)
        }
        let m = round(k.lerp.apply(s[0], g)); // exp_avg.lerp_(grad, 1 - beta1)
                                              // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let v = rounded_square_average(s[1], k.beta2, k.one_minus_beta2, g, round);
        // exp_avg_sq.div(bias_correction2).sqrt(); denom.add_(eps)
        let denom = round(round(round(v / k.bias_correction2).sqrt()) + round(k.eps));
        p = round(p + k.grad_coefficient * g / denom); // param.addcdiv_(grad, denom, value=…)
        *param = round(p + k.exp_avg_coefficient * m / denom); // param.addcdiv_(exp_avg, …)
        s[0] = m;
        s[1] = v;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &NadamConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = p * k.decay;
        }
        let m = k.lerp.apply(s[0], g);
        let v = (k.one_minus_beta2 * g).mul_add(g, s[1] * k.beta2);
        let denom = (v / k.bias_correction2).sqrt() + k.eps;
        p = p + k.grad_coefficient * g / denom;
        *param = p + k.exp_avg_coefficient * m / denom;
        s[0] = m;
        s[1] = v;
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

    /// A straightforward transcription of torch's `_single_tensor_nadam`
    /// (non-capturable branch) in float64, one tensor op per pass, as torch runs them.
    /// `mu_product` is a float64 0-d tensor here (torch's default dtype float64).
    fn reference_step(
        h: &NadamHyper,
        step_t: &mut f64,
        mu_product: &mut f64,
        param: &mut [f64],
        grad: &[f64],
        s: &mut [Vec<f64>],
    ) {
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let n = param.len();
        let (exp_avg, rest) = s.split_first_mut().unwrap();
        let exp_avg_sq = &mut rest[0];
        // grad = grads[i] if not maximize else -grads[i]
        let mut grad: Vec<f64> = grad
            .iter()
            .map(|&g| if h.maximize { -g } else { g })
            .collect();
        // step_t += 1; step = _get_value(step_t)
        *step_t += 1.0;
        let step = *step_t;
        let bias_correction2 = 1.0 - beta2.powf(step);
        if h.weight_decay != 0.0 {
            if h.decoupled_weight_decay {
                // param.mul_(1 - lr * weight_decay)
                let factor = 1.0 - lr * h.weight_decay;
                param.iter_mut().for_each(|p| *p *= factor);
            } else {
                // grad = grad.add(param, alpha=weight_decay)  (one fused multiply-add)
                for i in 0..n {
                    grad[i] = param[i].mul_add(h.weight_decay, grad[i]);
                }
            }
        }
        let mu = beta1 * (1.0 - 0.5 * 0.96f64.powf(step * h.momentum_decay));
        let mu_next = beta1 * (1.0 - 0.5 * 0.96f64.powf((step + 1.0) * h.momentum_decay));
        // mu_product *= mu
        *mu_product *= mu;
        // exp_avg.lerp_(grad, 1 - beta1): start + weight * (end - start), weight < 0.5
        let weight = 1.0 - beta1;
        assert!(
            weight < 0.5,
            "the reference transcribes lerp's small-weight branch"
        );
        for i in 0..n {
            exp_avg[i] = weight.mul_add(grad[i] - exp_avg[i], exp_avg[i]);
        }
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_sq.iter_mut().for_each(|v| *v *= beta2);
        for i in 0..n {
            exp_avg_sq[i] = ((1.0 - beta2) * grad[i]).mul_add(grad[i], exp_avg_sq[i]);
        }
        // denom = exp_avg_sq.div(bias_correction2).sqrt(); denom.add_(eps)
        let mut denom: Vec<f64> = exp_avg_sq
            .iter()
            .map(|v| (v / bias_correction2).sqrt())
            .collect();
        denom.iter_mut().for_each(|d| *d += h.eps);
        let mu_product_next = *mu_product * mu_next;
        // param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product)))
        let value = -lr * (1.0 - mu) / (1.0 - *mu_product);
        for i in 0..n {
            param[i] += value * grad[i] / denom[i];
        }
        // param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))
        let value = (-lr * mu_next) / (1.0 - mu_product_next);
        for i in 0..n {
            param[i] += value * exp_avg[i] / denom[i];
        }
    }

    fn all_hypers() -> Vec<NadamHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for (weight_decay, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
                for (momentum_decay, beta1) in [(4e-3, 0.9), (0.02, 0.8)] {
                    out.push(NadamHyper {
                        lr: TensorScalar::of(0.01),
                        betas: [beta1, 0.999],
                        maximize,
                        weight_decay,
                        momentum_decay,
                        decoupled_weight_decay: decoupled,
                        ..NadamHyper::default()
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
            let mut ours = buffers::<f64, f64>(&lens, 2, 0.0, &[0.0, 1.0]);
            let mut reference = buffers::<f64, f64>(&lens, 2, 0.0, &[0.0, 1.0]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Nadam, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    let [step_t, mu_product] = &mut r.scalars[..] else {
                        unreachable!()
                    };
                    reference_step(&h, step_t, mu_product, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_eq!(b.scalars, r.scalars, "step and mu_product: {h:?}");
                assert_eq!(b.scalars[0], 20.0);
                assert_close(&b.p, &r.p, 1e-13, &format!("{h:?}"));
                for (x, y) in b.states.iter().zip(&r.states) {
                    assert_close(x, y, 1e-13, &format!("{h:?}"));
                }
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Nadam>(&h, 0.0, &[0.0, 1.0]);
        }
    }

    #[test]
    fn mu_product_rounds_like_torchs_float32_tensor() {
        // torch 2.15: `NAdam(momentum_decay=.., betas=(beta1, 0.999))`, float32
        // `state["mu_product"]` after steps 1, 5 and 10 (its bits).
        let cases = [
            (4e-3, 0.9, [0x3ee67008u32, 0x3c978932, 0x39b421cd]),
            (0.02, 0.8, [0x3eccf796, 0x3c29d54f, 0x38e5f17c]),
        ];
        for (momentum_decay, beta1, bits) in cases {
            let h = NadamHyper {
                momentum_decay,
                betas: [beta1, 0.999],
                ..NadamHyper::default()
            };
            let mut bufs = buffers::<f32, f32>(&[3], 2, 0.0, &[0.0, 1.0]);
            let mut seen = Vec::new();
            for step in 1..=10 {
                set_grads(&mut bufs, step);
                step_with::<Nadam, _, _>(
                    &mut bufs,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                if [1, 5, 10].contains(&step) {
                    seen.push(bufs[0].scalars[1].to_bits());
                }
            }
            assert_eq!(seen, bits, "momentum_decay {momentum_decay}, beta1 {beta1}");
        }
    }

    #[test]
    fn float32_lr_tensor_rounds_its_scalars_in_float32() {
        let h = NadamHyper {
            lr: TensorScalar {
                value: f64::from(0.0123f32),
                is_f32_tensor: true,
            },
            weight_decay: 0.1,
            decoupled_weight_decay: true,
            ..NadamHyper::default()
        };
        let k = Nadam::consts::<f32>(&h, &[3.0, 0.5]);
        let lr = 0.0123f32;
        assert_eq!(k.decay, 1.0 - lr * 0.1f32);
        let mu = h.mu(3.0);
        assert_eq!(k.grad_coefficient, -lr * (1.0 - mu) as f32 / 0.5f32);
        let plain = NadamHyper {
            lr: TensorScalar::of(h.lr.value),
            ..h
        };
        let k = Nadam::consts::<f32>(&plain, &[3.0, 0.5]);
        assert_eq!(k.grad_coefficient, (-h.lr.value * (1.0 - mu) / 0.5) as f32);
    }

    #[test]
    fn nan_gradients_stay_nan_and_others_stay_finite() {
        let h = NadamHyper::default();
        let mut bufs = buffers::<f32, f32>(&[2], 2, 0.0, &[0.0, 1.0]);
        bufs[0].p = vec![1.0, 1.0];
        bufs[0].g = vec![f32::NAN, 0.5];
        step_with::<Nadam, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        assert!(bufs[0].p[0].is_nan() && bufs[0].states[0][0].is_nan());
        assert!(bufs[0].p[1].is_finite() && bufs[0].p[1] < 1.0);
    }
}

//! RAdam (torch.optim semantics: L2 or decoupled weight decay, maximize, the
//! variance rectification that switches on once `rho_t > 5`).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/radam.py::_single_tensor_radam`, non-capturable, non-differentiable
//! branch). Each element goes through the same operations in the same order, with
//! scalars computed in float64 as torch's Python computes them and rounded to the
//! tensor's dtype where torch rounds them:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay — see engine::elementwise)
//! decoupled: p = p * (1 - lr*wd)              param.mul_(1 - lr * weight_decay)
//! L2:        g = p*wd + g   (fused)           grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! u = (m / bc1) * lr                          bias_corrected_exp_avg = exp_avg / bias_correction1; ... * lr
//! rectified (rho_t > 5):
//!   a = (1 / (sqrt(v) + eps)) * sqrt(bc2)     _compute_adaptive_lr(): `bc2 ** 0.5 / t` is
//!                                             `t.reciprocal() * bc2 ** 0.5` (Tensor.__rtruediv__)
//!   u = (u * a) * rect                        ... * _compute_adaptive_lr() * _compute_rect()
//! p = p - u                                   param.add_(..., alpha=-1.0)
//! ```
//!
//! with the per-tensor scalars (Python floats, from the step number):
//!
//! ```text
//! bc1 = 1 - beta1 ** step
//! bc2 = 1 - beta2 ** step
//! rho_inf = 2 / (1 - beta2) - 1
//! rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
//! rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
//! ```
//!
//! Whether the step is rectified depends on the step number only, so it is one
//! constant per tensor and step ([`RadamConsts::rectified`]), not a per-element
//! choice. `** 0.5` is libm's `pow` (as Python's float power), not `sqrt`.
//!
//! A tensor `lr` stays a 0-d tensor in torch (`_to_scalar`): `* lr` multiplies by
//! its value in the param's dtype, the same as for a Python float, and a float32
//! tensor makes `1 - lr * wd` float32 tensor arithmetic (`lr.is_f32_tensor`).
//!
//! Complex params step as their real views. torch applies the L2 term after taking
//! the real view here, so it is the same fused multiply-add as for real params.
//!
//! Rounding checked element by element against torch 2.15's float32 for-loop
//! (30 steps, sizes 1..4099, every flag): bitwise equal where torch's vectorised
//! `sqrt` is correctly rounded.
//!
//! One pass over memory: read p, g, m, v; write p, m, v.

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{
    decays_param, has, Elementwise, FlagRunner, GradPrep, StepContext, L2,
};
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// RAdam's hyperparameters, under torch's param-group names.
    pub struct RadamHyper {
        /// A float32 tensor `lr` makes torch compute `1 - lr * wd` in float32
        /// tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        /// RAdamW: `param *= 1 - lr * wd` instead of L2 (`grad += wd * param`).
        decoupled_weight_decay: bool,
        maximize: bool,
    }
}

impl Default for RadamHyper {
    fn default() -> Self {
        RadamHyper {
            lr: TensorScalar::of(1e-3),
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            maximize: false,
        }
    }
}

/// The rectification of step `step` as torch's Python computes it: `Some(rect)`
/// where `rho_t > 5`, `None` (the unadapted, momentum-only update) otherwise.
pub fn rectification(beta2: f64, step: f64) -> Option<f64> {
    let bias_correction2 = 1.0 - beta2.powf(step);
    let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    let rho_t = rho_inf - 2.0 * step * beta2.powf(step) / bias_correction2;
    (rho_t > 5.0).then(|| {
        ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
            .powf(0.5)
    })
}

/// Decoupled weight decay (`param *= 1 - lr * wd` before the update).
const DECOUPLED: u32 = 1 << 2;

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct RadamConsts<C> {
    lerp: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    eps: C,
    /// `1 - lr * wd` (decoupled decay).
    decay: C,
    bias_correction1: C,
    lr: C,
    /// Whether this step is rectified (`rho_t > 5`): the same for every element.
    rectified: bool,
    /// `bias_correction2 ** 0.5`.
    sqrt_bias_correction2: C,
    /// `_compute_rect()`.
    rect: C,
}

/// RAdam (and RAdamW with `decoupled_weight_decay`).
pub struct Radam;

impl Elementwise for Radam {
    const NAME: &'static str = "radam";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = RadamHyper;
    type Consts<C: Real> = RadamConsts<C>;

    fn state_keys(_h: &RadamHyper) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn grad_prep(h: &RadamHyper) -> GradPrep {
        GradPrep::with_weight_decay(h.maximize, h.weight_decay, h.decoupled_weight_decay)
    }

    fn flags(h: &RadamHyper, _ctx: &StepContext) -> u32 {
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

    /// Computed in float64 exactly as torch's Python code computes them, from the
    /// step number (already incremented).
    fn consts<C: Real>(h: &RadamHyper, scalars: &[f64]) -> RadamConsts<C> {
        let step = scalars[0];
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let decay = if h.lr.is_f32_tensor {
            // Tensor arithmetic on a 0-d float32 `lr`: the Python float operand and
            // each result rounded to float32.
            f64::from(1.0 - lr as f32 * h.weight_decay as f32)
        } else {
            1.0 - lr * h.weight_decay
        };
        let rect = rectification(beta2, step);
        RadamConsts {
            lerp: Lerp::new(1.0 - beta1),
            beta2: C::from_f64(beta2),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            eps: C::from_f64(h.eps),
            decay: C::from_f64(decay),
            bias_correction1: C::from_f64(bias_correction1),
            lr: C::from_f64(lr),
            rectified: rect.is_some(),
            // Only read when rectified (where `bc2 > 0`).
            sqrt_bias_correction2: C::from_f64(bias_correction2.powf(0.5)),
            rect: C::from_f64(rect.unwrap_or(1.0)),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_radam` on a bfloat16/float16 param, op by op (see
    /// [`Elementwise::update_rounded`]): `bias_correction2 ** 0.5 / t` is Python's
    /// `t.__rtruediv__`, a reciprocal then a product, and `add_(eps)` adds eps in the
    /// param's dtype.
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &RadamConsts<C>,
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
        let corrected = round(m / k.bias_correction1); // exp_avg / bias_correction1
        let scaled = round(corrected * k.lr); // bias_corrected_exp_avg * lr
        let u = if k.rectified {
            // exp_avg_sq.sqrt().add_(eps); (bias_correction2 ** 0.5) / that
            let root = round(round(v.sqrt()) + round(k.eps));
            let adaptive_lr = round(round(C::ONE / root) * k.sqrt_bias_correction2);
            round(round(scaled * adaptive_lr) * k.rect) // … * _compute_adaptive_lr() * _compute_rect()
        } else {
            scaled
        };
        *param = round(p - u); // param.add_(…, alpha=-1.0)
        s[0] = m;
        s[1] = v;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &RadamConsts<C>,
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
        let mut u = m / k.bias_correction1 * k.lr;
        if k.rectified {
            let adaptive_lr = C::ONE / (v.sqrt() + k.eps) * k.sqrt_bias_correction2;
            u = u * adaptive_lr * k.rect;
        }
        *param = p - u;
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

    /// A straightforward transcription of torch's `_single_tensor_radam`
    /// (non-capturable branch) in float64, one tensor op per pass, as torch runs them.
    fn reference_step(
        h: &RadamHyper,
        step_t: &mut f64,
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
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        // bias_corrected_exp_avg = exp_avg / bias_correction1
        let corrected: Vec<f64> = exp_avg.iter().map(|m| m / bias_correction1).collect();
        let rho_inf = 2.0 / (1.0 - beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * beta2.powf(step) / bias_correction2;
        // bias_corrected_exp_avg * lr
        let mut update: Vec<f64> = corrected.iter().map(|m| m * lr).collect();
        if rho_t > 5.0 {
            // exp_avg_sq.sqrt().add_(eps); (bias_correction2 ** 0.5) / that
            let denom: Vec<f64> = exp_avg_sq.iter().map(|v| v.sqrt() + h.eps).collect();
            let adaptive: Vec<f64> = denom
                .iter()
                .map(|d| (1.0 / d) * bias_correction2.powf(0.5))
                .collect();
            let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5);
            for i in 0..n {
                update[i] = update[i] * adaptive[i] * rect;
            }
        }
        // param.add_(..., alpha=-1.0)
        for i in 0..n {
            param[i] = (-1.0f64).mul_add(update[i], param[i]);
        }
    }

    fn all_hypers() -> Vec<RadamHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for (weight_decay, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
                for betas in [[0.9, 0.999], [0.8, 0.9]] {
                    out.push(RadamHyper {
                        lr: TensorScalar::of(0.01),
                        betas,
                        maximize,
                        weight_decay,
                        decoupled_weight_decay: decoupled,
                        ..RadamHyper::default()
                    });
                }
            }
        }
        out
    }

    #[test]
    fn rectification_switches_on_where_rho_t_passes_five() {
        // beta2 = 0.999: rho_t = 1, 1.999, ... passes 5 at step 6 (torch's RAdam
        // takes its first adaptive step there).
        let on: Vec<bool> = (1..=8)
            .map(|t| rectification(0.999, f64::from(t)).is_some())
            .collect();
        assert_eq!(on, [false, false, false, false, false, true, true, true]);
        // rho_inf = 1 for beta2 = 0: never rectified.
        assert!((1..100).all(|t| rectification(0.0, f64::from(t)).is_none()));
        // Far out rect tends to 1.
        let far = rectification(0.999, 1e6).unwrap();
        assert!((far - 1.0).abs() < 1e-9, "{far}");
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64, f64>(&lens, 2, 0.0, &[0.0]);
            let mut reference = buffers::<f64, f64>(&lens, 2, 0.0, &[0.0]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Radam, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    let step_t = &mut r.scalars[0];
                    reference_step(&h, step_t, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_eq!(b.scalars, r.scalars, "step: {h:?}");
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
            assert_bitwise_everywhere::<Radam>(&h, 0.0, &[0.0]);
        }
        // Past step 5 (rectified steps; `assert_bitwise_everywhere` runs 4).
        let h = RadamHyper::default();
        for level in SimdLevel::supported() {
            let run = |level| {
                let mut bufs = buffers::<f32, f32>(&[3, 4099, 70_001], 2, 0.0, &[0.0]);
                for step in 1..=8 {
                    set_grads(&mut bufs, step);
                    step_with::<Radam, _, _>(&mut bufs, &h, &StepContext::default(), level);
                }
                bufs
            };
            let (a, b) = (run(SimdLevel::Scalar), run(level));
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.p, y.p, "{level}");
                assert_eq!(x.states, y.states, "{level}");
            }
        }
    }

    #[test]
    fn float32_rounds_each_tensor_op() {
        // One element through a rectified float32 step, each op rounded as torch's
        // float32 tensor ops round.
        let h = RadamHyper {
            lr: TensorScalar::of(0.01),
            ..RadamHyper::default()
        };
        let step = 10.0;
        let k = Radam::consts::<f32>(&h, &[step]);
        assert!(k.rectified);
        let (p0, g, m0, v0) = (0.3f32, -0.7f32, 0.05f32, 0.002f32);
        let mut p = p0;
        let mut s = [0.0f32; MAX_STATES];
        s[0] = m0;
        s[1] = v0;
        Radam::update::<f32, 0>(&k, &mut p, g, &mut s);
        let m = ((1.0f64 - 0.9) as f32).mul_add(g - m0, m0);
        let v = ((1.0f64 - 0.999) as f32 * g).mul_add(g, v0 * 0.999f32);
        let bc1 = (1.0 - 0.9f64.powf(step)) as f32;
        let bc2 = 1.0 - 0.999f64.powf(step);
        let rect = rectification(0.999, step).unwrap() as f32;
        let u = m / bc1 * 0.01f32;
        let a = 1.0f32 / (v.sqrt() + 1e-8f32) * bc2.powf(0.5) as f32;
        assert_eq!((s[0], s[1]), (m, v));
        assert_eq!(p, p0 - u * a * rect);
    }

    #[test]
    fn float32_lr_tensor_rounds_the_decay_in_float32() {
        let h = RadamHyper {
            lr: TensorScalar {
                value: f64::from(0.0123f32),
                is_f32_tensor: true,
            },
            weight_decay: 0.1,
            decoupled_weight_decay: true,
            ..RadamHyper::default()
        };
        let k = Radam::consts::<f64>(&h, &[3.0]);
        assert_eq!(k.decay, f64::from(1.0 - 0.0123f32 * 0.1f32));
        assert_eq!(k.lr, f64::from(0.0123f32));
    }

    #[test]
    fn unrectified_steps_ignore_the_second_moment() {
        // An infinite exp_avg_sq (g*g overflowed) does not reach the param before
        // rectification starts, as in torch (which never reads it there).
        let h = RadamHyper::default();
        let mut bufs = buffers::<f32, f32>(&[2], 2, 0.0, &[0.0]);
        bufs[0].p = vec![1.0, 1.0];
        bufs[0].g = vec![1e30, 0.5];
        step_with::<Radam, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        assert!(bufs[0].states[1][0].is_infinite());
        assert!(bufs[0].p.iter().all(|p| p.is_finite()));
    }
}

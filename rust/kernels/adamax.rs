//! Adamax (torch.optim semantics, including weight decay and maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/adamax.py::_single_tensor_adamax`, non-capturable, non-differentiable
//! branch). Each element goes through the same operations in the same order, with
//! scalars computed in float64 as torch's Python computes them and rounded to the
//! tensor's dtype where torch rounds them:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay — see engine::elementwise)
//! g = p*wd + g   (fused)                      grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! u = maximum(u*beta2, |g| + eps)             torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
//! p = p + (-clr * m) / u                      param.addcdiv_(exp_avg, exp_inf, value=-clr)
//! ```
//!
//! with `clr = lr / (1 - beta1 ** step)` (Python floats; a float32 tensor `lr` makes it
//! float32 tensor arithmetic, `lr.is_f32_tensor`). `maximum` propagates NaN.
//!
//! Complex params step as their real views. torch applies the L2 term before taking
//! the real view, as complex arithmetic (`g + (wd + 0i) * p`: a product, then a sum,
//! each rounded); the real views' fused multiply-add here is at least as exact (the
//! same choice as Adam's kernel).
//!
//! Rounding checked element by element against torch 2.15's float32 for-loop
//! (30 steps, sizes 1..4099, every flag, a float32 tensor `lr`): bitwise equal.
//!
//! One pass over memory: read p, g, m, u; write p, m, u.

use super::Lerp;
use crate::engine::elementwise::{Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// Adamax's hyperparameters, under torch's param-group names.
    pub struct AdamaxHyper {
        /// A float32 tensor `lr` makes torch compute `lr / bias_correction` in
        /// float32 tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        maximize: bool,
    }
}

impl Default for AdamaxHyper {
    fn default() -> Self {
        AdamaxHyper {
            lr: TensorScalar::of(2e-3),
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdamaxConsts<C> {
    lerp: Lerp<C>,
    beta2: C,
    eps: C,
    /// `value` of the `addcdiv_`: `-lr / (1 - beta1 ** step)`.
    neg_clr: C,
}

/// Adamax.
pub struct Adamax;

impl Elementwise for Adamax {
    const NAME: &'static str = "adamax";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = AdamaxHyper;
    type Consts<C: Real> = AdamaxConsts<C>;

    fn state_keys(_h: &AdamaxHyper) -> &'static [&'static str] {
        &["exp_avg", "exp_inf"]
    }

    fn grad_prep(h: &AdamaxHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &AdamaxHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, L2])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    /// Computed in float64 exactly as torch's Python code computes them, for
    /// step number `step` (already incremented).
    fn consts<C: Real>(h: &AdamaxHyper, scalars: &[f64]) -> AdamaxConsts<C> {
        let step = scalars[0];
        let [beta1, beta2] = h.betas;
        let bias_correction = 1.0 - beta1.powf(step);
        let clr = if h.lr.is_f32_tensor {
            f64::from(h.lr.value as f32 / bias_correction as f32)
        } else {
            h.lr.value / bias_correction
        };
        AdamaxConsts {
            lerp: Lerp::new(1.0 - beta1),
            beta2: C::from_f64(beta2),
            eps: C::from_f64(h.eps),
            neg_clr: C::from_f64(-clr),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_adamax` on a bfloat16/float16 param, op by op.
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AdamaxConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let m = round(k.lerp.apply(s[0], g)); // exp_avg.lerp_(grad, 1 - beta1)
                                              // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        let u = round(s[1] * k.beta2).max_propagate_nan(round(g.abs() + round(k.eps)));
        *param = round(*param + k.neg_clr * m / u); // param.addcdiv_(exp_avg, exp_inf, value=-clr)
        s[0] = m;
        s[1] = u;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AdamaxConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let m = k.lerp.apply(s[0], g);
        let u = (s[1] * k.beta2).max_propagate_nan(g.abs() + k.eps);
        *param = *param + k.neg_clr * m / u;
        s[0] = m;
        s[1] = u;
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

    /// A straightforward transcription of torch's `_single_tensor_adamax`
    /// (non-capturable, non-differentiable branch) in float64, one tensor op per
    /// pass, as torch runs them.
    fn reference_step(
        h: &AdamaxHyper,
        step_t: &mut f64,
        param: &mut [f64],
        grad: &[f64],
        s: &mut [Vec<f64>],
    ) {
        let [beta1, beta2] = h.betas;
        let n = param.len();
        let (exp_avg, rest) = s.split_first_mut().unwrap();
        let exp_inf = &mut rest[0];
        // grad = grad if not maximize else -grad
        let mut grad: Vec<f64> = grad
            .iter()
            .map(|&g| if h.maximize { -g } else { g })
            .collect();
        // step_t += 1
        *step_t += 1.0;
        if h.weight_decay != 0.0 {
            // grad = grad.add(param, alpha=weight_decay)  (one fused multiply-add)
            for i in 0..n {
                grad[i] = param[i].mul_add(h.weight_decay, grad[i]);
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
        // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        exp_inf.iter_mut().for_each(|u| *u *= beta2);
        let norm: Vec<f64> = grad.iter().map(|g| g.abs() + h.eps).collect();
        for i in 0..n {
            exp_inf[i] = if exp_inf[i].is_nan() || norm[i].is_nan() {
                f64::NAN
            } else {
                exp_inf[i].max(norm[i])
            };
        }
        // bias_correction = 1 - beta1 ** _get_value(step_t); clr = lr / bias_correction
        let bias_correction = 1.0 - beta1.powf(*step_t);
        let clr = h.lr.value / bias_correction;
        // param.addcdiv_(exp_avg, exp_inf, value=-clr)
        for i in 0..n {
            param[i] += -clr * exp_avg[i] / exp_inf[i];
        }
    }

    fn all_hypers() -> Vec<AdamaxHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.1] {
                for betas in [[0.9, 0.999], [0.6, 0.9]] {
                    out.push(AdamaxHyper {
                        lr: TensorScalar::of(0.01),
                        betas,
                        maximize,
                        weight_decay,
                        ..AdamaxHyper::default()
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
            let mut ours = buffers::<f64, f64>(&lens, 2, 0.0, &[0.0]);
            let mut reference = buffers::<f64, f64>(&lens, 2, 0.0, &[0.0]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Adamax, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    reference_step(&h, &mut r.scalars[0], &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_eq!(b.scalars, vec![20.0]);
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
            assert_bitwise_everywhere::<Adamax>(&h, 0.0, &[0.0]);
        }
    }

    #[test]
    fn float32_lr_tensor_rounds_the_step_size_in_float32() {
        let h = AdamaxHyper {
            lr: TensorScalar {
                value: f64::from(0.0123f32),
                is_f32_tensor: true,
            },
            ..AdamaxHyper::default()
        };
        let bias_correction = 1.0 - 0.9f64.powf(3.0);
        let k = Adamax::consts::<f32>(&h, &[3.0]);
        assert_eq!(k.neg_clr, -(0.0123f32 / bias_correction as f32));
    }

    #[test]
    fn exp_inf_propagates_nan_like_torch_maximum() {
        let h = AdamaxHyper::default();
        let mut bufs = buffers::<f64, f64>(&[4], 2, 0.0, &[0.0]);
        bufs[0].p = vec![1.0; 4];
        bufs[0].g = vec![f64::NAN, 0.5, -0.5, -0.5];
        bufs[0].states[1] = vec![0.0, f64::NAN, 10.0, 0.1];
        step_with::<Adamax, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        let u = &bufs[0].states[1];
        assert!(u[0].is_nan() && bufs[0].p[0].is_nan());
        assert!(u[1].is_nan());
        // Otherwise the larger of the decayed norm and the new |g| + eps.
        assert_eq!(u[2], 10.0 * 0.999);
        assert_eq!(u[3], 0.5 + 1e-8);
    }
}

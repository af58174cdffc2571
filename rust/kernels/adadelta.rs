//! Adadelta (torch.optim semantics, including weight decay and maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/adadelta.py::_single_tensor_adadelta`, non-capturable branch). Each
//! element goes through the same operations in the same order, with scalars
//! computed in float64 as torch's Python computes them and rounded to the tensor's
//! dtype where torch rounds them:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay — see engine::elementwise)
//! g = p*wd + g   (fused)                      grad.add(param, alpha=weight_decay)
//! v = ((1 - rho)*g)*g + v*rho  (fused)        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
//! std = sqrt(v + eps)                         std = square_avg.add(eps).sqrt_()
//! delta = (sqrt(u + eps) / std) * g           delta = acc_delta.add(eps).sqrt_(); delta.div_(std).mul_(grad)
//! u = ((1 - rho)*delta)*delta + u*rho (fused) acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
//! p = delta*(-lr) + p   (fused)               param.add_(delta, alpha=-lr)
//! ```
//!
//! torch only increments the step counter; no scalar depends on it. A tensor `lr`
//! reaches `add_` as the Scalar `-lr`: its value, rounded to the param's dtype, as
//! for a Python float.
//!
//! Complex params step as their real views. torch applies the L2 term before taking
//! the real view, as complex arithmetic (`g + (wd + 0i) * p`: a product, then a sum,
//! each rounded); the real views' fused multiply-add here is at least as exact (the
//! same choice as Adam's and Adamax's kernels).
//!
//! Rounding checked element by element against torch 2.15's float32 for-loop
//! (30 steps, sizes 1..4099, every flag): bitwise equal where torch's vectorised
//! `sqrt` is correctly rounded.
//!
//! One pass over memory: read p, g, v, u; write p, v, u.

use super::rounded_square_average;
use crate::engine::elementwise::{Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// Adadelta's hyperparameters, under torch's param-group names.
    pub struct AdadeltaHyper {
        lr: f64,
        rho: f64,
        eps: f64,
        weight_decay: f64,
        maximize: bool,
    }
}

impl Default for AdadeltaHyper {
    fn default() -> Self {
        AdadeltaHyper {
            lr: 1.0,
            rho: 0.9,
            eps: 1e-6,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdadeltaConsts<C> {
    rho: C,
    one_minus_rho: C,
    eps: C,
    /// `alpha` of the final `add_`: `-lr`.
    neg_lr: C,
}

/// Adadelta.
pub struct Adadelta;

impl Elementwise for Adadelta {
    const NAME: &'static str = "adadelta";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = AdadeltaHyper;
    type Consts<C: Real> = AdadeltaConsts<C>;

    fn state_keys(_h: &AdadeltaHyper) -> &'static [&'static str] {
        &["square_avg", "acc_delta"]
    }

    fn grad_prep(h: &AdadeltaHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &AdadeltaHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, L2])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    fn consts<C: Real>(h: &AdadeltaHyper, _scalars: &[f64]) -> AdadeltaConsts<C> {
        AdadeltaConsts {
            rho: C::from_f64(h.rho),
            one_minus_rho: C::from_f64(1.0 - h.rho),
            eps: C::from_f64(h.eps),
            neg_lr: C::from_f64(-h.lr),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_adadelta` on a bfloat16/float16 param, op by op (see
    /// [`Elementwise::update_rounded`]; `add(eps)` adds eps in the param's dtype).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AdadeltaConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let eps = round(k.eps);
        // square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        let v = rounded_square_average(s[0], k.rho, k.one_minus_rho, g, round);
        let std = round(round(v + eps).sqrt()); // square_avg.add(eps).sqrt_()
        let delta = round(round(s[1] + eps).sqrt()); // acc_delta.add(eps).sqrt_()
        let delta = round(round(delta / std) * g); // delta.div_(std).mul_(grad)
                                                   // acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        let u = rounded_square_average(s[1], k.rho, k.one_minus_rho, delta, round);
        *param = round(delta.mul_add(round(k.neg_lr), *param)); // param.add_(delta, alpha=-lr)
        s[0] = v;
        s[1] = u;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AdadeltaConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let v = (k.one_minus_rho * g).mul_add(g, s[0] * k.rho);
        let std = (v + k.eps).sqrt();
        let delta = (s[1] + k.eps).sqrt() / std * g;
        let u = (k.one_minus_rho * delta).mul_add(delta, s[1] * k.rho);
        *param = delta.mul_add(k.neg_lr, *param);
        s[0] = v;
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

    /// A straightforward transcription of torch's `_single_tensor_adadelta`
    /// (non-capturable branch) in float64, one tensor op per pass, as torch runs them.
    fn reference_step(
        h: &AdadeltaHyper,
        step_t: &mut f64,
        param: &mut [f64],
        grad: &[f64],
        s: &mut [Vec<f64>],
    ) {
        let n = param.len();
        let (square_avg, rest) = s.split_first_mut().unwrap();
        let acc_delta = &mut rest[0];
        // step += 1
        *step_t += 1.0;
        // grad = grad if not maximize else -grad
        let mut grad: Vec<f64> = grad
            .iter()
            .map(|&g| if h.maximize { -g } else { g })
            .collect();
        if h.weight_decay != 0.0 {
            // grad = grad.add(param, alpha=weight_decay)  (one fused multiply-add)
            for i in 0..n {
                grad[i] = param[i].mul_add(h.weight_decay, grad[i]);
            }
        }
        // square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        square_avg.iter_mut().for_each(|v| *v *= h.rho);
        for i in 0..n {
            square_avg[i] = ((1.0 - h.rho) * grad[i]).mul_add(grad[i], square_avg[i]);
        }
        // std = square_avg.add(eps).sqrt_()
        let std: Vec<f64> = square_avg.iter().map(|v| (v + h.eps).sqrt()).collect();
        // delta = acc_delta.add(eps).sqrt_(); delta.div_(std).mul_(grad)
        let mut delta: Vec<f64> = acc_delta.iter().map(|u| (u + h.eps).sqrt()).collect();
        for i in 0..n {
            delta[i] /= std[i];
        }
        for i in 0..n {
            delta[i] *= grad[i];
        }
        // acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        acc_delta.iter_mut().for_each(|u| *u *= h.rho);
        for i in 0..n {
            acc_delta[i] = ((1.0 - h.rho) * delta[i]).mul_add(delta[i], acc_delta[i]);
        }
        // param.add_(delta, alpha=-lr)  (one fused multiply-add)
        for i in 0..n {
            param[i] = delta[i].mul_add(-h.lr, param[i]);
        }
    }

    fn all_hypers() -> Vec<AdadeltaHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.1] {
                for (lr, rho, eps) in [(1.0, 0.9, 1e-6), (0.5, 0.95, 1e-3)] {
                    out.push(AdadeltaHyper {
                        lr,
                        rho,
                        eps,
                        weight_decay,
                        maximize,
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
                step_with::<Adadelta, _, _>(
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
            assert_bitwise_everywhere::<Adadelta>(&h, 0.0, &[0.0]);
        }
    }

    #[test]
    fn float32_rounds_each_tensor_op() {
        let h = AdadeltaHyper {
            lr: 0.7,
            weight_decay: 0.0,
            ..AdadeltaHyper::default()
        };
        let k = Adadelta::consts::<f32>(&h, &[1.0]);
        let (p0, g, v0, u0) = (0.3f32, -0.7f32, 0.05f32, 0.002f32);
        let mut p = p0;
        let mut s = [0.0f32; MAX_STATES];
        s[0] = v0;
        s[1] = u0;
        Adadelta::update::<f32, 0>(&k, &mut p, g, &mut s);
        let one_minus_rho = (1.0f64 - 0.9) as f32;
        let v = (one_minus_rho * g).mul_add(g, v0 * 0.9f32);
        let std = (v + 1e-6f32).sqrt();
        let delta = (u0 + 1e-6f32).sqrt() / std * g;
        let u = (one_minus_rho * delta).mul_add(delta, u0 * 0.9f32);
        assert_eq!((s[0], s[1]), (v, u));
        assert_eq!(p, delta.mul_add(-0.7f32, p0));
    }

    #[test]
    fn nan_gradients_stay_nan_and_others_stay_finite() {
        let h = AdadeltaHyper::default();
        let mut bufs = buffers::<f32, f32>(&[2], 2, 0.0, &[0.0]);
        bufs[0].p = vec![1.0, 1.0];
        bufs[0].g = vec![f32::NAN, 0.5];
        step_with::<Adadelta, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        assert!(bufs[0].p[0].is_nan() && bufs[0].states[0][0].is_nan());
        assert!(bufs[0].p[1].is_finite() && bufs[0].p[1] < 1.0);
    }
}

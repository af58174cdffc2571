//! Adamax (torch.optim semantics, including weight decay and maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/adamax.py::_single_tensor_adamax`, non-capturable, non-differentiable
//! branch). Each element goes through the same operations in the same order, with
//! scalars computed in float64 as torch's Python computes them and rounded to the
//! tensor's dtype where torch rounds them:
//!
//! ```text
//! grad = grad * inv_scale * clip_coef         (GradScaler unscale, clipping; 1.0 when off)
//! g = -grad if maximize else grad
//! g = p*wd + g   (fused)                      grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! u = maximum(u*beta2, |g| + eps)             torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
//! p = p + (-clr * m) / u                      param.addcdiv_(exp_avg, exp_inf, value=-clr)
//! ```
//!
//! with `clr = lr / (1 - beta1 ** step)` (Python floats; a float32 tensor `lr` makes it
//! float32 tensor arithmetic, [`AdamaxHyper::lr_is_f32`]). `maximum` propagates NaN.
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

use super::{GradScale, GradScaleOf, Lerp, Real};

/// Hyperparameters of one parameter group, as torch keeps them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
    /// Unscaling and clipping applied to every gradient as it is read.
    pub grad_scale: GradScale,
    /// `lr` is a float32 tensor: torch computes `lr / bias_correction` in float32.
    pub lr_is_f32: bool,
}

impl Default for AdamaxHyper {
    fn default() -> Self {
        AdamaxHyper {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
            grad_scale: GradScale::default(),
            lr_is_f32: false,
        }
    }
}

impl AdamaxHyper {
    /// State buffers per parameter: exp_avg, exp_inf.
    pub const NUM_STATES: usize = 2;
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdamaxConsts<C> {
    grad_scale: GradScaleOf<C>,
    lerp: Lerp<C>,
    beta2: C,
    eps: C,
    weight_decay: C,
    /// `value` of the `addcdiv_`: `-lr / (1 - beta1 ** step)`.
    neg_clr: C,
}

impl<C: Real> AdamaxConsts<C> {
    /// Constants for step number `step` (already incremented), computed in float64
    /// exactly as torch's Python code computes them.
    pub fn new(h: &AdamaxHyper, step: f64) -> Self {
        let bias_correction = 1.0 - h.beta1.powf(step);
        let clr = if h.lr_is_f32 {
            f64::from(h.lr as f32 / bias_correction as f32)
        } else {
            h.lr / bias_correction
        };
        AdamaxConsts {
            grad_scale: GradScaleOf::new(&h.grad_scale),
            lerp: Lerp::new(1.0 - h.beta1),
            beta2: C::from_f64(h.beta2),
            eps: C::from_f64(h.eps),
            weight_decay: C::from_f64(h.weight_decay),
            neg_clr: C::from_f64(-clr),
        }
    }
}

/// One element's update: `(param, grad, exp_avg, exp_inf)` in, the new
/// `(param, exp_avg, exp_inf)` out. `WEIGHT_DECAY`: the L2 term is on (`wd != 0`).
#[inline(always)]
pub fn update<C: Real, const MAXIMIZE: bool, const WEIGHT_DECAY: bool>(
    k: &AdamaxConsts<C>,
    param: C,
    grad: C,
    exp_avg: C,
    exp_inf: C,
) -> (C, C, C) {
    let grad = k.grad_scale.apply(grad);
    let mut g = if MAXIMIZE { -grad } else { grad };
    if WEIGHT_DECAY {
        g = param.mul_add(k.weight_decay, g);
    }
    let m = k.lerp.apply(exp_avg, g);
    let u = (exp_inf * k.beta2).max_propagate_nan(g.abs() + k.eps);
    let p = param + k.neg_clr * m / u;
    (p, m, u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random};

    /// A straightforward transcription of torch's `_single_tensor_adamax`
    /// (non-capturable, non-differentiable branch) in float64, one tensor op per
    /// pass, as torch runs them.
    fn reference_step(
        h: &AdamaxHyper,
        step_t: &mut f64,
        param: &mut [f64],
        grad: &[f64],
        exp_avg: &mut [f64],
        exp_inf: &mut [f64],
    ) {
        let n = param.len();
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
        let weight = 1.0 - h.beta1;
        assert!(
            weight < 0.5,
            "the reference transcribes lerp's small-weight branch"
        );
        for i in 0..n {
            exp_avg[i] = weight.mul_add(grad[i] - exp_avg[i], exp_avg[i]);
        }
        // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        exp_inf.iter_mut().for_each(|u| *u *= h.beta2);
        let norm: Vec<f64> = grad.iter().map(|g| g.abs() + h.eps).collect();
        for i in 0..n {
            exp_inf[i] = if exp_inf[i].is_nan() || norm[i].is_nan() {
                f64::NAN
            } else {
                exp_inf[i].max(norm[i])
            };
        }
        // bias_correction = 1 - beta1 ** _get_value(step_t); clr = lr / bias_correction
        let bias_correction = 1.0 - h.beta1.powf(*step_t);
        let clr = h.lr / bias_correction;
        // param.addcdiv_(exp_avg, exp_inf, value=-clr)
        for i in 0..n {
            param[i] += -clr * exp_avg[i] / exp_inf[i];
        }
    }

    fn all_hypers() -> Vec<AdamaxHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.1] {
                for (beta1, beta2) in [(0.9, 0.999), (0.6, 0.9)] {
                    out.push(AdamaxHyper {
                        lr: 0.01,
                        beta1,
                        beta2,
                        maximize,
                        weight_decay,
                        ..AdamaxHyper::default()
                    });
                }
            }
        }
        out
    }

    /// Steps one tensor with [`update`] in `C`.
    fn run<C: Real>(h: &AdamaxHyper, n: usize, steps: u64) -> Vec<C> {
        let mut p: Vec<C> = random(n, 7).into_iter().map(C::from_f64).collect();
        let mut m = vec![C::ZERO; n];
        let mut u = vec![C::ZERO; n];
        for step in 1..=steps {
            let grad: Vec<C> = random(n, 100 + step).into_iter().map(C::from_f64).collect();
            let k = AdamaxConsts::<C>::new(h, step as f64);
            for i in 0..n {
                let (pi, mi, ui) = match (h.maximize, h.weight_decay != 0.0) {
                    (false, false) => update::<C, false, false>(&k, p[i], grad[i], m[i], u[i]),
                    (false, true) => update::<C, false, true>(&k, p[i], grad[i], m[i], u[i]),
                    (true, false) => update::<C, true, false>(&k, p[i], grad[i], m[i], u[i]),
                    (true, true) => update::<C, true, true>(&k, p[i], grad[i], m[i], u[i]),
                };
                (p[i], m[i], u[i]) = (pi, mi, ui);
            }
        }
        p
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let n = 1000;
        for h in all_hypers() {
            let ours = run::<f64>(&h, n, 30);
            let mut p = random(n, 7);
            let (mut m, mut u) = (vec![0.0; n], vec![0.0; n]);
            let mut step_t = 0.0;
            for step in 1..=30 {
                let grad = random(n, 100 + step);
                reference_step(&h, &mut step_t, &mut p, &grad, &mut m, &mut u);
            }
            assert_close(&ours, &p, 1e-13, &format!("{h:?}"));
        }
    }

    #[test]
    fn float32_lr_tensor_rounds_the_step_size_in_float32() {
        let h = AdamaxHyper {
            lr: 0.0123,
            lr_is_f32: true,
            ..AdamaxHyper::default()
        };
        let bias_correction = 1.0 - 0.9f64.powf(3.0);
        let k = AdamaxConsts::<f32>::new(&h, 3.0);
        assert_eq!(k.neg_clr, -(0.0123f32 / bias_correction as f32));
    }

    #[test]
    fn exp_inf_propagates_nan_like_torch_maximum() {
        let k = AdamaxConsts::<f64>::new(&AdamaxHyper::default(), 1.0);
        let (p, _, u) = update::<f64, false, false>(&k, 1.0, f64::NAN, 0.0, 0.0);
        assert!(u.is_nan() && p.is_nan());
        let (_, _, u) = update::<f64, false, false>(&k, 1.0, 0.5, 0.0, f64::NAN);
        assert!(u.is_nan());
        // Otherwise the larger of the decayed norm and the new |g| + eps.
        let (_, _, u) = update::<f64, false, false>(&k, 1.0, -0.5, 0.0, 10.0);
        assert_eq!(u, 10.0 * 0.999);
        let (_, _, u) = update::<f64, false, false>(&k, 1.0, -0.5, 0.0, 0.1);
        assert_eq!(u, 0.5 + 1e-8);
    }
}

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
//! grad = grad * inv_scale * clip_coef         (GradScaler unscale, clipping; 1.0 when off)
//! g = -grad if maximize else grad
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
//! mu_product *= mu                            a 0-d tensor op: rounded to the tensor's dtype
//!                                             (float32 unless torch's default dtype is float64)
//! c1 = -lr * (1 - mu) / (1 - mu_product)
//! c2 = (-lr * mu_next) / (1 - mu_product * mu_next)
//! ```
//!
//! Complex params step as their real views (torch takes `view_as_real` before the
//! weight decay, so the L2 term is the same fused multiply-add as for real params).
//! A float32 tensor `lr` makes torch compute `1 - lr*wd`, `c1` and `c2` in float32
//! tensor arithmetic ([`NadamHyper::lr_is_f32`]).
//!
//! Rounding checked element by element against torch 2.15's float32 for-loop
//! (30 steps, sizes 1..4099, every flag): bitwise equal where torch's vectorised
//! `sqrt` is correctly rounded (it is off by one ulp on ~0.65% of inputs), and
//! `mu_product` bitwise equal always.
//!
//! One pass over memory: read p, g, m, v; write p, m, v.

use super::{GradScale, GradScaleOf, Lerp, Real};
use crate::engine::DType;

/// Hyperparameters of one parameter group, as torch keeps them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NadamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum_decay: f64,
    /// NAdamW: `param *= 1 - lr * wd` instead of L2 (`grad += wd * param`).
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
    /// Unscaling and clipping applied to every gradient as it is read.
    pub grad_scale: GradScale,
    /// `lr` is a float32 tensor: torch computes `1 - lr * wd`, `c1` and `c2` in
    /// float32 tensor arithmetic.
    pub lr_is_f32: bool,
}

impl Default for NadamHyper {
    fn default() -> Self {
        NadamHyper {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum_decay: 4e-3,
            decoupled_weight_decay: false,
            maximize: false,
            grad_scale: GradScale::default(),
            lr_is_f32: false,
        }
    }
}

/// Weight-decay variants, specialised at compile time.
pub const WD_NONE: u8 = 0;
pub const WD_L2: u8 = 1;
pub const WD_DECOUPLED: u8 = 2;

impl NadamHyper {
    /// State buffers per parameter: exp_avg, exp_avg_sq.
    pub const NUM_STATES: usize = 2;

    pub fn weight_decay_mode(&self) -> u8 {
        if self.weight_decay == 0.0 {
            WD_NONE
        } else if self.decoupled_weight_decay {
            WD_DECOUPLED
        } else {
            WD_L2
        }
    }

    /// `mu_t` of step `step`: `beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))`.
    pub fn mu(&self, step: f64) -> f64 {
        self.beta1 * (1.0 - 0.5 * 0.96f64.powf(step * self.momentum_decay))
    }

    /// The tensor's `mu_product` after step `step` (`mu_product *= mu`), from its value
    /// before, rounded to the dtype of torch's 0-d tensor: the Python float `mu` is
    /// rounded to that dtype and the product rounded again.
    pub fn next_mu_product(&self, step: f64, previous: f64, dtype: DType) -> f64 {
        let mu = self.mu(step);
        match dtype {
            DType::F32 => f64::from(previous as f32 * mu as f32),
            DType::F64 => previous * mu,
        }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct NadamConsts<C> {
    grad_scale: GradScaleOf<C>,
    lerp: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    eps: C,
    /// L2: `alpha` of `grad.add(param, alpha=wd)`; decoupled: `1 - lr * wd`.
    weight_decay: C,
    bias_correction2: C,
    /// `value` of the first `addcdiv_` (on the gradient).
    grad_coefficient: C,
    /// `value` of the second `addcdiv_` (on exp_avg).
    exp_avg_coefficient: C,
}

impl<C: Real> NadamConsts<C> {
    /// Constants for step `step` (already incremented) of a tensor whose `mu_product`
    /// is `mu_product` after this step's update ([`NadamHyper::next_mu_product`]),
    /// computed in float64 exactly as torch's Python code computes them.
    pub fn new(h: &NadamHyper, step: f64, mu_product: f64) -> Self {
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let mu = h.mu(step);
        let mu_next = h.mu(step + 1.0);
        let mu_product_next = mu_product * mu_next;
        let (weight_decay, grad_coefficient, exp_avg_coefficient) = if h.lr_is_f32 {
            // Tensor arithmetic on a 0-d float32 `lr`: each Python float operand is
            // rounded to float32, each operation's result too.
            let lr = h.lr as f32;
            let weight_decay = 1.0 - lr * h.weight_decay as f32;
            let c1 = -lr * (1.0 - mu) as f32 / (1.0 - mu_product) as f32;
            let c2 = -lr * mu_next as f32 / (1.0 - mu_product_next) as f32;
            (f64::from(weight_decay), f64::from(c1), f64::from(c2))
        } else {
            (
                1.0 - h.lr * h.weight_decay,
                -h.lr * (1.0 - mu) / (1.0 - mu_product),
                (-h.lr * mu_next) / (1.0 - mu_product_next),
            )
        };
        NadamConsts {
            grad_scale: GradScaleOf::new(&h.grad_scale),
            lerp: Lerp::new(1.0 - h.beta1),
            beta2: C::from_f64(h.beta2),
            one_minus_beta2: C::from_f64(1.0 - h.beta2),
            eps: C::from_f64(h.eps),
            weight_decay: C::from_f64(if h.decoupled_weight_decay {
                weight_decay
            } else {
                h.weight_decay
            }),
            bias_correction2: C::from_f64(bias_correction2),
            grad_coefficient: C::from_f64(grad_coefficient),
            exp_avg_coefficient: C::from_f64(exp_avg_coefficient),
        }
    }
}

/// One element's update: `(param, grad, exp_avg, exp_avg_sq)` in, the new
/// `(param, exp_avg, exp_avg_sq)` out.
#[inline(always)]
pub fn update<C: Real, const MAXIMIZE: bool, const WD: u8>(
    k: &NadamConsts<C>,
    param: C,
    grad: C,
    exp_avg: C,
    exp_avg_sq: C,
) -> (C, C, C) {
    let mut p = param;
    let grad = k.grad_scale.apply(grad);
    let mut g = if MAXIMIZE { -grad } else { grad };
    if WD == WD_DECOUPLED {
        p = p * k.weight_decay;
    } else if WD == WD_L2 {
        g = p.mul_add(k.weight_decay, g);
    }
    let m = k.lerp.apply(exp_avg, g);
    let v = (k.one_minus_beta2 * g).mul_add(g, exp_avg_sq * k.beta2);
    let denom = (v / k.bias_correction2).sqrt() + k.eps;
    p = p + k.grad_coefficient * g / denom;
    p = p + k.exp_avg_coefficient * m / denom;
    (p, m, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, random};

    /// A straightforward transcription of torch's `_single_tensor_nadam`
    /// (non-capturable branch) in float64, one tensor op per pass, as torch runs them.
    /// `mu_product` is a float64 0-d tensor here (torch's default dtype float64).
    fn reference_step(
        h: &NadamHyper,
        step_t: &mut f64,
        mu_product: &mut f64,
        param: &mut [f64],
        grad: &[f64],
        exp_avg: &mut [f64],
        exp_avg_sq: &mut [f64],
    ) {
        let n = param.len();
        // grad = grads[i] if not maximize else -grads[i]
        let mut grad: Vec<f64> = grad
            .iter()
            .map(|&g| if h.maximize { -g } else { g })
            .collect();
        // step_t += 1; step = _get_value(step_t)
        *step_t += 1.0;
        let step = *step_t;
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        if h.weight_decay != 0.0 {
            if h.decoupled_weight_decay {
                // param.mul_(1 - lr * weight_decay)
                let factor = 1.0 - h.lr * h.weight_decay;
                param.iter_mut().for_each(|p| *p *= factor);
            } else {
                // grad = grad.add(param, alpha=weight_decay)  (one fused multiply-add)
                for i in 0..n {
                    grad[i] = param[i].mul_add(h.weight_decay, grad[i]);
                }
            }
        }
        let mu = h.beta1 * (1.0 - 0.5 * 0.96f64.powf(step * h.momentum_decay));
        let mu_next = h.beta1 * (1.0 - 0.5 * 0.96f64.powf((step + 1.0) * h.momentum_decay));
        // mu_product *= mu
        *mu_product *= mu;
        // exp_avg.lerp_(grad, 1 - beta1): start + weight * (end - start), weight < 0.5
        let weight = 1.0 - h.beta1;
        assert!(
            weight < 0.5,
            "the reference transcribes lerp's small-weight branch"
        );
        for i in 0..n {
            exp_avg[i] = weight.mul_add(grad[i] - exp_avg[i], exp_avg[i]);
        }
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_sq.iter_mut().for_each(|v| *v *= h.beta2);
        for i in 0..n {
            exp_avg_sq[i] = ((1.0 - h.beta2) * grad[i]).mul_add(grad[i], exp_avg_sq[i]);
        }
        // denom = exp_avg_sq.div(bias_correction2).sqrt(); denom.add_(eps)
        let mut denom: Vec<f64> = exp_avg_sq
            .iter()
            .map(|v| (v / bias_correction2).sqrt())
            .collect();
        denom.iter_mut().for_each(|d| *d += h.eps);
        let mu_product_next = *mu_product * mu_next;
        // param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product)))
        let value = -h.lr * (1.0 - mu) / (1.0 - *mu_product);
        for i in 0..n {
            param[i] += value * grad[i] / denom[i];
        }
        // param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))
        let value = (-h.lr * mu_next) / (1.0 - mu_product_next);
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
                        lr: 0.01,
                        beta1,
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

    /// Steps one tensor with [`update`] in `C`, keeping `mu_product` in `dtype`.
    fn run<C: Real>(h: &NadamHyper, n: usize, steps: u64, dtype: DType) -> (Vec<C>, f64) {
        let mut p: Vec<C> = random(n, 7).into_iter().map(C::from_f64).collect();
        let mut m = vec![C::ZERO; n];
        let mut v = vec![C::ZERO; n];
        let mut mu_product = 1.0;
        for step in 1..=steps {
            let grad: Vec<C> = random(n, 100 + step).into_iter().map(C::from_f64).collect();
            mu_product = h.next_mu_product(step as f64, mu_product, dtype);
            let k = NadamConsts::<C>::new(h, step as f64, mu_product);
            for i in 0..n {
                let (pi, mi, vi) = match (h.maximize, h.weight_decay_mode()) {
                    (false, WD_NONE) => update::<C, false, WD_NONE>(&k, p[i], grad[i], m[i], v[i]),
                    (false, WD_L2) => update::<C, false, WD_L2>(&k, p[i], grad[i], m[i], v[i]),
                    (false, _) => update::<C, false, WD_DECOUPLED>(&k, p[i], grad[i], m[i], v[i]),
                    (true, WD_NONE) => update::<C, true, WD_NONE>(&k, p[i], grad[i], m[i], v[i]),
                    (true, WD_L2) => update::<C, true, WD_L2>(&k, p[i], grad[i], m[i], v[i]),
                    (true, _) => update::<C, true, WD_DECOUPLED>(&k, p[i], grad[i], m[i], v[i]),
                };
                (p[i], m[i], v[i]) = (pi, mi, vi);
            }
        }
        (p, mu_product)
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let n = 1000;
        for h in all_hypers() {
            let (ours, ours_mu_product) = run::<f64>(&h, n, 30, DType::F64);
            let mut p = random(n, 7);
            let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
            let (mut step_t, mut mu_product) = (0.0, 1.0);
            for step in 1..=30 {
                let grad = random(n, 100 + step);
                reference_step(
                    &h,
                    &mut step_t,
                    &mut mu_product,
                    &mut p,
                    &grad,
                    &mut m,
                    &mut v,
                );
            }
            assert_eq!(ours_mu_product, mu_product, "{h:?}");
            assert_close(&ours, &p, 1e-13, &format!("{h:?}"));
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
                beta1,
                ..NadamHyper::default()
            };
            let mut mu_product = 1.0;
            let mut seen = Vec::new();
            for step in 1..=10 {
                mu_product = h.next_mu_product(step as f64, mu_product, DType::F32);
                if [1, 5, 10].contains(&step) {
                    seen.push((mu_product as f32).to_bits());
                }
            }
            assert_eq!(seen, bits, "momentum_decay {momentum_decay}, beta1 {beta1}");
        }
    }

    #[test]
    fn float32_lr_tensor_rounds_its_scalars_in_float32() {
        let h = NadamHyper {
            lr: 0.0123,
            weight_decay: 0.1,
            decoupled_weight_decay: true,
            lr_is_f32: true,
            ..NadamHyper::default()
        };
        let k = NadamConsts::<f32>::new(&h, 3.0, 0.5);
        let lr = 0.0123f32;
        assert_eq!(k.weight_decay, 1.0 - lr * 0.1f32);
        let mu = h.mu(3.0);
        assert_eq!(k.grad_coefficient, -lr * (1.0 - mu) as f32 / 0.5f32);
        let plain = NadamConsts::<f32>::new(
            &NadamHyper {
                lr_is_f32: false,
                ..h
            },
            3.0,
            0.5,
        );
        assert_eq!(plain.grad_coefficient, (-0.0123 * (1.0 - mu) / 0.5) as f32);
    }

    #[test]
    fn nan_gradients_stay_nan_and_others_stay_finite() {
        let h = NadamHyper::default();
        let k = NadamConsts::<f32>::new(&h, 1.0, h.next_mu_product(1.0, 1.0, DType::F32));
        let (p, m, v) = update::<f32, false, WD_NONE>(&k, 1.0, f32::NAN, 0.0, 0.0);
        assert!(p.is_nan() && m.is_nan() && v.is_nan());
        let (p, m, v) = update::<f32, false, WD_NONE>(&k, 1.0, 0.5, 0.0, 0.0);
        assert!(p.is_finite() && m.is_finite() && v.is_finite());
        assert!(p < 1.0, "a positive gradient moves the param down");
    }
}

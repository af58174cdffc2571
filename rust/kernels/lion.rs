//! Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms"), exactly as
//! the reference implementation `lion-pytorch` computes it.
//!
//! Reference: `lion_pytorch/lion_pytorch.py::update_fn` (the default, non-Triton
//! flavour), with the step's scalars from `Lion.step`. Per element, each line one
//! torch op in the reference's order (scalars in float64 as its Python computes
//! them, rounded to the tensor's dtype by the op):
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize — a ferroptim extra keyword)
//! wd = weight_decay / init_lr  if decoupled   wd /= init_lr  (Python floats)
//! p = p * (1 - lr*wd)                         p.data.mul_(1. - lr * wd)
//! c = m * beta1                               exp_avg.clone().mul_(beta1)
//! c = g*(1 - beta1) + c   (fused)             .add(grad, alpha = 1. - beta1)
//! s = (c > 0) - (c < 0)                       .sgn_()   (torch: sign(0) = sign(nan) = +0)
//! p = s*(-lr) + p         (fused; exact)      p.add_(update, alpha = -lr)
//! m = m * beta2                               exp_avg.mul_(beta2)
//! m = g*(1 - beta2) + m   (fused)             .add_(grad, alpha = 1. - beta2)
//! ```
//!
//! `add(alpha=)` is one fused multiply-add in torch's vectorised CPU loops (see
//! the module docs of `kernels`); `s*(-lr)` is exact for `s` in {-1, 0, 1}, so
//! the param update rounds once either way. The reference multiplies by
//! `1 - lr*wd` even when `wd` is 0: a multiplication by 1.0, which we skip
//! (bitwise the same).
//!
//! One pass over memory: read p, g, m; write p, m (20 bytes/element in float32).

use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// Lion's hyperparameters, under the param-group names of ferroptim's Lion:
    /// lion-pytorch's (`lr`, `betas`, `weight_decay`), its constructor's
    /// `decoupled_weight_decay` and `lr` (as `init_lr`), and torch's `maximize`.
    pub struct LionHyper {
        /// A float32 tensor `lr` makes the reference compute `1 - lr*wd` in float32
        /// tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 2],
        weight_decay: f64,
        /// lion-pytorch's decoupled decay: `weight_decay` is divided by the
        /// constructor's learning rate (`init_lr`) before `1 - lr*wd`.
        decoupled_weight_decay: bool,
        init_lr: f64,
        maximize: bool,
    }
}

impl Default for LionHyper {
    fn default() -> Self {
        LionHyper {
            lr: TensorScalar::of(1e-4),
            betas: [0.9, 0.99],
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            init_lr: 1e-4,
            maximize: false,
        }
    }
}

/// Multiply the param by `1 - lr*wd` before the update.
const DECAY: u32 = 1 << 2;

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct LionConsts<C> {
    /// `1 - lr*wd`.
    decay: C,
    beta1: C,
    one_minus_beta1: C,
    beta2: C,
    one_minus_beta2: C,
    neg_lr: C,
}

/// Lion.
pub struct Lion;

impl Lion {
    /// The weight decay the reference multiplies `lr` by.
    fn effective_weight_decay(h: &LionHyper) -> f64 {
        if h.decoupled_weight_decay {
            h.weight_decay / h.init_lr
        } else {
            h.weight_decay
        }
    }
}

impl Elementwise for Lion {
    const NAME: &'static str = "lion";
    /// The reference keeps no step counter.
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = LionHyper;
    type Consts<C: Real> = LionConsts<C>;

    fn state_keys(_h: &LionHyper) -> &'static [&'static str] {
        &["exp_avg"]
    }

    fn grad_prep(h: &LionHyper) -> GradPrep {
        // Lion's weight decay is always the multiplicative (decoupled) kind.
        GradPrep {
            maximize: h.maximize,
            l2: 0.0,
        }
    }

    fn flags(h: &LionHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags() | if h.weight_decay != 0.0 { DECAY } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, DECAY])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        1
    }

    fn consts<C: Real>(h: &LionHyper, _scalars: &[f64]) -> LionConsts<C> {
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let weight_decay = Self::effective_weight_decay(h);
        let decay = if h.lr.is_f32_tensor {
            // `1. - lr * wd` on a float32 0-d tensor: `wd` rounded to float32, each
            // operation rounded to float32 (the Python layer hands a tensor `init_lr`
            // with decoupled decay to torch ops instead).
            f64::from(1.0 - lr as f32 * weight_decay as f32)
        } else {
            1.0 - lr * weight_decay
        };
        LionConsts {
            decay: C::from_f64(decay),
            beta1: C::from_f64(beta1),
            one_minus_beta1: C::from_f64(1.0 - beta1),
            beta2: C::from_f64(beta2),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            neg_lr: C::from_f64(-lr),
        }
    }

    const ROUNDED: bool = true;

    /// `lion_pytorch`'s `update_fn` on a bfloat16/float16 param, op by op (see
    /// [`Elementwise::update_rounded`]): each `add(grad, alpha=…)` a fused
    /// multiply-add with `alpha` in the param's dtype.
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &LionConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let mut p = *param;
        if has(FLAGS, DECAY) {
            p = round(p * k.decay); // p.data.mul_(1. - lr * wd)
        }
        let m = s[0];
        // exp_avg.clone().mul_(beta1).add(grad, alpha=1. - beta1).sgn_()
        let c = round(g.mul_add(round(k.one_minus_beta1), round(m * k.beta1)));
        let positive = if c > C::ZERO { C::ONE } else { C::ZERO };
        let negative = if c < C::ZERO { C::ONE } else { C::ZERO };
        *param = round((positive - negative).mul_add(round(k.neg_lr), p)); // p.add_(update, alpha=-lr)
                                                                           // exp_avg.mul_(beta2).add_(grad, alpha=1. - beta2)
        s[0] = round(g.mul_add(round(k.one_minus_beta2), round(m * k.beta2)));
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &LionConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let mut p = *param;
        if has(FLAGS, DECAY) {
            p = p * k.decay;
        }
        let m = s[0];
        let c = g.mul_add(k.one_minus_beta1, m * k.beta1);
        // torch's vectorised sign: a NaN or a zero of either sign gives +0. (As
        // two selects and a subtraction, so the loop vectorises.)
        let positive = if c > C::ZERO { C::ONE } else { C::ZERO };
        let negative = if c < C::ZERO { C::ONE } else { C::ZERO };
        *param = (positive - negative).mul_add(k.neg_lr, p);
        s[0] = g.mul_add(k.one_minus_beta2, m * k.beta2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::elementwise::StepContext;
    use crate::kernels::testing::{assert_bitwise_everywhere, buffers, set_grads, step_with};
    use crate::simd::SimdLevel;

    /// torch's `sgn` on a real number.
    fn sgn(x: f64) -> f64 {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    }

    /// A straightforward transcription of lion-pytorch's `Lion.step` and
    /// `update_fn` in float64, one torch op per line.
    fn reference_step(h: &LionHyper, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let mut wd = h.weight_decay;
        if h.decoupled_weight_decay {
            wd /= h.init_lr;
        }
        let exp_avg = &mut s[0];
        for i in 0..p.len() {
            let grad = if h.maximize { -g[i] } else { g[i] };
            p[i] *= 1.0 - lr * wd;
            let mut update = exp_avg[i] * beta1;
            update = grad.mul_add(1.0 - beta1, update);
            let update = sgn(update);
            p[i] = update.mul_add(-lr, p[i]);
            exp_avg[i] *= beta2;
            exp_avg[i] = grad.mul_add(1.0 - beta2, exp_avg[i]);
        }
    }

    fn all_hypers() -> Vec<LionHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for (weight_decay, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
                out.push(LionHyper {
                    lr: TensorScalar::of(0.01),
                    init_lr: 0.03,
                    maximize,
                    weight_decay,
                    decoupled_weight_decay: decoupled,
                    ..LionHyper::default()
                });
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference_bitwise() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64, f64>(&lens, 1, 0.0, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 1, 0.0, &[]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Lion, _, _>(
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
                // The same operations with the same roundings: the same bits.
                assert_eq!(b.p, r.p, "{h:?}");
                assert_eq!(b.states, r.states, "{h:?}");
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Lion>(&h, 0.0, &[]);
        }
    }

    /// torch's `sgn_` maps NaN and both zeros to +0: the param only decays, the
    /// momentum carries the NaN on.
    #[test]
    fn sign_of_nan_and_zero_is_zero_like_torch() {
        let h = LionHyper {
            lr: TensorScalar::of(0.5),
            weight_decay: 0.1,
            ..LionHyper::default()
        };
        let mut bufs = buffers::<f64, f64>(&[4], 1, 0.0, &[]);
        bufs[0].p = vec![1.0, 1.0, -0.0, 1.0];
        bufs[0].g = vec![f64::NAN, 0.0, -0.0, 2.0];
        step_with::<Lion, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        let decay = 1.0 - 0.5 * 0.1;
        assert_eq!(bufs[0].p[0], decay);
        assert_eq!(bufs[0].p[1], decay);
        // -0 * decay = -0; + (+0 * -lr = -0) stays -0
        assert!(bufs[0].p[2] == 0.0 && bufs[0].p[2].is_sign_negative());
        assert_eq!(bufs[0].p[3], decay - 0.5);
        assert!(bufs[0].states[0][0].is_nan());
        assert_eq!(bufs[0].states[0][3], 2.0 * (1.0 - 0.99));
    }

    #[test]
    fn grad_scale_and_clip_equal_prescaled_grads() {
        let ctx = StepContext {
            unscale: 0.5,
            clip: 0.5,
            ..StepContext::default()
        };
        let h = LionHyper::default();
        let mut scaled = buffers::<f32, f32>(&[1000], 1, 0.0, &[]);
        let mut prescaled = buffers::<f32, f32>(&[1000], 1, 0.0, &[]);
        for step in 1..=5 {
            set_grads(&mut scaled, step);
            set_grads(&mut prescaled, step);
            prescaled[0].g.iter_mut().for_each(|g| *g *= 0.25);
            step_with::<Lion, _, _>(&mut scaled, &h, &ctx, SimdLevel::detect());
            step_with::<Lion, _, _>(
                &mut prescaled,
                &h,
                &StepContext::default(),
                SimdLevel::detect(),
            );
        }
        assert_eq!(scaled[0].p, prescaled[0].p);
        assert_eq!(scaled[0].states, prescaled[0].states);
    }
}

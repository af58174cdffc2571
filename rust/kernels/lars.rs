//! LARS (You et al., "Large Batch Training of Convolutional Networks"), as the
//! reference implementation `pytorch_optimizer.LARS` (pytorch-optimizer 4.1.0)
//! computes it.
//!
//! Reference: `pytorch_optimizer/optimizer/lars.py::LARS._step_foreach` (its
//! default flavour on CPU) and `_step_per_param`. Per element, each line one
//! torch op in the reference's order:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize: g = -g)   grad.neg_()
//! params with ndim > 1 ("lars" tensors):
//!   g = p*wd + g            (fused)                        grad.add_(p, alpha=wd)
//!   g = g * trust_ratio                                    grad.mul_(trust_ratio)
//! momentum > 0:
//!   m = m * momentum                                       mb.mul_(momentum)
//!   m = g*(1 - dampening) + m  (fused)                     .add_(grad, alpha=1 - dampening)
//!   u = m*momentum + g      (fused)  if nesterov           grad.add_(mb, alpha=momentum)
//!   u = m                            otherwise             grad.copy_(mb)
//! p = u*(-lr) + p           (fused)                        p.add_(grad, alpha=-lr)
//! ```
//!
//! The trust ratio needs the norms of the param and of the gradient before the
//! update: the Python layer takes them with the engine's reductions (one
//! parallel pass, float64 in a fixed tree, `_core.grad_norms`), computes the
//! ratio with the reference's float32 tensor arithmetic and hands it over as
//! per-tensor scalar slot 0; slot 1 says whether the tensor is a "lars" one
//! (more than one dimension). Neither is optimizer state: the reference keeps
//! only `momentum_buffer` per param (and a `step` count in the param group).
//!
//! Unlike the reference, the gradient is read, never written (the reference
//! leaves the update in `p.grad`).

use crate::engine::elementwise::{
    has, Elementwise, FlagRunner, GradPrep, StepContext, FIRST_KERNEL_FLAG,
};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// LARS's hyperparameters, under the reference's param-group names (plus
    /// `maximize`, an attribute of the reference's optimizer, passed by name).
    pub struct LarsHyper {
        lr: f64,
        weight_decay: f64,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        maximize: bool,
    }
}

impl Default for LarsHyper {
    fn default() -> Self {
        LarsHyper {
            lr: 1e-3,
            weight_decay: 0.0,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

/// Keep a momentum buffer (`momentum > 0`).
const MOMENTUM: u32 = FIRST_KERNEL_FLAG;
/// Nesterov's update (with a momentum buffer).
const NESTEROV: u32 = FIRST_KERNEL_FLAG << 1;

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct LarsConsts<C> {
    /// Whether the tensor has more than one dimension (decay and trust ratio).
    lars: bool,
    weight_decay: C,
    trust_ratio: C,
    momentum: C,
    one_minus_dampening: C,
    neg_lr: C,
}

/// LARS.
pub struct Lars;

impl Elementwise for Lars {
    const NAME: &'static str = "lars";
    /// Per-tensor inputs of this step (not state): the trust ratio and the
    /// "lars tensor" flag (1.0 or 0.0).
    const SCALARS: &'static [&'static str] = &["trust_ratio", "lars"];
    type Hyper = LarsHyper;
    type Consts<C: Real> = LarsConsts<C>;

    fn state_keys(h: &LarsHyper) -> &'static [&'static str] {
        if h.momentum > 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn grad_prep(h: &LarsHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: 0.0,
        }
    }

    fn flags(h: &LarsHyper, _ctx: &StepContext) -> u32 {
        let mut flags = Self::grad_prep(h).flags();
        if h.momentum > 0.0 {
            flags |= MOMENTUM;
            if h.nesterov {
                flags |= NESTEROV;
            }
        }
        flags
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, MOMENTUM, MOMENTUM | NESTEROV])
    }

    #[inline(always)]
    fn num_states(flags: u32) -> usize {
        usize::from(has(flags, MOMENTUM))
    }

    fn consts<C: Real>(h: &LarsHyper, scalars: &[f64]) -> LarsConsts<C> {
        LarsConsts {
            lars: scalars[1] != 0.0,
            weight_decay: C::from_f64(h.weight_decay),
            trust_ratio: C::from_f64(scalars[0]),
            momentum: C::from_f64(h.momentum),
            one_minus_dampening: C::from_f64(1.0 - h.dampening),
            neg_lr: C::from_f64(-h.lr),
        }
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &LarsConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let p = *param;
        let g = if k.lars {
            p.mul_add(k.weight_decay, g) * k.trust_ratio
        } else {
            g
        };
        let u = if has(FLAGS, MOMENTUM) {
            let m = g.mul_add(k.one_minus_dampening, s[0] * k.momentum);
            s[0] = m;
            if has(FLAGS, NESTEROV) {
                m.mul_add(k.momentum, g)
            } else {
                m
            }
        } else {
            g
        };
        *param = u.mul_add(k.neg_lr, p);
    }
}

/// LARS on tensors with at most one dimension (no trust ratio, no decay: the
/// reference's plain SGD for biases and norms), without per-tensor scalars, so
/// that such tensors can keep a cached plan (re-checked, not rebuilt, every
/// step: what makes a list of many small tensors fast).
pub struct LarsPlain;

impl Elementwise for LarsPlain {
    const NAME: &'static str = "lars_plain";
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = LarsHyper;
    type Consts<C: Real> = LarsConsts<C>;

    fn state_keys(h: &LarsHyper) -> &'static [&'static str] {
        Lars::state_keys(h)
    }

    fn grad_prep(h: &LarsHyper) -> GradPrep {
        Lars::grad_prep(h)
    }

    fn flags(h: &LarsHyper, ctx: &StepContext) -> u32 {
        Lars::flags(h, ctx)
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        Lars::dispatch_flags(flags, runner)
    }

    #[inline(always)]
    fn num_states(flags: u32) -> usize {
        Lars::num_states(flags)
    }

    fn consts<C: Real>(h: &LarsHyper, _scalars: &[f64]) -> LarsConsts<C> {
        Lars::consts(h, &[1.0, 0.0])
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &LarsConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        Lars::update::<C, FLAGS>(k, param, g, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::elementwise::StepContext;
    use crate::kernels::testing::{assert_bitwise_everywhere, buffers, set_grads, step_with};
    use crate::simd::SimdLevel;

    /// The reference's per-element lines in float64, one torch op per line.
    fn reference_step(
        h: &LarsHyper,
        trust: f64,
        lars: bool,
        p: &mut [f64],
        g: &[f64],
        s: &mut [Vec<f64>],
    ) {
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if lars {
                grad = p[i].mul_add(h.weight_decay, grad);
                grad *= trust;
            }
            if h.momentum > 0.0 {
                let mb = &mut s[0][i];
                *mb *= h.momentum;
                *mb = grad.mul_add(1.0 - h.dampening, *mb);
                grad = if h.nesterov {
                    mb.mul_add(h.momentum, grad)
                } else {
                    *mb
                };
            }
            p[i] = grad.mul_add(-h.lr, p[i]);
        }
    }

    fn all_hypers() -> Vec<LarsHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
                out.push(LarsHyper {
                    lr: 0.1,
                    weight_decay: 0.01,
                    momentum,
                    dampening: 0.1,
                    nesterov,
                    maximize,
                });
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference_bitwise() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            for (trust, lars) in [(0.37, 1.0), (1.0, 0.0)] {
                let states = Lars::state_keys(&h).len();
                let mut ours = buffers::<f64, f64>(&lens, states, 0.0, &[trust, lars]);
                let mut reference = buffers::<f64, f64>(&lens, 1, 0.0, &[]);
                for step in 1..=20 {
                    set_grads(&mut ours, step);
                    set_grads(&mut reference, step);
                    step_with::<Lars, _, _>(
                        &mut ours,
                        &h,
                        &StepContext::default(),
                        SimdLevel::detect(),
                    );
                    for r in reference.iter_mut() {
                        reference_step(&h, trust, lars != 0.0, &mut r.p, &r.g, &mut r.states);
                    }
                }
                for (b, r) in ours.iter().zip(reference.iter()) {
                    assert_eq!(b.p, r.p, "{h:?}");
                    if h.momentum > 0.0 {
                        assert_eq!(b.states[0], r.states[0], "{h:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Lars>(&h, 0.0, &[0.37, 1.0]);
            assert_bitwise_everywhere::<LarsPlain>(&h, 0.0, &[]);
        }
    }

    #[test]
    fn plain_equals_lars_without_trust_ratio() {
        for h in all_hypers() {
            let states = Lars::state_keys(&h).len();
            let mut plain = buffers::<f32, f32>(&[1000], states, 0.0, &[]);
            let mut lars = buffers::<f32, f32>(&[1000], states, 0.0, &[0.5, 0.0]);
            for step in 1..=5 {
                set_grads(&mut plain, step);
                set_grads(&mut lars, step);
                let ctx = StepContext::default();
                step_with::<LarsPlain, _, _>(&mut plain, &h, &ctx, SimdLevel::detect());
                step_with::<Lars, _, _>(&mut lars, &h, &ctx, SimdLevel::detect());
            }
            assert_eq!(plain[0].p, lars[0].p, "{h:?}");
            assert_eq!(plain[0].states, lars[0].states, "{h:?}");
        }
    }
}

//! SGD with momentum, dampening, Nesterov and weight decay (torch.optim semantics).
//!
//! Reference: `torch/optim/sgd.py::_single_tensor_sgd`, per element:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay g = p*wd + g)
//! momentum:
//!   first step:  buf = g                        buf = grad.detach().clone()
//!   later:       buf = g*(1 - dampening) + buf*momentum   buf.mul_(momentum).add_(grad, alpha=1 - dampening)
//!   g = buf*momentum + g  if nesterov else buf  grad.add(buf, alpha=momentum)
//! p = g*(-lr) + p   (fused)                     param.add_(grad, alpha=-lr)
//! ```
//!
//! torch creates the momentum buffer on a parameter's first step; the Python
//! layer allocates it and runs that step with `StepContext::fresh`, which
//! writes the buffer instead of reading it.

use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// SGD's hyperparameters, under torch's param-group names.
    pub struct SgdHyper {
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
        maximize: bool,
    }
}

impl Default for SgdHyper {
    fn default() -> Self {
        SgdHyper {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

/// A momentum buffer is kept.
const MOMENTUM: u32 = 1 << 2;
/// Nesterov momentum.
const NESTEROV: u32 = 1 << 3;
/// The momentum buffer is new: written from the gradient, not read.
const FIRST: u32 = 1 << 4;

#[derive(Clone, Copy, Debug)]
pub struct SgdConsts<C> {
    momentum: C,
    one_minus_dampening: C,
    neg_lr: C,
}

/// SGD.
pub struct Sgd;

impl Elementwise for Sgd {
    const NAME: &'static str = "sgd";
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = SgdHyper;
    type Consts<C: Real> = SgdConsts<C>;

    fn state_keys(h: &SgdHyper) -> &'static [&'static str] {
        if h.momentum != 0.0 {
            &["momentum_buffer"]
        } else {
            &[]
        }
    }

    fn grad_prep(h: &SgdHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &SgdHyper, ctx: &StepContext) -> u32 {
        let momentum = if h.momentum == 0.0 {
            0
        } else {
            MOMENTUM | if h.nesterov { NESTEROV } else { 0 } | if ctx.fresh { FIRST } else { 0 }
        };
        Self::grad_prep(h).flags() | momentum
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        const MN: u32 = MOMENTUM | NESTEROV;
        crate::flag_match!(
            flags,
            runner,
            [
                0,
                L2,
                MOMENTUM,
                L2 | MOMENTUM,
                MN,
                L2 | MN,
                MOMENTUM | FIRST,
                L2 | MOMENTUM | FIRST,
                MN | FIRST,
                L2 | MN | FIRST,
            ]
        )
    }

    #[inline(always)]
    fn num_states(flags: u32) -> usize {
        usize::from(has(flags, MOMENTUM))
    }

    #[inline(always)]
    fn reads_state(flags: u32, _k: usize) -> bool {
        !has(flags, FIRST)
    }

    fn consts<C: Real>(h: &SgdHyper, _scalars: &[f64]) -> SgdConsts<C> {
        SgdConsts {
            momentum: C::from_f64(h.momentum),
            one_minus_dampening: C::from_f64(1.0 - h.dampening),
            neg_lr: C::from_f64(-h.lr),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_sgd` on a bfloat16/float16 param, op by op: each
    /// result rounded, `add_`'s `alpha` (`1 - dampening`, `momentum` for Nesterov,
    /// `-lr`) in the param's dtype, `mul_`'s momentum in float32.
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &SgdConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let mut g = g;
        if has(FLAGS, MOMENTUM) {
            let buf = if has(FLAGS, FIRST) {
                g // torch.clone(grad)
            } else {
                // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                round(g.mul_add(round(k.one_minus_dampening), round(s[0] * k.momentum)))
            };
            s[0] = buf;
            g = if has(FLAGS, NESTEROV) {
                round(buf.mul_add(round(k.momentum), g)) // grad.add(buf, alpha=momentum)
            } else {
                buf
            };
        }
        *param = round(g.mul_add(round(k.neg_lr), *param)); // param.add_(grad, alpha=-lr)
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &SgdConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let mut g = g;
        if has(FLAGS, MOMENTUM) {
            let buf = if has(FLAGS, FIRST) {
                g
            } else {
                g.mul_add(k.one_minus_dampening, s[0] * k.momentum)
            };
            s[0] = buf;
            g = if has(FLAGS, NESTEROV) {
                buf.mul_add(k.momentum, g)
            } else {
                buf
            };
        }
        *param = g.mul_add(k.neg_lr, *param);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, set_grads, step_with,
    };
    use crate::simd::SimdLevel;

    /// torch's `_single_tensor_sgd`, transcribed in float64.
    fn reference_step(h: &SgdHyper, first: bool, p: &mut [f64], g: &[f64], buf: &mut [f64]) {
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                grad = p[i].mul_add(h.weight_decay, grad);
            }
            if h.momentum != 0.0 {
                buf[i] = if first {
                    grad
                } else {
                    grad.mul_add(1.0 - h.dampening, buf[i] * h.momentum)
                };
                grad = if h.nesterov {
                    buf[i].mul_add(h.momentum, grad)
                } else {
                    buf[i]
                };
            }
            p[i] = grad.mul_add(-h.lr, p[i]);
        }
    }

    fn all_hypers() -> Vec<SgdHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.05] {
                for (momentum, dampening, nesterov) in [
                    (0.0, 0.0, false),
                    (0.9, 0.0, false),
                    (0.9, 0.1, false),
                    (0.9, 0.0, true),
                ] {
                    out.push(SgdHyper {
                        lr: 0.05,
                        momentum,
                        dampening,
                        weight_decay,
                        nesterov,
                        maximize,
                    });
                }
            }
        }
        out
    }

    fn ctx(first: bool) -> StepContext {
        StepContext {
            fresh: first,
            ..StepContext::default()
        }
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 17, 1000, 70_001];
        for h in all_hypers() {
            let states = Sgd::state_keys(&h).len();
            let mut ours = buffers::<f64, f64>(&lens, states, 0.0, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 1, 0.0, &[]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Sgd, _, _>(&mut ours, &h, &ctx(step == 1), SimdLevel::detect());
                for r in reference.iter_mut() {
                    reference_step(&h, step == 1, &mut r.p, &r.g, &mut r.states[0]);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-13, &format!("{h:?}"));
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            // Buffers start at 0.5 so the non-first steps read real values.
            assert_bitwise_everywhere::<Sgd>(&h, 0.5, &[]);
        }
    }

    #[test]
    fn first_step_writes_the_buffer_from_the_gradient() {
        let h = SgdHyper {
            momentum: 0.9,
            dampening: 0.5,
            weight_decay: 0.1,
            ..SgdHyper::default()
        };
        let mut bufs = buffers::<f32, f32>(&[100], 1, f64::NAN, &[]);
        set_grads(&mut bufs, 1);
        let before = bufs[0].p.clone();
        step_with::<Sgd, _, _>(&mut bufs, &h, &ctx(true), SimdLevel::detect());
        let b = &bufs[0];
        for ((&p0, &g), (&buf, &p)) in before.iter().zip(&b.g).zip(b.states[0].iter().zip(&b.p)) {
            let g = p0.mul_add(0.1, g);
            assert_eq!(buf, g);
            assert_eq!(p, g.mul_add(-1e-3, p0));
        }
    }
}

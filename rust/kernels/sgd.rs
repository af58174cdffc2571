//! SGD with momentum, dampening, Nesterov and weight decay (torch.optim semantics).
//!
//! Reference: `torch/optim/sgd.py::_single_tensor_sgd`, per element:
//!
//! ```text
//! grad = grad * inv_scale * clip_coef         (GradScaler unscale, clipping; 1.0 when off)
//! g = -grad if maximize else grad
//! g = p*wd + g   (fused)                        grad.add(param, alpha=weight_decay)
//! momentum:
//!   first step:  buf = g                        buf = grad.detach().clone()
//!   later:       buf = g*(1 - dampening) + buf*momentum   buf.mul_(momentum).add_(grad, alpha=1 - dampening)
//!   g = buf*momentum + g  if nesterov else buf  grad.add(buf, alpha=momentum)
//! p = g*(-lr) + p   (fused)                     param.add_(grad, alpha=-lr)
//! ```
//!
//! torch creates the momentum buffer on a parameter's first step; the Python
//! layer allocates it and runs that step with `first_step`, which writes the
//! buffer instead of reading it.

use super::{run_segments, GradScale, GradScaleOf, Real, SegmentKernel, Storage};
use crate::engine::{Group, Slices};
use crate::simd::SimdLevel;

/// Hyperparameters of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
    /// Unscaling and clipping applied to every gradient as it is read.
    pub grad_scale: GradScale,
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
            grad_scale: GradScale::default(),
        }
    }
}

impl SgdHyper {
    /// State buffers per parameter: the momentum buffer when momentum is on.
    pub fn num_states(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }
}

#[derive(Clone, Copy, Debug)]
struct SgdConsts<C> {
    grad_scale: GradScaleOf<C>,
    weight_decay: C,
    momentum: C,
    one_minus_dampening: C,
    neg_lr: C,
}

impl<C: Real> SgdConsts<C> {
    fn new(h: &SgdHyper) -> Self {
        SgdConsts {
            grad_scale: GradScaleOf::new(&h.grad_scale),
            weight_decay: C::from_f64(h.weight_decay),
            momentum: C::from_f64(h.momentum),
            one_minus_dampening: C::from_f64(1.0 - h.dampening),
            neg_lr: C::from_f64(-h.lr),
        }
    }
}

struct SgdKernel<
    C,
    const MAXIMIZE: bool,
    const WD: bool,
    const MOMENTUM: bool,
    const NESTEROV: bool,
    const FIRST: bool,
> {
    consts: SgdConsts<C>,
}

impl<
        T,
        const MAXIMIZE: bool,
        const WD: bool,
        const MOMENTUM: bool,
        const NESTEROV: bool,
        const FIRST: bool,
    > SegmentKernel<T> for SgdKernel<T, MAXIMIZE, WD, MOMENTUM, NESTEROV, FIRST>
where
    T: Storage<Compute = T> + Real,
{
    #[inline(always)]
    fn apply(&self, _tensor: usize, s: Slices<'_, T>) {
        let k = &self.consts;
        let n = s.param.len();
        let param = &mut s.param[..n];
        let grad = &s.grad[..n];
        let [buffer, _, _] = s.states;
        let element = |p: T, grad: T, buf: T| -> (T, T) {
            let grad = k.grad_scale.apply(grad);
            let mut g = if MAXIMIZE { -grad } else { grad };
            if WD {
                g = p.mul_add(k.weight_decay, g);
            }
            let mut buf = buf;
            if MOMENTUM {
                buf = if FIRST {
                    g
                } else {
                    g.mul_add(k.one_minus_dampening, buf * k.momentum)
                };
                g = if NESTEROV {
                    buf.mul_add(k.momentum, g)
                } else {
                    buf
                };
            }
            (g.mul_add(k.neg_lr, p), buf)
        };
        if MOMENTUM {
            let buffer = &mut buffer[..n];
            for i in 0..n {
                let (p, buf) = element(param[i], grad[i], buffer[i]);
                param[i] = p;
                buffer[i] = buf;
            }
        } else {
            for i in 0..n {
                param[i] = element(param[i], grad[i], T::ZERO).0;
            }
        }
    }
}

/// Steps a whole group. `first_step`: the momentum buffers are new and are
/// written (as torch's `clone(grad)`) rather than read.
///
/// # Panics
/// If tensors do not carry `h.num_states()` state buffers.
pub fn sgd_step(group: &Group<'_>, h: &SgdHyper, first_step: bool, level: SimdLevel) {
    for t in group.tensors() {
        assert_eq!(t.num_states, h.num_states(), "SGD momentum buffer missing");
    }
    crate::const_bool!(h.maximize, MAXIMIZE, {
        crate::const_bool!(h.weight_decay != 0.0, WD, {
            if h.momentum == 0.0 {
                run::<MAXIMIZE, WD, false, false, false>(group, h, level)
            } else {
                crate::const_bool!(h.nesterov, NESTEROV, {
                    crate::const_bool!(first_step, FIRST, {
                        run::<MAXIMIZE, WD, true, NESTEROV, FIRST>(group, h, level)
                    })
                })
            }
        })
    })
}

fn run<
    const MAXIMIZE: bool,
    const WD: bool,
    const MOMENTUM: bool,
    const NESTEROV: bool,
    const FIRST: bool,
>(
    group: &Group<'_>,
    h: &SgdHyper,
    level: SimdLevel,
) {
    let k32 = SgdKernel::<f32, MAXIMIZE, WD, MOMENTUM, NESTEROV, FIRST> {
        consts: SgdConsts::new(h),
    };
    let k64 = SgdKernel::<f64, MAXIMIZE, WD, MOMENTUM, NESTEROV, FIRST> {
        consts: SgdConsts::new(h),
    };
    run_segments(group, level, &k32, &k64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, group_of, set_grads,
    };

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
                        grad_scale: GradScale::default(),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64>(&lens, h.num_states(), 0.0);
            let mut reference = buffers::<f64>(&lens, 1, 0.0);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                sgd_step(
                    &group_of(&mut ours, false),
                    &h,
                    step == 1,
                    SimdLevel::detect(),
                );
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
            // Buffers start at 0.5 so the non-first-step path reads real values.
            assert_bitwise_everywhere(h.num_states(), 0.5, &|group, level| {
                sgd_step(group, &h, false, level);
            });
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
        let mut bufs = buffers::<f32>(&[100], 1, f64::NAN);
        set_grads(&mut bufs, 1);
        let before = bufs[0].p.clone();
        sgd_step(&group_of(&mut bufs, false), &h, true, SimdLevel::detect());
        let b = &bufs[0];
        for ((&p0, &g), (&buf, &p)) in before.iter().zip(&b.g).zip(b.states[0].iter().zip(&b.p)) {
            let g = p0.mul_add(0.1, g);
            assert_eq!(buf, g);
            assert_eq!(p, g.mul_add(-1e-3, p0));
        }
    }
}

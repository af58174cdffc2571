//! Adagrad with learning-rate decay and weight decay (torch.optim semantics, dense grads).
//!
//! Reference: `torch/optim/adagrad.py::_single_tensor_adagrad`, per element:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay g = p*wd + g)
//! clr = lr / (1 + (step - 1) * lr_decay)        (float64, per tensor)
//! sum = g*g + sum   (fused)                     state_sum.addcmul_(grad, grad, value=1)
//! std = sqrt(sum) + eps                         state_sum.sqrt().add_(eps)
//! p = p + (-clr*g)/std                          param.addcdiv_(grad, std, value=-clr)
//! ```
//!
//! Sparse gradients take torch's own path (see the Python layer).

use crate::engine::elementwise::{Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// Adagrad's hyperparameters, under torch's param-group names.
    pub struct AdagradHyper {
        /// A float32 tensor `lr` makes torch compute `clr` in float32.
        lr: TensorScalar,
        lr_decay: f64,
        weight_decay: f64,
        eps: f64,
        maximize: bool,
    }
}

impl Default for AdagradHyper {
    fn default() -> Self {
        AdagradHyper {
            lr: TensorScalar::of(1e-2),
            lr_decay: 0.0,
            weight_decay: 0.0,
            eps: 1e-10,
            maximize: false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AdagradConsts<C> {
    eps: C,
    neg_clr: C,
}

/// Adagrad (dense gradients).
pub struct Adagrad;

impl Elementwise for Adagrad {
    const NAME: &'static str = "adagrad";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = AdagradHyper;
    type Consts<C: Real> = AdagradConsts<C>;

    fn state_keys(_h: &AdagradHyper) -> &'static [&'static str] {
        &["sum"]
    }

    fn grad_prep(h: &AdagradHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &AdagradHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, L2])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        1
    }

    fn consts<C: Real>(h: &AdagradHyper, scalars: &[f64]) -> AdagradConsts<C> {
        let step = scalars[0];
        let decay = 1.0 + (step - 1.0) * h.lr_decay;
        let clr = if h.lr.is_f32_tensor {
            f64::from(h.lr.value as f32 / decay as f32)
        } else {
            h.lr.value / decay
        };
        AdagradConsts {
            eps: C::from_f64(h.eps),
            neg_clr: C::from_f64(-clr),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_adagrad` on a bfloat16/float16 param, op by op.
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AdagradConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let total = round(g.mul_add(g, s[0])); // state_sum.addcmul_(grad, grad, value=1)
        s[0] = total;
        let std = round(round(total.sqrt()) + round(k.eps)); // state_sum.sqrt().add_(eps)
        *param = round(*param + k.neg_clr * g / std); // param.addcdiv_(grad, std, value=-clr)
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AdagradConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let total = g.mul_add(g, s[0]);
        s[0] = total;
        let std = total.sqrt() + k.eps;
        *param = *param + k.neg_clr * g / std;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StepContext;
    use crate::kernels::testing::{
        assert_bitwise_everywhere, assert_close, buffers, set_grads, step_with,
    };
    use crate::simd::SimdLevel;

    /// torch's `_single_tensor_adagrad` (dense branch), transcribed in float64.
    fn reference_step(h: &AdagradHyper, step: f64, p: &mut [f64], g: &[f64], sum: &mut [f64]) {
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                grad = p[i].mul_add(h.weight_decay, grad);
            }
            let clr = h.lr.value / (1.0 + (step - 1.0) * h.lr_decay);
            sum[i] = grad.mul_add(grad, sum[i]);
            let std = sum[i].sqrt() + h.eps;
            p[i] += -clr * grad / std;
        }
    }

    fn all_hypers() -> Vec<AdagradHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.05] {
                for lr_decay in [0.0, 0.01] {
                    out.push(AdagradHyper {
                        maximize,
                        weight_decay,
                        lr_decay,
                        ..AdagradHyper::default()
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
            let mut ours = buffers::<f64, f64>(&lens, 1, 0.1, &[0.0]);
            let mut reference = buffers::<f64, f64>(&lens, 1, 0.1, &[0.0]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Adagrad, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    reference_step(&h, step as f64, &mut r.p, &r.g, &mut r.states[0]);
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
            assert_bitwise_everywhere::<Adagrad>(&h, 0.1, &[0.0]);
        }
    }
}

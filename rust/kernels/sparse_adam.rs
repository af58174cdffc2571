//! SparseAdam (torch.optim semantics): Adam on the rows a sparse gradient touches.
//!
//! The reference is torch's `torch/optim/_functional.py::sparse_adam`. It coalesces
//! the gradient (duplicate indices summed: the Python side calls torch's own
//! `coalesce`, so the sums are torch's), then updates only the touched entries of
//! the moments and of the param. Each touched row is one run of memory of the
//! (contiguous) param and its states; `GroupPlan.from_rows` lays the rows out as
//! the engine's tensors, and this kernel is the per-element update, torch's
//! operations in torch's order (each rounded):
//!
//! ```text
//! (engine: maximize negates g)               grad = -grad if maximize
//! um = (g - m) * (1 - beta1)                 grad_values.sub(old_exp_avg_values).mul_(1 - beta1)
//! m  = m + um                                exp_avg.add_(make_sparse(um))     (= numer)
//! uv = (g*g - v) * (1 - beta2)               grad_values.pow(2).sub_(old).mul_(1 - beta2)
//! v  = v + uv                                exp_avg_sq.add_(make_sparse(uv))
//! d  = sqrt(v) + eps                         uv.add_(old).sqrt_().add_(eps)
//! p  = p + (m / d) * (-step_size)            param.add_(make_sparse(-step_size * numer.div_(denom)))
//! ```
//!
//! with `step_size = lr * sqrt(1 - beta2 ** step) / (1 - beta1 ** step)` in Python
//! floats (a float32 tensor `lr`, which torch's `_to_scalar` leaves a tensor, makes it
//! float32 tensor arithmetic). torch's `numer` (`um + m_old`) and `uv + v_old` are the same sums as the
//! new moments, so they are not recomputed. torch's SparseAdam keeps its step
//! counter as a Python int in the state: the Python side increments it and passes
//! it here as the `step` hyperparameter.
//!
//! One pass over the touched rows: read p, g, m, v; write p, m, v.

use crate::engine::elementwise::{Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// SparseAdam's hyperparameters (torch's param-group names) and the step number.
    pub struct SparseAdamHyper {
        /// A float32 tensor `lr` makes torch compute the step size in float32
        /// tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 2],
        eps: f64,
        maximize: bool,
        /// The param's step counter, already incremented (torch's `state["step"]`).
        step: f64,
    }
}

impl Default for SparseAdamHyper {
    fn default() -> Self {
        SparseAdamHyper {
            lr: TensorScalar::of(1e-3),
            betas: [0.9, 0.999],
            eps: 1e-8,
            maximize: false,
            step: 1.0,
        }
    }
}

/// The constants of one step, rounded to the compute type.
#[derive(Clone, Copy, Debug)]
pub struct SparseAdamConsts<C> {
    one_minus_beta1: C,
    one_minus_beta2: C,
    eps: C,
    neg_step_size: C,
}

/// SparseAdam.
pub struct SparseAdam;

impl Elementwise for SparseAdam {
    const NAME: &'static str = "sparse_adam";
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = SparseAdamHyper;
    type Consts<C: Real> = SparseAdamConsts<C>;

    fn state_keys(_h: &SparseAdamHyper) -> &'static [&'static str] {
        &["exp_avg", "exp_avg_sq"]
    }

    fn grad_prep(h: &SparseAdamHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: 0.0,
        }
    }

    fn flags(h: &SparseAdamHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    /// Computed in float64 exactly as torch's Python code computes them.
    fn consts<C: Real>(h: &SparseAdamHyper, _scalars: &[f64]) -> SparseAdamConsts<C> {
        let [beta1, beta2] = h.betas;
        let bias_correction1 = 1.0 - beta1.powf(h.step);
        let bias_correction2 = 1.0 - beta2.powf(h.step);
        let step_size = if h.lr.is_f32_tensor {
            // `lr * math.sqrt(bc2)` and `/ bc1`: float32 tensor ops, each Python float
            // rounded to float32 first.
            let scaled = h.lr.value as f32 * bias_correction2.sqrt() as f32;
            f64::from(scaled / bias_correction1 as f32)
        } else {
            h.lr.value * bias_correction2.sqrt() / bias_correction1
        };
        SparseAdamConsts {
            one_minus_beta1: C::from_f64(1.0 - beta1),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            eps: C::from_f64(h.eps),
            neg_step_size: C::from_f64(-step_size),
        }
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &SparseAdamConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let m = s[0] + (g - s[0]) * k.one_minus_beta1;
        let v = s[1] + (g * g - s[1]) * k.one_minus_beta2;
        let denom = v.sqrt() + k.eps;
        *param = *param + m / denom * k.neg_step_size;
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

    /// torch's `sparse_adam` on a fully touched row, in float64, one tensor op
    /// per pass as torch runs them.
    fn reference_step(h: &SparseAdamHyper, param: &mut [f64], grad: &[f64], s: &mut [Vec<f64>]) {
        let [beta1, beta2] = h.betas;
        let (exp_avg, rest) = s.split_first_mut().unwrap();
        let exp_avg_sq = &mut rest[0];
        for i in 0..param.len() {
            let g = if h.maximize { -grad[i] } else { grad[i] };
            let old_m = exp_avg[i];
            let um = (g - old_m) * (1.0 - beta1);
            exp_avg[i] = old_m + um;
            let old_v = exp_avg_sq[i];
            let uv = (g.powi(2) - old_v) * (1.0 - beta2);
            exp_avg_sq[i] = old_v + uv;
            let numer = um + old_m;
            let denom = (uv + old_v).sqrt() + h.eps;
            let bias_correction1 = 1.0 - beta1.powf(h.step);
            let bias_correction2 = 1.0 - beta2.powf(h.step);
            let step_size = h.lr.value * bias_correction2.sqrt() / bias_correction1;
            param[i] += -step_size * (numer / denom);
        }
    }

    fn all_hypers() -> Vec<SparseAdamHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for betas in [[0.9, 0.999], [0.6, 0.9]] {
                out.push(SparseAdamHyper {
                    lr: TensorScalar::of(0.01),
                    betas,
                    maximize,
                    ..SparseAdamHyper::default()
                });
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 64, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64, f64>(&lens, 2, 0.0, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 2, 0.0, &[]);
            for step in 1..=20 {
                let h = SparseAdamHyper {
                    step: step as f64,
                    ..h
                };
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<SparseAdam, _, _>(
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
            assert_bitwise_everywhere::<SparseAdam>(&h, 0.0, &[]);
        }
    }
}

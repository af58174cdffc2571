//! ASGD (torch.optim semantics: `lambd`, `alpha`, `t0`, L2 weight decay, maximize,
//! the per-tensor scalar state `eta` and `mu`, the averaged parameter `ax`).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/asgd.py::_single_tensor_asgd`, non-capturable, non-differentiable
//! branch). Each element goes through the same operations in the same order:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay — see engine::elementwise)
//! p = p * (1 - lambd * eta)                   param.mul_(1 - lambd * eta_value)
//! p = (-eta) * g + p   (fused)                param.add_(grad, alpha=-eta_value)
//! ax = ax + (p - ax) * mu   if mu != 1        ax.add_(param.sub(ax).mul_(mu))
//! ax = p                    if mu == 1        ax.copy_(param)
//! ```
//!
//! `eta` and `mu` are the values *before* this step (0-d tensors in torch's scalar
//! dtype: float32 unless the default dtype is float64; `eta_value = eta.item()`), so
//! the kernel reads them first and updates them afterwards ([`Advance::AfterConsts`]),
//! from the incremented step, as torch's Python computes them and rounds them into
//! the tensors (`eta.copy_(torch.as_tensor(...))`: through the default dtype, see
//! [`Asgd::advance`]):
//!
//! ```text
//! eta = lr / ((1 + lambd * lr * step) ** alpha)
//! mu = 1 / max(1, step - t0)
//! ```
//!
//! A float32 tensor `lr` makes torch compute `eta` in float32 tensor arithmetic
//! (`lambd * lr`, `* step`, `1 +`, `** alpha`, `lr /` each rounded to float32; `**`
//! is torch's `pow` with its special exponents: [`torch_pow_f32`]). The choice between averaging and
//! copying depends on the tensor's `mu` only, so it is made per tensor, not per
//! element.
//!
//! Rounding: `1 - lambd * eta` and `-eta` are rounded to the param's dtype (torch's
//! scalar arguments), every tensor op rounds once; no operation is approximate, so the
//! result is bitwise torch's.
//!
//! One pass over memory: read p, g, ax; write p, ax.

use crate::engine::elementwise::{Advance, Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::{Format, Real, ScalarSlot, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// ASGD's hyperparameters, under torch's param-group names.
    pub struct AsgdHyper {
        /// A float32 tensor `lr` makes torch compute `eta` in float32 tensor arithmetic.
        lr: TensorScalar,
        lambd: f64,
        alpha: f64,
        t0: f64,
        weight_decay: f64,
        maximize: bool,
    }
}

impl Default for AsgdHyper {
    fn default() -> Self {
        AsgdHyper {
            lr: TensorScalar::of(1e-2),
            lambd: 1e-4,
            alpha: 0.75,
            t0: 1e6,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

/// torch's `pow(tensor, exponent)` on a 0-d float32 tensor: the exponents its CPU
/// kernel special-cases, else the float64 `pow` of the widened base and the Python
/// float exponent, rounded to float32 (checked against torch 2.15 on 20,000 bases
/// and exponents: bitwise equal; exponent 0.5 is torch's vectorised `sqrt`, which is
/// off by an ulp on ~0.6% of bases, ours is correctly rounded).
fn torch_pow_f32(base: f32, exponent: f64) -> f32 {
    if exponent == 0.5 {
        base.sqrt()
    } else if exponent == -0.5 {
        1.0 / base.sqrt()
    } else if exponent == -1.0 {
        1.0 / base
    } else if exponent == 2.0 {
        base * base
    } else if exponent == 3.0 {
        base * base * base
    } else if exponent == -2.0 {
        1.0 / (base * base)
    } else {
        f64::from(base).powf(exponent) as f32
    }
}

impl AsgdHyper {
    /// `eta` after step `step` (the incremented counter), before rounding into the
    /// tensor: `lr / ((1 + lambd * lr * step) ** alpha)`.
    pub fn eta(&self, step: f64) -> f64 {
        if self.lr.is_f32_tensor {
            let lr = self.lr.value as f32;
            let base = 1.0 + self.lambd as f32 * lr * step as f32;
            f64::from(lr / torch_pow_f32(base, self.alpha))
        } else {
            let lr = self.lr.value;
            lr / (1.0 + self.lambd * lr * step).powf(self.alpha)
        }
    }

    /// `mu` after step `step`: `1 / max(1, step - t0)` (Python's `max` keeps the
    /// first argument unless the second is larger: NaN gives 1).
    pub fn mu(&self, step: f64) -> f64 {
        let since = step - self.t0;
        1.0 / if since > 1.0 { since } else { 1.0 }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AsgdConsts<C> {
    /// `1 - lambd * eta`.
    decay: C,
    /// `-eta`.
    neg_eta: C,
    mu: C,
    /// `mu == 1`: `ax.copy_(param)` instead of averaging.
    copy: bool,
}

/// ASGD.
pub struct Asgd;

impl Elementwise for Asgd {
    const NAME: &'static str = "asgd";
    const SCALARS: &'static [&'static str] = &["step", "eta", "mu"];
    const ADVANCE: Advance = Advance::AfterConsts;
    type Hyper = AsgdHyper;
    type Consts<C: Real> = AsgdConsts<C>;

    fn state_keys(_h: &AsgdHyper) -> &'static [&'static str] {
        &["ax"]
    }

    fn grad_prep(h: &AsgdHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &AsgdHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        use crate::engine::L2;
        crate::flag_match!(flags, runner, [0, L2])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        1
    }

    /// `eta` and `mu` for the next step, from the incremented counter, rounded into
    /// their slots (after `consts` read the old values). torch copies them from
    /// `torch.as_tensor(python_float)`, a tensor of the default dtype: float32 unless
    /// the default dtype is float64, whatever the slot's dtype (a checkpoint load
    /// casts `eta` and `mu` to the param's dtype). The step counter's dtype, which
    /// torch made from the default dtype, stands for it.
    fn advance(h: &AsgdHyper, scalars: &[ScalarSlot]) {
        let [step, eta, mu] = [scalars[0], scalars[1], scalars[2]];
        let default_f32 = step.format == Format::F32;
        let as_tensor = |x: f64| if default_f32 { f64::from(x as f32) } else { x };
        let step = step.get();
        eta.set(as_tensor(h.eta(step)));
        mu.set(as_tensor(h.mu(step)));
    }

    /// From `eta` and `mu` as they were before this step (`eta.item()`, `mu.item()`).
    fn consts<C: Real>(h: &AsgdHyper, scalars: &[f64]) -> AsgdConsts<C> {
        let [_step, eta, mu] = [scalars[0], scalars[1], scalars[2]];
        AsgdConsts {
            decay: C::from_f64(1.0 - h.lambd * eta),
            neg_eta: C::from_f64(-eta),
            mu: C::from_f64(mu),
            copy: mu == 1.0,
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_asgd` on a bfloat16/float16 param, op by op (see
    /// [`Elementwise::update_rounded`]; `mu` multiplies as the float32 0-d tensor it is).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AsgdConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let p = round(*param * k.decay); // param.mul_(1 - lambd * eta)
        let p = round(g.mul_add(round(k.neg_eta), p)); // param.add_(grad, alpha=-eta)
        let ax = s[0];
        s[0] = if k.copy {
            p // ax.copy_(param)
        } else {
            round(ax + round(round(p - ax) * k.mu)) // ax.add_(param.sub(ax).mul_(mu))
        };
        *param = p;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AsgdConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let p = k.neg_eta.mul_add(g, *param * k.decay);
        let ax = s[0];
        s[0] = if k.copy { p } else { ax + (p - ax) * k.mu };
        *param = p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::elementwise::StepContext;
    use crate::kernels::testing::{assert_bitwise_everywhere, buffers, set_grads, step_with};
    use crate::simd::SimdLevel;

    /// A straightforward transcription of torch's `_single_tensor_asgd`
    /// (non-capturable branch) in float64, one tensor op per pass, as torch runs them;
    /// `eta` and `mu` are float64 0-d tensors here (torch's default dtype float64).
    fn reference_step(
        h: &AsgdHyper,
        scalars: &mut [f64],
        param: &mut [f64],
        grad: &[f64],
        ax: &mut [f64],
    ) {
        let lr = h.lr.value;
        let n = param.len();
        // grad = grad if not maximize else -grad
        let mut grad: Vec<f64> = grad
            .iter()
            .map(|&g| if h.maximize { -g } else { g })
            .collect();
        // step_t += 1
        scalars[0] += 1.0;
        if h.weight_decay != 0.0 {
            // grad = grad.add(param, alpha=weight_decay)  (one fused multiply-add)
            for i in 0..n {
                grad[i] = param[i].mul_add(h.weight_decay, grad[i]);
            }
        }
        let eta_value = scalars[1];
        // param.mul_(1 - lambd * eta_value)
        let factor = 1.0 - h.lambd * eta_value;
        param.iter_mut().for_each(|p| *p *= factor);
        // param.add_(grad, alpha=-eta_value)  (fused)
        for i in 0..n {
            param[i] = (-eta_value).mul_add(grad[i], param[i]);
        }
        // if mu.item() != 1: ax.add_(param.sub(ax).mul_(mu)) else: ax.copy_(param)
        if scalars[2] != 1.0 {
            let diff: Vec<f64> = (0..n).map(|i| (param[i] - ax[i]) * scalars[2]).collect();
            for i in 0..n {
                ax[i] += diff[i];
            }
        } else {
            ax.copy_from_slice(param);
        }
        let step = scalars[0];
        scalars[1] = lr / (1.0 + h.lambd * lr * step).powf(h.alpha);
        scalars[2] = 1.0 / (step - h.t0).max(1.0);
    }

    fn all_hypers() -> Vec<AsgdHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.05] {
                // t0 = 5: averaging starts within the 20 steps; 1e6: never.
                for (lambd, alpha, t0) in [(1e-4, 0.75, 1e6), (0.3, 0.5, 5.0)] {
                    out.push(AsgdHyper {
                        lr: TensorScalar::of(0.05),
                        lambd,
                        alpha,
                        t0,
                        weight_decay,
                        maximize,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference_bitwise() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let init = [0.0, h.lr.value, 1.0];
            let mut ours = buffers::<f64, f64>(&lens, 1, 0.0, &init);
            let mut reference = buffers::<f64, f64>(&lens, 1, 0.0, &init);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Asgd, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    reference_step(&h, &mut r.scalars, &mut r.p, &r.g, &mut r.states[0]);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_eq!(b.scalars, r.scalars, "step, eta and mu: {h:?}");
                assert_eq!(b.scalars[0], 20.0);
                assert_eq!(b.p, r.p, "{h:?}");
                assert_eq!(b.states, r.states, "{h:?}");
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Asgd>(&h, 0.0, &[0.0, h.lr.value, 1.0]);
        }
    }

    #[test]
    fn eta_and_mu_round_like_torchs_float32_tensors() {
        // torch 2.15: `ASGD(lr=0.05, lambd=0.3, alpha=0.75, t0=2)`, float32 params, the
        // float32 `state["eta"]` and `state["mu"]` after steps 1, 2 and 5 (their bits).
        let h = AsgdHyper {
            lr: TensorScalar::of(0.05),
            lambd: 0.3,
            t0: 2.0,
            ..AsgdHyper::default()
        };
        let mut bufs = buffers::<f32, f32>(&[3], 1, 0.0, &[0.0, 0.05, 1.0]);
        let mut seen = Vec::new();
        for step in 1..=5 {
            set_grads(&mut bufs, step);
            step_with::<Asgd, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
            if [1, 2, 5].contains(&step) {
                seen.push((bufs[0].scalars[1].to_bits(), bufs[0].scalars[2].to_bits()));
            }
        }
        let want: Vec<(u32, u32)> = [1.0, 2.0, 5.0]
            .iter()
            .map(|&step| {
                (
                    (h.eta(step) as f32).to_bits(),
                    (h.mu(step) as f32).to_bits(),
                )
            })
            .collect();
        assert_eq!(seen, want);
        assert_eq!(f32::from_bits(seen[2].1), 1.0 / 3.0);
    }

    #[test]
    fn float32_lr_tensor_computes_eta_in_float32() {
        let h = AsgdHyper {
            lr: TensorScalar {
                value: f64::from(0.05f32),
                is_f32_tensor: true,
            },
            lambd: 0.3,
            ..AsgdHyper::default()
        };
        let lr = 0.05f32;
        let base = 1.0 + 0.3f32 * lr * 7.0;
        let want = lr / f64::from(base).powf(0.75) as f32;
        assert_eq!(h.eta(7.0), f64::from(want));
        let sqrt = AsgdHyper { alpha: 0.5, ..h };
        assert_eq!(
            sqrt.eta(7.0),
            f64::from(lr / (1.0 + 0.3f32 * lr * 7.0).sqrt())
        );
    }
}

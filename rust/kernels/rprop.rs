//! Rprop (torch.optim semantics: `etas`, `step_sizes`, maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/rprop.py::_single_tensor_rprop`, non-capturable, non-differentiable
//! branch). Each element goes through the same operations in the same order:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize — see engine::elementwise)
//! s = sign(g * prev)                          sign = grad.mul(prev).sign()
//! s = etaplus  where s > 0                    sign[sign.gt(0)] = etaplus
//! s = etaminus where s < 0                    sign[sign.lt(0)] = etaminus
//! s = 1        where s == 0                   sign[sign.eq(0)] = 1
//! step_size = min(max(step_size * s, lo), hi) step_size.mul_(sign).clamp_(step_size_min, step_size_max)
//! g = 0        where s == etaminus            grad = grad.clone(); grad[sign.eq(etaminus)] = 0
//! p = (-1 * sign(g)) * step_size + p  (fused) param.addcmul_(grad.sign(), step_size, value=-1)
//! prev = g                                    prev.copy_(grad)
//! ```
//!
//! Every value is in the parameter's dtype: `etaplus`, `etaminus`, `1` are written
//! into the float32 `sign` tensor (rounded), `clamp_` rounds its bounds to the
//! tensor's dtype, and `eq(etaminus)` compares in that dtype. torch's `sign` is
//! `(0 < x) - (x < 0)`: NaN and -0 give +0, so a NaN product leaves the step size as
//! it was and a NaN gradient leaves the parameter as it was (and is kept in `prev`).
//! The three replacements run one after the other as in torch, so a group whose
//! `etas` were set outside the constructor's range (`etaplus <= 0`) gets torch's
//! numbers too. `clamp_` is `min(max(x, lo), hi)` with std::max/std::min's
//! comparisons (NaN propagates; `lo > hi` gives `hi`).
//!
//! `lr` is not read: torch uses it only when it creates `step_size`
//! (`torch.full_like(grad, lr)`, in the Python layer, torch's own `_init_group`).
//! There is no weight decay. Every operation is exactly rounded, so the result is
//! bitwise torch's.
//!
//! Complex params step as their real views (torch takes `view_as_real` of grad,
//! prev, param and step_size).
//!
//! One pass over memory: read p, g, prev, step_size; write p, prev, step_size.

use crate::engine::elementwise::{Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// Rprop's hyperparameters, under torch's param-group names.
    pub struct RpropHyper {
        /// `(etaminus, etaplus)`: the step size's factors after a sign change and
        /// after no sign change.
        etas: [f64; 2],
        /// `(step_size_min, step_size_max)`: `clamp_`'s bounds.
        step_sizes: [f64; 2],
        maximize: bool,
    }
}

impl Default for RpropHyper {
    fn default() -> Self {
        RpropHyper {
            etas: [0.5, 1.2],
            step_sizes: [1e-6, 50.0],
            maximize: false,
        }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct RpropConsts<C> {
    etaminus: C,
    etaplus: C,
    step_size_min: C,
    step_size_max: C,
}

/// Rprop.
pub struct Rprop;

/// torch's `sign`: `(0 < x) - (x < 0)` (NaN and -0 give +0).
#[inline(always)]
fn sign<C: Real>(x: C) -> C {
    if x > C::ZERO {
        C::ONE
    } else if x < C::ZERO {
        -C::ONE
    } else {
        C::ZERO
    }
}

impl Elementwise for Rprop {
    const NAME: &'static str = "rprop";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = RpropHyper;
    type Consts<C: Real> = RpropConsts<C>;

    fn state_keys(_h: &RpropHyper) -> &'static [&'static str] {
        &["prev", "step_size"]
    }

    fn grad_prep(h: &RpropHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: 0.0,
        }
    }

    fn flags(h: &RpropHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    fn consts<C: Real>(h: &RpropHyper, _scalars: &[f64]) -> RpropConsts<C> {
        let [etaminus, etaplus] = h.etas;
        let [step_size_min, step_size_max] = h.step_sizes;
        RpropConsts {
            etaminus: C::from_f64(etaminus),
            etaplus: C::from_f64(etaplus),
            step_size_min: C::from_f64(step_size_min),
            step_size_max: C::from_f64(step_size_max),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_rprop` on a bfloat16/float16 param, op by op (see
    /// [`Elementwise::update_rounded`]): the product's sign is taken after its
    /// rounding (a float16 product can underflow to zero), and `sign[…] = etaplus`
    /// stores the etas in the param's dtype (as `clamp_` does its bounds, which
    /// clamps a 16-bit value alike either way).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &RpropConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let etaminus = round(k.etaminus);
        let mut factor = sign(round(g * s[0])); // grad.mul(prev).sign()
        if factor > C::ZERO {
            factor = round(k.etaplus);
        }
        if factor < C::ZERO {
            factor = etaminus;
        }
        if factor == C::ZERO {
            factor = C::ONE;
        }
        // step_size.mul_(sign).clamp_(step_size_min, step_size_max)
        let scaled = round(s[1] * factor);
        let min = round(k.step_size_min);
        let max = round(k.step_size_max);
        let low = if scaled < min { min } else { scaled };
        let step_size = if max < low { max } else { low };
        let g = if factor == etaminus { C::ZERO } else { g }; // grad[sign.eq(etaminus)] = 0
        *param = round((-sign(g)).mul_add(step_size, *param)); // param.addcmul_(grad.sign(), step_size, value=-1)
        s[0] = g;
        s[1] = step_size;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &RpropConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let mut factor = sign(g * s[0]);
        if factor > C::ZERO {
            factor = k.etaplus;
        }
        if factor < C::ZERO {
            factor = k.etaminus;
        }
        if factor == C::ZERO {
            factor = C::ONE;
        }
        // clamp_: std::min(std::max(x, lo), hi)
        let scaled = s[1] * factor;
        let low = if scaled < k.step_size_min {
            k.step_size_min
        } else {
            scaled
        };
        let step_size = if k.step_size_max < low {
            k.step_size_max
        } else {
            low
        };
        let g = if factor == k.etaminus { C::ZERO } else { g };
        *param = (-sign(g)).mul_add(step_size, *param);
        s[0] = g;
        s[1] = step_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::elementwise::StepContext;
    use crate::kernels::testing::{assert_bitwise_everywhere, buffers, set_grads, step_with};
    use crate::simd::SimdLevel;

    /// A straightforward transcription of torch's `_single_tensor_rprop`
    /// (non-capturable branch) in float64, one tensor op per pass, as torch runs them.
    fn reference_step(
        h: &RpropHyper,
        step_t: &mut f64,
        param: &mut [f64],
        grad: &[f64],
        s: &mut [Vec<f64>],
    ) {
        let [etaminus, etaplus] = h.etas;
        let [step_size_min, step_size_max] = h.step_sizes;
        let n = param.len();
        let (prev, rest) = s.split_first_mut().unwrap();
        let step_size = &mut rest[0];
        let torch_sign = |x: f64| f64::from(u8::from(0.0 < x)) - f64::from(u8::from(x < 0.0));
        // grad = grad if not maximize else -grad
        let mut grad: Vec<f64> = grad
            .iter()
            .map(|&g| if h.maximize { -g } else { g })
            .collect();
        *step_t += 1.0;
        // sign = grad.mul(prev).sign()
        let mut sign: Vec<f64> = (0..n).map(|i| torch_sign(grad[i] * prev[i])).collect();
        sign.iter_mut()
            .filter(|x| **x > 0.0)
            .for_each(|x| *x = etaplus);
        sign.iter_mut()
            .filter(|x| **x < 0.0)
            .for_each(|x| *x = etaminus);
        sign.iter_mut()
            .filter(|x| **x == 0.0)
            .for_each(|x| *x = 1.0);
        // step_size.mul_(sign).clamp_(step_size_min, step_size_max)
        for i in 0..n {
            step_size[i] *= sign[i];
            step_size[i] = step_size[i].max(step_size_min).min(step_size_max);
        }
        // grad[sign.eq(etaminus)] = 0
        for i in 0..n {
            if sign[i] == etaminus {
                grad[i] = 0.0;
            }
        }
        // param.addcmul_(grad.sign(), step_size, value=-1)
        for i in 0..n {
            param[i] += -torch_sign(grad[i]) * step_size[i];
        }
        prev.copy_from_slice(&grad);
    }

    fn all_hypers() -> Vec<RpropHyper> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            // (the last: etas set outside the constructor's range, where torch's
            // replacements overwrite each other and every factor equals etaminus)
            for (etas, step_sizes) in [
                ([0.5, 1.2], [1e-6, 50.0]),
                ([0.3, 1.7], [1e-3, 0.02]),
                ([1.0, 0.0], [1e-3, 0.02]),
            ] {
                out.push(RpropHyper {
                    etas,
                    step_sizes,
                    maximize,
                });
            }
        }
        out
    }

    fn fresh(lens: &[usize], lr: f64) -> Vec<crate::kernels::testing::Buffers<f64>> {
        let mut bufs = buffers::<f64, f64>(lens, 2, 0.0, &[0.0]);
        for b in bufs.iter_mut() {
            b.states[1].iter_mut().for_each(|x| *x = lr);
        }
        bufs
    }

    #[test]
    fn float64_matches_the_transcribed_reference_bitwise() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = fresh(&lens, 0.01);
            let mut reference = fresh(&lens, 0.01);
            for step in 1..=20 {
                // Every third step repeats the last gradient (no sign change) and one
                // in five flips it, so every branch runs.
                if step % 3 != 0 {
                    set_grads(&mut ours, step);
                    set_grads(&mut reference, step);
                    if step % 5 == 0 {
                        for b in ours.iter_mut().chain(reference.iter_mut()) {
                            b.g.iter_mut().for_each(|g| *g = -*g);
                        }
                    }
                }
                step_with::<Rprop, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    let [step_t] = &mut r.scalars[..] else {
                        unreachable!()
                    };
                    reference_step(&h, step_t, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_eq!(b.scalars, vec![20.0]);
                assert_eq!(b.p, r.p, "{h:?}");
                assert_eq!(b.states, r.states, "{h:?}");
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Rprop>(&h, 0.01, &[0.0]);
        }
    }

    #[test]
    fn sign_changes_zero_the_gradient_and_nan_leaves_the_param() {
        let h = RpropHyper::default();
        let mut bufs = buffers::<f32, f32>(&[4], 2, 0.0, &[0.0]);
        bufs[0].p = vec![1.0; 4];
        bufs[0].states[0] = vec![1.0, 1.0, 1.0, f32::NAN];
        bufs[0].states[1] = vec![0.01; 4];
        bufs[0].g = vec![2.0, -2.0, f32::NAN, 1.0];
        step_with::<Rprop, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        let b = &bufs[0];
        // same sign: step size * 1.2, param moves against the gradient
        assert_eq!(b.states[1][0], 0.01f32 * 1.2f32);
        assert_eq!(b.p[0], 1.0 - 0.01f32 * 1.2f32);
        // sign change: step size * 0.5, gradient zeroed, param unchanged
        assert_eq!(b.states[1][1], 0.01f32 * 0.5f32);
        assert_eq!((b.p[1], b.states[0][1]), (1.0, 0.0));
        // NaN gradient: sign 0, step size kept, param kept, NaN kept in prev
        assert_eq!((b.p[2], b.states[1][2]), (1.0, 0.01));
        assert!(b.states[0][2].is_nan());
        // NaN prev: factor 1, the param still moves
        assert_eq!((b.p[3], b.states[1][3]), (1.0 - 0.01, 0.01));
    }

    #[test]
    fn step_sizes_are_clamped_in_the_params_dtype() {
        let h = RpropHyper {
            step_sizes: [0.1, 0.3],
            ..RpropHyper::default()
        };
        let mut bufs = buffers::<f32, f32>(&[2], 2, 0.0, &[0.0]);
        bufs[0].states[0] = vec![1.0, -1.0];
        bufs[0].states[1] = vec![0.29, 0.15];
        bufs[0].g = vec![1.0, 1.0];
        step_with::<Rprop, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        assert_eq!(bufs[0].states[1], vec![0.3f32, 0.1f32]);
    }
}

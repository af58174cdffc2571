//! Adam and AdamW (torch.optim semantics, including AMSGrad and maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/adam.py::_single_tensor_adam`, non-capturable branch). Each
//! element goes through the same operations in the same order, with scalars
//! computed in float64 and rounded to the tensor's dtype exactly where torch
//! rounds them:
//!
//! ```text
//! (engine: grad * inv_scale * clip_coef, maximize, L2 decay — see engine::elementwise)
//! AdamW:  p = p * (1 - lr*wd)                 param.mul_(1 - lr * weight_decay)
//! Adam:   g = p*wd + g   (fused)              grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! vmax = maximum(vmax, v)                     (amsgrad)
//! denom = sqrt(v or vmax) / sqrt(bc2) + eps
//! p = p + (-lr/bc1 * m) / denom               param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//!
//! One pass over memory: read p, g, m, v (vmax); write p, m, v (vmax).

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{
    decays_param, has, Elementwise, FlagRunner, GradPrep, StepContext, L2,
};
use crate::engine::{Real, TensorScalar, MAX_STATES};

crate::hyper_record! {
    /// Adam's hyperparameters, under torch's param-group names.
    pub struct AdamHyper {
        /// A float32 tensor `lr` makes torch compute `lr / bc1` and
        /// `1 - lr * wd` in float32 tensor arithmetic.
        lr: TensorScalar,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        /// AdamW's decoupled decay (`param *= 1 - lr * wd`) instead of L2.
        decoupled_weight_decay: bool,
        amsgrad: bool,
        maximize: bool,
    }
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            lr: TensorScalar::of(1e-3),
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            amsgrad: false,
            maximize: false,
        }
    }
}

/// Decoupled weight decay (`param *= 1 - lr * wd` before the update).
const DECOUPLED: u32 = 1 << 2;
/// Keep `max_exp_avg_sq` and divide by its square root.
const AMSGRAD: u32 = 1 << 3;

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts<C> {
    lerp: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    eps: C,
    /// `1 - lr * wd` (decoupled decay).
    decay: C,
    neg_step_size: C,
    bias_correction2_sqrt: C,
}

/// Adam and AdamW.
pub struct Adam;

impl Elementwise for Adam {
    const NAME: &'static str = "adam";
    const SCALARS: &'static [&'static str] = &["step"];
    type Hyper = AdamHyper;
    type Consts<C: Real> = AdamConsts<C>;

    fn state_keys(h: &AdamHyper) -> &'static [&'static str] {
        if h.amsgrad {
            &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        } else {
            &["exp_avg", "exp_avg_sq"]
        }
    }

    fn grad_prep(h: &AdamHyper) -> GradPrep {
        GradPrep::with_weight_decay(h.maximize, h.weight_decay, h.decoupled_weight_decay)
    }

    fn flags(h: &AdamHyper, _ctx: &StepContext) -> u32 {
        let decoupled = decays_param(h.decoupled_weight_decay, h.weight_decay);
        Self::grad_prep(h).flags()
            | if decoupled { DECOUPLED } else { 0 }
            | if h.amsgrad { AMSGRAD } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(
            flags,
            runner,
            [0, L2, DECOUPLED, AMSGRAD, L2 | AMSGRAD, DECOUPLED | AMSGRAD]
        )
    }

    #[inline(always)]
    fn num_states(flags: u32) -> usize {
        if has(flags, AMSGRAD) {
            3
        } else {
            2
        }
    }

    /// Computed in float64 exactly as torch's Python code computes them, for
    /// step number `step` (already incremented).
    fn consts<C: Real>(h: &AdamHyper, scalars: &[f64]) -> AdamConsts<C> {
        let step = scalars[0];
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let step_size = if h.lr.is_f32_tensor {
            f64::from(lr as f32 / bias_correction1 as f32)
        } else {
            lr / bias_correction1
        };
        // Python's `bias_correction2 ** 0.5` is libm's pow, which LLVM would
        // otherwise rewrite to sqrt for a literal 0.5.
        let bias_correction2_sqrt = bias_correction2.powf(std::hint::black_box(0.5));
        let decay = if h.lr.is_f32_tensor {
            f64::from(1.0 - lr as f32 * h.weight_decay as f32)
        } else {
            1.0 - lr * h.weight_decay
        };
        AdamConsts {
            lerp: Lerp::new(1.0 - beta1),
            beta2: C::from_f64(beta2),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            eps: C::from_f64(h.eps),
            decay: C::from_f64(decay),
            neg_step_size: C::from_f64(-step_size),
            bias_correction2_sqrt: C::from_f64(bias_correction2_sqrt),
        }
    }

    const ROUNDED: bool = true;

    /// torch's `_single_tensor_adam` on a bfloat16/float16 param, op by op (each
    /// result rounded; `addcmul_` a fused multiply-add of `(value * t1)` and `t2`,
    /// `addcdiv_` `self + (value * t1) / t2`, as torch's CPU kernels compute them).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &AdamConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = round(p * k.decay); // param.mul_(1 - lr * weight_decay)
        }
        let m = round(k.lerp.apply(s[0], g)); // exp_avg.lerp_(grad, 1 - beta1)
                                              // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let v = rounded_square_average(s[1], k.beta2, k.one_minus_beta2, g, round);
        let second = if has(FLAGS, AMSGRAD) {
            s[2] = s[2].max_propagate_nan(v); // torch.maximum(max_exp_avg_sq, exp_avg_sq)
            s[2]
        } else {
            v
        };
        // (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        let denom = round(round(round(second.sqrt()) / k.bias_correction2_sqrt) + round(k.eps));
        *param = round(p + k.neg_step_size * m / denom); // param.addcdiv_(exp_avg, denom, value=-step_size)
        s[0] = m;
        s[1] = v;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &AdamConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let mut p = *param;
        if has(FLAGS, DECOUPLED) {
            p = p * k.decay;
        }
        let m = k.lerp.apply(s[0], g);
        let v = (k.one_minus_beta2 * g).mul_add(g, s[1] * k.beta2);
        let second = if has(FLAGS, AMSGRAD) {
            s[2] = s[2].max_propagate_nan(v);
            s[2]
        } else {
            v
        };
        let denom = second.sqrt() / k.bias_correction2_sqrt + k.eps;
        *param = p + k.neg_step_size * m / denom;
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

    /// A straightforward transcription of torch's `_single_tensor_adam`
    /// (non-capturable branch) in float64, one operation per line.
    fn reference_step(h: &AdamHyper, step: f64, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let [beta1, beta2] = h.betas;
        let lr = h.lr.value;
        let (m, rest) = s.split_first_mut().unwrap();
        let (v, rest) = rest.split_first_mut().unwrap();
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                if h.decoupled_weight_decay {
                    p[i] *= 1.0 - lr * h.weight_decay;
                } else {
                    grad = p[i].mul_add(h.weight_decay, grad);
                }
            }
            m[i] = (1.0 - beta1).mul_add(grad - m[i], m[i]);
            v[i] = ((1.0 - beta2) * grad).mul_add(grad, v[i] * beta2);
            let bc1 = 1.0 - beta1.powf(step);
            let bc2 = 1.0 - beta2.powf(step);
            let step_size = lr / bc1;
            let second = if h.amsgrad {
                let vmax = &mut rest[0];
                vmax[i] = vmax[i].max(v[i]);
                vmax[i]
            } else {
                v[i]
            };
            let denom = second.sqrt() / bc2.powf(0.5) + h.eps;
            p[i] += -step_size * m[i] / denom;
        }
    }

    fn all_hypers() -> Vec<AdamHyper> {
        let mut out = Vec::new();
        for amsgrad in [false, true] {
            for maximize in [false, true] {
                for (weight_decay, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
                    out.push(AdamHyper {
                        lr: TensorScalar::of(0.01),
                        amsgrad,
                        maximize,
                        weight_decay,
                        decoupled_weight_decay: decoupled,
                        ..AdamHyper::default()
                    });
                }
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let states = Adam::state_keys(&h).len();
            let mut ours = buffers::<f64, f64>(&lens, states, 0.0, &[0.0]);
            let mut reference = buffers::<f64, f64>(&lens, states, 0.0, &[0.0]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Adam, _, _>(
                    &mut ours,
                    &h,
                    &StepContext::default(),
                    SimdLevel::detect(),
                );
                for r in reference.iter_mut() {
                    reference_step(&h, step as f64, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_eq!(b.scalars, vec![20.0]);
                assert_close(&b.p, &r.p, 1e-13, &format!("{h:?}"));
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Adam>(&h, 0.0, &[0.0]);
        }
    }

    #[test]
    fn grad_scale_equals_prescaled_grads() {
        let ctx = StepContext {
            unscale: 0.5,
            clip: 0.5,
            ..StepContext::default()
        };
        let h = AdamHyper::default();
        let mut scaled = buffers::<f32, f32>(&[1000], 2, 0.0, &[0.0]);
        let mut prescaled = buffers::<f32, f32>(&[1000], 2, 0.0, &[0.0]);
        for step in 1..=5 {
            set_grads(&mut scaled, step);
            set_grads(&mut prescaled, step);
            prescaled[0].g.iter_mut().for_each(|g| *g *= 0.25);
            step_with::<Adam, _, _>(&mut scaled, &h, &ctx, SimdLevel::detect());
            step_with::<Adam, _, _>(
                &mut prescaled,
                &h,
                &StepContext::default(),
                SimdLevel::detect(),
            );
        }
        assert_eq!(scaled[0].p, prescaled[0].p);
    }

    /// The engine's moving average (`ema_decay`): the kernel's params and states
    /// are exactly those of a step without it, the average is torch's lerp of
    /// each stepped param (a small weight and a large one take torch's two
    /// formulas), and every SIMD level and thread count gives the same bits.
    #[test]
    fn moving_average_follows_each_step_and_leaves_the_step_alone() {
        fn lerp(start: f32, end: f32, weight: f32) -> f32 {
            if weight.abs() < 0.5 {
                (end - start).mul_add(weight, start)
            } else {
                (end - start).mul_add(weight - 1.0, end)
            }
        }
        let lens = [3, 100, 4099, 70_001];
        let h = AdamHyper::default();
        for weight in [0.001, 0.25, 0.75] {
            let run = |level: SimdLevel| {
                let mut plain = buffers::<f32, f32>(&lens, 2, 0.0, &[0.0]);
                let mut averaged = buffers::<f32, f32>(&lens, 3, 0.0, &[0.0]);
                let mut reference: Vec<Vec<f32>> = Vec::new();
                for b in averaged.iter_mut() {
                    b.states[2] = b.p.iter().map(|&x| -x).collect();
                    reference.push(b.states[2].clone());
                }
                let ctx = StepContext {
                    ema: Some(weight),
                    ..StepContext::default()
                };
                for step in 1..=4 {
                    set_grads(&mut plain, step);
                    set_grads(&mut averaged, step);
                    step_with::<Adam, _, _>(&mut plain, &h, &StepContext::default(), level);
                    step_with::<Adam, _, _>(&mut averaged, &h, &ctx, level);
                    for (r, b) in reference.iter_mut().zip(&averaged) {
                        for (e, &p) in r.iter_mut().zip(&b.p) {
                            *e = lerp(*e, p, weight as f32);
                        }
                    }
                }
                for ((a, b), r) in averaged.iter().zip(&plain).zip(&reference) {
                    assert_eq!(a.p, b.p, "the step changed with an average");
                    assert_eq!(a.states[..2], b.states[..], "the states changed");
                    assert_eq!(&a.states[2], r, "the average (weight {weight})");
                }
                averaged
            };
            let want = run(SimdLevel::Scalar);
            let mut runs: Vec<_> = SimdLevel::supported().into_iter().map(run).collect();
            crate::parallel::set_num_threads(1).unwrap();
            runs.push(run(SimdLevel::detect()));
            crate::parallel::set_num_threads(2).unwrap();
            for got in runs {
                for (a, b) in got.iter().zip(&want) {
                    assert_eq!(a.states, b.states);
                }
            }
        }
    }

    /// A moving average stored in another dtype than its param is refused
    /// before anything is written.
    #[test]
    fn moving_average_in_another_dtype_is_refused() {
        let mut p = vec![1f32; 8];
        let g = [1f32; 8];
        let (m, v) = (vec![0f32; 8], vec![0f32; 8]);
        let average = [0f64; 8];
        let mut step = 0f32;
        let at = |x: usize, f| crate::engine::Buffer::new(x, f);
        use crate::engine::{Format, Group, ScalarSlot, TensorBuffers};
        let t = TensorBuffers::param(
            8,
            at(p.as_mut_ptr() as usize, Format::F32),
            Some(at(g.as_ptr() as usize, Format::F32)),
        )
        .with_states(&[
            at(m.as_ptr() as usize, Format::F32),
            at(v.as_ptr() as usize, Format::F32),
            at(average.as_ptr() as usize, Format::F64),
        ])
        .with_scalars(&[ScalarSlot {
            addr: &mut step as *mut f32 as usize,
            format: Format::F32,
        }]);
        // SAFETY: every address points into a live local of the stated format.
        let group = unsafe { Group::new(vec![t]) }.unwrap();
        let ctx = StepContext {
            ema: Some(0.1),
            ..StepContext::default()
        };
        let result = crate::engine::elementwise::step::<Adam>(
            &group,
            &AdamHyper::default(),
            &ctx,
            SimdLevel::detect(),
        );
        assert!(result.is_err());
        assert_eq!(p, vec![1f32; 8]);
        assert_eq!(step, 0.0);
    }

    #[test]
    fn amsgrad_keeps_nan_like_torch_maximum() {
        let h = AdamHyper {
            amsgrad: true,
            ..AdamHyper::default()
        };
        let mut bufs = buffers::<f64, f64>(&[4], 3, 0.0, &[0.0]);
        bufs[0].g = vec![f64::NAN, 1.0, 1.0, 1.0];
        step_with::<Adam, _, _>(&mut bufs, &h, &StepContext::default(), SimdLevel::detect());
        assert!(bufs[0].states[2][0].is_nan());
        assert!(bufs[0].p[0].is_nan());
        assert!(bufs[0].p[1].is_finite());
    }

    /// bfloat16 states for float32 params: each step computes in float32 from
    /// the widened states and rounds them back (round to nearest even), the
    /// same as a float32 step whose states are rounded to bfloat16 after it.
    #[test]
    fn bfloat16_states_round_once_per_step() {
        use half::bf16;
        let h = AdamHyper {
            weight_decay: 0.1,
            decoupled_weight_decay: true,
            ..AdamHyper::default()
        };
        let lens = [3, 100, 70_001];
        let mut narrow = buffers::<f32, bf16>(&lens, 2, 0.0, &[0.0]);
        let mut wide = buffers::<f32, f32>(&lens, 2, 0.0, &[0.0]);
        for step in 1..=5 {
            set_grads(&mut narrow, step);
            set_grads(&mut wide, step);
            step_with::<Adam, _, _>(
                &mut narrow,
                &h,
                &StepContext::default(),
                SimdLevel::detect(),
            );
            step_with::<Adam, _, _>(&mut wide, &h, &StepContext::default(), SimdLevel::detect());
            for b in wide.iter_mut() {
                for s in b.states.iter_mut() {
                    s.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
                }
            }
        }
        for (n, w) in narrow.iter().zip(&wide) {
            assert_eq!(n.p, w.p);
            let widened: Vec<Vec<f32>> = n
                .states
                .iter()
                .map(|s| s.iter().map(|x| x.to_f32()).collect())
                .collect();
            assert_eq!(widened, w.states);
        }
    }
}

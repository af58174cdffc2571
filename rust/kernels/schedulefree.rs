//! Schedule-Free AdamW and SGD (Defazio et al., "The Road Less Scheduled"),
//! exactly as the reference implementation `schedulefree` 1.4.1 computes them.
//!
//! Reference: `schedulefree/adamw_schedulefree.py::AdamWScheduleFree.step` and
//! `schedulefree/sgd_schedulefree.py::SGDScheduleFree.step` (their default CPU
//! flavour, `foreach=True`: `torch._foreach_*` over the same ops as the
//! per-parameter loop, which run the same CPU kernels). The param holds `y`
//! (train mode; `optimizer.train()` / `.eval()` swap it with `x` by `lerp`s in
//! Python) and the state `z`. The group's per-step scalars are the reference's
//! Python arithmetic, computed on the Python side from the group (`k`,
//! `warmup_steps`, `lr_max`, `weight_sum`, `r`, `weight_lr_power`) and handed
//! over by name: `scheduled_lr` (`lr * sched`), `ckp1` (`weight / weight_sum`),
//! `y_lr` (`lr * (beta1*(1 - ckp1) - 1)`) and, for AdamW, `bias_correction2`
//! (`1 - beta2**(k+1)`). Per element, each line one torch op in the reference's
//! order (scalars rounded to the tensor's dtype by the op):
//!
//! ```text
//! AdamW:
//! (engine: grad * inv_scale * clip_coef, maximize — a ferroptim extra keyword)
//! v = ((1 - beta2)*g)*g + v*beta2  (fused)   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2)
//! d = sqrt(v / bc2) + eps                    denom = exp_avg_sq.div(bc2).sqrt_().add_(eps)
//! u = g / d                                  grad.div_(denom)
//! u = y*wd + u            (fused; wd != 0)   grad.add_(y, alpha=decay)
//! y = lerp(y, z, ckp1)                       y.lerp_(z, weight=ckp1)
//! y = u*y_lr + y          (fused)            y.add_(grad, alpha=lr*(beta1*(1-ckp1)-1))
//! z = u*(-lr) + z         (fused)            z.sub_(grad, alpha=lr)
//!
//! SGD:
//! (engine: unscale, clip, maximize, then L2: g = y*wd + g (fused), as
//!  grad.add_(y, alpha=weight_decay) where weight_decay != 0)
//! y = lerp(y, z, ckp1)                       y.lerp_(z, weight=ckp1)
//! y = g*y_lr + y          (fused)            y.add_(grad, alpha=lr*(momentum*(1-ckp1)-1))
//! z = g*(-lr) + z         (fused)            z.sub_(grad, alpha=lr)
//! ```
//!
//! `sub_(alpha=lr)` is torch's `add` with `-lr`: one fused multiply-add. The
//! reference normalises (AdamW) and decays the gradient in place (`p.grad` is
//! left holding `u`); ferroptim leaves gradients untouched, as torch.optim does.
//!
//! One pass over memory: AdamW reads y, g, z, v and writes y, z, v (28
//! bytes/element in float32); SGD reads y, g, z and writes y, z (20).

use super::{rounded_square_average, Lerp};
use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext, L2};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// Schedule-Free AdamW's hyperparameters, under the reference's param-group
    /// names (plus torch's `maximize`), and this step's scalars (see the module docs).
    pub struct ScheduleFreeAdamwHyper {
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        maximize: bool,
        /// `lr * sched` (the warmup's learning rate).
        scheduled_lr: f64,
        /// The weight of `z` in the average: `weight / weight_sum`.
        ckp1: f64,
        /// `lr * (beta1 * (1 - ckp1) - 1)`.
        y_lr: f64,
        /// `1 - beta2 ** (k + 1)`.
        bias_correction2: f64,
    }
}

impl Default for ScheduleFreeAdamwHyper {
    fn default() -> Self {
        ScheduleFreeAdamwHyper {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
            scheduled_lr: 0.0025,
            ckp1: 1.0,
            // (the first step: ckp1 = 1, so y_lr = lr * (beta1*0 - 1))
            y_lr: -0.0025,
            bias_correction2: 1.0 - 0.999,
        }
    }
}

/// Weight decay at `y`, added to the normalised gradient.
const DECAY: u32 = 1 << 2;

/// The constants of one AdamW step, rounded to the compute type.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleFreeAdamwConsts<C> {
    beta2: C,
    one_minus_beta2: C,
    bias_correction2: C,
    eps: C,
    decay: C,
    average: Lerp<C>,
    y_lr: C,
    neg_lr: C,
}

/// Schedule-Free AdamW.
pub struct ScheduleFreeAdamw;

impl Elementwise for ScheduleFreeAdamw {
    const NAME: &'static str = "schedulefree_adamw";
    /// The reference counts steps per group (`k`), not per tensor.
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = ScheduleFreeAdamwHyper;
    type Consts<C: Real> = ScheduleFreeAdamwConsts<C>;

    fn state_keys(_h: &ScheduleFreeAdamwHyper) -> &'static [&'static str] {
        &["z", "exp_avg_sq"]
    }

    fn grad_prep(h: &ScheduleFreeAdamwHyper) -> GradPrep {
        GradPrep {
            maximize: h.maximize,
            l2: 0.0,
        }
    }

    fn flags(h: &ScheduleFreeAdamwHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags() | if h.weight_decay != 0.0 { DECAY } else { 0 }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, DECAY])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    fn consts<C: Real>(h: &ScheduleFreeAdamwHyper, _scalars: &[f64]) -> ScheduleFreeAdamwConsts<C> {
        let [_, beta2] = h.betas;
        ScheduleFreeAdamwConsts {
            beta2: C::from_f64(beta2),
            one_minus_beta2: C::from_f64(1.0 - beta2),
            bias_correction2: C::from_f64(h.bias_correction2),
            eps: C::from_f64(h.eps),
            decay: C::from_f64(h.weight_decay),
            average: Lerp::new(h.ckp1),
            y_lr: C::from_f64(h.y_lr),
            neg_lr: C::from_f64(-h.scheduled_lr),
        }
    }

    const ROUNDED: bool = true;

    /// The reference's per-parameter loop on a bfloat16/float16 param, each op's
    /// result rounded to the param's dtype (its foreach flavour rounds alike).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &ScheduleFreeAdamwConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let y = *param;
        let z = s[0];
        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        let v = rounded_square_average(s[1], k.beta2, k.one_minus_beta2, g, round);
        // exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
        let denom = round(round(round(v / k.bias_correction2).sqrt()) + round(k.eps));
        let mut u = round(g / denom); // grad.div_(denom)
        if has(FLAGS, DECAY) {
            u = round(y.mul_add(round(k.decay), u)); // grad_normalized.add_(y, alpha=decay)
        }
        let average = round(k.average.apply(y, z)); // y.lerp_(end=z, weight=ckp1)
        *param = round(u.mul_add(round(k.y_lr), average)); // y.add_(grad_normalized, alpha=…)
        s[0] = round(u.mul_add(round(k.neg_lr), z)); // z.sub_(grad_normalized, alpha=lr)
        s[1] = v;
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &ScheduleFreeAdamwConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let y = *param;
        let z = s[0];
        let v = (k.one_minus_beta2 * g).mul_add(g, s[1] * k.beta2);
        let denom = (v / k.bias_correction2).sqrt() + k.eps;
        let mut u = g / denom;
        if has(FLAGS, DECAY) {
            u = y.mul_add(k.decay, u);
        }
        *param = u.mul_add(k.y_lr, k.average.apply(y, z));
        s[0] = u.mul_add(k.neg_lr, z);
        s[1] = v;
    }
}

crate::hyper_record! {
    /// Schedule-Free SGD's hyperparameters, under the reference's param-group names
    /// (plus torch's `maximize`), and this step's scalars (see the module docs).
    pub struct ScheduleFreeSgdHyper {
        weight_decay: f64,
        maximize: bool,
        /// `lr * sched` (the warmup's learning rate).
        scheduled_lr: f64,
        /// The weight of `z` in the average: `weight / weight_sum`.
        ckp1: f64,
        /// `lr * (momentum * (1 - ckp1) - 1)`.
        y_lr: f64,
    }
}

impl Default for ScheduleFreeSgdHyper {
    fn default() -> Self {
        ScheduleFreeSgdHyper {
            weight_decay: 0.0,
            maximize: false,
            scheduled_lr: 1.0,
            ckp1: 1.0,
            y_lr: -1.0,
        }
    }
}

/// The constants of one SGD step, rounded to the compute type.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleFreeSgdConsts<C> {
    average: Lerp<C>,
    y_lr: C,
    neg_lr: C,
}

/// Schedule-Free SGD.
pub struct ScheduleFreeSgd;

impl Elementwise for ScheduleFreeSgd {
    const NAME: &'static str = "schedulefree_sgd";
    /// The reference counts steps per group (`k`), not per tensor.
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = ScheduleFreeSgdHyper;
    type Consts<C: Real> = ScheduleFreeSgdConsts<C>;

    fn state_keys(_h: &ScheduleFreeSgdHyper) -> &'static [&'static str] {
        &["z"]
    }

    fn grad_prep(h: &ScheduleFreeSgdHyper) -> GradPrep {
        // The reference's decay is `grad.add_(y, alpha=weight_decay)` before the update:
        // the engine's L2 decay (the param is y).
        GradPrep {
            maximize: h.maximize,
            l2: h.weight_decay,
        }
    }

    fn flags(h: &ScheduleFreeSgdHyper, _ctx: &StepContext) -> u32 {
        Self::grad_prep(h).flags()
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, L2])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        1
    }

    fn consts<C: Real>(h: &ScheduleFreeSgdHyper, _scalars: &[f64]) -> ScheduleFreeSgdConsts<C> {
        ScheduleFreeSgdConsts {
            average: Lerp::new(h.ckp1),
            y_lr: C::from_f64(h.y_lr),
            neg_lr: C::from_f64(-h.scheduled_lr),
        }
    }

    const ROUNDED: bool = true;

    /// The reference's per-parameter loop on a bfloat16/float16 param, each op's
    /// result rounded to the param's dtype (the decay, `grad.add_(y, alpha=…)`,
    /// rounded by the engine's gradient preparation).
    #[inline(always)]
    fn update_rounded<C: Real, const FLAGS: u32>(
        k: &ScheduleFreeSgdConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
        round: impl Fn(C) -> C + Copy,
    ) {
        let z = s[0];
        let average = round(k.average.apply(*param, z)); // y.lerp_(end=z, weight=ckp1)
        *param = round(g.mul_add(round(k.y_lr), average)); // y.add_(grad, alpha=…)
        s[0] = round(g.mul_add(round(k.neg_lr), z)); // z.sub_(grad, alpha=lr)
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &ScheduleFreeSgdConsts<C>,
        param: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let z = s[0];
        *param = g.mul_add(k.y_lr, k.average.apply(*param, z));
        s[0] = g.mul_add(k.neg_lr, z);
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

    /// The reference's group scalars of step `k` (its Python, in float64), updating
    /// `lr_max` and `weight_sum` as it does: `(scheduled_lr, ckp1)`.
    fn group_scalars(
        lr: f64,
        k: f64,
        warmup: f64,
        r: f64,
        power: f64,
        lr_max: &mut f64,
        weight_sum: &mut f64,
    ) -> (f64, f64) {
        let sched = if k < warmup { (k + 1.0) / warmup } else { 1.0 };
        let lr = lr * sched;
        *lr_max = lr.max(*lr_max);
        let weight = (k + 1.0).powf(r) * lr_max.powf(power);
        *weight_sum += weight;
        let ckp1 = if *weight_sum == 0.0 {
            0.0
        } else {
            weight / *weight_sum
        };
        (lr, ckp1)
    }

    /// Both references' per-parameter loops in float64, one tensor op per line.
    fn reference_adamw(h: &ScheduleFreeAdamwHyper, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        let [beta1, beta2] = h.betas;
        let (lr, ckp1) = (h.scheduled_lr, h.ckp1);
        let (z, rest) = s.split_first_mut().unwrap();
        let v = &mut rest[0];
        for i in 0..p.len() {
            let grad = if h.maximize { -g[i] } else { g[i] };
            v[i] = v[i] * beta2 + (1.0 - beta2) * grad * grad;
            let denom = (v[i] / h.bias_correction2).sqrt() + h.eps;
            let mut u = grad / denom;
            if h.weight_decay != 0.0 {
                u += h.weight_decay * p[i];
            }
            p[i] += ckp1 * (z[i] - p[i]);
            p[i] += lr * (beta1 * (1.0 - ckp1) - 1.0) * u;
            z[i] -= lr * u;
        }
    }

    fn reference_sgd(
        h: &ScheduleFreeSgdHyper,
        momentum: f64,
        p: &mut [f64],
        g: &[f64],
        z: &mut [f64],
    ) {
        let (lr, ckp1) = (h.scheduled_lr, h.ckp1);
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                grad += h.weight_decay * p[i];
            }
            p[i] += ckp1 * (z[i] - p[i]);
            p[i] += lr * (momentum * (1.0 - ckp1) - 1.0) * grad;
            z[i] -= lr * grad;
        }
    }

    /// (maximize, weight_decay, warmup, r, weight_lr_power) combinations.
    fn settings() -> Vec<(bool, f64, f64, f64, f64)> {
        let mut out = Vec::new();
        for maximize in [false, true] {
            for weight_decay in [0.0, 0.05] {
                for (warmup, r, power) in [(0.0, 0.0, 2.0), (5.0, 0.5, 2.0), (5.0, 0.0, 0.0)] {
                    out.push((maximize, weight_decay, warmup, r, power));
                }
            }
        }
        out
    }

    fn adamw_hyper(
        setting: (bool, f64, f64, f64, f64),
        k: f64,
        lr_max: &mut f64,
        weight_sum: &mut f64,
    ) -> ScheduleFreeAdamwHyper {
        let (maximize, weight_decay, warmup, r, power) = setting;
        let [beta1, beta2] = [0.8, 0.99];
        let (lr, ckp1) = group_scalars(0.01, k, warmup, r, power, lr_max, weight_sum);
        ScheduleFreeAdamwHyper {
            betas: [beta1, beta2],
            eps: 1e-8,
            weight_decay,
            maximize,
            scheduled_lr: lr,
            ckp1,
            y_lr: lr * (beta1 * (1.0 - ckp1) - 1.0),
            bias_correction2: 1.0 - beta2.powf(k + 1.0),
        }
    }

    fn sgd_hyper(
        setting: (bool, f64, f64, f64, f64),
        momentum: f64,
        k: f64,
        lr_max: &mut f64,
        weight_sum: &mut f64,
    ) -> ScheduleFreeSgdHyper {
        let (maximize, weight_decay, warmup, r, power) = setting;
        let (lr, ckp1) = group_scalars(0.5, k, warmup, r, power, lr_max, weight_sum);
        ScheduleFreeSgdHyper {
            weight_decay,
            maximize,
            scheduled_lr: lr,
            ckp1,
            y_lr: lr * (momentum * (1.0 - ckp1) - 1.0),
        }
    }

    #[test]
    fn adamw_float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 64, 1000, 70_001];
        for setting in settings() {
            let mut ours = buffers::<f64, f64>(&lens, 2, 0.5, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 2, 0.5, &[]);
            let (mut lr_max, mut weight_sum) = (-1.0, 0.0);
            for step in 0..20 {
                let h = adamw_hyper(setting, step as f64, &mut lr_max, &mut weight_sum);
                set_grads(&mut ours, step + 1);
                set_grads(&mut reference, step + 1);
                let ctx = StepContext::default();
                step_with::<ScheduleFreeAdamw, _, _>(&mut ours, &h, &ctx, SimdLevel::detect());
                for r in reference.iter_mut() {
                    reference_adamw(&h, &mut r.p, &r.g, &mut r.states);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-12, &format!("{setting:?}"));
                for (x, y) in b.states.iter().zip(&r.states) {
                    assert_close(x, y, 1e-12, &format!("{setting:?}"));
                }
            }
        }
    }

    #[test]
    fn sgd_float64_matches_the_transcribed_reference() {
        let lens = [1, 15, 17, 64, 1000, 70_001];
        let momentum = 0.9;
        for setting in settings() {
            let mut ours = buffers::<f64, f64>(&lens, 1, 0.5, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 1, 0.5, &[]);
            let (mut lr_max, mut weight_sum) = (-1.0, 0.0);
            for step in 0..20 {
                let h = sgd_hyper(setting, momentum, step as f64, &mut lr_max, &mut weight_sum);
                set_grads(&mut ours, step + 1);
                set_grads(&mut reference, step + 1);
                let ctx = StepContext::default();
                step_with::<ScheduleFreeSgd, _, _>(&mut ours, &h, &ctx, SimdLevel::detect());
                for r in reference.iter_mut() {
                    reference_sgd(&h, momentum, &mut r.p, &r.g, &mut r.states[0]);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                assert_close(&b.p, &r.p, 1e-12, &format!("{setting:?}"));
                assert_close(&b.states[0], &r.states[0], 1e-12, &format!("{setting:?}"));
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for setting in settings() {
            // A mid-run step (ckp1 < 1: both branches of the average's lerp get used
            // across the settings).
            let (mut lr_max, mut weight_sum) = (-1.0, 0.0);
            let mut adamw = adamw_hyper(setting, 0.0, &mut lr_max, &mut weight_sum);
            let mut sgd = sgd_hyper(setting, 0.9, 0.0, &mut -1.0, &mut 0.0);
            for k in 1..4 {
                adamw = adamw_hyper(setting, k as f64, &mut lr_max, &mut weight_sum);
                sgd = sgd_hyper(setting, 0.9, k as f64, &mut -1.0, &mut (k as f64 * 0.25));
            }
            assert_bitwise_everywhere::<ScheduleFreeAdamw>(&adamw, 0.3, &[]);
            assert_bitwise_everywhere::<ScheduleFreeSgd>(&sgd, 0.3, &[]);
            let first = ScheduleFreeAdamwHyper::default();
            assert_bitwise_everywhere::<ScheduleFreeAdamw>(&first, 0.3, &[]);
        }
    }
}

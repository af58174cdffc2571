//! Adam and AdamW (torch.optim semantics, including AMSGrad and maximize).
//!
//! The reference is torch's single-tensor implementation
//! (`torch/optim/adam.py::_single_tensor_adam`, non-capturable branch). Each
//! element goes through the same operations in the same order, with scalars
//! computed in float64 and rounded to the tensor's dtype exactly where torch
//! rounds them:
//!
//! ```text
//! g = -grad if maximize else grad
//! AdamW:  p = p * (1 - lr*wd)                 param.mul_(1 - lr * weight_decay)
//! Adam:   g = p*wd + g   (fused)              grad.add(param, alpha=weight_decay)
//! m = lerp(m, g, 1 - beta1)                   exp_avg.lerp_(grad, 1 - beta1)
//! v = v*beta2 + ((1 - beta2)*g)*g             exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! vmax = maximum(vmax, v)                     (amsgrad)
//! denom = sqrt(v or vmax) / sqrt(bc2) + eps
//! p = p + (-lr/bc1 * m) / denom               param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//!
//! One pass over memory: read p, g, m, v (vmax); write p, m, v (vmax).

use super::{Lerp, Real, Storage};
use crate::engine::{DType, Group};
use crate::simd::{dispatch, SimdLevel, SimdTask};

/// Hyperparameters of one parameter group, as torch keeps them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay (`param *= 1 - lr * wd`) instead of L2 (`grad += wd * param`).
    pub decoupled_weight_decay: bool,
    pub amsgrad: bool,
    pub maximize: bool,
}

impl Default for AdamHyper {
    fn default() -> Self {
        AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            amsgrad: false,
            maximize: false,
        }
    }
}

/// Weight-decay variants, specialised at compile time.
const WD_NONE: u8 = 0;
const WD_L2: u8 = 1;
const WD_DECOUPLED: u8 = 2;

impl AdamHyper {
    /// Number of state buffers per parameter: exp_avg, exp_avg_sq (, max_exp_avg_sq).
    pub fn num_states(&self) -> usize {
        if self.amsgrad {
            3
        } else {
            2
        }
    }

    fn weight_decay_mode(&self) -> u8 {
        if self.weight_decay == 0.0 {
            WD_NONE
        } else if self.decoupled_weight_decay {
            WD_DECOUPLED
        } else {
            WD_L2
        }
    }
}

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct AdamConsts<C> {
    lerp: Lerp<C>,
    beta2: C,
    one_minus_beta2: C,
    eps: C,
    /// L2: `alpha` of `grad.add(param, alpha=wd)`; decoupled: `1 - lr * wd`.
    weight_decay: C,
    neg_step_size: C,
    bias_correction2_sqrt: C,
}

impl<C: Real> AdamConsts<C> {
    /// Constants for step number `step` (already incremented), computed in
    /// float64 exactly as torch's Python code computes them.
    pub fn new(h: &AdamHyper, step: f64) -> Self {
        let bias_correction1 = 1.0 - h.beta1.powf(step);
        let bias_correction2 = 1.0 - h.beta2.powf(step);
        let step_size = h.lr / bias_correction1;
        // Python's `bias_correction2 ** 0.5` is libm's pow, which LLVM would
        // otherwise rewrite to sqrt for a literal 0.5.
        let bias_correction2_sqrt = bias_correction2.powf(std::hint::black_box(0.5));
        let weight_decay = if h.decoupled_weight_decay {
            1.0 - h.lr * h.weight_decay
        } else {
            h.weight_decay
        };
        AdamConsts {
            lerp: Lerp::new(1.0 - h.beta1),
            beta2: C::from_f64(h.beta2),
            one_minus_beta2: C::from_f64(1.0 - h.beta2),
            eps: C::from_f64(h.eps),
            weight_decay: C::from_f64(weight_decay),
            neg_step_size: C::from_f64(-step_size),
            bias_correction2_sqrt: C::from_f64(bias_correction2_sqrt),
        }
    }
}

/// One tensor's slices for [`adam_update`]; `max_exp_avg_sq` is empty unless AMSGrad.
pub struct AdamSlices<'a, S> {
    pub param: &'a mut [S],
    pub grad: &'a [S],
    pub exp_avg: &'a mut [S],
    pub exp_avg_sq: &'a mut [S],
    pub max_exp_avg_sq: &'a mut [S],
}

#[inline(always)]
fn element<C: Real, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    k: &AdamConsts<C>,
    param: C,
    grad: C,
    exp_avg: C,
    exp_avg_sq: C,
    max_exp_avg_sq: C,
) -> (C, C, C, C) {
    let mut p = param;
    let mut g = if MAXIMIZE { -grad } else { grad };
    if WD == WD_DECOUPLED {
        p = p * k.weight_decay;
    } else if WD == WD_L2 {
        g = p.mul_add(k.weight_decay, g);
    }
    let m = k.lerp.apply(exp_avg, g);
    let v = exp_avg_sq * k.beta2 + k.one_minus_beta2 * g * g;
    let (vmax, second) = if AMSGRAD {
        let vmax = max_exp_avg_sq.max_propagate_nan(v);
        (vmax, vmax)
    } else {
        (max_exp_avg_sq, v)
    };
    let denom = second.sqrt() / k.bias_correction2_sqrt + k.eps;
    p = p + k.neg_step_size * m / denom;
    (p, m, v, vmax)
}

/// Updates one tensor (or one range of it) in a single pass.
#[inline(always)]
pub fn adam_update<S: Storage, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    s: AdamSlices<'_, S>,
    k: &AdamConsts<S::Compute>,
) {
    let n = s.param.len();
    let grad = &s.grad[..n];
    let exp_avg = &mut s.exp_avg[..n];
    let exp_avg_sq = &mut s.exp_avg_sq[..n];
    let param = &mut s.param[..n];
    if AMSGRAD {
        let max_exp_avg_sq = &mut s.max_exp_avg_sq[..n];
        for i in 0..n {
            let (p, m, v, vmax) = element::<_, true, MAXIMIZE, WD>(
                k,
                param[i].load(),
                grad[i].load(),
                exp_avg[i].load(),
                exp_avg_sq[i].load(),
                max_exp_avg_sq[i].load(),
            );
            param[i] = S::store(p);
            exp_avg[i] = S::store(m);
            exp_avg_sq[i] = S::store(v);
            max_exp_avg_sq[i] = S::store(vmax);
        }
    } else {
        for i in 0..n {
            let zero = <S::Compute as Real>::ZERO;
            let (p, m, v, _) = element::<_, false, MAXIMIZE, WD>(
                k,
                param[i].load(),
                grad[i].load(),
                exp_avg[i].load(),
                exp_avg_sq[i].load(),
                zero,
            );
            param[i] = S::store(p);
            exp_avg[i] = S::store(m);
            exp_avg_sq[i] = S::store(v);
        }
    }
}

/// [`adam_update`] as a [`SimdTask`], so it compiles once per SIMD level.
struct AdamTask<'a, 'k, S: Storage, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8> {
    slices: AdamSlices<'a, S>,
    consts: &'k AdamConsts<S::Compute>,
}

impl<S: Storage, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8> SimdTask
    for AdamTask<'_, '_, S, AMSGRAD, MAXIMIZE, WD>
{
    type Output = ();
    #[inline(always)]
    fn run(self) {
        adam_update::<S, AMSGRAD, MAXIMIZE, WD>(self.slices, self.consts)
    }
}

/// Steps a whole group: increments every step counter, then updates all
/// tensors chunk by chunk on the pool. Returns the new step counts.
///
/// # Panics
/// If a tensor of the group does not carry the `h.num_states()` buffers
/// exp_avg, exp_avg_sq (, max_exp_avg_sq) in that order, or no step counter.
pub fn adam_step(group: &mut Group<'_>, h: &AdamHyper, level: SimdLevel) -> Vec<f64> {
    for t in group.tensors() {
        assert_eq!(t.num_states, h.num_states(), "Adam state buffers missing");
        assert!(t.step.is_some(), "Adam needs a step counter per parameter");
    }
    let steps = group.increment_steps();
    let consts32: Vec<AdamConsts<f32>> = consts_for(group, h, &steps, DType::F32);
    let consts64: Vec<AdamConsts<f64>> = consts_for(group, h, &steps, DType::F64);
    crate::const_bool!(h.amsgrad, AMSGRAD, {
        crate::const_bool!(h.maximize, MAXIMIZE, {
            match h.weight_decay_mode() {
                WD_NONE => run::<AMSGRAD, MAXIMIZE, WD_NONE>(group, &consts32, &consts64, level),
                WD_L2 => run::<AMSGRAD, MAXIMIZE, WD_L2>(group, &consts32, &consts64, level),
                _ => run::<AMSGRAD, MAXIMIZE, WD_DECOUPLED>(group, &consts32, &consts64, level),
            }
        })
    });
    steps
}

/// Per-tensor constants for the tensors of one dtype (indexed by tensor).
fn consts_for<C: Real>(
    group: &Group<'_>,
    h: &AdamHyper,
    steps: &[f64],
    dtype: DType,
) -> Vec<AdamConsts<C>> {
    if group.tensors().iter().all(|t| t.dtype != dtype) {
        return Vec::new();
    }
    super::per_step(steps, |step| AdamConsts::new(h, step))
}

fn run<const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    group: &Group<'_>,
    consts32: &[AdamConsts<f32>],
    consts64: &[AdamConsts<f64>],
    level: SimdLevel,
) {
    group.for_each_chunk(|segments| {
        for segment in segments {
            let index = segment.tensor_index();
            match segment.dtype() {
                DType::F32 => {
                    update::<f32, AMSGRAD, MAXIMIZE, WD>(segment, &consts32[index], level)
                }
                DType::F64 => {
                    update::<f64, AMSGRAD, MAXIMIZE, WD>(segment, &consts64[index], level)
                }
            }
        }
    });
}

#[inline]
fn update<T, const AMSGRAD: bool, const MAXIMIZE: bool, const WD: u8>(
    segment: crate::engine::ChunkSlices<'_>,
    consts: &AdamConsts<T>,
    level: SimdLevel,
) where
    T: crate::engine::Element + Storage<Compute = T> + Real,
{
    let s = segment.slices::<T>();
    let [exp_avg, exp_avg_sq, max_exp_avg_sq] = s.states;
    let task = AdamTask::<T, AMSGRAD, MAXIMIZE, WD> {
        slices: AdamSlices {
            param: s.param,
            grad: s.grad,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
        },
        consts,
    };
    dispatch(level, task);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{StepCounter, TensorBuffers, MAX_STATES};

    /// A straightforward transcription of torch's `_single_tensor_adam`
    /// (non-capturable branch) in float64, one operation per line.
    fn reference_step(
        h: &AdamHyper,
        step: f64,
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        vmax: &mut [f64],
    ) {
        for i in 0..p.len() {
            let mut grad = if h.maximize { -g[i] } else { g[i] };
            if h.weight_decay != 0.0 {
                if h.decoupled_weight_decay {
                    p[i] *= 1.0 - h.lr * h.weight_decay;
                } else {
                    grad = p[i].mul_add(h.weight_decay, grad);
                }
            }
            m[i] = (1.0 - h.beta1).mul_add(grad - m[i], m[i]);
            v[i] = v[i] * h.beta2 + (1.0 - h.beta2) * grad * grad;
            let bc1 = 1.0 - h.beta1.powf(step);
            let bc2 = 1.0 - h.beta2.powf(step);
            let step_size = h.lr / bc1;
            let second = if h.amsgrad {
                vmax[i] = vmax[i].max(v[i]);
                vmax[i]
            } else {
                v[i]
            };
            let denom = second.sqrt() / bc2.powf(0.5) + h.eps;
            p[i] += -step_size * m[i] / denom;
        }
    }

    struct Buffers<T> {
        p: Vec<T>,
        g: Vec<T>,
        states: Vec<Vec<T>>,
        step: T,
    }

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn group_of<'a, T: crate::engine::Element>(
        bufs: &'a mut [Buffers<T>],
        dtype: DType,
    ) -> Group<'a> {
        let tensors = bufs
            .iter_mut()
            .map(|b| {
                let mut states = [0; MAX_STATES];
                for (slot, s) in states.iter_mut().zip(b.states.iter_mut()) {
                    *slot = s.as_mut_ptr() as usize;
                }
                TensorBuffers {
                    dtype,
                    len: b.p.len(),
                    param: b.p.as_mut_ptr() as usize,
                    grad: b.g.as_ptr() as usize,
                    states,
                    num_states: b.states.len(),
                    step: Some(StepCounter {
                        addr: &mut b.step as *mut T as usize,
                        dtype,
                    }),
                }
            })
            .collect();
        // SAFETY: every address points into a Vec (or field) borrowed mutably for 'a.
        unsafe { Group::new(tensors) }.unwrap()
    }

    fn all_hypers() -> Vec<AdamHyper> {
        let mut out = Vec::new();
        for amsgrad in [false, true] {
            for maximize in [false, true] {
                for (weight_decay, decoupled) in [(0.0, false), (0.1, false), (0.1, true)] {
                    out.push(AdamHyper {
                        lr: 0.01,
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
            let mut ours: Vec<Buffers<f64>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| Buffers {
                    p: random(n, i as u64),
                    g: vec![0.0; n],
                    states: vec![vec![0.0; n]; h.num_states()],
                    step: 0.0,
                })
                .collect();
            // (param, exp_avg, exp_avg_sq, max_exp_avg_sq) per tensor.
            let mut reference: Vec<[Vec<f64>; 4]> = ours
                .iter()
                .map(|b| {
                    [
                        b.p.clone(),
                        vec![0.0; b.p.len()],
                        vec![0.0; b.p.len()],
                        vec![0.0; b.p.len()],
                    ]
                })
                .collect();
            for step in 1..=20 {
                for (i, b) in ours.iter_mut().enumerate() {
                    b.g = random(b.p.len(), 1000 + step * 7 + i as u64);
                }
                let mut group = group_of(&mut ours, DType::F64);
                let steps = adam_step(&mut group, &h, SimdLevel::detect());
                assert!(steps.iter().all(|&s| s == step as f64));
                for (b, r) in ours.iter().zip(reference.iter_mut()) {
                    let [p, m, v, vmax] = r;
                    reference_step(&h, step as f64, p, &b.g, m, v, vmax);
                }
            }
            for (b, r) in ours.iter().zip(reference.iter()) {
                for (x, y) in b.p.iter().zip(r[0].iter()) {
                    assert!(
                        (x - y).abs() <= 1e-13 * (1.0 + y.abs()),
                        "{h:?}: {x} vs {y}"
                    );
                }
            }
        }
    }

    fn run_f32(h: &AdamHyper, lens: &[usize], level: SimdLevel, steps: u64) -> Vec<Buffers<f32>> {
        let mut bufs: Vec<Buffers<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Buffers {
                p: random(n, i as u64).into_iter().map(|x| x as f32).collect(),
                g: vec![0.0; n],
                states: vec![vec![0.0; n]; h.num_states()],
                step: 0.0,
            })
            .collect();
        for step in 1..=steps {
            for (i, b) in bufs.iter_mut().enumerate() {
                b.g = random(b.p.len(), step * 31 + i as u64)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
            }
            let mut group = group_of(&mut bufs, DType::F32);
            adam_step(&mut group, h, level);
        }
        bufs
    }

    #[test]
    fn every_simd_level_gives_identical_bits() {
        let lens = [3, 64, 100, 4099, 65_600];
        for h in all_hypers() {
            let want = run_f32(&h, &lens, SimdLevel::Scalar, 5);
            for level in SimdLevel::supported() {
                let got = run_f32(&h, &lens, level, 5);
                for (a, b) in got.iter().zip(want.iter()) {
                    assert_eq!(a.p, b.p, "{level} param differs for {h:?}");
                    assert_eq!(a.states, b.states, "{level} state differs for {h:?}");
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        let lens = [100_000, 3, 200_000, 64 * 1024 + 5];
        let h = AdamHyper {
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            amsgrad: true,
            ..AdamHyper::default()
        };
        crate::parallel::set_num_threads(1).unwrap();
        let single = run_f32(&h, &lens, SimdLevel::detect(), 3);
        crate::parallel::set_num_threads(4).unwrap();
        let multi = run_f32(&h, &lens, SimdLevel::detect(), 3);
        crate::parallel::set_num_threads(2).unwrap();
        for (a, b) in single.iter().zip(multi.iter()) {
            assert_eq!(a.p, b.p);
            assert_eq!(a.states, b.states);
        }
    }

    #[test]
    fn amsgrad_keeps_nan_like_torch_maximum() {
        let h = AdamHyper {
            amsgrad: true,
            ..AdamHyper::default()
        };
        let mut bufs = vec![Buffers {
            p: vec![1.0f64; 4],
            g: vec![f64::NAN, 1.0, 1.0, 1.0],
            states: vec![vec![0.0; 4]; 3],
            step: 0.0,
        }];
        let mut group = group_of(&mut bufs, DType::F64);
        adam_step(&mut group, &h, SimdLevel::detect());
        assert!(bufs[0].states[2][0].is_nan());
        assert!(bufs[0].p[0].is_nan());
        assert!(bufs[0].p[1].is_finite());
    }
}

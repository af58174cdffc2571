//! Muon's element-wise half (torch 2.15's `torch.optim.Muon`): the momentum
//! buffer and the (Nesterov) update that Newton–Schulz orthogonalises.
//!
//! Reference: `torch/optim/_muon.py::_single_tensor_muon`. Per element, each
//! line one torch op in torch's order:
//!
//! ```text
//! m = lerp(m, g, 1 - momentum)                buf.lerp_(grad, 1 - momentum)
//! u = lerp(g, m, momentum)   if nesterov      update = grad.lerp(buf, momentum)
//! u = m                      otherwise        update = buf
//! ```
//!
//! The rest of torch's step is not element-wise and stays in torch, op for op
//! (`python/ferroptim/muon.py`): `u.to(bfloat16)`, the Frobenius norm and the
//! division, the Newton–Schulz matrix products (torch's own `mm`/`addmm` in
//! bfloat16), and `param.mul_(1 - lr*wd)`, `param.add_(O, alpha=-adjusted_lr)`.
//!
//! The engine's *param* role is the momentum buffer here (the buffer the
//! kernel updates in place) and state 0 is the update `u`, a scratch tensor
//! laid out like the gradient (as torch's `lerp` output is). One pass: read g,
//! m; write m, u (16 bytes/element in float32) instead of torch's three
//! (`lerp_`, `lerp`, and the read of `u` by the conversion that follows).

use super::Lerp;
use crate::engine::elementwise::FIRST_KERNEL_FLAG;
use crate::engine::elementwise::{has, Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// Muon's element-wise hyperparameters, under torch's param-group names.
    pub struct MuonHyper {
        momentum: f64,
        nesterov: bool,
    }
}

impl Default for MuonHyper {
    fn default() -> Self {
        MuonHyper {
            momentum: 0.95,
            nesterov: true,
        }
    }
}

/// `u = lerp(g, m, momentum)` instead of `u = m`.
const NESTEROV: u32 = FIRST_KERNEL_FLAG;

/// The constants of one tensor's update, rounded to its compute type.
#[derive(Clone, Copy, Debug)]
pub struct MuonConsts<C> {
    /// `buf.lerp_(grad, 1 - momentum)`.
    to_grad: Lerp<C>,
    /// `grad.lerp(buf, momentum)`.
    to_buf: Lerp<C>,
}

/// Muon's momentum.
pub struct Muon;

impl Elementwise for Muon {
    const NAME: &'static str = "muon";
    /// torch's Muon keeps no step counter.
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = MuonHyper;
    type Consts<C: Real> = MuonConsts<C>;

    fn state_keys(_h: &MuonHyper) -> &'static [&'static str] {
        // (the param role is `momentum_buffer`; state 0 is the scratch update)
        &["update"]
    }

    fn grad_prep(_h: &MuonHyper) -> GradPrep {
        // torch's Muon has no maximize and decays the param outside this pass.
        GradPrep {
            maximize: false,
            l2: 0.0,
        }
    }

    fn flags(h: &MuonHyper, _ctx: &StepContext) -> u32 {
        if h.nesterov {
            NESTEROV
        } else {
            0
        }
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0, NESTEROV])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        1
    }

    fn consts<C: Real>(h: &MuonHyper, _scalars: &[f64]) -> MuonConsts<C> {
        MuonConsts {
            to_grad: Lerp::new(1.0 - h.momentum),
            to_buf: Lerp::new(h.momentum),
        }
    }

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(
        k: &MuonConsts<C>,
        buf: &mut C,
        g: C,
        s: &mut [C; MAX_STATES],
    ) {
        let m = k.to_grad.apply(*buf, g);
        *buf = m;
        s[0] = if has(FLAGS, NESTEROV) {
            k.to_buf.apply(g, m)
        } else {
            m
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::elementwise::StepContext;
    use crate::kernels::testing::{assert_bitwise_everywhere, buffers, set_grads, step_with};
    use crate::simd::SimdLevel;

    /// torch's vectorised `lerp`, transcribed in float64 (one fused multiply-add
    /// from the nearer end).
    fn lerp(start: f64, end: f64, weight: f64) -> f64 {
        if weight.abs() < 0.5 {
            weight.mul_add(end - start, start)
        } else {
            (weight - 1.0).mul_add(end - start, end)
        }
    }

    /// `_single_tensor_muon`'s element-wise lines in float64, one torch op per line.
    fn reference_step(h: &MuonHyper, buf: &mut [f64], g: &[f64], s: &mut [Vec<f64>]) {
        for i in 0..buf.len() {
            buf[i] = lerp(buf[i], g[i], 1.0 - h.momentum);
            s[0][i] = if h.nesterov {
                lerp(g[i], buf[i], h.momentum)
            } else {
                buf[i]
            };
        }
    }

    fn all_hypers() -> Vec<MuonHyper> {
        let mut out = Vec::new();
        for nesterov in [false, true] {
            for momentum in [0.95, 0.3, 0.0] {
                out.push(MuonHyper { momentum, nesterov });
            }
        }
        out
    }

    #[test]
    fn float64_matches_the_transcribed_reference_bitwise() {
        let lens = [1, 15, 17, 1000, 70_001];
        for h in all_hypers() {
            let mut ours = buffers::<f64, f64>(&lens, 1, 0.0, &[]);
            let mut reference = buffers::<f64, f64>(&lens, 1, 0.0, &[]);
            for step in 1..=20 {
                set_grads(&mut ours, step);
                set_grads(&mut reference, step);
                step_with::<Muon, _, _>(
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
                assert_eq!(b.p, r.p, "{h:?}");
                assert_eq!(b.states, r.states, "{h:?}");
            }
        }
    }

    #[test]
    fn every_level_and_thread_count_gives_identical_bits() {
        for h in all_hypers() {
            assert_bitwise_everywhere::<Muon>(&h, 0.0, &[]);
        }
    }
}

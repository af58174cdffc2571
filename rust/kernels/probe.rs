//! A bandwidth probe with Adam's memory traffic and none of its arithmetic.
//!
//! Reads param, grad and two states, writes param and both states (28 bytes
//! per float32 element), through the same engine, pool, chunking and loop as
//! the optimizers. Benchmarks time it beside a real step to measure the
//! machine's streaming floor in the same run.

use crate::engine::elementwise::{Elementwise, FlagRunner, GradPrep, StepContext};
use crate::engine::{Real, MAX_STATES};

crate::hyper_record! {
    /// No hyperparameters.
    pub struct ProbeHyper {}
}

/// Adds the grad to the param and to both state buffers.
pub struct StreamProbe;

impl Elementwise for StreamProbe {
    const NAME: &'static str = "stream_probe";
    const SCALARS: &'static [&'static str] = &[];
    type Hyper = ProbeHyper;
    type Consts<C: Real> = ();

    fn state_keys(_h: &ProbeHyper) -> &'static [&'static str] {
        &["first", "second"]
    }

    fn grad_prep(_h: &ProbeHyper) -> GradPrep {
        GradPrep {
            maximize: false,
            l2: 0.0,
        }
    }

    fn flags(_h: &ProbeHyper, _ctx: &StepContext) -> u32 {
        0
    }

    fn dispatch_flags<R: FlagRunner>(flags: u32, runner: R) -> R::Output {
        crate::flag_match!(flags, runner, [0])
    }

    #[inline(always)]
    fn num_states(_flags: u32) -> usize {
        2
    }

    fn consts<C: Real>(_h: &ProbeHyper, _scalars: &[f64]) {}

    #[inline(always)]
    fn update<C: Real, const FLAGS: u32>(_k: &(), param: &mut C, g: C, s: &mut [C; MAX_STATES]) {
        *param = *param + g;
        s[0] = s[0] + g;
        s[1] = s[1] + g;
    }
}

//! A bandwidth probe with Adam's memory traffic and none of its arithmetic.
//!
//! Reads param, grad and two states, writes param and both states (28 bytes
//! per float32 element), through the same engine, pool and chunking as the
//! optimizers. Benchmarks time it beside a real step to measure the machine's
//! streaming floor in the same run.

use super::{run_segments, Real, SegmentKernel, Storage};
use crate::engine::{Group, Slices};
use crate::simd::SimdLevel;

struct Probe;

impl<T> SegmentKernel<T> for Probe
where
    T: Storage<Compute = T> + Real,
{
    #[inline(always)]
    fn apply(&self, _tensor: usize, s: Slices<'_, T>) {
        let n = s.param.len();
        let grad = &s.grad[..n];
        let [first, second, _] = s.states;
        let (first, second) = (&mut first[..n], &mut second[..n]);
        for i in 0..n {
            let g = grad[i];
            s.param[i] = s.param[i] + g;
            first[i] = first[i] + g;
            second[i] = second[i] + g;
        }
    }
}

/// Adds the grad to the param and to both state buffers of every tensor.
///
/// # Panics
/// If a tensor does not carry two state buffers.
pub fn stream_probe(group: &Group<'_>, level: SimdLevel) {
    assert!(group.tensors().iter().all(|t| t.num_states == 2));
    run_segments(group, level, &Probe, &Probe);
}

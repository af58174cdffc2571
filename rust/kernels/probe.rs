//! A bandwidth probe with Adam's memory traffic and none of its arithmetic.
//!
//! Reads param, grad and two states, writes param and both states (28 bytes
//! per float32 element), through the same engine, pool and chunking as the
//! optimizers. Benchmarks time it beside a real step to measure the machine's
//! streaming floor in the same run.

use crate::engine::{DType, Group};
use crate::simd::{dispatch, SimdLevel, SimdTask};

struct ProbeTask<'a, T> {
    param: &'a mut [T],
    grad: &'a [T],
    first: &'a mut [T],
    second: &'a mut [T],
}

impl<T: Copy + std::ops::Add<Output = T>> SimdTask for ProbeTask<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let n = self.param.len();
        let (grad, first, second) = (&self.grad[..n], &mut self.first[..n], &mut self.second[..n]);
        for i in 0..n {
            let g = grad[i];
            self.param[i] = self.param[i] + g;
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
    group.for_each_chunk(|segments| {
        for segment in segments {
            match segment.dtype() {
                DType::F32 => {
                    let s = segment.slices::<f32>();
                    let [first, second, _] = s.states;
                    dispatch(
                        level,
                        ProbeTask {
                            param: s.param,
                            grad: s.grad,
                            first,
                            second,
                        },
                    );
                }
                DType::F64 => {
                    let s = segment.slices::<f64>();
                    let [first, second, _] = s.states;
                    dispatch(
                        level,
                        ProbeTask {
                            param: s.param,
                            grad: s.grad,
                            first,
                            second,
                        },
                    );
                }
            }
        }
    });
}

//! Shared scaffolding for the kernels' unit tests: buffers, deterministic
//! pseudo-random data, groups over them, and the cross-level / cross-thread
//! bitwise check every kernel must pass.

use crate::engine::{Element, Group, StepCounter, TensorBuffers, MAX_STATES};
use crate::simd::SimdLevel;

/// One parameter's buffers, owned by the test.
pub struct Buffers<T> {
    pub p: Vec<T>,
    pub g: Vec<T>,
    pub states: Vec<Vec<T>>,
    pub step: T,
}

/// Deterministic values in [-1, 1).
pub fn random(n: usize, seed: u64) -> Vec<f64> {
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

pub trait FromF64: Copy {
    fn from_f64(x: f64) -> Self;
}

impl FromF64 for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl FromF64 for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// Buffers for tensors of the given lengths: random params, states filled with `state_init`.
pub fn buffers<T: FromF64>(lens: &[usize], num_states: usize, state_init: f64) -> Vec<Buffers<T>> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| Buffers {
            p: random(n, i as u64).into_iter().map(T::from_f64).collect(),
            g: vec![T::from_f64(0.0); n],
            states: vec![vec![T::from_f64(state_init); n]; num_states],
            step: T::from_f64(0.0),
        })
        .collect()
}

/// Fresh random gradients for step `step`.
pub fn set_grads<T: FromF64>(bufs: &mut [Buffers<T>], step: u64) {
    for (i, b) in bufs.iter_mut().enumerate() {
        b.g = random(b.p.len(), 1000 + step * 31 + i as u64)
            .into_iter()
            .map(T::from_f64)
            .collect();
    }
}

/// A group over the buffers (with step counters when `with_step`).
pub fn group_of<T: Element>(bufs: &mut [Buffers<T>], with_step: bool) -> Group<'_> {
    let tensors = bufs
        .iter_mut()
        .map(|b| {
            let mut states = [0; MAX_STATES];
            for (slot, s) in states.iter_mut().zip(b.states.iter_mut()) {
                *slot = s.as_mut_ptr() as usize;
            }
            TensorBuffers {
                dtype: T::DTYPE,
                len: b.p.len(),
                param: b.p.as_mut_ptr() as usize,
                grad: Some(b.g.as_ptr() as usize),
                states,
                num_states: b.states.len(),
                step: with_step.then_some(StepCounter {
                    addr: &mut b.step as *mut T as usize,
                    dtype: T::DTYPE,
                }),
            }
        })
        .collect();
    // SAFETY: every address points into a Vec (or field) borrowed mutably for the group's life.
    unsafe { Group::new(tensors) }.unwrap()
}

/// Runs `steps` float32 steps of `step` at `level` from fixed initial data.
pub fn run_f32(
    lens: &[usize],
    num_states: usize,
    state_init: f64,
    steps: u64,
    level: SimdLevel,
    step: &dyn Fn(&mut Group<'_>, SimdLevel),
) -> Vec<Buffers<f32>> {
    let mut bufs = buffers::<f32>(lens, num_states, state_init);
    for s in 1..=steps {
        set_grads(&mut bufs, s);
        let mut group = group_of(&mut bufs, true);
        step(&mut group, level);
    }
    bufs
}

/// Asserts that every supported SIMD level and several thread counts give
/// bitwise-identical params and states.
pub fn assert_bitwise_everywhere(
    num_states: usize,
    state_init: f64,
    step: &dyn Fn(&mut Group<'_>, SimdLevel),
) {
    let lens = [3, 64, 100, 4099, 70_001, 64 * 1024 + 5];
    let want = run_f32(&lens, num_states, state_init, 4, SimdLevel::Scalar, step);
    let mut runs = Vec::new();
    for level in SimdLevel::supported() {
        runs.push((
            format!("{level}"),
            run_f32(&lens, num_states, state_init, 4, level, step),
        ));
    }
    for threads in [1, 3] {
        crate::parallel::set_num_threads(threads).unwrap();
        let got = run_f32(&lens, num_states, state_init, 4, SimdLevel::detect(), step);
        runs.push((format!("{threads} threads"), got));
    }
    crate::parallel::set_num_threads(2).unwrap();
    for (what, got) in runs {
        for (a, b) in got.iter().zip(want.iter()) {
            assert_eq!(a.p, b.p, "{what}: params differ");
            assert_eq!(a.states, b.states, "{what}: states differ");
        }
    }
}

/// Asserts `got` is within `rel` (relative to 1 + |want|) of `want`.
pub fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    for (i, (x, y)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            (x - y).abs() <= rel * (1.0 + y.abs()) || (x.is_nan() && y.is_nan()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

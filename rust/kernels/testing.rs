//! Shared scaffolding for the kernels' unit tests: buffers, deterministic
//! pseudo-random data, groups over them, and the cross-level / cross-thread
//! bitwise check every kernel must pass.

use crate::engine::elementwise::step;
use crate::engine::{Buffer, Elementwise, Group, ScalarSlot, StepContext, Storage, TensorBuffers};
use crate::simd::SimdLevel;

/// One parameter's buffers, owned by the test: param and grad stored as `T`,
/// states as `S`, scalar slots (step first) as float64 unless `T` is float32.
pub struct Buffers<T, S = T> {
    pub p: Vec<T>,
    pub g: Vec<T>,
    pub states: Vec<Vec<S>>,
    pub scalars: Vec<T>,
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

/// A value rounded into storage type `T`.
pub fn stored<T: Storage>(x: f64) -> T {
    T::store(<T::Compute as crate::engine::Real>::from_f64(x))
}

/// Buffers for tensors of the given lengths: random params, states filled
/// with `state_init`, `scalars` scalar slots holding `scalar_init`.
pub fn buffers<T: Storage, S: Storage>(
    lens: &[usize],
    num_states: usize,
    state_init: f64,
    scalar_init: &[f64],
) -> Vec<Buffers<T, S>> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| Buffers {
            p: random(n, i as u64).into_iter().map(stored).collect(),
            g: vec![stored(0.0); n],
            states: vec![vec![stored(state_init); n]; num_states],
            scalars: scalar_init.iter().map(|&v| stored(v)).collect(),
        })
        .collect()
}

/// Fresh random gradients for step `step`.
pub fn set_grads<T: Storage, S>(bufs: &mut [Buffers<T, S>], step: u64) {
    for (i, b) in bufs.iter_mut().enumerate() {
        b.g = random(b.p.len(), 1000 + step * 31 + i as u64)
            .into_iter()
            .map(stored)
            .collect();
    }
}

fn buffer<T: Storage>(values: &[T]) -> Buffer {
    Buffer::new(values.as_ptr() as usize, T::FORMAT)
}

/// A group over the buffers.
pub fn group_of<T: Storage, S: Storage>(bufs: &mut [Buffers<T, S>]) -> Group<'_> {
    let tensors = bufs
        .iter_mut()
        .map(|b| {
            let states: Vec<Buffer> = b.states.iter().map(|s| buffer(s)).collect();
            let scalars: Vec<ScalarSlot> = b
                .scalars
                .iter_mut()
                .map(|s| ScalarSlot {
                    addr: s as *mut T as usize,
                    format: T::FORMAT,
                })
                .collect();
            TensorBuffers::param(b.p.len(), buffer(&b.p), Some(buffer(&b.g)))
                .with_states(&states)
                .with_scalars(&scalars)
        })
        .collect();
    // SAFETY: every address points into a Vec borrowed mutably for the group's life.
    unsafe { Group::new(tensors) }.unwrap()
}

/// One step of kernel `K` over the buffers.
pub fn step_with<K: Elementwise, T: Storage, S: Storage>(
    bufs: &mut [Buffers<T, S>],
    h: &K::Hyper,
    ctx: &StepContext,
    level: SimdLevel,
) {
    step::<K>(&group_of(bufs), h, ctx, level).unwrap();
}

/// Runs `steps` float32 steps of `K` at `level` from fixed initial data.
pub fn run_f32<K: Elementwise>(
    lens: &[usize],
    h: &K::Hyper,
    state_init: f64,
    scalar_init: &[f64],
    steps: u64,
    level: SimdLevel,
) -> Vec<Buffers<f32>> {
    let num_states = K::state_keys(h).len();
    let mut bufs = buffers::<f32, f32>(lens, num_states, state_init, scalar_init);
    for s in 1..=steps {
        set_grads(&mut bufs, s);
        let ctx = StepContext {
            fresh: s == 1,
            ..StepContext::default()
        };
        step_with::<K, _, _>(&mut bufs, h, &ctx, level);
    }
    bufs
}

/// Asserts that every supported SIMD level and several thread counts give
/// bitwise-identical params, states and scalar state.
pub fn assert_bitwise_everywhere<K: Elementwise>(
    h: &K::Hyper,
    state_init: f64,
    scalar_init: &[f64],
) {
    let lens = [3, 64, 100, 4099, 70_001, 64 * 1024 + 5];
    let run = |level| run_f32::<K>(&lens, h, state_init, scalar_init, 4, level);
    let want = run(SimdLevel::Scalar);
    let mut runs = Vec::new();
    for level in SimdLevel::supported() {
        runs.push((format!("{level}"), run(level)));
    }
    for threads in [1, 3] {
        crate::parallel::set_num_threads(threads).unwrap();
        runs.push((format!("{threads} threads"), run(SimdLevel::detect())));
    }
    crate::parallel::set_num_threads(2).unwrap();
    for (what, got) in runs {
        for (a, b) in got.iter().zip(want.iter()) {
            assert_eq!(a.p, b.p, "{what}: params differ ({h:?})");
            assert_eq!(a.states, b.states, "{what}: states differ ({h:?})");
            assert_eq!(a.scalars, b.scalars, "{what}: scalar state differs ({h:?})");
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

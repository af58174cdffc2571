//! Raw engine throughput, without Python: `cargo bench --bench engine`.
//!
//! Prints the median step time and effective bandwidth of the Adam kernel for
//! the benchmark shapes, per SIMD level and thread count. The comparisons
//! against torch live in `benches/test_*.py`.

use std::time::Instant;

use _core::engine::elementwise::step;
use _core::engine::{Buffer, Format, Group, ScalarSlot, StepContext, TensorBuffers};
use _core::kernels::adam::{Adam, AdamHyper};
use _core::kernels::clip::{tensor_norms, NormType};
use _core::kernels::probe::{ProbeHyper, StreamProbe};
use _core::parallel::set_num_threads;
use _core::simd::SimdLevel;

struct Tensor {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: f32,
}

fn make(lens: &[usize]) -> Vec<Tensor> {
    lens.iter()
        .map(|&n| Tensor {
            p: (0..n).map(|i| (i % 97) as f32 * 0.01).collect(),
            g: (0..n).map(|i| (i % 89) as f32 * 0.001 - 0.04).collect(),
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0.0,
        })
        .collect()
}

fn group(tensors: &mut [Tensor]) -> Group<'_> {
    let buffers = tensors
        .iter_mut()
        .map(|t| {
            let f32_buffer = |addr: usize| Buffer::new(addr, Format::F32);
            TensorBuffers::param(
                t.p.len(),
                f32_buffer(t.p.as_mut_ptr() as usize),
                Some(f32_buffer(t.g.as_ptr() as usize)),
            )
            .with_states(&[
                f32_buffer(t.m.as_mut_ptr() as usize),
                f32_buffer(t.v.as_mut_ptr() as usize),
            ])
            .with_scalars(&[ScalarSlot {
                addr: &mut t.step as *mut f32 as usize,
                format: Format::F32,
            }])
        })
        .collect();
    // SAFETY: every address points into `tensors`, borrowed mutably for the group's life.
    unsafe { Group::new(buffers) }.expect("valid buffers")
}

fn median_seconds(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            if std::env::var("GAP").is_ok() {
                let t = Instant::now();
                while t.elapsed().as_micros() < 500 {}
            }
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn main() {
    let hyper = AdamHyper {
        weight_decay: 0.01,
        decoupled_weight_decay: true,
        ..AdamHyper::default()
    };
    let cases: Vec<(&str, Vec<usize>)> = vec![
        ("1000 x 1024", vec![1024; 1000]),
        ("16", vec![16]),
        ("32M", vec![32 << 20]),
    ];
    for (name, lens) in cases {
        let elements: usize = lens.iter().sum();
        let mut tensors = make(&lens);
        let reps = if elements > 10_000_000 { 15 } else { 200 };
        for threads in [1, 2] {
            set_num_threads(threads).unwrap();
            for level in SimdLevel::supported() {
                let seconds = median_seconds(
                    || {
                        let g = group(&mut tensors);
                        step::<Adam>(&g, &hyper, &StepContext::default(), level).unwrap();
                    },
                    reps,
                );
                let norm = median_seconds(
                    || {
                        tensor_norms(&group(&mut tensors), NormType::Two, 1.0, level);
                    },
                    reps,
                );
                println!(
                    "{name:>12} threads={threads} {level:>7}: l2 norm {:>9.1} us {:>6.1} GB/s",
                    norm * 1e6,
                    4.0 * elements as f64 / norm / 1e9,
                );
                let probe = median_seconds(
                    || {
                        let g = group(&mut tensors);
                        step::<StreamProbe>(&g, &ProbeHyper {}, &StepContext::default(), level)
                            .unwrap();
                    },
                    reps,
                );
                println!(
                    "{name:>12} threads={threads} {level:>7}: adam {:>9.1} us {:>6.1} GB/s | probe {:>9.1} us {:>6.1} GB/s",
                    seconds * 1e6,
                    28.0 * elements as f64 / seconds / 1e9,
                    probe * 1e6,
                    28.0 * elements as f64 / probe / 1e9,
                );
            }
        }
    }
}

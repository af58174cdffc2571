//! Python-free optimizer kernels, one file per optimizer: its hyperparameter
//! record (read by name), its per-step constants and its per-element update,
//! as an [`Elementwise`](crate::engine::Elementwise) implementation. The
//! engine owns everything else (loops, formats, SIMD dispatch, gradient
//! preparation, step counters). `adam.rs` is the model to copy.
//!
//! Each kernel rounds where torch's CPU kernels round, as measured element by
//! element against torch 2.15: `add(alpha=)`, `lerp` and the last
//! multiply-add of `addcmul` are single fused multiply-adds (torch's vectorised
//! loops are compiled with FMA contraction), while `mul`, `div` and `addcdiv`
//! round each operation. torch's vectorised float32 `sqrt` is not always
//! correctly rounded (about 0.7% of values are off by one ulp); ours is, so
//! the last bit can differ there.
//!
//! [`registry!`] below turns every kernel into an entry point: adding an
//! optimizer is its file plus one line there.

pub mod adadelta;
pub mod adafactor;
pub mod adagrad;
pub mod adam;
pub mod adamax;
pub mod adan;
pub mod ademamix;
pub mod asgd;
pub mod clip;
pub mod lamb;
pub mod lars;
pub mod lbfgs;
pub mod lion;
pub mod muon;
pub mod nadam;
pub mod probe;
pub mod radam;
pub mod registry;
pub mod rmsprop;
pub mod rprop;
pub mod schedulefree;
pub mod sgd;
pub mod sparse_adam;
#[cfg(test)]
pub(crate) mod testing;

pub use crate::engine::{Real, Storage};

/// `torch.lerp(start, end, weight)` as torch's vectorised CPU kernel computes
/// it: `start + weight * (end - start)` for small weights and
/// `end - (1 - weight) * (end - start)` otherwise, each with one fused
/// multiply-add. The choice depends only on the scalar weight, so it is made
/// once per call ([`Lerp::new`]), not per element.
#[derive(Clone, Copy, Debug)]
pub struct Lerp<C> {
    coefficient: C,
    from_start: bool,
}

impl<C: Real> Lerp<C> {
    pub fn new(weight: f64) -> Self {
        let weight = C::from_f64(weight);
        let from_start = weight.abs() < C::from_f64(0.5);
        Lerp {
            coefficient: if from_start { weight } else { weight - C::ONE },
            from_start,
        }
    }

    #[inline(always)]
    pub fn apply(self, start: C, end: C) -> C {
        let base = if self.from_start { start } else { end };
        self.coefficient.mul_add(end - start, base)
    }
}

/// `average.mul_(decay).addcmul_(x, x, value=1 - decay)` on a bfloat16/float16
/// tensor, as torch's CPU kernels compute it: the product rounded to the
/// tensor's dtype, then `(value * x) * x + product` fused and rounded. The
/// square averages of Adam, RMSprop, Adadelta and their kin in their
/// `update_rounded`.
#[inline(always)]
pub fn rounded_square_average<C: Real>(
    average: C,
    decay: C,
    one_minus_decay: C,
    x: C,
    round: impl Fn(C) -> C,
) -> C {
    round((one_minus_decay * x).mul_add(x, round(average * decay)))
}

/// How far ahead of the current block the streaming passes (norms, the
/// finiteness scan, in-place scaling) prefetch. A core reading one stream
/// with nothing but the hardware prefetchers keeps too few cache-line fills in
/// flight: measured on this project's 2-core Xeon, 18 GB/s for a plain read
/// against 31-35 GB/s with a prefetch 4-16 KiB ahead. (The update kernels read
/// and write several streams at once and already run near the streaming floor
/// without it.)
const PREFETCH_BYTES: usize = 8 * 1024;

/// Hints every cache line of `block`, `PREFETCH_BYTES` further on, into cache.
#[inline(always)]
pub(crate) fn prefetch_ahead<B>(block: &B) {
    let start = (block as *const B).cast::<u8>();
    for offset in (0..std::mem::size_of::<B>()).step_by(64) {
        // `wrapping_add`: the address may lie past the slice (see `prefetch`).
        crate::simd::prefetch(start.wrapping_add(PREFETCH_BYTES + offset));
    }
}

/// How many blocks each of the two streams of `two_streams` gets: half of
/// those whose prefetch target still lies inside the slice (prefetching past
/// the end would fetch lines nobody reads, a whole tensor's worth for small
/// ones).
#[inline(always)]
fn stream_len<B>(blocks: usize) -> usize {
    let ahead = PREFETCH_BYTES.div_ceil(std::mem::size_of::<B>().max(1));
    blocks.saturating_sub(ahead) / 2
}

/// Splits `blocks` into two equal streams to read side by side, prefetching
/// (`first[i]` with `second[i]`), and the rest to read plainly. Two streams per
/// core keep more line fills in flight than one, even with prefetching: on this
/// project's 2-core Xeon a read-only pass over 128 MiB went from 33-35 GB/s
/// (prefetch alone) to 42-45 GB/s.
#[inline(always)]
pub(crate) fn two_streams<B>(blocks: &[B]) -> (&[B], &[B], &[B]) {
    let half = stream_len::<B>(blocks.len());
    let (first, rest) = blocks.split_at(half);
    let (second, rest) = rest.split_at(half);
    (first, second, rest)
}

/// `two_streams` for a pass that writes.
#[inline(always)]
pub(crate) fn two_streams_mut<B>(blocks: &mut [B]) -> (&mut [B], &mut [B], &mut [B]) {
    let half = stream_len::<B>(blocks.len());
    let (first, rest) = blocks.split_at_mut(half);
    let (second, rest) = rest.split_at_mut(half);
    (first, second, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lerp_uses_both_branches() {
        let small = Lerp::<f64>::new(0.1);
        assert_eq!(small.apply(1.0, 2.0), 1.1);
        let large = Lerp::<f64>::new(0.75);
        assert_eq!(large.apply(0.0, 4.0), 3.0);
        assert_eq!(Lerp::<f32>::new(1.0).apply(3.0, 5.0), 5.0);
    }
}

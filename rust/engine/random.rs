//! The counter-based generator behind stochastic rounding.
//!
//! Every random number is a pure function of (the group's per-step key, the
//! tensor's stream, the buffer, the element's index), never of thread-local
//! state: a step gives the same bits for any thread count, chunking and SIMD
//! level, and is reproducible from the optimizer's seed. The per-step key is
//! computed by the Python layer (`ferroptim._lowp.step_key`) from the seed,
//! the group's index and its step counter; everything below it is here, and
//! mirrored bit for bit by the torch-op implementation in `_lowp.py`.

/// splitmix64's increment (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64: one step of the generator, a bijective 64-bit mix of `x`.
#[inline(always)]
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Chris Wellons' `lowbias32`: a bijective 32-bit mix with low bias, cheap
/// enough to run per element in the vectorised loop (two multiplies).
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The word number of a parameter's own store (after the state buffers'
/// words: one per pair of them).
pub const PARAM_STREAM: u64 = 15;

/// The 32-bit key of one buffer's elements `high << 32 .. (high + 1) << 32`
/// of the tensor with stream `stream` in a step keyed `step_key`.
#[inline]
pub fn block_key(step_key: u64, stream: u64, buffer: u64, high: u64) -> u32 {
    mix64(mix64(step_key ^ mix64(stream)) ^ ((high << 4) | buffer)) as u32
}

/// The random bits of the element whose index in its tensor has low 32 bits
/// `index`, under its block's key.
#[inline(always)]
pub fn bits(index: u32, key: u32) -> u32 {
    mix32(index ^ key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixers_match_their_published_values() {
        // splitmix64 seeded with 0: its first output.
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
        // lowbias32(1), from the published constants.
        let mut x: u32 = 1;
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846ca68b);
        x ^= x >> 16;
        assert_eq!(mix32(1), x);
        assert_ne!(mix32(1), mix32(2));
    }

    #[test]
    fn bits_are_roughly_uniform_per_bit() {
        let key = block_key(7, 3, 0, 0);
        let n = 1 << 16;
        let mut ones = [0u32; 32];
        for i in 0..n {
            let b = bits(i, key);
            for (bit, count) in ones.iter_mut().enumerate() {
                *count += (b >> bit) & 1;
            }
        }
        for count in ones {
            let p = f64::from(count) / f64::from(n);
            assert!((p - 0.5).abs() < 0.01, "bit frequency {p}");
        }
    }

    #[test]
    fn keys_differ_by_stream_buffer_and_block() {
        let base = block_key(1, 2, 0, 0);
        assert_ne!(base, block_key(1, 3, 0, 0));
        assert_ne!(base, block_key(1, 2, 1, 0));
        assert_ne!(base, block_key(1, 2, 0, 1));
        assert_ne!(base, block_key(2, 2, 0, 0));
    }
}

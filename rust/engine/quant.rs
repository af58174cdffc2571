//! 8-bit blockwise storage of optimizer states: one `u8` code per element and
//! one float32 scale (the block's absolute maximum) per block of
//! [`Q8_BLOCK`] elements, with bitsandbytes' dynamic quantisation maps, so
//! codes and scales mean what bitsandbytes' blockwise 8-bit optimizers' do.
//!
//! A quantised buffer is packed in one allocation: the `n` codes, zero padding
//! to a multiple of 4 bytes, then the `ceil(n / 256)` scales
//! ([`packed_len`]). Quantising a block:
//!
//! * `absmax = max |x|` (NaN propagates, like `torch.amax`);
//! * `v = x * (1 / absmax)` in float32, `1 / absmax` taken as 0 for an absmax below
//!   the smallest normal float32 (an all-zero block codes as zeros, not NaN);
//! * the code is the number of midpoints `(map[j] + map[j + 1]) / 2` (float32)
//!   below `v`: the nearest map value, a tie to the lower one (bitsandbytes'
//!   torch backend of `quantize_blockwise` bit for bit; a NaN `v` codes 0).
//!
//! Dequantising is `map[code] * absmax` in float32. `ferroptim/_q8.py` is the
//! same arithmetic in torch ops, which the tests hold this file to bit for bit.

use std::sync::OnceLock;

use super::format::Q8_BLOCK;
use crate::simd::SimdLevel;

/// Bytes of a packed quantised buffer of `n` elements.
pub const fn packed_len(n: usize) -> usize {
    n.next_multiple_of(4) + 4 * n.div_ceil(Q8_BLOCK)
}

/// Byte offset of the scales in a packed buffer of `n` elements.
pub const fn scales_offset(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// A quantisation map with its lookup table.
pub struct QMap {
    values: [f32; 256],
    /// For each value of a float32's top 16 bits (a bucket), packed in a `u32`:
    /// bits 0..8, how many midpoints `(values[j] + values[j + 1]) / 2` lie
    /// below the bucket's smallest float32 (0 for NaN); bits 8..24, the low 16
    /// bits of the one midpoint inside the bucket, in the bucket's order
    /// (complemented for a negative bucket, where a larger pattern is a
    /// smaller value), or 0xffff when none is: the code of `v` is the first
    /// count plus one when `v`'s ordered low bits exceed the threshold. One
    /// load (a gather in SIMD) per value, exact for every float32 (the maps'
    /// midpoints are more than a bucket apart, checked in [`QMap::new`]).
    buckets: Box<[u32; BUCKETS]>,
}

/// One bucket per value of a float32's top 16 bits.
const BUCKETS: usize = 1 << 16;

/// `x`'s low 16 bits in its bucket's order (see [`QMap::buckets`]).
#[inline(always)]
fn ordered_low_bits(bits: u32) -> u32 {
    (bits & 0xffff) ^ ((bits >> 31).wrapping_neg() & 0xffff)
}

impl QMap {
    fn new(bits: &[u32; 256]) -> QMap {
        let values = bits.map(f32::from_bits);
        let midpoints: Vec<f32> = values.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        // (NaN compares false: a NaN bound counts no midpoint)
        let count_below = |x: f32| midpoints.partition_point(|&m| m < x);
        let buckets = (0..=u16::MAX)
            .map(|key| {
                let key = u32::from(key) << 16;
                let negative = key & 0x8000_0000 != 0;
                let smallest = f32::from_bits(if negative { key | 0xffff } else { key });
                let largest = f32::from_bits(if negative { key } else { key | 0xffff });
                let first = count_below(smallest);
                // (NaN patterns follow +inf in its bucket: count none there)
                let inside = count_below(largest).saturating_sub(first);
                assert!(inside <= 1, "two midpoints in the bucket of {smallest:e}");
                let threshold = if inside == 1 {
                    ordered_low_bits(midpoints[first].to_bits())
                } else {
                    0xffff
                };
                first as u32 | threshold << 8
            })
            .collect::<Box<[u32]>>()
            .try_into()
            .expect("one bucket per 16-bit key");
        QMap { values, buckets }
    }

    pub fn values(&self) -> &[f32; 256] {
        &self.values
    }

    /// The code of a normalised value (see the module docs).
    #[inline(always)]
    pub fn encode(&self, v: f32) -> u8 {
        let bits = v.to_bits();
        let bucket = self.buckets[usize::from((bits >> 16) as u16)];
        (bucket as u8) + u8::from(ordered_low_bits(bits) > bucket >> 8)
    }

    /// Quantises one block: writes the codes of `values` and returns its scale.
    /// `level` picks the encoder (all give the same codes); it must be one
    /// this CPU supports, else the portable encoder runs.
    #[inline(always)]
    pub fn quantize_block(&self, level: SimdLevel, values: &[f32], codes: &mut [u8]) -> f32 {
        // The largest magnitude by bit pattern: ordered as the values are, and a
        // NaN's pattern exceeds infinity's, so a NaN wins as in `torch.amax`
        // (and the loop vectorises).
        let bits = values
            .iter()
            .fold(0u32, |a, &x| a.max(x.to_bits() & 0x7fff_ffff));
        let absmax = f32::from_bits(bits);
        // (`!(absmax >= MIN_POSITIVE)` would code a NaN block as zeros; NaN
        // must give NaN: it fails this comparison and keeps `1 / NaN`)
        let inv = if absmax < f32::MIN_POSITIVE {
            0.0
        } else {
            1.0 / absmax
        };
        let codes = &mut codes[..values.len()];
        let done = match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 if level.is_supported() => {
                // SAFETY: the CPU has the features (checked just above).
                unsafe { self.encode_avx512(values, inv, codes) }
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 if level.is_supported() => {
                // SAFETY: the CPU has the features (checked just above).
                unsafe { self.encode_avx2(values, inv, codes) }
            }
            _ => 0,
        };
        for (code, &x) in codes[done..].iter_mut().zip(&values[done..]) {
            *code = self.encode(x * inv);
        }
        absmax
    }

    /// Codes the leading multiple of 16 of `values` (scaled by `inv`) 16 at a
    /// time, one gather each; returns how many it coded.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
    fn encode_avx512(&self, values: &[f32], inv: f32, codes: &mut [u8]) -> usize {
        use std::arch::x86_64::*;
        let inv = _mm512_set1_ps(inv);
        let low16 = _mm512_set1_epi32(0xffff);
        let low8 = _mm512_set1_epi32(0xff);
        let one = _mm512_set1_epi32(1);
        let mut done = 0;
        for (chunk, out) in values.chunks_exact(16).zip(codes.chunks_exact_mut(16)) {
            // SAFETY: `chunk` holds 16 floats and `out` 16 bytes (unaligned
            // accesses); the gather reads `buckets[key]` for keys below 2^16,
            // all inside the 2^16-entry table.
            unsafe {
                let v = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(chunk.as_ptr()), inv));
                let key = _mm512_srli_epi32::<16>(v);
                let bucket = _mm512_i32gather_epi32::<4>(key, self.buckets.as_ptr().cast());
                let flip = _mm512_srli_epi32::<16>(_mm512_srai_epi32::<31>(v));
                let low = _mm512_xor_si512(_mm512_and_si512(v, low16), flip);
                let above = _mm512_cmpgt_epu32_mask(low, _mm512_srli_epi32::<8>(bucket));
                let first = _mm512_and_si512(bucket, low8);
                let code = _mm512_mask_add_epi32(first, above, first, one);
                _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(code));
            }
            done += 16;
        }
        done
    }

    /// [`QMap::encode_avx512`] 8 at a time with AVX2, the 8 table loads scalar: on
    /// AMD Zen 3 (AVX2, no AVX-512) `vpgatherdd` made the encoder ~1.1 ns/element and
    /// eight plain loads ~0.7 (a 64K-element microbenchmark, medians).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn encode_avx2(&self, values: &[f32], inv: f32, codes: &mut [u8]) -> usize {
        use std::arch::x86_64::*;
        let inv = _mm256_set1_ps(inv);
        let low16 = _mm256_set1_epi32(0xffff);
        let low8 = _mm256_set1_epi32(0xff);
        let mut done = 0;
        for (chunk, out) in values.chunks_exact(8).zip(codes.chunks_exact_mut(8)) {
            let mut keys = [0u32; 8];
            // SAFETY: `chunk` holds 8 floats and `keys` 8 u32s (unaligned accesses).
            let v = unsafe {
                let v = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), inv));
                _mm256_storeu_si256(keys.as_mut_ptr().cast(), _mm256_srli_epi32::<16>(v));
                v
            };
            let buckets = keys.map(|key| self.buckets[usize::from(key as u16)]);
            // SAFETY: `buckets` holds 8 u32s (an unaligned load).
            let packed = unsafe {
                let bucket = _mm256_loadu_si256(buckets.as_ptr().cast());
                let flip = _mm256_srli_epi32::<16>(_mm256_srai_epi32::<31>(v));
                let low = _mm256_xor_si256(_mm256_and_si256(v, low16), flip);
                // (both sides below 2^16: the signed comparison is the unsigned one)
                let above = _mm256_cmpgt_epi32(low, _mm256_srli_epi32::<8>(bucket));
                let code = _mm256_sub_epi32(_mm256_and_si256(bucket, low8), above);
                let words = _mm256_packus_epi32(code, code);
                let bytes = _mm256_packus_epi16(words, words);
                let low_half = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes)) as u32;
                let high_half = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(bytes)) as u32;
                u64::from(low_half) | u64::from(high_half) << 32
            };
            out.copy_from_slice(&packed.to_le_bytes());
            done += 8;
        }
        done
    }

    /// Dequantises one block of codes with its scale into `out`.
    #[inline(always)]
    pub fn dequantize_block(&self, codes: &[u8], scale: f32, out: &mut [f32]) {
        let out = &mut out[..codes.len()];
        // Eight codes per 64-bit load: the byte-at-a-time loop compiled to reloads
        // of its pointers between the table loads (measured ~15% slower, Zen 3).
        let mut words = codes.chunks_exact(8);
        let mut outs = out.chunks_exact_mut(8);
        for (word, values) in (&mut words).zip(&mut outs) {
            let word = u64::from_le_bytes(word.try_into().expect("8 codes"));
            for (k, value) in values.iter_mut().enumerate() {
                *value = self.values[usize::from((word >> (8 * k)) as u8)] * scale;
            }
        }
        for (value, &code) in outs.into_remainder().iter_mut().zip(words.remainder()) {
            *value = self.values[usize::from(code)] * scale;
        }
    }

    /// Quantises `values` (whole blocks and a ragged last one) into `codes`
    /// and `scales`.
    pub fn quantize(&self, level: SimdLevel, values: &[f32], codes: &mut [u8], scales: &mut [f32]) {
        for ((block, out), scale) in values
            .chunks(Q8_BLOCK)
            .zip(codes.chunks_mut(Q8_BLOCK))
            .zip(scales.iter_mut())
        {
            *scale = self.quantize_block(level, block, out);
        }
    }

    /// Dequantises `codes` with their block `scales` into `out`.
    pub fn dequantize(&self, codes: &[u8], scales: &[f32], out: &mut [f32]) {
        for ((block, out), &scale) in codes
            .chunks(Q8_BLOCK)
            .zip(out.chunks_mut(Q8_BLOCK))
            .zip(scales)
        {
            self.dequantize_block(block, scale, out);
        }
    }
}

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`, first
/// moments), as float32 bit patterns, ascending.
pub fn signed() -> &'static QMap {
    static MAP: OnceLock<QMap> = OnceLock::new();
    MAP.get_or_init(|| QMap::new(&SIGNED_MAP))
}

/// bitsandbytes' unsigned dynamic map (`create_dynamic_map(signed=False)`,
/// second moments).
pub fn unsigned() -> &'static QMap {
    static MAP: OnceLock<QMap> = OnceLock::new();
    MAP.get_or_init(|| QMap::new(&UNSIGNED_MAP))
}

const SIGNED_MAP: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];
const UNSIGNED_MAP: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest map value by a plain scan, ties to the lower: what the
    /// lookup table must reproduce.
    fn encode_by_scan(map: &QMap, v: f32) -> u8 {
        let m = map.values();
        let mut best = 0;
        for j in 1..256 {
            let mid = (m[j - 1] + m[j]) / 2.0;
            if mid < v {
                best = j;
            }
        }
        best as u8
    }

    #[test]
    fn maps_are_bitsandbytes_dynamic_maps() {
        for map in [signed(), unsigned()] {
            let m = map.values();
            assert!(m.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
            assert_eq!(m[255], 1.0);
            assert!(m.contains(&0.0));
        }
        assert_eq!(signed().values()[0], -0.992_968_75);
        assert_eq!(unsigned().values()[0], 0.0);
    }

    #[test]
    fn the_lookup_table_agrees_with_a_scan() {
        for map in [signed(), unsigned()] {
            // Every map value, its neighbours, midpoints and values outside [-1, 1].
            let mut probes = vec![
                -2.0f32,
                -1.0,
                -0.0,
                0.0,
                1.0,
                1.000_000_1,
                3.0,
                1e-30,
                -1e-30,
            ];
            for w in map.values().windows(2) {
                let mid = (w[0] + w[1]) * 0.5;
                for x in [w[0], w[1], mid] {
                    probes.extend([x, f32::from_bits(x.to_bits() + 1)]);
                    if x != 0.0 {
                        probes.push(f32::from_bits(x.to_bits() - 1));
                    }
                }
            }
            // And a sweep over float32 bit patterns.
            probes.extend((0..1u32 << 20).map(|i| f32::from_bits(i.wrapping_mul(4099))));
            for v in probes.into_iter().filter(|v| !v.is_nan()) {
                assert_eq!(map.encode(v), encode_by_scan(map, v), "v = {v:e}");
            }
        }
    }

    /// Every level's block encoder against the scan, on blocks whose scale is
    /// exactly 1 (so the codes are those of the values themselves): a sweep
    /// over float32 patterns in [-1, 1], ragged lengths included.
    #[test]
    fn every_level_encodes_blocks_as_the_scan_does() {
        for map in [signed(), unsigned()] {
            let mut probes: Vec<f32> = (0..1u32 << 22)
                .map(|i| f32::from_bits(i.wrapping_mul(1021)))
                .filter(|v| v.abs() <= 1.0)
                .collect();
            for w in map.values().windows(2) {
                let mid = (w[0] + w[1]) * 0.5;
                probes.extend([mid, f32::from_bits(mid.to_bits() + 1), -mid, w[0]]);
            }
            for level in SimdLevel::supported() {
                let mut codes = [0u8; Q8_BLOCK];
                for (i, block) in probes.chunks(Q8_BLOCK - 1).enumerate() {
                    // a ragged length, then 1.0 so the block's scale is 1
                    let block = &block[..block.len().saturating_sub(i % 23)];
                    let values: Vec<f32> = block.iter().copied().chain([1.0]).collect();
                    let scale = map.quantize_block(level, &values, &mut codes);
                    assert_eq!(scale, 1.0);
                    for (&v, &code) in values.iter().zip(&codes) {
                        assert_eq!(code, encode_by_scan(map, v), "{level}: v = {v:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_round_trip_within_half_a_gap() {
        let values: Vec<f32> = (0..700)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut codes = vec![0u8; 700];
        let mut scales = vec![0f32; 3];
        let map = signed();
        map.quantize(SimdLevel::detect(), &values, &mut codes, &mut scales);
        let mut back = vec![0f32; 700];
        map.dequantize(&codes, &scales, &mut back);
        for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
            let scale = scales[i / Q8_BLOCK];
            assert!((x - y).abs() <= scale * 0.02, "{x} {y}");
        }
        // The block maximum is represented exactly (code of 1.0 or -1.0's neighbour).
        assert_eq!(
            scales[2],
            values[512..].iter().fold(0f32, |a, x| a.max(x.abs()))
        );
        // An all-zero (or subnormal) block keeps zeros; a NaN gives a NaN scale.
        let mut zero_codes = [7u8; 4];
        assert_eq!(
            map.quantize_block(SimdLevel::Scalar, &[0.0; 4], &mut zero_codes),
            0.0
        );
        assert!(zero_codes
            .iter()
            .all(|&c| map.values()[usize::from(c)] == 0.0));
        let tiny = [1e-40f32, -1e-40, 0.0, 0.0];
        map.quantize_block(SimdLevel::Scalar, &tiny, &mut zero_codes);
        assert!(zero_codes
            .iter()
            .all(|&c| map.values()[usize::from(c)] == 0.0));
        assert!(map
            .quantize_block(SimdLevel::Scalar, &[1.0, f32::NAN], &mut zero_codes)
            .is_nan());
        assert_eq!(packed_len(0), 0);
        assert_eq!(packed_len(1), 8);
        assert_eq!(packed_len(257), 260 + 8);
    }
}

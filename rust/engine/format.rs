//! Storage formats of buffers and the arithmetic types kernels compute in.
//!
//! Every buffer of a tensor carries its own [`Format`]; its elements are
//! loaded into the tensor's compute type (float32 for float32, bfloat16 and
//! float16 storage, float64 for float64) and stored back narrowed (round to
//! nearest even) inside the same single pass. Kernels are written once over
//! [`Real`] and see only compute values.

use std::ops::{Add, Div, Mul, Neg, Sub};

use half::{bf16, f16};

/// How a buffer's elements are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F64,
    BF16,
    F16,
    /// 8-bit blockwise with bitsandbytes' signed dynamic map (first moments):
    /// one `u8` code per element and one float32 scale per block of
    /// [`Q8_BLOCK`] elements, packed in one buffer (see [`super::quant`]).
    /// Chunks of a tensor holding such a buffer are cut on block boundaries.
    Q8Signed,
    /// As [`Format::Q8Signed`] with the unsigned map (second moments).
    Q8Unsigned,
}

/// Elements per scale of the 8-bit blockwise formats.
pub const Q8_BLOCK: usize = 256;

/// The type a tensor's arithmetic runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compute {
    F32,
    F64,
}

impl Format {
    /// Bytes per element (the codes, for blockwise formats).
    pub fn size(self) -> usize {
        match self {
            Format::F64 => 8,
            Format::F32 => 4,
            Format::BF16 | Format::F16 => 2,
            Format::Q8Signed | Format::Q8Unsigned => 1,
        }
    }

    /// Alignment in bytes the buffer's address needs (blockwise formats: their
    /// float32 scales').
    pub fn align(self) -> usize {
        match self {
            Format::Q8Signed | Format::Q8Unsigned => 4,
            other => other.size(),
        }
    }

    /// Whether this is an 8-bit blockwise format.
    pub fn is_quantized(self) -> bool {
        matches!(self, Format::Q8Signed | Format::Q8Unsigned)
    }

    /// torch's name of the dtype (the codes' dtype for blockwise formats).
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "float32",
            Format::F64 => "float64",
            Format::BF16 => "bfloat16",
            Format::F16 => "float16",
            Format::Q8Signed => "uint8 (8-bit blockwise, signed map)",
            Format::Q8Unsigned => "uint8 (8-bit blockwise, unsigned map)",
        }
    }

    pub fn compute(self) -> Compute {
        match self {
            Format::F64 => Compute::F64,
            _ => Compute::F32,
        }
    }

    /// Elements per block that chunk cuts must respect (1: any cut).
    pub fn block(self) -> usize {
        match self {
            Format::Q8Signed | Format::Q8Unsigned => Q8_BLOCK,
            _ => 1,
        }
    }
}

/// The arithmetic type a kernel computes in.
///
/// Every operation is correctly rounded IEEE arithmetic, so a kernel gives the
/// same bits at every SIMD level and on every chunking of its input.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const COMPUTE: Compute;
    /// Rounds a float64 scalar to this type (how torch turns a Python float
    /// hyperparameter into the tensor's dtype).
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `self * a + b` with a single rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
    fn is_finite(self) -> bool;
    /// `torch.maximum`: the larger value, NaN if either is NaN.
    #[inline(always)]
    fn max_propagate_nan(self, other: Self) -> Self {
        if self.is_nan() || self > other {
            self
        } else {
            other
        }
    }
}

macro_rules! impl_real {
    ($t:ty, $compute:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const COMPUTE: Compute = $compute;
            #[inline(always)]
            fn from_f64(value: f64) -> Self {
                value as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}

impl_real!(f32, Compute::F32);
impl_real!(f64, Compute::F64);

/// An element type a buffer can be viewed as: how it loads into its compute
/// type and how a compute value is stored back.
pub trait Storage: Copy + Send + Sync + 'static {
    type Compute: Real;
    const FORMAT: Format;
    fn load(self) -> Self::Compute;
    fn store(value: Self::Compute) -> Self;
    /// Stores `value` rounded stochastically with the uniform random `bits`:
    /// up to the next representable magnitude with probability equal to the
    /// fraction of the gap `value` covers (unbiased), else down; NaN stays
    /// NaN, infinities stay. Formats that hold the compute type exactly store
    /// it unchanged.
    #[inline(always)]
    fn store_stochastic(value: Self::Compute, bits: u32) -> Self {
        let _ = bits;
        Self::store(value)
    }
    /// `value` rounded to nearest in this format and widened back: what a tensor op
    /// on this format stores (torch's for-loop on 16-bit params rounds every op).
    #[inline(always)]
    fn round(value: Self::Compute) -> Self::Compute {
        Self::store(value).load()
    }
}

macro_rules! impl_identity_storage {
    ($t:ty, $format:expr) => {
        impl Storage for $t {
            type Compute = $t;
            const FORMAT: Format = $format;
            #[inline(always)]
            fn load(self) -> $t {
                self
            }
            #[inline(always)]
            fn store(value: $t) -> $t {
                value
            }
        }
    };
}

impl_identity_storage!(f32, Format::F32);
impl_identity_storage!(f64, Format::F64);

/// bfloat16: widened exactly, narrowed with round to nearest even (what
/// torch's `c10::BFloat16` conversion does; NaN stays NaN).
impl Storage for bf16 {
    type Compute = f32;
    const FORMAT: Format = Format::BF16;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(value: f32) -> bf16 {
        bf16::from_f32(value)
    }
    /// Round to nearest even on the bit pattern, branch-free so the loops vectorise:
    /// the dropped 16 bits plus 0x7fff and the kept lowest bit carry into the kept
    /// ones (a carry out of the largest finite value gives infinity); NaN becomes
    /// torch's quiet NaN (0x7FC0).
    #[inline(always)]
    fn round(value: f32) -> f32 {
        let bits = value.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
        f32::from_bits(if value.is_nan() { 0x7fc0_0000 } else { rounded })
    }
    /// The magnitude's dropped 16 bits plus 16 random bits carry into the kept
    /// ones with probability (dropped bits) / 2^16: exactly stochastic rounding
    /// of the magnitude (torchao's and bitsandbytes' bf16 rounding). A carry out
    /// of the largest finite value gives infinity, as round to nearest does for
    /// values that close; NaN becomes torch's quiet NaN (0x7FC0).
    #[inline(always)]
    fn store_stochastic(value: f32, bits: u32) -> bf16 {
        let raised = value.to_bits().wrapping_add(bits & 0xffff);
        let rounded = (raised >> 16) as u16;
        bf16::from_bits(if value.is_nan() { 0x7fc0 } else { rounded })
    }
}

/// float16's bits widened to float32, exactly, with selects only (no branch), so
/// that loops over it vectorise. `half`'s own conversion without the F16C
/// target feature at compile time is a scalar, branchy routine: a float16 loop
/// through it ran ~10x slower than the same loop on bfloat16 (AMD EPYC Zen 3,
/// 8M elements). Subnormals are renormalised by one exact float32 subtraction;
/// NaN keeps its payload.
#[inline(always)]
fn f32_from_f16_bits(h: u16) -> f32 {
    const EXPONENT: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let shifted = (h & 0x7fff) << 13;
    let exponent = shifted & EXPONENT;
    let normal = shifted + ((127 - 15) << 23);
    // infinity, or NaN made quiet (as `half` and F16C's `vcvtph2ps` widen it)
    let quiet = if shifted & 0x007f_e000 != 0 {
        0x0040_0000
    } else {
        0
    };
    let special = (normal + ((128 - 16) << 23)) | quiet;
    // (2^-14 + m * 2^-24) - 2^-14: exact
    let subnormal = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let magnitude = if exponent == EXPONENT {
        special
    } else if exponent == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(magnitude | ((h & 0x8000) << 16))
}

/// float32 narrowed to float16's bits with round to nearest even, with selects
/// only (see [`f32_from_f16_bits`]): the exponent rebiased and the dropped 13
/// bits plus 0xfff and the kept lowest bit carried into the kept ones (a carry
/// out of the largest finite value gives infinity); results below float16's
/// normals are aligned by one float32 addition, which rounds to nearest even
/// itself. NaN becomes the quiet NaN 0x7e00 with its sign, as torch's
/// `c10::Half` conversion makes it.
#[inline(always)]
fn f16_bits_from_f32(value: f32) -> u16 {
    /// 0.5: its exponent puts float16's smallest subnormal at float32's last bit.
    const ALIGN: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let bits = value.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    let huge = if magnitude > 0x7f80_0000 {
        0x7e00
    } else {
        0x7c00
    };
    let subnormal = (f32::from_bits(magnitude) + f32::from_bits(ALIGN))
        .to_bits()
        .wrapping_sub(ALIGN);
    let odd = (magnitude >> 13) & 1;
    let normal = magnitude
        .wrapping_sub((127 - 15) << 23)
        .wrapping_add(0xfff + odd)
        >> 13;
    let narrowed = if magnitude >= (127 + 16) << 23 {
        huge
    } else if magnitude < 113 << 23 {
        subnormal
    } else {
        normal
    };
    (narrowed | ((bits >> 16) & 0x8000)) as u16
}

/// float16: widened exactly, narrowed with round to nearest even (both
/// branch-free: see [`f32_from_f16_bits`]).
impl Storage for f16 {
    type Compute = f32;
    const FORMAT: Format = Format::F16;
    #[inline(always)]
    fn load(self) -> f32 {
        f32_from_f16_bits(self.to_bits())
    }
    #[inline(always)]
    fn store(value: f32) -> f16 {
        f16::from_bits(f16_bits_from_f32(value))
    }
    /// Round to nearest even within float32, cheaper than narrowing and widening
    /// (torch's 16-bit for-loop rounds every op): a normal result keeps 10
    /// fraction bits (the dropped 13 plus 0xfff and the kept lowest bit carry
    /// into the kept ones), a subnormal one is a multiple of 2^-24 (one float32
    /// addition of 0.5, whose ulp that is, rounds it), 65520 and up overflow to
    /// infinity; NaN becomes a quiet NaN with its sign.
    #[inline(always)]
    fn round(value: f32) -> f32 {
        const SMALLEST_NORMAL: u32 = 113 << 23; // 2^-14
        const OVERFLOW: u32 = 0x477f_f000; // 65520: halfway past float16's largest
        let bits = value.to_bits();
        let magnitude = bits & 0x7fff_ffff;
        let normal = (magnitude + 0xfff + ((magnitude >> 13) & 1)) & 0xffff_e000;
        let subnormal = ((f32::from_bits(magnitude) + 0.5) - 0.5).to_bits();
        let rounded = if magnitude > 0x7f80_0000 {
            0x7fc0_0000
        } else if magnitude >= OVERFLOW {
            0x7f80_0000
        } else if magnitude < SMALLEST_NORMAL {
            subnormal
        } else {
            normal
        };
        f32::from_bits(rounded | (bits & 0x8000_0000))
    }
    /// Between the two float16 values around `value` (the gap is a power of
    /// two, so the fraction covered is exact), up with probability equal to
    /// that fraction at 16-bit resolution (the low 16 random bits, as bfloat16
    /// uses). Past the largest finite value it
    /// keeps to the finite side; NaN and infinities round to nearest.
    #[inline(always)]
    fn store_stochastic(value: f32, bits: u32) -> f16 {
        let nearest = Self::store(value);
        if !value.is_finite() || (nearest.is_infinite() && value.abs() >= 65520.0) {
            return nearest;
        }
        // The float16 value next to `value` towards zero, and the one after it.
        let mut toward_zero = nearest;
        if nearest.to_f32().abs() > value.abs() {
            toward_zero = f16::from_bits(nearest.to_bits() - 1);
        }
        let away = f16::from_bits(toward_zero.to_bits() + 1);
        if away.is_infinite() {
            return toward_zero;
        }
        let (low, high) = (toward_zero.to_f32().abs(), away.to_f32().abs());
        let fraction = (value.abs() - low) / (high - low);
        let threshold = (bits & 0xffff) as f32 * (1.0 / 65_536.0);
        if threshold < fraction {
            away
        } else {
            toward_zero
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free bfloat16 `round` is round to nearest even, as `half`'s
    /// conversion (and torch's) is: on every 251st float32 pattern, every tie and
    /// its neighbours, the extremes, infinities and NaN.
    #[test]
    fn bfloat16_round_is_round_to_nearest_even() {
        let mut patterns: Vec<u32> = (0..=u32::MAX / 251).map(|i| i * 251).collect();
        for high in (0..=0xffffu32).step_by(7) {
            let tie = (high << 16) | 0x8000;
            patterns.extend([tie - 1, tie, tie + 1, (high << 16) | 0xffff]);
        }
        patterns.extend([
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            1,
        ]);
        for bits in patterns {
            let x = f32::from_bits(bits);
            let want = bf16::from_f32(x).to_f32();
            let got = <bf16 as Storage>::round(x);
            if x.is_nan() {
                assert!(got.is_nan(), "{bits:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#x}");
            }
        }
    }

    /// The branch-free float16 conversions and `round` are `half`'s (correctly
    /// rounded): widening every float16 pattern; narrowing and rounding the
    /// patterns of [`patterns_for_float16`].
    #[test]
    fn float16_conversions_are_halfs() {
        for h in 0..=u16::MAX {
            let (got, want) = (f32_from_f16_bits(h), f16::from_bits(h).to_f32());
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
        }
        for bits in patterns_for_float16() {
            let x = f32::from_bits(bits);
            let (got, want) = (f16_bits_from_f32(x), f16::from_f32(x));
            let rounded = <f16 as Storage>::round(x);
            if x.is_nan() {
                assert_eq!(got & 0x7e00, 0x7e00, "{bits:#x}");
                assert!(rounded.is_nan(), "{bits:#x}");
            } else {
                assert_eq!(got, want.to_bits(), "{bits:#x}");
                assert_eq!(rounded.to_bits(), want.to_f32().to_bits(), "{bits:#x}");
            }
        }
        assert_eq!(f16_bits_from_f32(f32::NAN), 0x7e00);
    }

    /// Every 251st float32 pattern, every tie between two float16 values
    /// (normal and subnormal, both signs) and its neighbours, the overflow
    /// threshold, infinities and NaN.
    fn patterns_for_float16() -> Vec<u32> {
        let mut patterns: Vec<u32> = (0..=u32::MAX / 251).map(|i| i * 251).collect();
        for h in 0..0x7c00u16 {
            let low = f16::from_bits(h).to_f32() as f64;
            let high = f16::from_bits(h + 1).to_f32() as f64;
            let tie = ((low + high) / 2.0) as f32; // exact: one more bit than float16
            let tie = tie.to_bits();
            for bits in [tie - 1, tie, tie + 1] {
                patterns.extend([bits, bits | 0x8000_0000]);
            }
        }
        let edges = [
            0x477f_efff,
            0x477f_f000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0001,
        ];
        patterns.extend(edges);
        patterns
    }

    #[test]
    fn narrow_formats_round_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bfloat16 values: ties go to even (1.0).
        assert_eq!(bf16::store(1.0 + 2f32.powi(-8)).load(), 1.0);
        // Just above halfway rounds up.
        assert_eq!(
            bf16::store(1.0 + 2f32.powi(-8) + 2f32.powi(-20)).load(),
            1.0 + 2f32.powi(-7)
        );
        assert!(bf16::store(f32::NAN).load().is_nan());
        assert_eq!(f16::store(1.0 + 2f32.powi(-11)).load(), 1.0);
        assert_eq!(f16::store(65520.0).load(), f32::INFINITY);
        for x in [0.0f32, -1.5, 3.0, 1e-3] {
            assert_eq!(bf16::store(x).load(), bf16::from_f32(x).to_f32());
        }
    }

    #[test]
    fn stochastic_rounding_picks_a_neighbour_with_the_right_odds() {
        // 1 + 2^-9 is a quarter of the way from 1.0 to the next bfloat16 (1 + 2^-7).
        let x = 1.0 + 2f32.powi(-9);
        let up = bf16::store_stochastic(x, 0xc000).load();
        let down = bf16::store_stochastic(x, 0xbfff).load();
        assert_eq!((up, down), (1.0 + 2f32.powi(-7), 1.0));
        let ups = (0..1u32 << 16)
            .filter(|&r| bf16::store_stochastic(x, r).load() > 1.0)
            .count();
        assert_eq!(ups, 1 << 14);
        // Negative values round their magnitude the same way.
        assert_eq!(
            bf16::store_stochastic(-x, 0xc000).load(),
            -(1.0 + 2f32.powi(-7))
        );
        // Representable values never move; NaN and infinities stay.
        for r in [0, 0xffff, 0x1234_5678] {
            assert_eq!(bf16::store_stochastic(1.5, r).load(), 1.5);
            assert_eq!(
                bf16::store_stochastic(f32::INFINITY, r).load(),
                f32::INFINITY
            );
            assert_eq!(bf16::store_stochastic(f32::NAN, r).to_bits(), 0x7fc0);
            assert_eq!(f16::store_stochastic(0.5, r).load(), 0.5);
        }
        // float16: a quarter of the way from 1.0 to 1 + 2^-10, and a subnormal.
        let y = 1.0 + 2f32.powi(-12);
        let ups = (0..1u32 << 16)
            .filter(|&r| f16::store_stochastic(y, r).load() > 1.0)
            .count();
        assert_eq!(ups, 1 << 14);
        let tiny = 2f32.powi(-25); // half of float16's smallest subnormal
        let ups = (0..1u32 << 16)
            .filter(|&r| f16::store_stochastic(-tiny, r).load() < 0.0)
            .count();
        assert_eq!(ups, 1 << 15);
        assert_eq!(f16::store_stochastic(65510.0, u32::MAX).load(), 65504.0);
    }

    #[test]
    fn formats_describe_themselves() {
        assert_eq!(Format::BF16.compute(), Compute::F32);
        assert_eq!(Format::F64.compute(), Compute::F64);
        assert_eq!(Format::Q8Unsigned.block(), Q8_BLOCK);
        assert_eq!(Format::Q8Signed.align(), 4);
        assert_eq!(<bf16 as Storage>::FORMAT.size(), 2);
    }

    #[test]
    fn max_propagates_nan_like_torch_maximum() {
        assert!(f32::NAN.max_propagate_nan(1.0).is_nan());
        assert!(1.0f32.max_propagate_nan(f32::NAN).is_nan());
        assert_eq!(2.0f32.max_propagate_nan(1.0), 2.0);
        assert_eq!(1.0f64.max_propagate_nan(2.0), 2.0);
    }
}

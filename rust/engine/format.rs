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
    /// 8-bit blockwise: one `u8` code per element and one float32 scale per
    /// block of [`Q8_BLOCK`] elements (the buffer's `scales` address). Chunks
    /// of a tensor holding such a buffer are cut on block boundaries. Its
    /// load/store (the quantisation map) belongs to the 8-bit issue; until
    /// then plans refuse it.
    Q8Block,
}

/// Elements per scale of [`Format::Q8Block`].
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
            Format::Q8Block => 1,
        }
    }

    /// torch's name of the dtype (the codes' dtype for blockwise formats).
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "float32",
            Format::F64 => "float64",
            Format::BF16 => "bfloat16",
            Format::F16 => "float16",
            Format::Q8Block => "uint8 (8-bit blockwise)",
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
            Format::Q8Block => Q8_BLOCK,
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
}

/// float16: widened exactly, narrowed with round to nearest even.
impl Storage for f16 {
    type Compute = f32;
    const FORMAT: Format = Format::F16;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(value: f32) -> f16 {
        f16::from_f32(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn formats_describe_themselves() {
        assert_eq!(Format::BF16.compute(), Compute::F32);
        assert_eq!(Format::F64.compute(), Compute::F64);
        assert_eq!(Format::Q8Block.block(), Q8_BLOCK);
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

//! Run-time instruction-set dispatch.
//!
//! Kernels are written once as plain Rust over slices and marked
//! `#[inline(always)]`; [`dispatch`] runs them inside a function compiled with
//! the target features of the chosen level, so LLVM vectorises the same source
//! for AVX-512, AVX2+FMA, NEON or plain scalar code.
//!
//! Every level evaluates the same operations in the same order with correctly
//! rounded IEEE arithmetic (fused multiply-add included: the scalar level calls
//! the exact `fma` from libm), so all levels give bitwise-identical results.
//! The level is detected once; `FERROPTIM_SIMD` or [`force_level`] overrides it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// Portable code: no SIMD assumptions beyond the target's baseline.
    Scalar,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 (F, VL, DQ, BW) and FMA.
    Avx512,
    /// AArch64 Advanced SIMD.
    Neon,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Scalar,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
        SimdLevel::Neon,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Neon => "neon",
        }
    }

    /// Whether this CPU can run code compiled for the level.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best level this CPU supports.
    pub fn detect() -> SimdLevel {
        [SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::Neon]
            .into_iter()
            .find(|level| level.is_supported())
            .unwrap_or(SimdLevel::Scalar)
    }

    /// The levels this CPU supports, best first.
    pub fn supported() -> Vec<SimdLevel> {
        let mut levels: Vec<SimdLevel> = [
            SimdLevel::Avx512,
            SimdLevel::Avx2,
            SimdLevel::Neon,
            SimdLevel::Scalar,
        ]
        .into_iter()
        .filter(|level| level.is_supported())
        .collect();
        levels.dedup();
        levels
    }

    fn code(self) -> u8 {
        match self {
            SimdLevel::Scalar => 1,
            SimdLevel::Avx2 => 2,
            SimdLevel::Avx512 => 3,
            SimdLevel::Neon => 4,
        }
    }

    fn from_code(code: u8) -> Option<SimdLevel> {
        SimdLevel::ALL
            .into_iter()
            .find(|level| level.code() == code)
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for a level name that does not exist or that this CPU cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelError(pub String);

impl fmt::Display for LevelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LevelError {}

impl FromStr for SimdLevel {
    type Err = LevelError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let wanted = name.trim().to_ascii_lowercase();
        SimdLevel::ALL
            .into_iter()
            .find(|level| level.name() == wanted)
            .ok_or_else(|| {
                LevelError(format!(
                    "unknown SIMD level {name:?}; expected one of: scalar, avx2, avx512, neon"
                ))
            })
    }
}

/// Environment variable that forces a level at start-up (`scalar`, `avx2`, `avx512`, `neon`).
pub const ENV_VAR: &str = "FERROPTIM_SIMD";

/// 0 = not decided yet; otherwise a `SimdLevel::code`.
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Parses a level name and checks this CPU can run it.
pub fn parse_supported(name: &str) -> Result<SimdLevel, LevelError> {
    let level: SimdLevel = name.parse()?;
    if level.is_supported() {
        Ok(level)
    } else {
        Err(LevelError(format!(
            "SIMD level {level} is not supported by this CPU (supported: {})",
            SimdLevel::supported()
                .iter()
                .map(|l| l.name())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// The level named by `FERROPTIM_SIMD`, if set.
pub fn level_from_env() -> Result<Option<SimdLevel>, LevelError> {
    match std::env::var(ENV_VAR) {
        Ok(value) if !value.trim().is_empty() && value.trim() != "auto" => parse_supported(&value)
            .map(Some)
            .map_err(|e| LevelError(format!("{ENV_VAR}={value:?}: {e}"))),
        _ => Ok(None),
    }
}

/// The level kernels run at: forced, else from the environment, else detected.
///
/// An invalid `FERROPTIM_SIMD` falls back to detection here; the Python module
/// reports it as an error at import so the mistake is not silent.
pub fn active_level() -> SimdLevel {
    if let Some(level) = SimdLevel::from_code(ACTIVE.load(Ordering::Relaxed)) {
        return level;
    }
    let level = level_from_env()
        .ok()
        .flatten()
        .unwrap_or_else(SimdLevel::detect);
    ACTIVE.store(level.code(), Ordering::Relaxed);
    level
}

/// Forces a level (`None` returns to the environment / detected level).
pub fn force_level(level: Option<SimdLevel>) -> Result<SimdLevel, LevelError> {
    let level = match level {
        Some(level) if !level.is_supported() => {
            return Err(LevelError(format!(
                "SIMD level {level} is not supported by this CPU"
            )))
        }
        Some(level) => level,
        None => level_from_env()?.unwrap_or_else(SimdLevel::detect),
    };
    ACTIVE.store(level.code(), Ordering::Relaxed);
    Ok(level)
}

/// Hints the cache line holding `address` into cache. A prefetch never
/// faults and reads nothing into the program, so `address` need not point
/// anywhere valid (past a slice's end, or at an object freed since).
#[inline(always)]
pub fn prefetch(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch has no
        // effect on the program's state whatever the address (see above).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

/// A unit of kernel work to run at one SIMD level.
///
/// Implementations put `#[inline(always)]` on [`SimdTask::run`] so its body is
/// compiled inside the target-feature function chosen by [`dispatch`].
pub trait SimdTask {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `task` compiled for `level`.
///
/// # Panics
/// If `level` is not supported by this CPU (levels are checked when chosen, so
/// this indicates a bug, and panicking is better than executing illegal
/// instructions).
#[inline]
pub fn dispatch<T: SimdTask>(level: SimdLevel, task: T) -> T::Output {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => {
            assert!(
                level.is_supported(),
                "AVX-512 kernels requested on a CPU without AVX-512"
            );
            // SAFETY: the CPU supports every feature `run_avx512` is compiled with
            // (checked just above; `is_x86_feature_detected!` caches its answer).
            unsafe { run_avx512(task) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            assert!(
                level.is_supported(),
                "AVX2 kernels requested on a CPU without AVX2+FMA"
            );
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { run_avx2(task) }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => {
            // SAFETY: NEON is part of the AArch64 baseline.
            unsafe { run_neon(task) }
        }
        _ => task.run(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn run_avx512<T: SimdTask>(task: T) -> T::Output {
    task.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<T: SimdTask>(task: T) -> T::Output {
    task.run()
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn run_neon<T: SimdTask>(task: T) -> T::Output {
    task.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for level in SimdLevel::ALL {
            assert_eq!(level.name().parse::<SimdLevel>().unwrap(), level);
        }
        assert!("sse9".parse::<SimdLevel>().is_err());
        assert_eq!(" AVX2 ".parse::<SimdLevel>().unwrap(), SimdLevel::Avx2);
    }

    #[test]
    fn detected_level_is_supported() {
        assert!(SimdLevel::detect().is_supported());
        assert!(SimdLevel::supported().contains(&SimdLevel::Scalar));
        assert_eq!(SimdLevel::supported()[0], SimdLevel::detect());
    }

    #[test]
    fn unsupported_level_is_refused() {
        #[cfg(target_arch = "x86_64")]
        assert!(parse_supported("neon").is_err());
        #[cfg(target_arch = "aarch64")]
        assert!(parse_supported("avx2").is_err());
        assert!(parse_supported("scalar").is_ok());
    }
}

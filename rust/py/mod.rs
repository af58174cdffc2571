//! The PyO3 glue: buffer plans from torch tensors, configuration, and one
//! entry point per optimizer family. Kernels live in `crate::kernels` and know
//! nothing of Python.

mod arrays;
mod clip;
mod error;
mod hot;
mod lbfgs;
mod native;
mod optimizers;
mod plan;
mod tensor;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::{parallel, simd};

/// The SIMD level kernels run at ("avx512", "avx2", "neon" or "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    simd::active_level().name()
}

/// Forces a SIMD level; `None` returns to `FERROPTIM_SIMD` or detection.
/// Returns the level now in use.
#[pyfunction]
#[pyo3(signature = (level))]
fn set_simd_level(level: Option<&str>) -> PyResult<&'static str> {
    let level = match level {
        None => None,
        Some(name) => Some(simd::parse_supported(name).map_err(|e| PyValueError::new_err(e.0))?),
    };
    simd::force_level(level)
        .map(|l| l.name())
        .map_err(|e| PyValueError::new_err(e.0))
}

/// SIMD levels this CPU can run, best first.
#[pyfunction]
fn supported_simd_levels() -> Vec<&'static str> {
    simd::SimdLevel::supported()
        .into_iter()
        .map(|l| l.name())
        .collect()
}

/// Problems with `FERROPTIM_SIMD` / `FERROPTIM_NUM_THREADS`, for import-time errors.
#[pyfunction]
fn environment_errors() -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = simd::level_from_env() {
        errors.push(e.0);
    }
    if let Err(e) = parallel::threads_from_env() {
        errors.push(e);
    }
    errors
}

/// Number of threads ferroptim's pool steps with.
#[pyfunction]
fn get_num_threads() -> usize {
    parallel::num_threads()
}

/// Sets the number of threads ferroptim's pool steps with.
#[pyfunction]
fn set_num_threads(threads: i64) -> PyResult<()> {
    let threads = usize::try_from(threads)
        .map_err(|_| PyValueError::new_err("the number of threads must be at least 1"))?;
    parallel::set_num_threads(threads).map_err(PyValueError::new_err)
}

/// Whether cached plans can be re-checked (torch's metadata layout was
/// recognised); `disable` turns them off, for testing the slow path alone.
#[pyfunction]
#[pyo3(signature = (disable = None))]
fn _native_recheck(py: Python<'_>, disable: Option<bool>) -> bool {
    if let Some(disable) = disable {
        native::set_disabled(disable);
    }
    native::layout(py).is_some()
}

/// The most threads [`set_num_threads`] accepts on this machine.
#[pyfunction]
fn max_num_threads() -> usize {
    parallel::max_threads()
}

/// Raises the RuntimeError a panic inside a kernel turns into (for tests).
#[pyfunction]
fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    let mut plan = plan::GroupPlan::from_tensors_unchecked_empty();
    plan.run(py, true, |_, _| -> Result<(), crate::engine::EngineError> {
        panic!("deliberate test panic")
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<plan::GroupPlan>()?;
    m.add_class::<plan::StateSnapshot>()?;
    m.add_class::<optimizers::Kernel>()?;
    m.add_class::<optimizers::AdafactorKernel>()?;
    m.add_class::<optimizers::LambKernel>()?;
    m.add_function(wrap_pyfunction!(optimizers::kernel_names, m)?)?;
    m.add_function(wrap_pyfunction!(clip::grad_norms, m)?)?;
    m.add_function(wrap_pyfunction!(clip::grads_finite, m)?)?;
    m.add_function(wrap_pyfunction!(clip::scale_grads, m)?)?;
    m.add_function(wrap_pyfunction!(clip::clamp_grads, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_dot, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_dot_pair, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_abs, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_direction, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_add, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(supported_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(environment_errors, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(max_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(_native_recheck, m)?)?;
    Ok(())
}

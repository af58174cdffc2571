//! Every error the engine and the kernels report, converted once to the
//! exception type torch raises in the same situation (cf. polars' `error.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::engine::{EngineError, HyperError};

/// An engine refusal as a Python exception: buffers the glue cannot plan
/// (overlaps, misalignment, unsupported formats) are `ValueError`s the Python
/// layer turns into torch's messages; a mismatch between a plan and its
/// kernel is an internal error.
pub fn engine_error(error: EngineError) -> PyErr {
    match error {
        EngineError::Mismatch { what } => {
            PyRuntimeError::new_err(format!("ferroptim internal error: {what}"))
        }
        other => PyValueError::new_err(other.to_string()),
    }
}

/// A hyperparameter that cannot be read: a missing entry is the `KeyError`
/// torch's `group["lr"]` raises; a value that is not a number is the
/// `TypeError` torch's arithmetic raises mid-step.
pub fn hyper_error(error: HyperError) -> PyErr {
    match error {
        HyperError::Missing(name) => PyKeyError::new_err(name),
        other => PyTypeError::new_err(other.to_string()),
    }
}

/// An unknown kernel name (a bug in a Python spec).
pub fn unknown_kernel(name: &str, known: &[&str]) -> PyErr {
    PyValueError::new_err(format!(
        "no kernel named {name:?}; registered: {}",
        known.join(", ")
    ))
}

/// A plan that cannot be built (the caller keeps the slow path or raises).
pub fn not_plannable(message: String) -> PyErr {
    PyValueError::new_err(message)
}

/// A plan used out of order (a bug in the Python layer).
pub fn internal(message: &str) -> PyErr {
    PyRuntimeError::new_err(format!("ferroptim internal error: {message}"))
}

/// Runs `work` with the GIL released; a Rust panic becomes a `RuntimeError`
/// (never an abort, and catchable as `Exception`).
pub fn run_caught<R: Send>(py: Python<'_>, work: impl FnOnce() -> R + Send) -> PyResult<R> {
    py.detach(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            PyRuntimeError::new_err(format!("ferroptim internal error (Rust panic): {message}"))
        })
}

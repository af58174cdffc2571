//! ferroptim's native core.
//!
//! * [`kernels`]: Python-free optimizer arithmetic over slices.
//! * [`engine`]: a parameter group as raw buffers, stepped in chunks.
//! * [`parallel`]: our own thread pool, the chunk planner, the fork handler.
//! * [`simd`]: instruction-set detection and dispatch.
//! * `py` (feature `python`): the PyO3 glue that builds groups from torch tensors.
//!
//! `cargo test` builds without the `python` feature, so it needs no Python.

pub mod engine;
pub mod kernels;
pub mod parallel;
pub mod simd;

#[cfg(feature = "python")]
mod py;

/// Turns a run-time `bool` into a `const` of the given name inside `$body`, so
/// kernels are specialised per flag instead of branching per element.
#[macro_export]
macro_rules! const_bool {
    ($value:expr, $name:ident, $body:expr) => {
        if $value {
            const $name: bool = true;
            $body
        } else {
            const $name: bool = false;
            $body
        }
    };
}

/// `gil_used = true`: the per-step re-check reads torch's tensor objects
/// directly and relies on the GIL to keep them still while it does
/// (`py/native.rs`); PyO3 would otherwise declare the module safe for
/// free-threaded Python without that having been audited.
#[cfg(feature = "python")]
#[pyo3::pymodule(gil_used = true)]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}

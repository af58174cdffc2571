//! Gradient norms and clipping over plans.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::plan::GroupPlan;
use crate::engine::{reduce::check_grads, Compute};
use crate::kernels::clip::{self, NormType};

/// Per-tensor gradient norms of every plan, in order, each rounded to its
/// tensor's dtype, and whether any tensor is float64 (torch would stack the
/// norms as float64 then). Plans stay gathered (the update pass follows).
/// `unscale` multiplies every gradient first (GradScaler's inverse scale).
#[pyfunction]
#[pyo3(signature = (plans, norm_type, unscale = 1.0))]
pub fn grad_norms(
    py: Python<'_>,
    plans: Vec<Bound<'_, GroupPlan>>,
    norm_type: f64,
    unscale: f64,
) -> PyResult<(Vec<f64>, bool)> {
    if norm_type.is_nan() {
        return Err(PyValueError::new_err("norm_type must not be NaN"));
    }
    let kind = NormType::new(norm_type);
    let mut norms = Vec::new();
    let mut has_float64 = false;
    for plan in plans {
        let (values, float64) = plan.borrow_mut().run(py, false, |group, level| {
            check_grads(group)?;
            let float64 = group.tensors().iter().any(|t| t.compute() == Compute::F64);
            Ok((clip::tensor_norms(group, kind, unscale, level), float64))
        })?;
        norms.extend(values);
        has_float64 |= float64;
    }
    Ok((norms, has_float64))
}

/// Multiplies every gradient of a `from_grads` plan by `factor`, then forgets the plan.
#[pyfunction]
pub fn scale_grads(py: Python<'_>, plan: &Bound<'_, GroupPlan>, factor: f64) -> PyResult<()> {
    plan.borrow_mut().run(py, true, |group, level| {
        check_grads(group)?;
        clip::scale(group, factor, level);
        Ok(())
    })
}

/// Clamps every gradient of a `from_grads` plan to `[-clip, clip]`, then forgets the plan.
#[pyfunction]
pub fn clamp_grads(py: Python<'_>, plan: &Bound<'_, GroupPlan>, clip: f64) -> PyResult<()> {
    plan.borrow_mut().run(py, true, |group, level| {
        check_grads(group)?;
        clip::clamp(group, clip, level);
        Ok(())
    })
}

/// Whether every gathered gradient of every plan is finite (no inf, no NaN):
/// one parallel read of the gradients. Plans stay gathered.
#[pyfunction]
pub fn grads_finite(py: Python<'_>, plans: Vec<Bound<'_, GroupPlan>>) -> PyResult<bool> {
    for plan in plans {
        let finite = plan.borrow_mut().run(py, false, |group, level| {
            check_grads(group)?;
            Ok(clip::grads_finite(group, level))
        })?;
        if !finite {
            return Ok(false);
        }
    }
    Ok(true)
}

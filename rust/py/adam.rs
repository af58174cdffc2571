//! `adam_step`: Adam and AdamW over a gathered plan.

use pyo3::prelude::*;

use super::plan::GroupPlan;
use crate::kernels::adam::{adam_step as step_group, AdamHyper};

/// Steps every gathered parameter of `plan` once (Adam, or AdamW with
/// `decoupled_weight_decay`). Scalars are torch's group hyperparameters.
#[pyfunction]
#[pyo3(signature = (plan, *, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize))]
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    py: Python<'_>,
    plan: &Bound<'_, GroupPlan>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> PyResult<()> {
    let hyper = AdamHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
    };
    plan.borrow_mut()
        .run(py, hyper.num_states(), true, |group, level| {
            step_group(group, &hyper, level);
        })
}

/// Bandwidth probe: Adam's memory traffic (read param, grad, two states; write
/// param and both states) without its arithmetic, on the same engine. For
/// benchmarks: it measures the streaming floor a step cannot beat.
#[pyfunction]
pub fn stream_probe(py: Python<'_>, plan: &Bound<'_, GroupPlan>) -> PyResult<()> {
    plan.borrow_mut().run(py, 2, false, |group, level| {
        crate::kernels::probe::stream_probe(group, level);
    })
}

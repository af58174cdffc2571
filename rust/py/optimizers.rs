//! One entry point per optimizer family: run its kernel over a gathered plan.
//! Scalars are the group's hyperparameters as torch keeps them; every
//! gradient is multiplied by `unscale` (GradScaler's inverse scale) and then
//! by `clip` (the `max_grad_norm` coefficient) as it is read (1.0: off).

use pyo3::prelude::*;

use super::plan::GroupPlan;
use crate::kernels::adagrad::{adagrad_step as adagrad_kernel, AdagradHyper};
use crate::kernels::adam::{adam_step as adam_kernel, AdamHyper};
use crate::kernels::probe;
use crate::kernels::rmsprop::{rmsprop_step as rmsprop_kernel, RmspropHyper};
use crate::kernels::sgd::{sgd_step as sgd_kernel, SgdHyper};
use crate::kernels::GradScale;

/// Adam, or AdamW with `decoupled_weight_decay`.
#[pyfunction]
#[pyo3(signature = (plan, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, unscale, clip, lr_is_f32))]
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
    unscale: f64,
    clip: f64,
    lr_is_f32: bool,
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
        grad_scale: GradScale { unscale, clip },
        lr_is_f32,
    };
    plan.borrow_mut()
        .run(py, Some(hyper.num_states()), true, true, |group, level| {
            adam_kernel(group, &hyper, level);
        })
}

/// SGD; `first_step`: the momentum buffers are new and get written, not read.
#[pyfunction]
#[pyo3(signature = (plan, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, unscale, clip))]
#[allow(clippy::too_many_arguments)]
pub fn sgd_step(
    py: Python<'_>,
    plan: &Bound<'_, GroupPlan>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    unscale: f64,
    clip: f64,
) -> PyResult<()> {
    let hyper = SgdHyper {
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        grad_scale: GradScale { unscale, clip },
    };
    plan.borrow_mut()
        .run(py, Some(hyper.num_states()), false, true, |group, level| {
            sgd_kernel(group, &hyper, first_step, level);
        })
}

/// RMSprop; state buffers in the order square_avg, momentum_buffer, grad_avg.
#[pyfunction]
#[pyo3(signature = (plan, lr, alpha, eps, weight_decay, momentum, centered, maximize, unscale, clip))]
#[allow(clippy::too_many_arguments)]
pub fn rmsprop_step(
    py: Python<'_>,
    plan: &Bound<'_, GroupPlan>,
    lr: f64,
    alpha: f64,
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    centered: bool,
    maximize: bool,
    unscale: f64,
    clip: f64,
) -> PyResult<()> {
    let hyper = RmspropHyper {
        lr,
        alpha,
        eps,
        weight_decay,
        momentum,
        centered,
        maximize,
        grad_scale: GradScale { unscale, clip },
    };
    plan.borrow_mut()
        .run(py, Some(hyper.num_states()), true, true, |group, level| {
            rmsprop_kernel(group, &hyper, level);
        })
}

/// Adagrad (dense gradients).
#[pyfunction]
#[pyo3(signature = (plan, lr, lr_decay, weight_decay, eps, maximize, unscale, clip, lr_is_f32))]
#[allow(clippy::too_many_arguments)]
pub fn adagrad_step(
    py: Python<'_>,
    plan: &Bound<'_, GroupPlan>,
    lr: f64,
    lr_decay: f64,
    weight_decay: f64,
    eps: f64,
    maximize: bool,
    unscale: f64,
    clip: f64,
    lr_is_f32: bool,
) -> PyResult<()> {
    let hyper = AdagradHyper {
        lr,
        lr_decay,
        weight_decay,
        eps,
        maximize,
        grad_scale: GradScale { unscale, clip },
        lr_is_f32,
    };
    plan.borrow_mut()
        .run(py, Some(1), true, true, |group, level| {
            adagrad_kernel(group, &hyper, level);
        })
}

/// Bandwidth probe: Adam's memory traffic (read param, grad, two states; write
/// param and both states) without its arithmetic, on the same engine. For
/// benchmarks: it measures the streaming floor a step cannot beat.
#[pyfunction]
pub fn stream_probe(py: Python<'_>, plan: &Bound<'_, GroupPlan>) -> PyResult<()> {
    plan.borrow_mut()
        .run(py, Some(2), false, true, |group, level| {
            probe::stream_probe(group, level);
        })
}

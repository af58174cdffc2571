//! The array functional API: the same kernels over any object exporting a
//! float32/float64 buffer (NumPy arrays, `array.array`, memoryviews), no torch
//! required. Every argument is checked before anything is written: dtype,
//! C-contiguity, writability, lengths, and that no written buffer overlaps
//! another buffer (the same array passed twice, say).

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::plan::run_caught;
use crate::engine::{check_buffers, DType, Group, StepCounter, TensorBuffers, MAX_STATES};
use crate::kernels::adagrad::{adagrad_step, AdagradHyper};
use crate::kernels::adam::{adam_step, AdamHyper};
use crate::kernels::rmsprop::{rmsprop_step, RmspropHyper};
use crate::kernels::sgd::{sgd_step, SgdHyper};
use crate::simd;

/// One exported buffer, checked.
struct Array {
    buffer: PyUntypedBuffer,
    dtype: DType,
    len: usize,
}

impl Array {
    fn get(object: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<Array> {
        let buffer = PyUntypedBuffer::get(object).map_err(|_| {
            PyTypeError::new_err(format!(
                "{what} must be an array of float32 or float64 (an object with the buffer protocol), got {}",
                object.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        let format = buffer.format().to_string_lossy().to_string();
        let code = format.trim_start_matches(['@', '=', '<']);
        let dtype = match (code, buffer.item_size()) {
            ("f", 4) => DType::F32,
            ("d", 8) => DType::F64,
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "{what} has element format {format:?}; expected float32 or float64 (native byte order)"
                )))
            }
        };
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{what} is not C-contiguous; pass a contiguous array (e.g. numpy.ascontiguousarray)"
            )));
        }
        if writable && buffer.readonly() {
            return Err(PyValueError::new_err(format!(
                "{what} is read-only; it is updated in place"
            )));
        }
        let len = buffer.item_count();
        Ok(Array { buffer, dtype, len })
    }

    fn addr(&self) -> usize {
        self.buffer.buf_ptr() as usize
    }
}

/// `params[i]`, `grads[i]`, `states[k][i]` checked and laid out as engine
/// buffers (plus the exported buffers, which must outlive the step).
struct Checked {
    tensors: Vec<TensorBuffers>,
    _arrays: Vec<Array>,
    /// Step counters of the tensors, `step - 1`, incremented by the kernel.
    steps: Vec<f64>,
}

fn check(
    params: &[Bound<'_, PyAny>],
    grads: &[Bound<'_, PyAny>],
    states: &[(&str, Vec<Bound<'_, PyAny>>)],
    step: Option<f64>,
) -> PyResult<Checked> {
    let n = params.len();
    if grads.len() != n {
        return Err(PyValueError::new_err(format!(
            "got {n} params but {} grads",
            grads.len()
        )));
    }
    for (name, list) in states {
        if list.len() != n {
            return Err(PyValueError::new_err(format!(
                "got {n} params but {} {name}",
                list.len()
            )));
        }
    }
    if states.len() > MAX_STATES {
        return Err(PyValueError::new_err("too many state arrays"));
    }
    if let Some(step) = step {
        if !(step >= 1.0 && step.fract() == 0.0) {
            return Err(PyValueError::new_err(format!(
                "step must be a positive integer (the 1-based number of this step), got {step}"
            )));
        }
    }
    let mut arrays = Vec::with_capacity(n * (2 + states.len()));
    let mut tensors = Vec::with_capacity(n);
    // (address, name) of every written array, to name a duplicate plainly.
    let mut written: Vec<(usize, String)> = Vec::new();
    for i in 0..n {
        let param = Array::get(&params[i], &format!("params[{i}]"), true)?;
        let grad = Array::get(&grads[i], &format!("grads[{i}]"), false)?;
        let mut addrs = [0usize; MAX_STATES];
        let mut companions = vec![(format!("grads[{i}]"), grad)];
        for (k, (name, list)) in states.iter().enumerate() {
            let what = format!("{name}[{i}]");
            let state = Array::get(&list[i], &what, true)?;
            addrs[k] = state.addr();
            if state.len > 0 {
                written.push((state.addr(), what.clone()));
            }
            companions.push((what, state));
        }
        for (what, other) in &companions {
            if other.dtype != param.dtype {
                return Err(PyTypeError::new_err(format!(
                    "{what} is {} but params[{i}] is {}",
                    other.dtype.name(),
                    param.dtype.name()
                )));
            }
            if other.len != param.len {
                return Err(PyValueError::new_err(format!(
                    "{what} has {} elements but params[{i}] has {}",
                    other.len, param.len
                )));
            }
        }
        if param.len > 0 {
            written.push((param.addr(), format!("params[{i}]")));
        }
        tensors.push(TensorBuffers {
            dtype: param.dtype,
            len: param.len,
            param: param.addr(),
            grad: companions[0].1.addr(),
            states: addrs,
            num_states: states.len(),
            step: None,
        });
        arrays.push(param);
        arrays.extend(companions.into_iter().map(|(_, array)| array));
    }
    written.sort();
    if let Some(pair) = written.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(PyValueError::new_err(format!(
            "{} and {} are the same array; each is updated in place, so pass distinct arrays",
            pair[0].1, pair[1].1
        )));
    }
    check_buffers(&tensors).map_err(|e| {
        PyValueError::new_err(format!(
            "{e} (pass each array once; a gradient may not be a parameter or state)"
        ))
    })?;
    let steps = vec![step.unwrap_or(1.0) - 1.0; n];
    Ok(Checked {
        tensors,
        _arrays: arrays,
        steps,
    })
}

/// Runs `kernel` over the checked arrays with the GIL released.
fn run(
    py: Python<'_>,
    mut checked: Checked,
    with_steps: bool,
    kernel: impl FnOnce(&mut Group<'_>, simd::SimdLevel) + Send,
) -> PyResult<()> {
    if with_steps {
        for (t, counter) in checked.tensors.iter_mut().zip(checked.steps.iter_mut()) {
            t.step = Some(StepCounter {
                addr: counter as *mut f64 as usize,
                dtype: DType::F64,
            });
        }
    }
    let tensors = std::mem::take(&mut checked.tensors);
    // SAFETY: every address points into a buffer exported by a live object
    // (`checked._arrays` holds the exports until this function returns, and an
    // exported NumPy array cannot be resized), of the checked dtype and length;
    // the step counters point into `checked.steps`, alive and untouched
    // elsewhere; `check_buffers` refused overlaps.
    let mut group = unsafe { Group::new_prechecked(tensors) };
    let level = simd::active_level();
    run_caught(py, || kernel(&mut group, level))
}

fn listify<'py>(value: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(list) = value.cast::<pyo3::types::PyList>() {
        return Ok(list.iter().collect());
    }
    if let Ok(tuple) = value.cast::<pyo3::types::PyTuple>() {
        return Ok(tuple.iter().collect());
    }
    Ok(vec![value.clone()])
}

/// Adam/AdamW over arrays. `states`: exp_avgs, exp_avg_sqs (, max_exp_avg_sqs).
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize))]
#[allow(clippy::too_many_arguments)]
pub fn array_adam(
    py: Python<'_>,
    params: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    exp_avgs: &Bound<'_, PyAny>,
    exp_avg_sqs: &Bound<'_, PyAny>,
    max_exp_avg_sqs: Option<&Bound<'_, PyAny>>,
    step: f64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> PyResult<()> {
    let mut states = vec![
        ("exp_avgs", listify(exp_avgs)?),
        ("exp_avg_sqs", listify(exp_avg_sqs)?),
    ];
    if let Some(max) = max_exp_avg_sqs {
        states.push(("max_exp_avg_sqs", listify(max)?));
    }
    let hyper = AdamHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad: max_exp_avg_sqs.is_some(),
        maximize,
        ..AdamHyper::default()
    };
    let checked = check(&listify(params)?, &listify(grads)?, &states, Some(step))?;
    run(py, checked, true, |group, level| {
        adam_step(group, &hyper, level);
    })
}

/// SGD over arrays; `momentum_buffers` when momentum is on (`first_step`: they are
/// written from the gradients, as torch creates them).
#[pyfunction]
#[pyo3(signature = (params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step))]
#[allow(clippy::too_many_arguments)]
pub fn array_sgd(
    py: Python<'_>,
    params: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    momentum_buffers: Option<&Bound<'_, PyAny>>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> PyResult<()> {
    let hyper = SgdHyper {
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        ..SgdHyper::default()
    };
    let states = match (momentum != 0.0, momentum_buffers) {
        (true, Some(buffers)) => vec![("momentum_buffers", listify(buffers)?)],
        (true, None) => {
            return Err(PyValueError::new_err(
                "momentum != 0 needs momentum_buffers (arrays like params; set first_step=True on the first step)",
            ))
        }
        (false, _) => Vec::new(),
    };
    let checked = check(&listify(params)?, &listify(grads)?, &states, None)?;
    run(py, checked, false, |group, level| {
        sgd_step(group, &hyper, first_step, level);
    })
}

/// RMSprop over arrays: square_avgs, then momentum_buffers (momentum > 0), then grad_avgs (centered).
#[pyfunction]
#[pyo3(signature = (params, grads, square_avgs, momentum_buffers, grad_avgs, step, lr, alpha, eps, weight_decay, momentum, maximize))]
#[allow(clippy::too_many_arguments)]
pub fn array_rmsprop(
    py: Python<'_>,
    params: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    square_avgs: &Bound<'_, PyAny>,
    momentum_buffers: Option<&Bound<'_, PyAny>>,
    grad_avgs: Option<&Bound<'_, PyAny>>,
    step: f64,
    lr: f64,
    alpha: f64,
    eps: f64,
    weight_decay: f64,
    momentum: f64,
    maximize: bool,
) -> PyResult<()> {
    let mut states = vec![("square_avgs", listify(square_avgs)?)];
    if momentum > 0.0 {
        let buffers = momentum_buffers
            .ok_or_else(|| PyValueError::new_err("momentum > 0 needs momentum_buffers"))?;
        states.push(("momentum_buffers", listify(buffers)?));
    }
    if let Some(grad_avgs) = grad_avgs {
        states.push(("grad_avgs", listify(grad_avgs)?));
    }
    let hyper = RmspropHyper {
        lr,
        alpha,
        eps,
        weight_decay,
        momentum,
        centered: grad_avgs.is_some(),
        maximize,
        ..RmspropHyper::default()
    };
    let checked = check(&listify(params)?, &listify(grads)?, &states, Some(step))?;
    run(py, checked, true, |group, level| {
        rmsprop_step(group, &hyper, level);
    })
}

/// Adagrad over arrays.
#[pyfunction]
#[pyo3(signature = (params, grads, state_sums, step, lr, lr_decay, weight_decay, eps, maximize))]
#[allow(clippy::too_many_arguments)]
pub fn array_adagrad(
    py: Python<'_>,
    params: &Bound<'_, PyAny>,
    grads: &Bound<'_, PyAny>,
    state_sums: &Bound<'_, PyAny>,
    step: f64,
    lr: f64,
    lr_decay: f64,
    weight_decay: f64,
    eps: f64,
    maximize: bool,
) -> PyResult<()> {
    let hyper = AdagradHyper {
        lr,
        lr_decay,
        weight_decay,
        eps,
        maximize,
        ..AdagradHyper::default()
    };
    let states = vec![("state_sums", listify(state_sums)?)];
    let checked = check(&listify(params)?, &listify(grads)?, &states, Some(step))?;
    run(py, checked, true, |group, level| {
        adagrad_step(group, &hyper, level);
    })
}

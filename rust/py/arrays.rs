//! Plans over arrays, for the functional API: any object exporting a
//! float32/float64 buffer (NumPy arrays, `array.array`, memoryviews), or a
//! float16 one, or bfloat16 bits as a uint16 buffer (the buffer protocol has no
//! bfloat16 code), no torch required. The plan then runs through the optimizers' own entry points.
//! Every argument is checked before anything is written: dtype, C-contiguity,
//! writability, lengths, and that no written buffer overlaps another buffer
//! (the same array passed twice, say).

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::plan::GroupPlan;
use crate::engine::{
    check_buffers, Buffer, Format, ScalarSlot, TensorBuffers, MAX_SCALARS, MAX_STATES,
};

/// One exported buffer, checked.
struct Array {
    buffer: PyUntypedBuffer,
    dtype: Format,
    len: usize,
}

impl Array {
    fn get(object: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<Array> {
        let buffer = PyUntypedBuffer::get(object).map_err(|_| {
            PyTypeError::new_err(format!(
                "{what} must be an array of float32, float64, float16 or bfloat16 (as uint16) (an object with the buffer protocol), got {}",
                object.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        let format = buffer.format().to_string_lossy().to_string();
        let code = format.trim_start_matches(['@', '=', '<']);
        let dtype = match (code, buffer.item_size()) {
            ("f", 4) => Format::F32,
            ("d", 8) => Format::F64,
            ("e", 2) => Format::F16,
            // bfloat16 has no buffer-protocol code: its bits come as a uint16 view
            ("H", 2) => Format::BF16,
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "{what} has element format {format:?}; expected float32, float64, float16, \
                     or bfloat16 bits as uint16 (native byte order)"
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

/// Checks arrays for a one-shot [`GroupPlan`]: `params[i]`, `grads[i]`,
/// `states[k].1[i]` (named `states[k].0` in errors). `step` (1-based) gives
/// every tensor a step counter owned by the plan; `scalars[k].1[i]` (one
/// element, float32 or float64 whatever the param's dtype, like torch's 0-d
/// state tensors) is its scalar state slot after the step counter, updated
/// in place (NAdam's `mu_product`).
pub fn plan_arrays(
    params: &[Bound<'_, PyAny>],
    grads: &[Bound<'_, PyAny>],
    states: &[(String, Vec<Bound<'_, PyAny>>)],
    step: Option<f64>,
    scalars: &[(String, Vec<Bound<'_, PyAny>>)],
) -> PyResult<GroupPlan> {
    let n = params.len();
    if grads.len() != n {
        return Err(PyValueError::new_err(format!(
            "got {n} params but {} grads",
            grads.len()
        )));
    }
    for (name, list) in states.iter().chain(scalars) {
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
    if scalars.len() + usize::from(step.is_some()) > MAX_SCALARS {
        return Err(PyValueError::new_err("too many scalar state arrays"));
    }
    if let Some(step) = step {
        if !(step >= 1.0 && step.fract() == 0.0) {
            return Err(PyValueError::new_err(format!(
                "step must be a positive integer (the 1-based number of this step), got {step}"
            )));
        }
    }
    let mut exports = Vec::with_capacity(n * (2 + states.len() + scalars.len()));
    let mut tensors = Vec::with_capacity(n);
    let mut slots = Vec::with_capacity(n);
    // Every array's bytes: the engine's overlap check sees buffers, not scalar slots.
    let mut extents: Vec<Extent> = Vec::new();
    // (address, name) of every written array, to name a duplicate plainly.
    let mut written: Vec<(usize, String)> = Vec::new();
    for i in 0..n {
        let param = Array::get(&params[i], &format!("params[{i}]"), true)?;
        let grad = Array::get(&grads[i], &format!("grads[{i}]"), false)?;
        let mut buffers = Vec::with_capacity(states.len());
        let mut companions = vec![(format!("grads[{i}]"), grad)];
        for (name, list) in states {
            let what = format!("{name}[{i}]");
            let state = Array::get(&list[i], &what, true)?;
            buffers.push(Buffer::new(state.addr(), state.dtype));
            if state.len > 0 {
                written.push((state.addr(), what.clone()));
            }
            companions.push((what, state));
        }
        extents.push(Extent::of(&param, format!("params[{i}]"), false));
        for (what, array) in &companions {
            extents.push(Extent::of(array, what.clone(), false));
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
        let mut tensor_slots = Vec::with_capacity(scalars.len());
        for (name, list) in scalars {
            let what = format!("{name}[{i}]");
            let scalar = Array::get(&list[i], &what, true)?;
            if !matches!(scalar.dtype, Format::F32 | Format::F64) {
                return Err(PyTypeError::new_err(format!(
                    "{what} is {}; a scalar state is float32 or float64, whatever the params' dtype",
                    scalar.dtype.name()
                )));
            }
            if scalar.len != 1 {
                return Err(PyValueError::new_err(format!(
                    "{what} has {} elements; it holds one number (a 1-element array)",
                    scalar.len
                )));
            }
            tensor_slots.push(ScalarSlot {
                addr: scalar.addr(),
                format: scalar.dtype,
            });
            extents.push(Extent::of(&scalar, what.clone(), true));
            written.push((scalar.addr(), what));
            exports.push(scalar.buffer);
        }
        slots.push(tensor_slots);
        tensors.push(
            TensorBuffers::param(
                param.len,
                Buffer::new(param.addr(), param.dtype),
                Some(Buffer::new(companions[0].1.addr(), param.dtype)),
            )
            .with_states(&buffers),
        );
        exports.push(param.buffer);
        exports.extend(companions.into_iter().map(|(_, array)| array.buffer));
    }
    written.sort();
    if let Some(pair) = written.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(PyValueError::new_err(format!(
            "{} and {} are the same array; each is updated in place, so pass distinct arrays",
            pair[0].1, pair[1].1
        )));
    }
    check_scalars(extents)?;
    check_buffers(&tensors).map_err(|e| {
        PyValueError::new_err(format!(
            "{e} (pass each array once; a gradient may not be a parameter or state)"
        ))
    })?;
    Ok(GroupPlan::from_exports(tensors, exports, step, slots))
}

/// The bytes of one array, and whether it is a scalar slot.
struct Extent {
    start: usize,
    end: usize,
    what: String,
    scalar: bool,
}

impl Extent {
    fn of(array: &Array, what: String, scalar: bool) -> Extent {
        let start = array.addr();
        Extent {
            start,
            end: start + array.len * array.dtype.size(),
            what,
            scalar,
        }
    }
}

/// Refuses a scalar array that overlaps any other array (the kernel writes it in
/// place). Sorted by start, an array can only overlap arrays starting before the
/// furthest end seen so far, or, for a scalar one, the furthest-reaching scalar.
fn check_scalars(mut extents: Vec<Extent>) -> PyResult<()> {
    extents.retain(|e| e.end > e.start);
    extents.sort_unstable_by_key(|e| e.start);
    let mut reach: Option<&Extent> = None;
    let mut scalar_reach: Option<&Extent> = None;
    for current in &extents {
        let earlier = if current.scalar { reach } else { scalar_reach };
        if let Some(earlier) = earlier.filter(|e| e.end > current.start) {
            return Err(PyValueError::new_err(format!(
                "{} and {} share memory; a scalar state array is updated in place, so pass \
                 one of its own",
                earlier.what, current.what
            )));
        }
        if reach.is_none_or(|r| current.end > r.end) {
            reach = Some(current);
        }
        if current.scalar && scalar_reach.is_none_or(|r| current.end > r.end) {
            scalar_reach = Some(current);
        }
    }
    Ok(())
}

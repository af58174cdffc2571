//! Buffer plans: a parameter group turned into engine buffers.
//!
//! A cached plan ([`GroupPlan::new`]) is built once per group from the
//! validated parameters and their optimizer state, and re-checked cheaply every
//! step by [`GroupPlan::gather`]: same parameter objects in the same order, the
//! same state tensors, and for each of them a raw reading of torch's metadata
//! ([`Fingerprint`]: impl, storage object, storage data and size, offset,
//! shape, strides, dtype, device, negation and conjugation bits) equal to the
//! one recorded and confirmed against torch's Python API when the plan was
//! built; and a gradient per parameter whose own reading proves it is a plain
//! CPU tensor of the parameter's dtype, shape and strides lying inside its
//! storage. When anything changed, `gather` reports it and the Python side
//! takes the slow path (which re-validates everything and rebuilds the plan).
//! Nothing is written before every tensor of every group has been checked.
//!
//! A one-shot plan ([`GroupPlan::from_tensors`]) is what the slow path hands
//! over: explicit tensors for one step, fully checked.

use pyo3::buffer::{PyBuffer, PyUntypedBuffer};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyString};

use super::error::{engine_error, internal, not_plannable, run_caught};
use super::hot::{Hot, Ref};
use super::native::{self, Fingerprint};
use super::tensor::{Layout, TensorInfo};
use crate::engine::quant::packed_len;
use crate::engine::{
    check_buffers, elementwise::supported_formats, Buffer, Compute, EngineError, Format, Group,
    ScalarSlot, TensorBuffers, WrittenSet, MAX_SCALARS, MAX_STATES, STATE_SLOTS,
};
use crate::simd::{self, SimdLevel};

/// A tensor of a cached plan and its metadata when the plan was built.
struct Tracked {
    tensor: Py<PyAny>,
    fingerprint: Fingerprint,
}

impl Tracked {
    /// Records `tensor`, confirming the raw reading against torch's API.
    fn new(tensor: &Bound<'_, PyAny>, dtype: Format, what: &str) -> PyResult<Tracked> {
        let fingerprint = Fingerprint::verified(tensor, dtype)?.ok_or_else(|| {
            not_plannable(format!("{what}'s metadata cannot be re-checked cheaply"))
        })?;
        Ok(Tracked {
            tensor: tensor.clone().unbind(),
            fingerprint,
        })
    }

    /// Whether `object` is still this tensor, over the same memory, with the
    /// same metadata.
    fn unchanged(&self, layout: &native::Layout, object: *mut ffi::PyObject) -> bool {
        // SAFETY: `object` is the tensor this plan holds a reference to (the
        // identity is compared first), the GIL is held.
        object == self.tensor.as_ptr()
            && unsafe { layout.read(object) }.is_some_and(|now| now == self.fingerprint)
    }

    fn hints(&self, hints: &mut Vec<usize>) {
        hints.push(self.tensor.as_ptr() as usize);
        hints.push(self.fingerprint.tensor_impl);
    }
}

/// A parameter's state tensors as cached by the plan.
struct EntryState {
    dict: Py<PyDict>,
    buffers: Vec<Tracked>,
    states: Vec<Buffer>,
    scalars: Vec<(Tracked, ScalarSlot)>,
}

/// One parameter of a cached plan.
struct Entry {
    param: Tracked,
    addr: usize,
    len: usize,
    dtype: Format,
    /// The parameter's index in its group: its stream of stochastic rounding.
    stream: u64,
    /// `None` until the parameter has been stepped once (state is lazy).
    state: Option<EntryState>,
    /// Where the re-check will read (see `Entry::prefetch`).
    hints: Vec<usize>,
}

/// How many entries ahead `gather` prefetches.
const LOOKAHEAD: usize = 4;

impl Entry {
    /// Hints the memory this entry's re-check reads into cache. Between two
    /// steps, forward and backward push all of it out, and the re-check is a
    /// chain of dependent misses (Python object, torch's TensorImpl, its
    /// StorageImpl, for the parameter and each state tensor). Fetched a few
    /// entries ahead, the misses overlap.
    fn prefetch(&self) {
        for &address in &self.hints {
            // The line before the address too: a Python object's GC header
            // sits just before it.
            let first = (address & !63).wrapping_sub(64);
            for line in 0..4 {
                crate::simd::prefetch(first.wrapping_add(64 * line) as *const u8);
            }
        }
    }
}

/// The optimizer's `state` mapping as it was when plans were built: a cheap
/// way to notice `opt.state[p] = {...}`, `del opt.state[p]`, `opt.state.clear()`
/// and the like, without hashing every parameter each step.
#[pyclass(module = "ferroptim._core")]
pub struct StateSnapshot {
    items: Vec<(Py<PyAny>, Py<PyAny>)>,
}

#[pymethods]
impl StateSnapshot {
    #[new]
    fn new(state: &Bound<'_, PyDict>) -> StateSnapshot {
        StateSnapshot {
            items: state
                .iter()
                .map(|(key, value)| (key.unbind(), value.unbind()))
                .collect(),
        }
    }

    /// Whether `state` holds the same keys mapped to the same objects, in the
    /// same order.
    fn matches(&self, state: &Bound<'_, PyDict>) -> bool {
        state.len() == self.items.len()
            && state
                .iter()
                .zip(&self.items)
                .all(|((key, value), (k, v))| key.is(k) && value.is(v))
    }
}

/// What [`GroupPlan::gather`] found for one parameter.
// A transient return value, moved once: boxing the large variant would cost an
// allocation per parameter per step.
#[allow(clippy::large_enum_variant)]
enum Gathered {
    /// Something changed since the plan was built: the slow path must look.
    Changed,
    /// No gradient this step: skip the parameter.
    NoGrad,
    /// Ready to step with this gradient.
    Ready(TensorBuffers, Ref),
}

/// Engine buffers of one parameter group (see the module docs).
#[pyclass(module = "ferroptim._core")]
pub struct GroupPlan {
    /// The group's `params` list, for cached plans.
    params: Option<Py<PyList>>,
    state_keys: Vec<Py<PyString>>,
    scalar_keys: Vec<Py<PyString>>,
    entries: Vec<Entry>,
    written: WrittenSet,
    /// Buffers gathered for the next run, and what keeps them alive.
    ready: Vec<TensorBuffers>,
    keepalive: Vec<Py<PyAny>>,
    /// The tensors the next run writes in place (parameters, or gradients
    /// when clipping): their autograd version counters are bumped afterwards,
    /// as torch's own in-place updates would.
    written_tensors: Vec<Py<PyAny>>,
    /// Whether `ready` holds buffers for a run.
    gathered: bool,
    /// Whether each parameter's last state buffer is its float32 master copy.
    master: bool,
    /// Per state buffer: whether a uint8 (8-bit blockwise) state uses the
    /// signed map (first moments) or the unsigned one; empty: none is 8-bit.
    signed: Vec<bool>,
    /// Buffer exports pinning the memory of array plans (`from_arrays`).
    exports: Vec<PyUntypedBuffer>,
    /// Step counters owned by array plans (each `step - 1`; the heap buffer
    /// never moves, so counters can point into it).
    owned_steps: Vec<f64>,
}

/// The one-shot plan arguments for one parameter (see `from_tensors`).
struct OneShot<'a, 'py> {
    index: usize,
    stream: u64,
    param: &'a Bound<'py, PyAny>,
    grad: &'a Bound<'py, PyAny>,
    states: Vec<&'a Bound<'py, PyAny>>,
    scalars: Vec<&'a Bound<'py, PyAny>>,
}

/// `torch.autograd.graph.increment_version(tensors)`: records that the
/// tensors were modified in place, so autograd refuses a graph that saved them
/// before the step, exactly as after torch's own in-place update.
fn bump_versions(py: Python<'_>, tensors: Vec<Py<PyAny>>) -> PyResult<()> {
    static INCREMENT_VERSION: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let increment = INCREMENT_VERSION.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("torch.autograd.graph")?
                .getattr("increment_version")?
                .unbind(),
        )
    })?;
    increment.call1(py, (PyList::new(py, tensors)?,))?;
    Ok(())
}

fn scalar_slot(info: &TensorInfo<'_>, what: &str) -> PyResult<ScalarSlot> {
    if info.len != 1 {
        return Err(not_plannable(format!(
            "{what} has {} elements, not 1",
            info.len
        )));
    }
    Ok(ScalarSlot {
        addr: info.addr,
        format: info.dtype,
    })
}

/// The first element of each row, checked: rows of `row_len` elements that lie
/// inside a tensor of `len` elements, in increasing order, without overlapping.
fn row_spans(offsets: &[i64], row_len: usize, len: usize) -> PyResult<Vec<usize>> {
    let mut spans = Vec::with_capacity(offsets.len());
    let mut next_free = 0usize;
    for &offset in offsets {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(row_len));
        match (start, end) {
            (Some(start), Some(end)) if start >= next_free && end <= len => {
                spans.push(start);
                next_free = end;
            }
            _ => {
                return Err(PyValueError::new_err(format!(
                    "row offset {offset} is outside the parameter ({len} elements, rows of \
                     {row_len}) or not after the previous row"
                )))
            }
        }
    }
    Ok(spans)
}

fn buffer(info: &TensorInfo<'_>) -> Buffer {
    Buffer::new(info.addr, info.dtype)
}

/// Checks that `other` can be stepped element by element with `param`, in
/// the parameter's dtype (a state may instead be one the engine loads into the
/// parameter's compute type: bfloat16 states of a float32 parameter).
fn check_companion(param: &TensorInfo<'_>, other: &TensorInfo<'_>, what: &str) -> PyResult<()> {
    check_layout(param, other, what, other.dtype == param.dtype)
}

fn check_state(param: &TensorInfo<'_>, state: &TensorInfo<'_>, what: &str) -> PyResult<()> {
    // (bfloat16 states of a float16 parameter: those of its float32 master copy; the
    // engine refuses them without one, before writing)
    let narrower = supported_formats(param.dtype, state.dtype)
        || (param.dtype == Format::F16 && state.dtype == Format::BF16);
    check_layout(param, state, what, state.dtype == param.dtype || narrower)
}

/// The buffer of state `k` of a parameter: a packed 8-bit blockwise state
/// (a uint8 tensor of `packed_len(n)` bytes for a float32, bfloat16 or
/// float16 parameter of `n` elements) with the map `signed[k]` names, else a
/// state laid out like its parameter (see `check_state`).
fn state_buffer(
    param: &TensorInfo<'_>,
    state: &TensorInfo<'_>,
    signed: Option<bool>,
    what: &str,
) -> PyResult<Buffer> {
    if !state.dtype.is_quantized() {
        check_state(param, state, what)?;
        return Ok(buffer(state));
    }
    let Some(signed) = signed else {
        return Err(not_plannable(format!(
            "{what} is uint8 but its 8-bit map was not named"
        )));
    };
    if param.dtype.compute() != Compute::F32 {
        return Err(not_plannable(format!(
            "{what} is 8-bit but its parameter is {}",
            param.dtype.name()
        )));
    }
    let bytes = packed_len(param.len);
    if state.layout != Layout::Contiguous || state.len != bytes {
        return Err(not_plannable(format!(
            "{what} is not a contiguous packed 8-bit state of {} elements ({bytes} bytes)",
            param.len
        )));
    }
    let format = if signed {
        Format::Q8Signed
    } else {
        Format::Q8Unsigned
    };
    Ok(Buffer::new(state.addr, format))
}

fn check_layout(
    param: &TensorInfo<'_>,
    other: &TensorInfo<'_>,
    what: &str,
    dtype_ok: bool,
) -> PyResult<()> {
    if !dtype_ok {
        return Err(not_plannable(format!(
            "{what} is {} but its parameter is {}",
            other.dtype.name(),
            param.dtype.name()
        )));
    }
    if other.len != param.len {
        return Err(not_plannable(format!(
            "{what} has {} elements but its parameter has {}",
            other.len, param.len
        )));
    }
    let same_layout = match param.layout {
        Layout::Contiguous => other.layout == Layout::Contiguous,
        Layout::Dense => other.layout != Layout::Strided && other.strides()?.eq(param.strides()?)?,
        Layout::Strided => false,
    };
    if !same_layout {
        return Err(not_plannable(format!(
            "{what} is not laid out in memory like its parameter"
        )));
    }
    Ok(())
}

impl GroupPlan {
    fn empty(state_keys: Vec<Py<PyString>>, scalar_keys: Vec<Py<PyString>>) -> GroupPlan {
        GroupPlan {
            params: None,
            state_keys,
            scalar_keys,
            entries: Vec::new(),
            written: WrittenSet::default(),
            ready: Vec::new(),
            keepalive: Vec::new(),
            written_tensors: Vec::new(),
            gathered: false,
            master: false,
            signed: Vec::new(),
            exports: Vec::new(),
            owned_steps: Vec::new(),
        }
    }

    /// A gathered one-shot plan over checked array buffers (see `arrays.rs`),
    /// with plan-owned step counters when `step` is given.
    /// `scalars[i]`: tensor `i`'s scalar slots after its step counter (if any).
    pub fn from_exports(
        mut tensors: Vec<TensorBuffers>,
        exports: Vec<PyUntypedBuffer>,
        step: Option<f64>,
        scalars: Vec<Vec<ScalarSlot>>,
    ) -> GroupPlan {
        let mut plan = GroupPlan::empty(Vec::new(), Vec::new());
        if let Some(step) = step {
            plan.owned_steps = vec![step - 1.0; tensors.len()];
        }
        for (i, (t, extra)) in tensors.iter_mut().zip(scalars).enumerate() {
            let mut slots: Vec<ScalarSlot> = plan
                .owned_steps
                .get_mut(i)
                .map(|counter| ScalarSlot {
                    addr: counter as *mut f64 as usize,
                    format: Format::F64,
                })
                .into_iter()
                .collect();
            slots.extend(extra);
            *t = t.with_scalars(&slots);
        }
        plan.ready = tensors;
        plan.exports = exports;
        plan.gathered = true;
        plan
    }

    /// An empty, gathered plan (drives the panic-conversion test).
    pub fn from_tensors_unchecked_empty() -> GroupPlan {
        let mut plan = GroupPlan::empty(Vec::new(), Vec::new());
        plan.gathered = true;
        plan
    }

    fn clear_gathered(&mut self) {
        self.ready.clear();
        self.keepalive.clear();
        self.written_tensors.clear();
        self.gathered = false;
    }

    /// Runs `step` on the gathered buffers with the GIL released. With
    /// `consume`, the buffers (and the gradients they keep alive) are
    /// forgotten afterwards; otherwise they stay gathered for another pass
    /// (a norm before the update). An engine error (raised before anything
    /// is written) or a panic becomes a Python exception.
    pub fn run<R: Send>(
        &mut self,
        py: Python<'_>,
        consume: bool,
        step: impl FnOnce(&Group<'_>, SimdLevel) -> Result<R, EngineError> + Send,
    ) -> PyResult<R> {
        if !self.gathered {
            return Err(internal("plan run without gathered buffers"));
        }
        let (tensors, keepalive, written) = if consume {
            self.gathered = false;
            (
                std::mem::take(&mut self.ready),
                std::mem::take(&mut self.keepalive),
                std::mem::take(&mut self.written_tensors),
            )
        } else {
            (self.ready.clone(), Vec::new(), Vec::new())
        };
        // SAFETY: every address was read from a live CPU tensor of the recorded
        // dtype and length (TensorInfo::inspect), and those tensors are kept
        // alive by `self.entries` and `keepalive` until this function returns.
        // Overlaps were refused by `check_buffers` (one-shot plans), by
        // `WrittenSet` plus the per-gradient check in `gather` (cached plans), or
        // (row plans, `from_rows`) for the whole tensors, with the rows checked to
        // be disjoint sub-ranges of them.
        let group = unsafe { Group::new_prechecked(tensors) };
        let level = simd::active_level();
        let result = run_caught(py, || step(&group, level));
        drop(group);
        drop(keepalive);
        let result = result?.map_err(engine_error);
        if result.is_ok() && !written.is_empty() {
            bump_versions(py, written)?;
        }
        result
    }

    /// Checks one parameter of a one-shot plan and adds its buffers.
    fn add_one_shot(&mut self, one: OneShot<'_, '_>) -> PyResult<()> {
        let i = one.index;
        // (a bfloat16 or float16 parameter too: the engine steps the formats it has
        // loops for and refuses the rest before writing)
        let info = TensorInfo::inspect_state(one.param, &format!("parameter {i}"))?;
        if info.layout == Layout::Strided {
            return Err(not_plannable(format!(
                "parameter {i} has gaps or overlaps in memory"
            )));
        }
        let what = format!("gradient of parameter {i}");
        let grad = TensorInfo::inspect_state(one.grad, &what)?;
        check_companion(&info, &grad, &what)?;
        let mut states = Vec::with_capacity(one.states.len());
        for (k, tensor) in one.states.into_iter().enumerate() {
            let what = format!("state {k} of parameter {i}");
            let state = TensorInfo::inspect_packed(tensor, &what)?;
            states.push(state_buffer(
                &info,
                &state,
                self.signed.get(k).copied(),
                &what,
            )?);
            self.keepalive.push(tensor.clone().unbind());
        }
        let mut scalars = Vec::with_capacity(one.scalars.len());
        for (k, tensor) in one.scalars.into_iter().enumerate() {
            let what = format!("scalar state {k} of parameter {i}");
            scalars.push(scalar_slot(&TensorInfo::inspect(tensor, &what)?, &what)?);
            self.keepalive.push(tensor.clone().unbind());
        }
        self.written_tensors.push(one.param.clone().unbind());
        self.keepalive.push(one.grad.clone().unbind());
        self.ready.push(
            TensorBuffers::param(info.len, buffer(&info), Some(buffer(&grad)))
                .with_states(&states)
                .with_master_last(self.master)
                .with_scalars(&scalars)
                .with_stream(one.stream),
        );
        Ok(())
    }

    fn inspect_state<'py>(
        &self,
        py: Python<'py>,
        param: &TensorInfo<'py>,
        dict: &Bound<'py, PyDict>,
        index: usize,
    ) -> PyResult<Option<EntryState>> {
        let needs_state = !self.state_keys.is_empty() || !self.scalar_keys.is_empty();
        if dict.is_empty() && needs_state {
            return Ok(None); // lazily created on the parameter's first step
        }
        let mut buffers = Vec::with_capacity(self.state_keys.len());
        let mut states = Vec::with_capacity(self.state_keys.len());
        for (k, key) in self.state_keys.iter().enumerate() {
            let key = key.bind(py);
            let what = format!("state {key:?} of parameter {index}");
            let tensor = dict
                .get_item(key)?
                .ok_or_else(|| not_plannable(format!("{what} is missing")))?;
            let info = TensorInfo::inspect_packed(&tensor, &what)?;
            states.push(state_buffer(
                param,
                &info,
                self.signed.get(k).copied(),
                &what,
            )?);
            buffers.push(Tracked::new(&tensor, info.dtype, &what)?);
        }
        let mut scalars = Vec::with_capacity(self.scalar_keys.len());
        for key in &self.scalar_keys {
            let key = key.bind(py);
            let what = format!("state {key:?} of parameter {index}");
            let tensor = dict
                .get_item(key)?
                .ok_or_else(|| not_plannable(format!("{what} is missing")))?;
            let slot = scalar_slot(&TensorInfo::inspect(&tensor, &what)?, &what)?;
            scalars.push((Tracked::new(&tensor, slot.format, &what)?, slot));
        }
        Ok(Some(EntryState {
            dict: dict.clone().unbind(),
            buffers,
            states,
            scalars,
        }))
    }

    /// Checks one entry for this step (see `Gathered`); `None` means
    /// something could not even be asked, which is a change too.
    fn gather_entry(
        &self,
        hot: &Hot<'_>,
        entry: &Entry,
        param: *mut ffi::PyObject,
    ) -> Option<Gathered> {
        let layout = hot.layout;
        if !entry.param.unchanged(layout, param) {
            return Some(Gathered::Changed);
        }
        let grad = hot.grad(param)?;
        if grad.is_none() {
            return Some(Gathered::NoGrad);
        }
        let Some(state) = &entry.state else {
            return Some(Gathered::Changed); // first gradient: the state must be created
        };
        // The same state tensors, unchanged (`t.data = ...`, `t.set_(...)`,
        // a resized storage all keep the object but not the memory).
        let dict = state.dict.as_ptr();
        for (key, buffer) in self.state_keys.iter().zip(&state.buffers) {
            if !buffer.unchanged(layout, hot.dict_get(dict, key.as_ptr())) {
                return Some(Gathered::Changed);
            }
        }
        for (key, (tracked, _)) in self.scalar_keys.iter().zip(&state.scalars) {
            if !tracked.unchanged(layout, hot.dict_get(dict, key.as_ptr())) {
                return Some(Gathered::Changed);
            }
        }
        let grad_addr = self.grad_address(hot, entry, &grad)?;
        let mut slots = [ScalarSlot::NONE; MAX_SCALARS];
        for (slot, (_, scalar)) in slots.iter_mut().zip(&state.scalars) {
            *slot = *scalar;
        }
        let buffers = TensorBuffers::param(
            entry.len,
            Buffer::new(entry.addr, entry.dtype),
            Some(Buffer::new(grad_addr, entry.dtype)),
        )
        .with_states(&state.states)
        .with_master_last(self.master)
        .with_scalars(&slots[..state.scalars.len()])
        .with_stream(entry.stream);
        Some(Gathered::Ready(buffers, grad))
    }

    /// Where `grad` can be read as `entry.len` elements laid out like the
    /// parameter, or `None` (a change: the slow path looks). torch's `.grad`
    /// setter guarantees dtype, device and shape, but `grad.data = ...`,
    /// `set_`, a resized storage or a negated view bypass it, and a wrong
    /// guess here would read out of bounds: the reading must prove a plain
    /// tensor (exact type, no negation or conjugation bit) of the
    /// parameter's dtype, device, shape and strides whose elements lie
    /// inside its storage, and share no memory with what the step writes.
    fn grad_address(&self, hot: &Hot<'_>, entry: &Entry, grad: &Ref) -> Option<usize> {
        let g = grad.as_ptr();
        if native::type_of(g)? != hot.tensor_type {
            return None;
        }
        // SAFETY: `g` is a live object of exactly torch.Tensor's type; the
        // GIL is held.
        let reading = unsafe { hot.layout.read(g) }?;
        let expected = &entry.param.fingerprint;
        if !reading.same_geometry(expected) || !reading.same_kind(expected) {
            return None;
        }
        let (address, len) = reading.owned_run(entry.dtype)?;
        let bytes = len * entry.dtype.size();
        if len != entry.len
            || !address.is_multiple_of(entry.dtype.size())
            || self.written.overlaps(address, address + bytes)
        {
            return None;
        }
        Some(address)
    }
}

#[pymethods]
impl GroupPlan {
    /// A cached plan for a group's `params` list. `states[i]` is the state
    /// dict of `params[i]` (empty until its first step); with `master`, the
    /// last state key names each parameter's float32 master copy; `signed[k]`:
    /// whether state `k`, when it is a packed 8-bit (uint8) tensor, uses the
    /// signed map (else the unsigned one). Raises
    /// `ValueError` if the group cannot be planned (the caller then keeps the
    /// slow path).
    #[new]
    #[pyo3(signature = (params, states, state_keys, scalar_keys, master = false, signed = Vec::new()))]
    fn new(
        py: Python<'_>,
        params: &Bound<'_, PyList>,
        states: Vec<Bound<'_, PyDict>>,
        state_keys: Vec<Bound<'_, PyString>>,
        scalar_keys: Vec<Bound<'_, PyString>>,
        master: bool,
        signed: Vec<bool>,
    ) -> PyResult<GroupPlan> {
        if states.len() != params.len() {
            return Err(PyValueError::new_err(
                "one state dict per parameter expected",
            ));
        }
        if state_keys.len() > STATE_SLOTS || scalar_keys.len() > MAX_SCALARS {
            return Err(PyValueError::new_err(
                "too many state buffers per parameter",
            ));
        }
        let mut plan = GroupPlan::empty(
            state_keys.into_iter().map(Bound::unbind).collect(),
            scalar_keys.into_iter().map(Bound::unbind).collect(),
        );
        plan.master = master;
        plan.signed = signed;
        let mut written = Vec::with_capacity(params.len());
        for (index, (param, dict)) in params.iter().zip(&states).enumerate() {
            let what = format!("parameter {index}");
            let info = TensorInfo::inspect_state(&param, &what)?;
            if info.layout == Layout::Strided {
                return Err(not_plannable(format!(
                    "{what} has gaps or overlaps in memory"
                )));
            }
            let tracked = Tracked::new(&param, info.dtype, &what)?;
            let state = plan.inspect_state(py, &info, dict, index)?;
            let states_now = state.as_ref().map_or(&[][..], |s| &s.states[..]);
            written
                .push(TensorBuffers::param(info.len, buffer(&info), None).with_states(states_now));
            let mut hints = Vec::new();
            tracked.hints(&mut hints);
            if let Some(state) = &state {
                hints.push(state.dict.as_ptr() as usize);
                for tracked in state
                    .buffers
                    .iter()
                    .chain(state.scalars.iter().map(|(t, _)| t))
                {
                    tracked.hints(&mut hints);
                }
            }
            plan.entries.push(Entry {
                param: tracked,
                addr: info.addr,
                len: info.len,
                dtype: info.dtype,
                stream: index as u64,
                state,
                hints,
            });
        }
        plan.written = WrittenSet::new(&written).map_err(|e| not_plannable(e.to_string()))?;
        plan.params = Some(params.clone().unbind());
        Ok(plan)
    }

    /// A one-shot plan over explicit tensors (already validated and laid out
    /// by the caller; re-checked here): `states[k][i]` is state buffer `k` of
    /// parameter `i`, `scalars[k][i]` its scalar state slot `k` (a 0-d tensor);
    /// `streams[i]` parameter `i`'s stream of stochastic rounding (its index in
    /// its param group; default: `i`); with `master`, each parameter's last
    /// state is its float32 master copy; `signed[k]` as for `GroupPlan(...)`.
    #[staticmethod]
    #[pyo3(signature = (params, grads, states, scalars, streams = None, master = false, signed = Vec::new()))]
    fn from_tensors(
        params: Vec<Bound<'_, PyAny>>,
        grads: Vec<Bound<'_, PyAny>>,
        states: Vec<Vec<Bound<'_, PyAny>>>,
        scalars: Vec<Vec<Bound<'_, PyAny>>>,
        streams: Option<Vec<u64>>,
        master: bool,
        signed: Vec<bool>,
    ) -> PyResult<GroupPlan> {
        let n = params.len();
        let streams = streams.unwrap_or_else(|| (0..n as u64).collect());
        if grads.len() != n
            || streams.len() != n
            || states.iter().chain(&scalars).any(|s| s.len() != n)
        {
            return Err(PyValueError::new_err(
                "params, grads, streams and every state and scalar list must have the same length",
            ));
        }
        if states.len() > STATE_SLOTS || scalars.len() > MAX_SCALARS {
            return Err(PyValueError::new_err(
                "too many state buffers per parameter",
            ));
        }
        let mut plan = GroupPlan::empty(Vec::new(), Vec::new());
        plan.master = master;
        plan.signed = signed;
        for i in 0..n {
            plan.add_one_shot(OneShot {
                index: i,
                stream: streams[i],
                param: &params[i],
                grad: &grads[i],
                states: states.iter().map(|list| &list[i]).collect(),
                scalars: scalars.iter().map(|list| &list[i]).collect(),
            })?;
        }
        check_buffers(&plan.ready).map_err(|e| PyValueError::new_err(e.to_string()))?;
        plan.gathered = true;
        Ok(plan)
    }

    /// A one-shot plan over the touched rows of a contiguous parameter
    /// (SparseAdam's coalesced sparse gradient): row `r` of `values` (`row_len`
    /// elements) is the gradient of elements `offsets[r] .. offsets[r] + row_len`
    /// of `param` and of each state. `offsets` is an int64 buffer (a NumPy view
    /// of the indices); the rows must lie inside the parameter, in increasing
    /// order, without overlapping.
    #[staticmethod]
    fn from_rows(
        param: Bound<'_, PyAny>,
        states: Vec<Bound<'_, PyAny>>,
        values: Bound<'_, PyAny>,
        offsets: &Bound<'_, PyAny>,
        row_len: usize,
    ) -> PyResult<GroupPlan> {
        if states.len() > MAX_STATES {
            return Err(PyValueError::new_err(
                "too many state buffers per parameter",
            ));
        }
        let info = TensorInfo::inspect(&param, "parameter")?;
        if info.layout != Layout::Contiguous {
            return Err(not_plannable("the parameter is not contiguous".to_string()));
        }
        let mut state_buffers = Vec::with_capacity(states.len());
        for (k, tensor) in states.iter().enumerate() {
            let what = format!("state {k}");
            let state = TensorInfo::inspect(tensor, &what)?;
            check_companion(&info, &state, &what)?;
            state_buffers.push(buffer(&state));
        }
        let grad = TensorInfo::inspect(&values, "gradient values")?;
        if grad.dtype != info.dtype || grad.layout != Layout::Contiguous {
            return Err(not_plannable(format!(
                "gradient values must be contiguous {}",
                info.dtype.name()
            )));
        }
        let offsets: Vec<i64> = PyBuffer::<i64>::get(offsets)
            .and_then(|b| b.to_vec(offsets.py()))
            .map_err(|_| PyValueError::new_err("offsets must be an int64 buffer"))?;
        let rows = row_spans(&offsets, row_len, info.len)?;
        if rows.len().checked_mul(row_len) != Some(grad.len) {
            return Err(PyValueError::new_err(format!(
                "gradient values have {} elements, not {} rows of {row_len}",
                grad.len,
                rows.len()
            )));
        }
        // The whole tensors are checked once (param and states written, values read):
        // every row is a sub-range of them, and rows are disjoint (`row_spans`), so
        // no row's buffers can overlap another's. (Checking thousands of rows one by
        // one cost more than stepping them.)
        let whole = TensorBuffers::param(info.len, buffer(&info), None).with_states(&state_buffers);
        let written =
            WrittenSet::new(&[whole]).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let size = info.dtype.size();
        if grad.len > 0 && written.overlaps(grad.addr, grad.addr + grad.len * size) {
            return Err(PyValueError::new_err(
                "the gradient values share memory with the parameter or its state",
            ));
        }
        let mut plan = GroupPlan::empty(Vec::new(), Vec::new());
        for (r, &start) in rows.iter().enumerate() {
            let at = |b: &Buffer, element: usize| Buffer::new(b.addr + element * size, b.format);
            let row_states: Vec<Buffer> = state_buffers.iter().map(|s| at(s, start)).collect();
            plan.ready.push(
                TensorBuffers::param(
                    row_len,
                    at(&buffer(&info), start),
                    Some(at(&buffer(&grad), r * row_len)),
                )
                .with_states(&row_states),
            );
        }
        plan.keepalive
            .extend(states.iter().map(|s| s.clone().unbind()));
        plan.keepalive.push(values.unbind());
        plan.written_tensors.push(param.unbind());
        plan.gathered = true;
        Ok(plan)
    }

    /// A one-shot plan over arrays (the functional API): `states` are
    /// `(name, arrays)` pairs in kernel order, `step` the 1-based step number.
    #[staticmethod]
    #[pyo3(signature = (params, grads, states, step, scalars = Vec::new()))]
    fn from_arrays(
        params: Vec<Bound<'_, PyAny>>,
        grads: Vec<Bound<'_, PyAny>>,
        states: Vec<(String, Vec<Bound<'_, PyAny>>)>,
        step: Option<f64>,
        scalars: Vec<(String, Vec<Bound<'_, PyAny>>)>,
    ) -> PyResult<GroupPlan> {
        super::arrays::plan_arrays(&params, &grads, &states, step, &scalars)
    }

    /// A one-shot plan over gradients alone, for clipping: each gradient is
    /// the written buffer. Gradients must be distinct CPU float32/float64
    /// tensors, each one run of memory.
    #[staticmethod]
    fn from_grads(grads: Vec<Bound<'_, PyAny>>) -> PyResult<GroupPlan> {
        let mut plan = GroupPlan::empty(Vec::new(), Vec::new());
        for (i, grad) in grads.iter().enumerate() {
            let info = TensorInfo::inspect(grad, &format!("gradient {i}"))?;
            if info.layout == Layout::Strided {
                return Err(not_plannable(format!(
                    "gradient {i} has gaps or overlaps in memory"
                )));
            }
            plan.ready
                .push(TensorBuffers::grad_only(info.len, buffer(&info)));
            plan.written_tensors.push(grad.clone().unbind());
        }
        check_buffers(&plan.ready).map_err(|e| PyValueError::new_err(e.to_string()))?;
        plan.gathered = true;
        Ok(plan)
    }

    /// Re-checks the cached plan against the group as it is now and gathers
    /// this step's gradients. `False`: something changed (or a parameter got
    /// its first gradient); nothing was gathered and the caller takes the slow
    /// path.
    fn gather(&mut self, py: Python<'_>) -> PyResult<bool> {
        self.clear_gathered();
        let Some(params) = &self.params else {
            return Ok(false);
        };
        let params = params.bind(py).clone();
        if params.len() != self.entries.len() {
            return Ok(false);
        }
        let Some(hot) = Hot::new(py)? else {
            return Ok(false);
        };
        let mut ready = Vec::with_capacity(self.entries.len());
        let mut keepalive = Vec::with_capacity(2 * self.entries.len());
        let mut written = Vec::with_capacity(self.entries.len());
        for (index, (entry, param)) in self.entries.iter().zip(params.iter()).enumerate() {
            if let Some(ahead) = self.entries.get(index + LOOKAHEAD) {
                ahead.prefetch();
            }
            match self.gather_entry(&hot, entry, param.as_ptr()) {
                None | Some(Gathered::Changed) => return Ok(false),
                Some(Gathered::NoGrad) => {}
                Some(Gathered::Ready(buffers, grad)) => {
                    ready.push(buffers);
                    keepalive.push(grad.into_py(py));
                    written.push(entry.param.tensor.clone_ref(py));
                }
            }
        }
        self.ready = ready;
        self.keepalive = keepalive;
        self.written_tensors = written;
        self.gathered = true;
        Ok(true)
    }

    /// Forgets gathered gradients without running (after another group failed).
    fn release(&mut self) {
        self.clear_gathered();
    }
}

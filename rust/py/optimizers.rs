//! The one entry point of every element-wise optimizer: a [`Kernel`] is a
//! registered kernel (see `kernels/registry.rs`) with its hyperparameters
//! read *by name* from a param-group mapping, in the prepare phase (so a bad
//! value raises before anything is written); `Kernel.step` runs it over a
//! gathered plan.

use std::cell::RefCell;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyMapping, PyString, PyTuple};

use super::error::{hyper_error, not_plannable, unknown_kernel};
use super::hot::Hot;
use super::native;
use super::plan::GroupPlan;
use super::tensor::{Layout, TensorInfo};
use crate::engine::{Buffer, HyperError, HyperRecord, HyperSource, StepContext, TensorScalar};
use crate::kernels::adafactor::{self, AdafactorHyper, Epsilons, Moment};
use crate::kernels::lamb::{self, LambHyper, LambStep};
use crate::kernels::registry::{Configured, NAMES};

/// A param group (or any mapping) as a source of hyperparameters.
struct GroupSource<'a, 'py> {
    group: &'a Bound<'py, PyMapping>,
    /// The exception Python itself raised for a malformed value, where its
    /// message is what torch's step would show (unpacking `betas`).
    python_error: RefCell<Option<PyErr>>,
}

impl GroupSource<'_, '_> {
    fn item(&self, name: &'static str) -> Result<Bound<'_, PyAny>, HyperError> {
        let py = self.group.py();
        self.group
            .get_item(interned(py, name))
            .map_err(|_| HyperError::Missing(name.to_string()))
    }
}

/// A name's (address, length) and its Python string.
type InternedName = ((usize, usize), Py<PyString>);

/// Slots of the per-thread name cache (a power of two, well above the few dozen
/// hyperparameter names).
const NAME_SLOTS: usize = 256;

/// `name` as a Python string made once: every step reads each hyperparameter by
/// name, and a string made (and hashed) per read cost about a third of a
/// microsecond per step on a 16-element AdamW. The names are the records' string
/// literals: a per-thread direct-mapped cache indexed by the literal's address
/// finds one in a single probe (a list searched from the front cost ~30 ns a read).
fn interned<'py>(py: Python<'py>, name: &'static str) -> Bound<'py, PyString> {
    thread_local! {
        static NAMES: RefCell<Vec<Option<InternedName>>> =
            RefCell::new((0..NAME_SLOTS).map(|_| None).collect());
    }
    // (address and length: one literal may start where a longer one does)
    let key = (name.as_ptr() as usize, name.len());
    let slot = (key.0 ^ (key.0 >> 9) ^ key.1) % NAME_SLOTS;
    NAMES.with_borrow_mut(|names| {
        if let Some((k, string)) = &names[slot] {
            if *k == key {
                return string.bind(py).clone();
            }
        }
        let string = PyString::intern(py, name);
        names[slot] = Some((key, string.clone().unbind()));
        string
    })
}

fn type_error(name: &str, value: &Bound<'_, PyAny>) -> HyperError {
    let type_name = value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string());
    let repr = value
        .repr()
        .map_or_else(|_| "?".to_string(), |r| r.to_string());
    HyperError::Type {
        name: name.to_string(),
        found: format!("{type_name}: {repr}"),
    }
}

/// The exception `first, second = value` raises, if any.
fn unpack_error(value: &Bound<'_, PyAny>, count: usize) -> Option<PyErr> {
    let py = value.py();
    let locals = PyDict::new(py);
    locals.set_item("value", value).ok()?;
    let unpacking = if count == 3 {
        c"first, second, third = value"
    } else {
        c"first, second = value"
    };
    py.run(unpacking, None, Some(&locals)).err()
}

impl GroupSource<'_, '_> {
    /// `N` numbers, unpacked as the optimizer's step unpacks them (`beta1, beta2 =
    /// group["betas"]`): what does not unpack raises what that unpacking raises.
    fn numbers<const N: usize>(&self, name: &'static str) -> Result<[f64; N], HyperError> {
        let value = self.item(name)?;
        let mut out = [0.0; N];
        // (every step reads `betas`: a tuple of the right length, the usual value, is
        // read in place, without collecting its items first)
        if let Ok(tuple) = value.cast_exact::<PyTuple>() {
            if tuple.len() == N {
                for (slot, item) in out.iter_mut().zip(tuple.iter()) {
                    *slot = number(name, &item)?;
                }
                return Ok(out);
            }
        }
        let items = value
            .try_iter()
            .and_then(|it| it.collect::<PyResult<Vec<_>>>())
            .ok()
            .filter(|items| items.len() == N);
        let Some(items) = items else {
            *self.python_error.borrow_mut() = unpack_error(&value, N);
            return Err(type_error(name, &value));
        };
        for (slot, item) in out.iter_mut().zip(&items) {
            *slot = number(name, item)?;
        }
        Ok(out)
    }
}

/// A real number as torch's step computes with it: Python numbers and
/// 1-element tensors (via `__float__`); strings and `None` are refused.
fn number(name: &str, value: &Bound<'_, PyAny>) -> Result<f64, HyperError> {
    if value.is_instance_of::<PyString>() {
        return Err(type_error(name, value));
    }
    value.extract::<f64>().map_err(|_| type_error(name, value))
}

impl HyperSource for GroupSource<'_, '_> {
    fn number(&self, name: &'static str) -> Result<TensorScalar, HyperError> {
        let value = self.item(name)?;
        // (the common cases first, without the tensor checks: `weight_decay=0` is an int)
        if let Ok(float) = value.cast_exact::<PyFloat>() {
            return Ok(TensorScalar::of(float.value()));
        }
        if value.is_exact_instance_of::<PyInt>() || value.is_exact_instance_of::<PyBool>() {
            if let Ok(number) = value.extract::<f64>() {
                return Ok(TensorScalar::of(number));
            }
        }
        let result = number(name, &value)?;
        let is_f32_tensor = super::tensor::is_float32_tensor(&value);
        Ok(TensorScalar {
            value: result,
            is_f32_tensor,
        })
    }

    fn flag(&self, name: &'static str) -> Result<bool, HyperError> {
        let value = self.item(name)?;
        value.is_truthy().map_err(|_| type_error(name, &value))
    }

    fn pair(&self, name: &'static str) -> Result<[f64; 2], HyperError> {
        self.numbers(name)
    }

    fn triple(&self, name: &'static str) -> Result<[f64; 3], HyperError> {
        self.numbers(name)
    }

    fn is_none(&self, name: &'static str) -> Result<bool, HyperError> {
        Ok(self.item(name)?.is_none())
    }
}

/// A registered kernel with its hyperparameters read from a param group.
#[pyclass(module = "ferroptim._core", frozen)]
pub struct Kernel {
    configured: Configured,
}

#[pymethods]
impl Kernel {
    /// Reads kernel `name`'s hyperparameters from `group` by name. Raises
    /// `KeyError` for a missing entry and `TypeError` for one that is not a
    /// number (torch's errors for the same group).
    #[new]
    fn new(name: &str, group: &Bound<'_, PyMapping>) -> PyResult<Kernel> {
        let source = GroupSource {
            group,
            python_error: RefCell::new(None),
        };
        let read = Configured::read(name, &source)
            .map_err(|e| source.python_error.take().unwrap_or_else(|| hyper_error(e)))?;
        match read {
            Some(configured) => Ok(Kernel { configured }),
            None => Err(unknown_kernel(name, NAMES)),
        }
    }

    #[getter]
    fn name(&self) -> &'static str {
        self.configured.name()
    }

    /// State buffers this group's step reads and writes, in kernel order.
    #[getter]
    fn state_keys(&self) -> Vec<&'static str> {
        self.configured.state_keys().to_vec()
    }

    /// Per-tensor scalar state (`step` first where the kernel counts steps).
    #[getter]
    fn scalar_keys(&self) -> Vec<&'static str> {
        self.configured.scalar_keys().to_vec()
    }

    /// Steps the gathered plan: every gradient multiplied by `unscale` then
    /// `clip` as it is read; `fresh`: the plan's lazily created state
    /// buffers are new (written, not read); `ema`: the weight `1 - ema_decay`
    /// of the parameters' moving average, each tensor's last state buffer
    /// (after the kernel's), updated right after the step; `stochastic`: the
    /// group's per-step key of stochastic rounding (narrow states and
    /// parameters round stochastically; None: to nearest).
    #[pyo3(signature = (plan, unscale = 1.0, clip = 1.0, fresh = false, *, ema = None, stochastic = None))]
    fn step(
        &self,
        plan: &Bound<'_, GroupPlan>,
        unscale: f64,
        clip: f64,
        fresh: bool,
        ema: Option<f64>,
        stochastic: Option<u64>,
    ) -> PyResult<()> {
        let ctx = StepContext {
            unscale,
            clip,
            fresh,
            ema,
            stochastic,
        };
        let configured = &self.configured;
        plan.borrow_mut().run(plan.py(), true, |group, level| {
            configured.step(group, &ctx, level)
        })
    }

    fn __repr__(&self) -> String {
        format!("Kernel({:?})", self.configured)
    }
}

/// Names of every registered kernel.
#[pyfunction]
pub fn kernel_names() -> Vec<&'static str> {
    NAMES.to_vec()
}

/// A tensor's second moment as Python hands it over: `(variance, None, 0, 0, 0)` for a
/// vector or scalar, `(row_var, col_var, batch, rows, cols)` for a param viewed as
/// `batch` row-major `rows × cols` matrices.
type MomentArgs<'py> = (
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    usize,
    usize,
    usize,
);

/// Adafactor's step (`kernels/adafactor.rs`): its hyperparameters read by name from
/// a param group now, the epsilons given resolved (torch's `eps1=None` depends on
/// the group's first param with a gradient).
#[pyclass(module = "ferroptim._core", frozen)]
pub struct AdafactorKernel {
    hyper: AdafactorHyper,
    eps: Epsilons,
}

/// A moment tensor's buffer and how many elements it holds.
fn moment_buffer(
    hot: Option<&Hot<'_>>,
    tensor: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<(Buffer, usize)> {
    // A raw reading of torch's metadata first (a plain CPU float tensor, row-major, its
    // elements inside its storage: what the cached plans' re-check proves, at a
    // fraction of the Python calls), else torch's Python API.
    if let Some(hot) = hot {
        let object = tensor.as_ptr();
        if native::type_of(object) == Some(hot.tensor_type) {
            // SAFETY: `object` is a live object of exactly torch.Tensor's type (checked
            // just above) that `tensor` holds a reference to; the GIL is held.
            if let Some(reading) = unsafe { hot.layout.read(object) } {
                if let Some(dtype) = hot.layout.plain_dtype(&reading) {
                    if reading.is_row_major() {
                        if let Some((addr, len)) = reading.owned_run(dtype) {
                            return Ok((Buffer::new(addr, dtype), len));
                        }
                    }
                }
            }
        }
    }
    let info = TensorInfo::inspect(tensor, what)?;
    if info.layout != Layout::Contiguous {
        return Err(not_plannable(format!("{what} is not contiguous")));
    }
    Ok((Buffer::new(info.addr, info.dtype), info.len))
}

#[pymethods]
impl AdafactorKernel {
    #[new]
    fn new(group: &Bound<'_, PyMapping>, eps1: f64, eps2: f64) -> PyResult<AdafactorKernel> {
        let source = GroupSource {
            group,
            python_error: RefCell::new(None),
        };
        let hyper = AdafactorHyper::read(&source)
            .map_err(|e| source.python_error.take().unwrap_or_else(|| hyper_error(e)))?;
        Ok(AdafactorKernel {
            hyper,
            eps: Epsilons { eps1, eps2 },
        })
    }

    /// The kernel's name (as `Kernel.name`).
    #[getter]
    fn name(&self) -> &'static str {
        "adafactor"
    }

    /// Element-wise state buffers in the plan: none (the moments come beside it).
    #[getter]
    fn state_keys(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Per-tensor scalar state: the step counter.
    #[getter]
    fn scalar_keys(&self) -> Vec<&'static str> {
        vec!["step"]
    }

    /// Steps the gathered plan (param, grad and step counter per tensor) with each
    /// tensor's second moment from `moments` (see `MomentArgs`), checked first:
    /// contiguous, the param's dtype and size, sharing no memory with anything the
    /// step reads or writes.
    #[pyo3(signature = (plan, moments, unscale = 1.0, clip = 1.0))]
    fn step(
        &self,
        py: Python<'_>,
        plan: &Bound<'_, GroupPlan>,
        moments: Vec<MomentArgs<'_>>,
        unscale: f64,
        clip: f64,
    ) -> PyResult<()> {
        let hot = Hot::new(py)?;
        let hot = hot.as_ref();
        let mut parsed = Vec::with_capacity(moments.len());
        let mut sizes = Vec::with_capacity(moments.len());
        for (i, (first, second, batch, rows, cols)) in moments.iter().enumerate() {
            // (sizes: `adafactor::check` compares them with the param's before any write)
            let what = |name: &str| format!("{name} of parameter {i}");
            let (a, a_len) = moment_buffer(
                hot,
                first,
                &what(if second.is_some() {
                    "row_var"
                } else {
                    "variance"
                }),
            )?;
            parsed.push(match second {
                None => {
                    sizes.push([a_len, 0]);
                    Moment::Full { variance: a }
                }
                Some(second) => {
                    let (b, b_len) = moment_buffer(hot, second, &what("col_var"))?;
                    sizes.push([a_len, b_len]);
                    Moment::Factored {
                        batch: *batch,
                        rows: *rows,
                        cols: *cols,
                        row_var: a,
                        col_var: b,
                    }
                }
            });
        }
        let ctx = StepContext {
            unscale,
            clip,
            ..StepContext::default()
        };
        let (hyper, eps) = (&self.hyper, self.eps);
        // (`moments` keeps the tensors alive until the run returns)
        plan.borrow_mut().run(py, true, |group, level| {
            adafactor::step(group, &parsed, &sizes, hyper, eps, &ctx, level)
        })
    }

    fn __repr__(&self) -> String {
        format!("AdafactorKernel({:?}, {:?})", self.hyper, self.eps)
    }
}

/// LAMB's step (`kernels/lamb.rs`): its hyperparameters read by name from a param
/// group now, the step size and the pre-norm scale given as the reference's Python
/// computes them.
#[pyclass(module = "ferroptim._core", frozen)]
pub struct LambKernel {
    hyper: LambHyper,
    step_size: f64,
}

#[pymethods]
impl LambKernel {
    #[new]
    fn new(group: &Bound<'_, PyMapping>, step_size: f64) -> PyResult<LambKernel> {
        let source = GroupSource {
            group,
            python_error: RefCell::new(None),
        };
        let hyper = LambHyper::read(&source)
            .map_err(|e| source.python_error.take().unwrap_or_else(|| hyper_error(e)))?;
        Ok(LambKernel { hyper, step_size })
    }

    /// The kernel's name (as `Kernel.name`).
    #[getter]
    fn name(&self) -> &'static str {
        "lamb"
    }

    /// State buffers in the plan, in kernel order.
    #[getter]
    fn state_keys(&self) -> Vec<&'static str> {
        vec!["exp_avg", "exp_avg_sq"]
    }

    /// Steps the gathered plan (param, grad, `exp_avg`, `exp_avg_sq` per tensor);
    /// returns every tensor's weight norm, then every adam norm, then every trust
    /// ratio (each rounded to its tensor's dtype). `pre_scale`: the reference's
    /// `pre_norm` gradient scale.
    #[pyo3(signature = (plan, unscale = 1.0, clip = 1.0, pre_scale = 1.0))]
    fn step(
        &self,
        py: Python<'_>,
        plan: &Bound<'_, GroupPlan>,
        unscale: f64,
        clip: f64,
        pre_scale: f64,
    ) -> PyResult<Vec<f64>> {
        let ctx = StepContext {
            unscale,
            clip,
            ..StepContext::default()
        };
        let hyper = &self.hyper;
        let step = &LambStep {
            step_size: self.step_size,
            pre_scale,
        };
        let norms = plan.borrow_mut().run(py, true, |group, level| {
            lamb::step(group, hyper, step, &ctx, level)
        })?;
        Ok((0..3)
            .flat_map(|k| norms.iter().map(move |n| n[k]))
            .collect())
    }

    fn __repr__(&self) -> String {
        format!(
            "LambKernel({:?}, step_size={:?})",
            self.hyper, self.step_size
        )
    }
}

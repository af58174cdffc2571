//! Reading what the engine needs from a torch tensor: address, length, dtype,
//! layout, and proof that the memory it describes is the tensor's own.
//! Everything goes through torch's public Python API (`data_ptr()`,
//! `numel()`, `dtype`, `is_cpu`, `stride()`, `untyped_storage()`), as
//! safetensors' torch glue does. This is the slow path's check; cached plans
//! re-check with raw readings (`native`).

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::engine::{is_dense, Format};

/// torch's dtype objects, fetched once.
pub struct TorchDtypes {
    pub float32: Py<PyAny>,
    pub float64: Py<PyAny>,
    pub bfloat16: Py<PyAny>,
    pub float16: Py<PyAny>,
    pub uint8: Py<PyAny>,
    pub tensor_type: Py<PyAny>,
}

static TORCH: PyOnceLock<TorchDtypes> = PyOnceLock::new();

pub fn torch(py: Python<'_>) -> PyResult<&TorchDtypes> {
    TORCH.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        Ok(TorchDtypes {
            float32: torch.getattr("float32")?.unbind(),
            float64: torch.getattr("float64")?.unbind(),
            bfloat16: torch.getattr("bfloat16")?.unbind(),
            float16: torch.getattr("float16")?.unbind(),
            uint8: torch.getattr("uint8")?.unbind(),
            tensor_type: torch.getattr("Tensor")?.unbind(),
        })
    })
}

/// The engine dtype for a torch dtype object, if the engine handles it.
pub fn engine_dtype(py: Python<'_>, dtype: &Bound<'_, PyAny>) -> PyResult<Option<Format>> {
    let torch = torch(py)?;
    Ok(if dtype.is(&torch.float32) {
        Some(Format::F32)
    } else if dtype.is(&torch.float64) {
        Some(Format::F64)
    } else {
        None
    })
}

/// The storage format for a torch dtype the engine keeps states in besides
/// the compute dtypes (bfloat16, float16), if it is one.
pub fn narrow_dtype(py: Python<'_>, dtype: &Bound<'_, PyAny>) -> PyResult<Option<Format>> {
    let torch = torch(py)?;
    Ok(if dtype.is(&torch.bfloat16) {
        Some(Format::BF16)
    } else if dtype.is(&torch.float16) {
        Some(Format::F16)
    } else {
        None
    })
}

/// Whether `value` is a float32 torch tensor (a learning rate torch computes
/// per-step scalars with in float32 tensor arithmetic).
pub fn is_float32_tensor(value: &Bound<'_, PyAny>) -> bool {
    let py = value.py();
    let Ok(torch) = torch(py) else {
        return false;
    };
    value
        .is_instance(torch.tensor_type.bind(py))
        .unwrap_or(false)
        && value
            .getattr(pyo3::intern!(py, "dtype"))
            .is_ok_and(|dtype| dtype.is(&torch.float32))
}

/// How a tensor's elements sit in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major contiguous.
    Contiguous,
    /// Every element exactly once in `numel` consecutive slots, in some other
    /// dimension order (a transposed or channels-last tensor).
    Dense,
    /// Gaps or overlaps: cannot be stepped in place as one run of memory.
    Strided,
}

/// What the engine needs to know about one tensor.
pub struct TensorInfo<'py> {
    pub tensor: Bound<'py, PyAny>,
    pub addr: usize,
    pub len: usize,
    pub dtype: Format,
    pub layout: Layout,
}

impl<'py> TensorInfo<'py> {
    /// Inspects a CPU float32/float64 strided tensor; any other tensor is a
    /// `ValueError` naming `what`.
    pub fn inspect(tensor: &Bound<'py, PyAny>, what: &str) -> PyResult<TensorInfo<'py>> {
        Self::inspect_with(tensor, what, false, false)
    }

    /// As [`inspect`](Self::inspect), a bfloat16 or float16 tensor accepted too
    /// (a state buffer kept narrower than its parameter).
    pub fn inspect_state(tensor: &Bound<'py, PyAny>, what: &str) -> PyResult<TensorInfo<'py>> {
        Self::inspect_with(tensor, what, true, false)
    }

    /// As [`inspect_state`](Self::inspect_state), a uint8 tensor accepted too
    /// (a packed 8-bit blockwise state: its dtype reads as
    /// [`Format::Q8Signed`] until the plan names its map).
    pub fn inspect_packed(tensor: &Bound<'py, PyAny>, what: &str) -> PyResult<TensorInfo<'py>> {
        Self::inspect_with(tensor, what, true, true)
    }

    fn inspect_with(
        tensor: &Bound<'py, PyAny>,
        what: &str,
        narrow: bool,
        packed: bool,
    ) -> PyResult<TensorInfo<'py>> {
        let py = tensor.py();
        if !tensor.is_instance(torch(py)?.tensor_type.bind(py))? {
            return Err(PyValueError::new_err(format!(
                "{what} is not a torch.Tensor"
            )));
        }
        if !tensor.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
            return Err(PyValueError::new_err(format!("{what} is not on the CPU")));
        }
        if tensor.getattr(intern!(py, "is_sparse"))?.is_truthy()? {
            return Err(PyValueError::new_err(format!("{what} is sparse")));
        }
        let dtype_obj = tensor.getattr(intern!(py, "dtype"))?;
        let narrowed = if narrow {
            narrow_dtype(py, &dtype_obj)?
        } else {
            None
        };
        let narrowed =
            narrowed.or((packed && dtype_obj.is(&torch(py)?.uint8)).then_some(Format::Q8Signed));
        let dtype = engine_dtype(py, &dtype_obj)?.or(narrowed).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{what} has dtype {dtype_obj}, not float32 or float64"
            ))
        })?;
        for bit in [intern!(py, "is_neg"), intern!(py, "is_conj")] {
            if tensor.call_method0(bit)?.is_truthy()? {
                // Lazily negated or conjugated: the memory holds other values.
                return Err(PyValueError::new_err(format!(
                    "{what} is a negated or conjugated view ({bit}())"
                )));
            }
        }
        let len: usize = tensor.call_method0(intern!(py, "numel"))?.extract()?;
        let addr: usize = tensor.call_method0(intern!(py, "data_ptr"))?.extract()?;
        let layout = layout_of(tensor)?;
        check_inside_storage(tensor, addr, dtype, what)?;
        Ok(TensorInfo {
            tensor: tensor.clone(),
            addr,
            len,
            dtype,
            layout,
        })
    }

    pub fn strides(&self) -> PyResult<Bound<'py, PyTuple>> {
        Ok(self
            .tensor
            .call_method0(intern!(self.tensor.py(), "stride"))?
            .cast_into::<PyTuple>()?)
    }
}

/// Refuses a tensor whose elements do not all lie inside its storage (a
/// storage resized under the tensor, say: torch itself then reads and writes
/// out of bounds).
fn check_inside_storage(
    tensor: &Bound<'_, PyAny>,
    addr: usize,
    dtype: Format,
    what: &str,
) -> PyResult<()> {
    let py = tensor.py();
    let shape: Vec<u64> = tensor.getattr(intern!(py, "shape"))?.extract()?;
    if shape.contains(&0) {
        return Ok(()); // no elements, no memory
    }
    let strides: Vec<i64> = tensor.call_method0(intern!(py, "stride"))?.extract()?;
    let storage = tensor.call_method0(intern!(py, "untyped_storage"))?;
    let start: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let bytes: u128 = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
    // The furthest element, in elements from the first one.
    let mut reach: u128 = 0;
    for (&size, &stride) in shape.iter().zip(&strides) {
        let Ok(stride) = u128::try_from(stride) else {
            return Err(PyValueError::new_err(format!(
                "{what} has a negative stride"
            )));
        };
        reach += u128::from(size - 1) * stride;
    }
    let size = dtype.size() as u128;
    let inside = start != 0
        && addr >= start
        && ((addr - start) as u128).is_multiple_of(size)
        && (addr - start) as u128 + (reach + 1) * size <= bytes;
    if !inside {
        return Err(PyValueError::new_err(format!(
            "{what} reaches outside its storage ({bytes} bytes): was the storage resized?"
        )));
    }
    Ok(())
}

fn layout_of(tensor: &Bound<'_, PyAny>) -> PyResult<Layout> {
    let py = tensor.py();
    if tensor
        .call_method0(intern!(py, "is_contiguous"))?
        .is_truthy()?
    {
        return Ok(Layout::Contiguous);
    }
    let shape: Vec<usize> = tensor.getattr(intern!(py, "shape"))?.extract()?;
    let strides: Vec<isize> = tensor.call_method0(intern!(py, "stride"))?.extract()?;
    Ok(if is_dense(&shape, &strides) {
        Layout::Dense
    } else {
        Layout::Strided
    })
}

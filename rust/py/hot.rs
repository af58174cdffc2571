//! The per-step re-check calls into CPython twice per parameter (its `grad`,
//! its state dict) and otherwise reads torch's objects directly (see
//! `native`); these thin wrappers skip PyO3's conveniences (error objects,
//! generic conversions) on that path. Every failure just means "changed":
//! the caller then takes the slow path, which reports real errors the way
//! torch does.

use std::ptr::NonNull;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

use super::native::{self, Layout};

/// An owned reference returned by the C API, released on drop.
pub struct Ref(NonNull<ffi::PyObject>);

impl Ref {
    /// Takes ownership of a new reference; `None` (with the error cleared) for null.
    ///
    /// # Safety
    /// The GIL is held and `ptr` is a new reference or null.
    unsafe fn new(ptr: *mut ffi::PyObject) -> Option<Ref> {
        match NonNull::new(ptr) {
            Some(ptr) => Some(Ref(ptr)),
            None => {
                // SAFETY: the GIL is held (caller's contract).
                unsafe { ffi::PyErr_Clear() };
                None
            }
        }
    }

    pub fn as_ptr(&self) -> *mut ffi::PyObject {
        self.0.as_ptr()
    }

    /// Hands the reference over to PyO3.
    pub fn into_py(self, py: Python<'_>) -> Py<PyAny> {
        let ptr = self.as_ptr();
        std::mem::forget(self);
        // SAFETY: `ptr` is an owned reference whose ownership moves to the `Py`
        // (the `Ref` is forgotten, so it is not released twice); the GIL is held.
        unsafe { Bound::from_owned_ptr(py, ptr) }.unbind()
    }

    pub fn is_none(&self) -> bool {
        // SAFETY: comparing against the None singleton's address reads nothing.
        self.as_ptr() == unsafe { ffi::Py_None() }
    }
}

impl Drop for Ref {
    fn drop(&mut self) {
        // SAFETY: a `Ref` only exists while the GIL is held (`Hot` borrows a
        // `Python` token and every `Ref` is created and dropped inside the
        // caller's GIL-holding scope), and it owns one reference.
        unsafe { ffi::Py_DecRef(self.as_ptr()) }
    }
}

/// Interned attribute names the re-check uses.
pub struct Names {
    grad: Py<PyString>,
}

static NAMES: PyOnceLock<Names> = PyOnceLock::new();

/// CPython calls and raw readings for one `gather`; holding a `Python` token
/// proves the GIL.
pub struct Hot<'py> {
    _py: Python<'py>,
    names: &'py Names,
    /// Where torch keeps the metadata the re-check compares.
    pub layout: &'static Layout,
    /// `torch.Tensor`: gradients of any other type take the slow path.
    pub tensor_type: NonNull<ffi::PyTypeObject>,
}

impl<'py> Hot<'py> {
    /// `None` when torch's layout is unknown (no plan can be re-checked).
    pub fn new(py: Python<'py>) -> PyResult<Option<Hot<'py>>> {
        let Some(layout) = native::layout(py) else {
            return Ok(None);
        };
        let names = NAMES.get_or_init(py, || Names {
            grad: PyString::intern(py, "grad").unbind(),
        });
        let tensor_type = super::tensor::torch(py)?.tensor_type.as_ptr();
        let Some(tensor_type) = NonNull::new(tensor_type.cast::<ffi::PyTypeObject>()) else {
            return Ok(None);
        };
        Ok(Some(Hot {
            _py: py,
            names,
            layout,
            tensor_type,
        }))
    }

    fn getattr(&self, object: *mut ffi::PyObject, name: &Py<PyString>) -> Option<Ref> {
        // SAFETY: the GIL is held (`self` holds a `Python` token); `object` is
        // a live object the caller holds a reference to; the result is a new
        // reference or null.
        unsafe { Ref::new(ffi::PyObject_GetAttr(object, name.as_ptr())) }
    }

    /// `param.grad` (a new reference, possibly to None).
    pub fn grad(&self, param: *mut ffi::PyObject) -> Option<Ref> {
        self.getattr(param, &self.names.grad)
    }

    /// `dict.get(key)` as a borrowed pointer (null when missing).
    pub fn dict_get(
        &self,
        dict: *mut ffi::PyObject,
        key: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject {
        // SAFETY: the GIL is held; `dict` is a live dict and `key` a live str.
        // PyDict_GetItem returns a borrowed reference and suppresses errors.
        unsafe { ffi::PyDict_GetItem(dict, key) }
    }
}

//! The per-step re-check calls into CPython about a dozen times per
//! parameter; these thin wrappers skip PyO3's conveniences (error objects,
//! generic conversions) on that path. Every failure just means "changed":
//! the caller then takes the slow path, which reports real errors the way
//! torch does.

use std::ptr::NonNull;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyString;

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

    pub fn is_true(&self) -> bool {
        // SAFETY: as above, for True.
        self.as_ptr() == unsafe { ffi::Py_True() }
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
    data_ptr: Py<PyString>,
    stride: Py<PyString>,
    grad: Py<PyString>,
    dtype: Py<PyString>,
    is_cpu: Py<PyString>,
    nbytes: Py<PyString>,
}

static NAMES: PyOnceLock<Names> = PyOnceLock::new();

/// CPython calls for one `gather`; holding a `Python` token proves the GIL.
pub struct Hot<'py> {
    _py: Python<'py>,
    names: &'py Names,
}

impl<'py> Hot<'py> {
    pub fn new(py: Python<'py>) -> Hot<'py> {
        let names = NAMES.get_or_init(py, || Names {
            data_ptr: PyString::intern(py, "data_ptr").unbind(),
            stride: PyString::intern(py, "stride").unbind(),
            grad: PyString::intern(py, "grad").unbind(),
            dtype: PyString::intern(py, "dtype").unbind(),
            is_cpu: PyString::intern(py, "is_cpu").unbind(),
            nbytes: PyString::intern(py, "nbytes").unbind(),
        });
        Hot { _py: py, names }
    }

    fn call0(&self, object: *mut ffi::PyObject, name: &Py<PyString>) -> Option<Ref> {
        // SAFETY: the GIL is held (`self` holds a `Python` token); `object` is a
        // live object the caller holds a reference to; the result is a new
        // reference or null.
        unsafe {
            Ref::new(ffi::compat::PyObject_CallMethodNoArgs(
                object,
                name.as_ptr(),
            ))
        }
    }

    fn getattr(&self, object: *mut ffi::PyObject, name: &Py<PyString>) -> Option<Ref> {
        // SAFETY: as in `call0`.
        unsafe { Ref::new(ffi::PyObject_GetAttr(object, name.as_ptr())) }
    }

    /// `tensor.data_ptr()`.
    pub fn data_ptr(&self, tensor: *mut ffi::PyObject) -> Option<usize> {
        let value = self.call0(tensor, &self.names.data_ptr)?;
        // SAFETY: the GIL is held; `value` is a live object. A non-int or a
        // negative value sets an error, reported as `(size_t)-1`.
        let address = unsafe { ffi::PyLong_AsSize_t(value.as_ptr()) };
        if address == usize::MAX {
            // SAFETY: the GIL is held.
            unsafe { ffi::PyErr_Clear() };
            return None;
        }
        Some(address)
    }

    /// `tensor.stride() == strides`.
    pub fn has_strides(
        &self,
        tensor: *mut ffi::PyObject,
        strides: *mut ffi::PyObject,
    ) -> Option<bool> {
        let current = self.call0(tensor, &self.names.stride)?;
        // SAFETY: the GIL is held; both objects are live.
        match unsafe { ffi::PyObject_RichCompareBool(current.as_ptr(), strides, ffi::Py_EQ) } {
            -1 => {
                // SAFETY: the GIL is held.
                unsafe { ffi::PyErr_Clear() };
                None
            }
            equal => Some(equal == 1),
        }
    }

    /// `param.grad` (a new reference, possibly to None).
    pub fn grad(&self, param: *mut ffi::PyObject) -> Option<Ref> {
        self.getattr(param, &self.names.grad)
    }

    /// `tensor.dtype is dtype`.
    pub fn has_dtype(&self, tensor: *mut ffi::PyObject, dtype: *mut ffi::PyObject) -> Option<bool> {
        Some(self.getattr(tensor, &self.names.dtype)?.as_ptr() == dtype)
    }

    /// `tensor.is_cpu`.
    pub fn is_cpu(&self, tensor: *mut ffi::PyObject) -> Option<bool> {
        Some(self.getattr(tensor, &self.names.is_cpu)?.is_true())
    }

    /// `tensor.nbytes`.
    pub fn nbytes(&self, tensor: *mut ffi::PyObject) -> Option<usize> {
        let value = self.getattr(tensor, &self.names.nbytes)?;
        // SAFETY: as in `data_ptr`.
        let bytes = unsafe { ffi::PyLong_AsSize_t(value.as_ptr()) };
        if bytes == usize::MAX {
            // SAFETY: the GIL is held.
            unsafe { ffi::PyErr_Clear() };
            return None;
        }
        Some(bytes)
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

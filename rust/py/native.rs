//! Reading a tensor's metadata straight from torch's C++ objects, so the
//! per-step re-check can prove, in a few loads per tensor, that a cached
//! buffer is still exactly the memory the tensor owns.
//!
//! torch's public Python API answers every question the re-check asks
//! (`data_ptr()`, `shape`, `stride()`, `storage_offset()`, `dtype`,
//! `is_neg()`, `untyped_storage().nbytes()`, ...), but at ~0.1 µs a call and
//! ~9 questions for each of a parameter's 4–5 tensors that is several µs per
//! parameter per step, more than the step itself on small tensors. The same
//! facts sit in three C++ objects:
//!
//! * the Python tensor object (`THPVariable`), which holds a pointer to its
//!   `c10::TensorImpl` (what `tensor._cdata` returns);
//! * the `TensorImpl`: `storage_` (a `StorageImpl*`), `sizes_and_strides_`
//!   (the dimension count, then up to 5 sizes and 5 strides inline, or a
//!   pointer to them), `storage_offset_`, `numel_`, one word holding
//!   `data_type_`, `device_opt_` and the layout flags, and the dispatch key
//!   set (which carries the negation and conjugation bits);
//! * the `StorageImpl`: its data pointer and its size in bytes.
//!
//! Where these fields sit is not part of any stable ABI, so nothing is
//! assumed: [`calibrate`] locates every field on probe tensors with known,
//! distinctive metadata (found by value, then confirmed on differently shaped
//! probes, and the flag and key words confirmed to change exactly when the
//! dtype or the negation bit does). If anything does not line up, the layout
//! stays unknown and no plan is cached: every step takes the slow path,
//! which asks torch's Python API. A cached plan additionally confirms, for
//! every tensor it records, that the raw reading agrees with torch's Python
//! API ([`Fingerprint::verified`]); afterwards a step only compares raw
//! readings with the recorded ones, and any difference means "changed".

use std::ptr::NonNull;

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::engine::Format;

/// Most dimensions a fingerprint records (more: the tensor is not cached).
pub const MAX_DIMS: usize = 8;
/// Dimensions `c10::SizesAndStrides` keeps inline.
const INLINE_DIMS: usize = 5;
/// How far into each object the calibration searches.
/// (A tensor's Python object is at least 48 bytes: header, impl, two hook
/// slots; a `TensorImpl` 176 in torch 2.15 — its last word holds the
/// dispatch keys the re-check reads; 24 words overran the heap block by 16
/// bytes under valgrind — and a `StorageImpl` at least 96: the searches stay
/// inside them.)
const OBJECT_WORDS: usize = 5;
const IMPL_WORDS: usize = 22;
const STORAGE_WORDS: usize = 10;
/// The flag word's bytes that hold the dtype (2) and the device (3). The
/// rest holds layout bits (implied by the sizes and strides, which are
/// compared themselves) and padding whose value is arbitrary: measured, the
/// top bit differs between otherwise identical tensors.
const DTYPE_DEVICE_MASK: u64 = 0xff_ffff_ffff;

/// Byte offsets of the fields the re-check reads (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// In the Python tensor object: the `TensorImpl*`.
    cdata: usize,
    /// In the `TensorImpl`.
    storage: usize,
    ndim: usize,
    storage_offset: usize,
    numel: usize,
    flags: usize,
    keys: usize,
    /// In the `StorageImpl`.
    storage_data: usize,
    storage_bytes: usize,
    /// The low bytes of the flag word for a CPU float32 / float64 tensor.
    float32_flags: u64,
    float64_flags: u64,
    /// ... and for bfloat16 / float16 (state buffers kept narrower than their
    /// parameter).
    bfloat16_flags: u64,
    float16_flags: u64,
    /// uint8: the packed 8-bit blockwise states.
    uint8_flags: u64,
    /// The key set of a plain CPU float tensor: no negation or conjugation
    /// bit, no Python subclass dispatch, not an inference tensor.
    plain_keys: u64,
}

/// What one tensor's metadata says, read raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub tensor_impl: usize,
    storage: usize,
    storage_data: usize,
    storage_bytes: usize,
    storage_offset: i64,
    numel: i64,
    flags: u64,
    keys: u64,
    ndim: usize,
    sizes: [i64; MAX_DIMS],
    strides: [i64; MAX_DIMS],
}

/// Reads one word at `base + offset`.
///
/// # Safety
/// `base + offset .. + 8` must be readable memory of a live object.
unsafe fn word(base: usize, offset: usize) -> u64 {
    // SAFETY: the caller's contract; torch's objects are 8-byte aligned and
    // every field read here is a word, but an unaligned read costs nothing.
    unsafe { ((base + offset) as *const u64).read_unaligned() }
}

impl Layout {
    /// The fingerprint of the tensor behind the Python object `object`, or
    /// `None` when it cannot be one we cache (no impl or storage, too many
    /// dimensions).
    ///
    /// # Safety
    /// `object` is a live Python object of a `torch.Tensor` type (checked by
    /// the caller) and the GIL is held, so no other thread mutates it.
    pub unsafe fn read(&self, object: *mut ffi::PyObject) -> Option<Fingerprint> {
        // SAFETY: a THPVariable holds its impl pointer at `cdata` (calibrated
        // on live tensor objects); the impl and its storage are alive while
        // the object is (the GIL is held, nothing can replace them mid-read).
        unsafe {
            let tensor_impl = word(object as usize, self.cdata) as usize;
            if tensor_impl == 0 {
                return None;
            }
            let ndim = word(tensor_impl, self.ndim) as usize;
            if ndim > MAX_DIMS {
                return None;
            }
            let dims = if ndim <= INLINE_DIMS {
                tensor_impl + self.ndim + 8
            } else {
                let outside = word(tensor_impl, self.ndim + 8) as usize;
                if outside == 0 {
                    return None;
                }
                outside
            };
            let capacity = ndim.max(INLINE_DIMS);
            let mut sizes = [0i64; MAX_DIMS];
            let mut strides = [0i64; MAX_DIMS];
            for d in 0..ndim {
                sizes[d] = word(dims, 8 * d) as i64;
                strides[d] = word(dims, 8 * (capacity + d)) as i64;
            }
            let storage = word(tensor_impl, self.storage) as usize;
            if storage == 0 {
                return None;
            }
            Some(Fingerprint {
                tensor_impl,
                storage,
                storage_data: word(storage, self.storage_data) as usize,
                storage_bytes: word(storage, self.storage_bytes) as usize,
                storage_offset: word(tensor_impl, self.storage_offset) as i64,
                numel: word(tensor_impl, self.numel) as i64,
                flags: word(tensor_impl, self.flags) & DTYPE_DEVICE_MASK,
                keys: word(tensor_impl, self.keys),
                ndim,
                sizes,
                strides,
            })
        }
    }

    /// The engine dtype the flag word names, if it is a plain CPU tensor of
    /// one (and not negated, conjugated, a subclass dispatching to Python or
    /// an inference tensor).
    pub fn plain_dtype(&self, fp: &Fingerprint) -> Option<Format> {
        if fp.keys != self.plain_keys {
            return None;
        }
        match fp.flags {
            f if f == self.float32_flags => Some(Format::F32),
            f if f == self.float64_flags => Some(Format::F64),
            f if f == self.bfloat16_flags => Some(Format::BF16),
            f if f == self.float16_flags => Some(Format::F16),
            // (which map the codes use is the plan's to say: see `same_storage`)
            f if f == self.uint8_flags => Some(Format::Q8Signed),
            _ => None,
        }
    }
}

impl Fingerprint {
    /// The address of the first element and the number of elements, when the
    /// tensor's elements all lie inside its storage: `[data, data + numel)`
    /// for a tensor that is one run of memory (the caller knows its layout),
    /// with the storage offset non-negative and the run inside the storage's
    /// bytes.
    pub fn owned_run(&self, dtype: Format) -> Option<(usize, usize)> {
        let size = dtype.size() as u128;
        let offset = u128::try_from(self.storage_offset).ok()?;
        let numel = u128::try_from(self.numel).ok()?;
        if (offset + numel) * size > self.storage_bytes as u128 {
            return None;
        }
        if numel > 0 && self.storage_data == 0 {
            return None;
        }
        let address = self.storage_data + (offset * size) as usize;
        Some((address, numel as usize))
    }

    /// Whether the tensor is row-major contiguous (dims of size 1 have any stride).
    pub fn is_row_major(&self) -> bool {
        let mut expected = 1i64;
        for d in (0..self.ndim).rev() {
            if self.sizes[d] != 1 && self.strides[d] != expected {
                return false;
            }
            expected = expected.saturating_mul(self.sizes[d]);
        }
        true
    }

    /// The address of the first element and the number of elements of a
    /// plain CPU tensor of `dtype` whose elements are one row-major run
    /// inside its storage (what L-BFGS's flat vectors and parameters are).
    pub fn contiguous_run(&self, layout: &Layout, dtype: Format) -> Option<(usize, usize)> {
        if layout.plain_dtype(self) != Some(dtype) {
            return None;
        }
        let mut expected = 1i64;
        for d in (0..self.ndim).rev() {
            if self.sizes[d] != 1 && self.strides[d] != expected {
                return None;
            }
            expected = expected.checked_mul(self.sizes[d])?;
        }
        self.owned_run(dtype)
    }

    /// Whether `other` has the same shape and strides.
    pub fn same_geometry(&self, other: &Fingerprint) -> bool {
        self.ndim == other.ndim
            && self.numel == other.numel
            && self.sizes[..self.ndim] == other.sizes[..other.ndim]
            && self.strides[..self.ndim] == other.strides[..other.ndim]
    }

    /// The same dtype, device and key set (negation and conjugation bits).
    pub fn same_kind(&self, other: &Fingerprint) -> bool {
        self.flags == other.flags && self.keys == other.keys
    }

    /// Reads `tensor`'s fingerprint and confirms every field against torch's
    /// Python API: the impl and storage objects, data pointer, byte size,
    /// offset, element count, shape, strides, dtype, and no negation or
    /// conjugation bit. `None` if anything disagrees (or the layout is
    /// unknown): such a tensor is not cached.
    pub fn verified(tensor: &Bound<'_, PyAny>, dtype: Format) -> PyResult<Option<Fingerprint>> {
        let Some(layout) = layout(tensor.py()) else {
            return Ok(None);
        };
        if !is_tensor(tensor)? {
            return Ok(None);
        }
        // SAFETY: `tensor` is a live torch.Tensor object and we hold the GIL.
        let Some(fp) = (unsafe { layout.read(tensor.as_ptr()) }) else {
            return Ok(None);
        };
        Ok(agrees(tensor, &fp, layout, dtype)?.then_some(fp))
    }
}

fn is_tensor(object: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = object.py();
    object.is_instance(super::tensor::torch(py)?.tensor_type.bind(py))
}

/// Whether a tensor stored as `found` holds `wanted`'s elements (both 8-bit
/// blockwise formats are uint8 tensors: the map is the plan's choice).
pub fn same_storage(found: Format, wanted: Format) -> bool {
    found == wanted || (found.is_quantized() && wanted.is_quantized())
}

/// Whether a raw reading matches torch's own answers for `tensor`.
fn agrees<'py>(
    tensor: &Bound<'py, PyAny>,
    fp: &Fingerprint,
    layout: &Layout,
    dtype: Format,
) -> PyResult<bool> {
    let py = tensor.py();
    let call = |name: &Bound<'py, pyo3::types::PyString>| tensor.call_method0(name);
    if !layout
        .plain_dtype(fp)
        .is_some_and(|found| same_storage(found, dtype))
        || call(intern!(py, "is_neg"))?.is_truthy()?
        || call(intern!(py, "is_conj"))?.is_truthy()?
    {
        return Ok(false);
    }
    let storage = call(intern!(py, "untyped_storage"))?;
    let cdata: usize = tensor.getattr(intern!(py, "_cdata"))?.extract()?;
    let storage_cdata: usize = storage.getattr(intern!(py, "_cdata"))?.extract()?;
    let storage_data: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let storage_bytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
    let offset: i64 = call(intern!(py, "storage_offset"))?.extract()?;
    let numel: i64 = call(intern!(py, "numel"))?.extract()?;
    let data: usize = call(intern!(py, "data_ptr"))?.extract()?;
    let shape: Vec<i64> = tensor.getattr(intern!(py, "shape"))?.extract()?;
    let strides: Vec<i64> = call(intern!(py, "stride"))?.extract()?;
    let expected_data = fp.owned_run(dtype).map(|(address, _)| address);
    Ok(fp.tensor_impl == cdata
        && fp.storage == storage_cdata
        && fp.storage_data == storage_data
        && fp.storage_bytes == storage_bytes
        && fp.storage_offset == offset
        && fp.numel == numel
        && fp.sizes[..fp.ndim] == shape[..]
        && fp.strides[..fp.ndim] == strides[..]
        && (numel == 0 || expected_data == Some(data)))
}

static LAYOUT: PyOnceLock<Option<Layout>> = PyOnceLock::new();

/// Test switch: pretend the layout is unknown (every step takes the slow path).
static DISABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_disabled(disabled: bool) {
    DISABLED.store(disabled, std::sync::atomic::Ordering::Relaxed);
}

/// The calibrated layout, calibrating on first use; `None` if torch's
/// objects did not line up with what the re-check expects.
pub fn layout(py: Python<'_>) -> Option<&'static Layout> {
    if DISABLED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    LAYOUT
        .get_or_init(py, || calibrate(py).ok().flatten())
        .as_ref()
}

/// The raw words of an object, for the calibration's searches.
///
/// # Safety
/// `base .. base + 8 * count` must be readable. Used only on torch objects
/// at least that large (a `TensorImpl` is over 150 bytes, a `StorageImpl`
/// over 100, a tensor's Python object over 64 with its GC header before it).
unsafe fn words(base: usize, count: usize) -> Vec<u64> {
    // SAFETY: the caller's contract.
    (0..count).map(|i| unsafe { word(base, 8 * i) }).collect()
}

/// Index of the first word equal to `value` in `haystack[from..]`.
fn first(haystack: &[u64], value: u64, from: usize) -> Option<usize> {
    (from..haystack.len()).find(|&i| haystack[i] == value)
}

/// Index of the only word equal to `value` in `haystack[from..]`.
fn only(haystack: &[u64], value: u64, from: usize) -> Option<usize> {
    let mut found = haystack
        .iter()
        .enumerate()
        .skip(from)
        .filter(|(_, &w)| w == value)
        .map(|(i, _)| i);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// A probe tensor and what torch says of it.
struct Probe<'py> {
    tensor: Bound<'py, PyAny>,
    cdata: usize,
    storage_cdata: usize,
    storage_data: usize,
    storage_bytes: usize,
}

impl<'py> Probe<'py> {
    fn new(tensor: Bound<'py, PyAny>) -> PyResult<Probe<'py>> {
        let storage = tensor.call_method0("untyped_storage")?;
        Ok(Probe {
            cdata: tensor.getattr("_cdata")?.extract()?,
            storage_cdata: storage.getattr("_cdata")?.extract()?,
            storage_data: storage.call_method0("data_ptr")?.extract()?,
            storage_bytes: storage.call_method0("nbytes")?.extract()?,
            tensor,
        })
    }

    fn impl_words(&self) -> Vec<u64> {
        // SAFETY: a live TensorImpl (we hold its tensor), larger than
        // IMPL_WORDS words (see the constant).
        unsafe { words(self.cdata, IMPL_WORDS) }
    }
}

/// `torch.zeros(shape, dtype=dtype, device="cpu")`: explicit, whatever the
/// default dtype and device are.
fn zeros<'py>(
    torch: &Bound<'py, PyModule>,
    shape: Vec<usize>,
    dtype: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = torch.py();
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("dtype", dtype)?;
    kwargs.set_item("device", "cpu")?;
    torch.call_method("zeros", (PyTuple::new(py, shape)?,), Some(&kwargs))
}

/// A probe: `shape` with `strides` at `offset` in a storage of `n` zeros.
fn strided<'py>(
    torch: &Bound<'py, PyModule>,
    n: usize,
    dtype: &Bound<'py, PyAny>,
    shape: &[i64],
    strides: &[i64],
    offset: i64,
) -> PyResult<Probe<'py>> {
    let py = torch.py();
    Probe::new(zeros(torch, vec![n], dtype)?.call_method1(
        "as_strided",
        (PyTuple::new(py, shape)?, PyTuple::new(py, strides)?, offset),
    )?)
}

/// Finds the layout on probe tensors (see the module docs). `Ok(None)`:
/// something did not line up.
fn calibrate(py: Python<'_>) -> PyResult<Option<Layout>> {
    let torch = py.import("torch")?;
    let float32 = torch.getattr("float32")?;
    let float64 = torch.getattr("float64")?;
    // Two probes with distinctive, different metadata.
    let a = strided(&torch, 10007, &float32, &[3, 5, 7], &[71, 13, 2], 17)?;
    let b = strided(&torch, 9973, &float64, &[11, 4, 2, 9], &[97, 19, 7, 1], 29)?;

    // The impl pointer in the Python object.
    // SAFETY: a tensor's Python object is larger than OBJECT_WORDS words (it
    // holds, after the object header, the impl, hooks and a dict slot).
    let object_words = |p: &Probe<'_>| unsafe { words(p.tensor.as_ptr() as usize, OBJECT_WORDS) };
    let Some(cdata) = only(&object_words(&a), a.cdata as u64, 1) else {
        return Ok(None);
    };
    if object_words(&b)[cdata] != b.cdata as u64 {
        return Ok(None);
    }

    let (wa, wb) = (a.impl_words(), b.impl_words());
    let Some(storage) = only(&wa, a.storage_cdata as u64, 1) else {
        return Ok(None);
    };
    // `sizes_and_strides_`: the dimension count, 5 sizes, 5 strides.
    // (the key word, `ndim + 2 * INLINE_DIMS + 4`, must lie within the words read)
    let ndim = (1..IMPL_WORDS - 2 * INLINE_DIMS - 4)
        .find(|&i| wa[i] == 3 && wa[i + 1..i + 4] == [3, 5, 7] && wa[i + 6..i + 9] == [71, 13, 2]);
    let Some(ndim) = ndim else {
        return Ok(None);
    };
    let storage_offset = ndim + 1 + 2 * INLINE_DIMS;
    let (numel, flags, keys) = (storage_offset + 1, storage_offset + 2, storage_offset + 3);
    let b_dims_ok = wb[ndim] == 4
        && wb[ndim + 1..ndim + 5] == [11, 4, 2, 9]
        && wb[ndim + 6..ndim + 10] == [97, 19, 7, 1];
    if wa[storage_offset] != 17
        || wb[storage_offset] != 29
        || wa[numel] != 105
        || wb[numel] != 792
        || wb[storage] != b.storage_cdata as u64
        || !b_dims_ok
    {
        return Ok(None);
    }
    // The storage's data pointer (the first word of its `DataPtr`; the
    // allocator's context that follows often holds the same address, a
    // buffer-backed storage below tells them apart) and byte size.
    // SAFETY: a live StorageImpl (its tensor is held) spans more than
    // STORAGE_WORDS words.
    let (sa, sb) = unsafe {
        (
            words(a.storage_cdata, STORAGE_WORDS),
            words(b.storage_cdata, STORAGE_WORDS),
        )
    };
    let (Some(storage_data), Some(storage_bytes)) = (
        first(&sa, a.storage_data as u64, 1),
        only(&sa, a.storage_bytes as u64, 1),
    ) else {
        return Ok(None);
    };
    if sb[storage_data] != b.storage_data as u64 || sb[storage_bytes] != b.storage_bytes as u64 {
        return Ok(None);
    }

    let mut layout = Layout {
        cdata: 8 * cdata,
        storage: 8 * storage,
        ndim: 8 * ndim,
        storage_offset: 8 * storage_offset,
        numel: 8 * numel,
        flags: 8 * flags,
        keys: 8 * keys,
        storage_data: 8 * storage_data,
        storage_bytes: 8 * storage_bytes,
        float32_flags: wa[flags] & DTYPE_DEVICE_MASK,
        float64_flags: wb[flags] & DTYPE_DEVICE_MASK,
        bfloat16_flags: 0,
        float16_flags: 0,
        uint8_flags: 0,
        plain_keys: wa[keys],
    };
    for (name, slot) in [("bfloat16", 0), ("float16", 1), ("uint8", 2)] {
        let probe = zeros(&torch, vec![4], &torch.getattr(name)?)?;
        // SAFETY: a live tensor object, the GIL held; the offsets were found on
        // live objects of the same type.
        let Some(fp) = (unsafe { layout.read(probe.as_ptr()) }) else {
            return Ok(None);
        };
        let flags = fp.flags;
        let distinct = [
            layout.float32_flags,
            layout.float64_flags,
            layout.bfloat16_flags,
            layout.float16_flags,
        ]
        .iter()
        .all(|&f| f != flags);
        if !distinct || (flags ^ layout.float32_flags) & !0xffff != 0 {
            return Ok(None);
        }
        match slot {
            0 => layout.bfloat16_flags = flags,
            1 => layout.float16_flags = flags,
            _ => layout.uint8_flags = flags,
        }
    }
    Ok(confirm(py, &torch, &layout)?.then_some(layout))
}

/// Checks a candidate layout on more probes: the flag word changes with the
/// dtype (and only its dtype bytes), the key word with negation and
/// conjugation, parameters and plain tensors read alike, and a tensor with
/// more dimensions than `SizesAndStrides` keeps inline reads right.
fn confirm(py: Python<'_>, torch: &Bound<'_, PyModule>, layout: &Layout) -> PyResult<bool> {
    let read = |tensor: &Bound<'_, PyAny>| -> Option<Fingerprint> {
        // SAFETY: a live tensor object, the GIL held; the layout's offsets
        // were found on live objects of the same types.
        unsafe { layout.read(tensor.as_ptr()) }
    };
    let float32 = torch.getattr("float32")?;
    let plain = zeros(torch, vec![64], &float32)?;
    let f32_fp = read(&plain);
    let int32 = plain.call_method1("view", (torch.getattr("int32")?,))?;
    let negated = torch.call_method1("_neg_view", (&plain,))?;
    let plain_view = plain.call_method1("view", (64,))?;
    let complex = zeros(torch, vec![8], &torch.getattr("complex64")?)?;
    let conjugated = complex.call_method0("conj")?;
    let parameter =
        torch
            .getattr("nn")?
            .getattr("Parameter")?
            .call1((zeros(torch, vec![64], &float32)?,))?;
    let (Some(f32_fp), Some(int_fp), Some(neg_fp), Some(view_fp)) =
        (f32_fp, read(&int32), read(&negated), read(&plain_view))
    else {
        return Ok(false);
    };
    let (Some(complex_fp), Some(conj_fp), Some(param_fp)) =
        (read(&complex), read(&conjugated), read(&parameter))
    else {
        return Ok(false);
    };
    let dtype_only = (f32_fp.flags ^ int_fp.flags) & !0xffff == 0;
    let ok_flags = f32_fp.flags == layout.float32_flags
        && int_fp.flags != layout.float32_flags
        && layout.float32_flags != layout.float64_flags
        && dtype_only;
    let ok_keys = f32_fp.keys == layout.plain_keys
        && view_fp.keys == layout.plain_keys
        && param_fp.keys == layout.plain_keys
        && neg_fp.keys != layout.plain_keys
        && conj_fp.keys != complex_fp.keys;
    // A 6-d tensor: sizes and strides live outside the impl.
    let six = zeros(torch, vec![2, 3, 1, 5, 2, 3], &float32)?
        .call_method1("permute", (PyTuple::new(py, [5, 4, 3, 2, 1, 0])?,))?;
    let ok_six = match read(&six) {
        None => false,
        Some(fp) => {
            let shape: Vec<i64> = six.getattr("shape")?.extract()?;
            let strides: Vec<i64> = six.call_method0("stride")?.extract()?;
            fp.ndim == 6 && fp.sizes[..6] == shape[..] && fp.strides[..6] == strides[..]
        }
    };
    // Memory torch did not allocate (a Python buffer): the allocator's
    // context is not the data address there.
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("dtype", torch.getattr("float32")?)?;
    let buffer = pyo3::types::PyByteArray::new(py, &[0u8; 256]);
    let borrowed = Probe::new(torch.call_method("frombuffer", (buffer,), Some(&kwargs))?)?;
    let ok_borrowed = read(&borrowed.tensor).is_some_and(|fp| {
        fp.storage_data == borrowed.storage_data && fp.storage_bytes == borrowed.storage_bytes
    });
    Ok(ok_flags && ok_keys && ok_six && ok_borrowed && f32_fp.same_geometry(&view_fp))
}

/// `Py_TYPE(object)`, for exact type checks.
pub fn type_of(object: *mut ffi::PyObject) -> Option<NonNull<ffi::PyTypeObject>> {
    // SAFETY: `object` is a live object (the caller holds a reference) and
    // the GIL is held.
    NonNull::new(unsafe { ffi::Py_TYPE(object) })
}

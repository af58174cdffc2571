//! L-BFGS's vector work on torch's own flat tensors (`flat_grad`, `d`, the
//! `old_dirs` / `old_stps` history, the parameters): each entry point reads
//! the tensors it is given, checks everything (dtype, one contiguous run of
//! memory inside the tensor's storage, equal lengths, no written buffer
//! overlapping another buffer) before it writes anything, then runs the
//! kernel in `kernels::lbfgs` with the GIL released. A refusal is a
//! `ValueError` the Python layer answers by running torch's op instead.
//!
//! A history of 100 pairs is 200 tensors per call: each is read raw (a few
//! loads, `native`), and confirmed once against torch's Python API; the
//! confirmed readings are remembered, so later calls over the same history
//! cost no Python calls per tensor.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::error::run_caught;
use super::native::{self, Fingerprint};
use super::tensor::{engine_dtype, torch, Layout, TensorInfo};
use crate::engine::{Format, Real};
use crate::kernels::lbfgs::{self, History};
use crate::simd;

/// Fingerprints confirmed against torch's Python API (bounded: cleared when full).
static CONFIRMED: Mutex<Option<HashSet<Fingerprint, BuildHasherDefault<WordHasher>>>> =
    Mutex::new(None);

/// A multiply-rotate hash over the fingerprint's words (SipHash, the default, costs more
/// than the rest of a tensor's check; nothing here needs resistance to chosen keys).
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Word by word (the shape and stride arrays arrive as one byte slice each).
        let (words, rest) = bytes.as_chunks::<8>();
        for word in words {
            self.write_u64(u64::from_le_bytes(*word));
        }
        for byte in rest {
            self.write_u64(u64::from(*byte));
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
    fn write_i64(&mut self, word: i64) {
        self.write_u64(word as u64);
    }
}
const MAX_CONFIRMED: usize = 16 * 1024;

/// One tensor's elements: one contiguous run of `len` elements at `addr`.
#[derive(Clone, Copy, Debug)]
struct Run {
    addr: usize,
    len: usize,
}

impl Run {
    fn bytes(self, dtype: Format) -> std::ops::Range<usize> {
        self.addr..self.addr + self.len * dtype.size()
    }
}

fn raw_run(tensor: &Bound<'_, PyAny>, dtype: Format) -> PyResult<Option<Run>> {
    let py = tensor.py();
    let Some(layout) = native::layout(py) else {
        return Ok(None);
    };
    if !tensor.is_instance(torch(py)?.tensor_type.bind(py))? {
        return Ok(None);
    }
    // SAFETY: `tensor` is a live torch.Tensor object (checked just above) and
    // we hold the GIL.
    let Some(fp) = (unsafe { layout.read(tensor.as_ptr()) }) else {
        return Ok(None);
    };
    let Some((addr, len)) = fp.contiguous_run(layout, dtype) else {
        return Ok(None);
    };
    let mut confirmed = CONFIRMED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let set = confirmed.get_or_insert_with(HashSet::default);
    if !set.contains(&fp) {
        if Fingerprint::verified(tensor, dtype)? != Some(fp) {
            return Ok(None);
        }
        if set.len() >= MAX_CONFIRMED {
            set.clear();
        }
        set.insert(fp);
    }
    Ok(Some(Run { addr, len }))
}

/// `tensor`'s elements as one run of `dtype`, or torch's Python API's reason why not.
fn run_of(tensor: &Bound<'_, PyAny>, dtype: Format, what: &dyn Fn() -> String) -> PyResult<Run> {
    let run = match raw_run(tensor, dtype)? {
        Some(run) => run,
        None => {
            let what = what();
            let info = TensorInfo::inspect(tensor, &what)?;
            if info.dtype != dtype {
                return Err(PyValueError::new_err(format!(
                    "{what} has dtype {:?}, not the parameters' {dtype:?}",
                    info.dtype
                )));
            }
            if info.layout != Layout::Contiguous {
                return Err(PyValueError::new_err(format!("{what} is not contiguous")));
            }
            Run {
                addr: info.addr,
                len: info.len,
            }
        }
    };
    if run.len > 0 && !run.addr.is_multiple_of(dtype.size()) {
        return Err(PyValueError::new_err(format!("{} is misaligned", what())));
    }
    Ok(run)
}

fn dtype_of(tensor: &Bound<'_, PyAny>, what: &str) -> PyResult<Format> {
    let py = tensor.py();
    let dtype = tensor.getattr(pyo3::intern!(py, "dtype"))?;
    engine_dtype(py, &dtype)?
        .ok_or_else(|| PyValueError::new_err(format!("{what} is neither float32 nor float64")))
}

fn same_len(runs: &[Run], len: usize, what: &str) -> PyResult<()> {
    if runs.iter().any(|r| r.len != len) {
        return Err(PyValueError::new_err(format!(
            "{what}: vectors of different lengths"
        )));
    }
    Ok(())
}

/// Refuses a written run that overlaps any other run (written or read); read runs may
/// overlap each other. One sort and a sweep: a run starting before the furthest end
/// seen so far overlaps an earlier run.
fn check_disjoint(written: &[Run], read: &[Run], dtype: Format, what: &str) -> PyResult<()> {
    let mut spans: Vec<(usize, usize, bool)> = written
        .iter()
        .map(|r| (r, true))
        .chain(read.iter().map(|r| (r, false)))
        .filter(|(r, _)| r.len > 0)
        .map(|(r, w)| (r.bytes(dtype).start, r.bytes(dtype).end, w))
        .collect();
    spans.sort_unstable();
    let (mut end_any, mut end_written) = (0usize, 0usize);
    for (start, end, written) in spans {
        if start < end_written || (written && start < end_any) {
            return Err(PyValueError::new_err(format!(
                "{what}: a written vector overlaps another vector"
            )));
        }
        end_any = end_any.max(end);
        if written {
            end_written = end_written.max(end);
        }
    }
    Ok(())
}

/// A read-only slice over a checked run.
///
/// # Safety
/// `run` was checked by `run_of` for `C`'s dtype and its tensor stays alive
/// and unresized for `'a`; no written slice overlaps it (`check_disjoint`).
unsafe fn slice<'a, C>(run: Run) -> &'a [C] {
    if run.len == 0 {
        return &[];
    }
    // SAFETY: the caller's contract: `len` aligned elements of `C` inside the
    // tensor's storage.
    unsafe { std::slice::from_raw_parts(run.addr as *const C, run.len) }
}

/// A writable slice over a checked run.
///
/// # Safety
/// As [`slice`], and no other slice (read or written) overlaps it.
unsafe fn slice_mut<'a, C>(run: Run) -> &'a mut [C] {
    if run.len == 0 {
        return &mut [];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(run.addr as *mut C, run.len) }
}

/// A scalar held in a one-element tensor of `dtype` (torch's 0-d `ro[i]`).
fn scalar_of<C: Real>(tensor: &Bound<'_, PyAny>, dtype: Format, index: usize) -> PyResult<C> {
    let run = run_of(tensor, dtype, &|| format!("ro[{index}]"))?;
    if run.len != 1 {
        return Err(PyValueError::new_err(format!(
            "ro[{index}] is not one element"
        )));
    }
    // SAFETY: one aligned element of `C` inside the tensor's storage (checked
    // by `run_of`), read while the GIL keeps the tensor alive.
    Ok(unsafe { (run.addr as *const C).read() })
}

/// `C(Σ a * b)` (torch's `a.dot(b)`), as a float.
#[pyfunction]
pub fn lbfgs_dot(py: Python<'_>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<f64> {
    let dtype = dtype_of(a, "a")?;
    let (ra, rb) = (
        run_of(a, dtype, &|| "a".into())?,
        run_of(b, dtype, &|| "b".into())?,
    );
    same_len(&[rb], ra.len, "dot")?;
    let level = simd::active_level();
    run_caught(py, move || {
        // SAFETY: both runs checked above; nothing is written.
        let (a, b) = unsafe { (slice(ra), slice(rb)) };
        match dtype {
            Format::F32 => f64::from(f32::from_f64(lbfgs::dot::<f32>(level, a, b))),
            // SAFETY: as above, for float64.
            _ => lbfgs::dot::<f64>(level, unsafe { slice(ra) }, unsafe { slice(rb) }),
        }
    })
}

/// `(C(y·s), C(y·y))` in one pass.
#[pyfunction]
pub fn lbfgs_dot_pair(
    py: Python<'_>,
    y: &Bound<'_, PyAny>,
    s: &Bound<'_, PyAny>,
) -> PyResult<(f64, f64)> {
    let dtype = dtype_of(y, "y")?;
    let (ry, rs) = (
        run_of(y, dtype, &|| "y".into())?,
        run_of(s, dtype, &|| "s".into())?,
    );
    same_len(&[rs], ry.len, "dot_pair")?;
    let level = simd::active_level();
    run_caught(py, move || match dtype {
        Format::F32 => {
            // SAFETY: both runs checked above; nothing is written.
            let (ys, yy) = unsafe { lbfgs::dot_pair::<f32>(level, slice(ry), slice(rs)) };
            (f64::from(ys), f64::from(yy))
        }
        // SAFETY: as above.
        _ => unsafe { lbfgs::dot_pair::<f64>(level, slice(ry), slice(rs)) },
    })
}

/// `(x.abs().max(), C(x.abs().sum()))`: what `flat_grad` is tested with
/// (`abs_sum` only when `with_sum`).
#[pyfunction]
#[pyo3(signature = (x, with_sum = false))]
pub fn lbfgs_abs(py: Python<'_>, x: &Bound<'_, PyAny>, with_sum: bool) -> PyResult<(f64, f64)> {
    let dtype = dtype_of(x, "x")?;
    let rx = run_of(x, dtype, &|| "x".into())?;
    let level = simd::active_level();
    run_caught(py, move || match dtype {
        Format::F32 => {
            // SAFETY: checked above; nothing is written.
            let x = unsafe { slice::<f32>(rx) };
            let sum = if with_sum {
                f32::from_f64(lbfgs::abs_sum(level, x))
            } else {
                0.0
            };
            (f64::from(lbfgs::abs_max(level, x)), f64::from(sum))
        }
        _ => {
            // SAFETY: checked above; nothing is written.
            let x = unsafe { slice::<f64>(rx) };
            let sum = if with_sum {
                lbfgs::abs_sum(level, x)
            } else {
                0.0
            };
            (lbfgs::abs_max(level, x), sum)
        }
    })
}

/// The two-loop recursion: `q` (`-flat_grad` on entry) becomes the
/// direction `d`, torch's `al[i]` are written into `al[0..n]` (one-element
/// tensors of the dtype, none overlapping another vector). Returns
/// `gtd = flat_grad.dot(d)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn lbfgs_direction(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    old_dirs: Vec<Bound<'_, PyAny>>,
    old_stps: Vec<Bound<'_, PyAny>>,
    ro: Vec<Bound<'_, PyAny>>,
    h_diag: f64,
    al: Vec<Bound<'_, PyAny>>,
) -> PyResult<f64> {
    let n = old_dirs.len();
    if old_stps.len() != n || ro.len() != n || al.len() < n {
        return Err(PyValueError::new_err(
            "old_dirs, old_stps, ro and al differ in length",
        ));
    }
    let dtype = dtype_of(q, "d")?;
    let rq = run_of(q, dtype, &|| "d".into())?;
    let rg = run_of(grad, dtype, &|| "flat_grad".into())?;
    let mut reads = vec![rg];
    for (i, y) in old_dirs.iter().enumerate() {
        reads.push(run_of(y, dtype, &|| format!("old_dirs[{i}]"))?);
    }
    for (i, s) in old_stps.iter().enumerate() {
        reads.push(run_of(s, dtype, &|| format!("old_stps[{i}]"))?);
    }
    same_len(&reads, rq.len, "two-loop recursion")?;
    let mut written = vec![rq];
    for (i, a) in al.iter().take(n).enumerate() {
        let run = run_of(a, dtype, &|| format!("al[{i}]"))?;
        if run.len != 1 {
            return Err(PyValueError::new_err(format!("al[{i}] is not one element")));
        }
        written.push(run);
    }
    check_disjoint(&written, &reads, dtype, "two-loop recursion")?;
    let level = simd::active_level();
    match dtype {
        Format::F32 => {
            let ro: Vec<f32> = ro
                .iter()
                .enumerate()
                .map(|(i, r)| scalar_of::<f32>(r, dtype, i))
                .collect::<PyResult<_>>()?;
            let h = f32::from_f64(h_diag);
            run_caught(py, move || {
                // SAFETY: every run checked above; the written runs (`q`, the `al`
                // entries) overlap no other run.
                f64::from(unsafe { two_loop::<f32>(level, &written, &reads, ro, h) })
            })
        }
        _ => {
            let ro: Vec<f64> = ro
                .iter()
                .enumerate()
                .map(|(i, r)| scalar_of::<f64>(r, dtype, i))
                .collect::<PyResult<_>>()?;
            run_caught(py, move || {
                // SAFETY: as above.
                unsafe { two_loop::<f64>(level, &written, &reads, ro, h_diag) }
            })
        }
    }
}

/// # Safety
/// `written` (`q`, then the n one-element `al` entries) and `reads`
/// (`flat_grad`, then the n `y`, then the n `s`) checked by `run_of` for `C`,
/// `q` and the reads of equal lengths, no written run overlapping another run.
unsafe fn two_loop<C: Real + Send + Sync>(
    level: simd::SimdLevel,
    written: &[Run],
    reads: &[Run],
    ro: Vec<C>,
    h: C,
) -> C {
    let n = ro.len();
    // SAFETY: the caller's contract.
    let (grad, q) = unsafe { (slice::<C>(reads[0]), slice_mut::<C>(written[0])) };
    let history = History {
        // SAFETY: the caller's contract.
        dirs: reads[1..=n]
            .iter()
            .map(|r| unsafe { slice::<C>(*r) })
            .collect(),
        // SAFETY: the caller's contract.
        stps: reads[n + 1..]
            .iter()
            .map(|r| unsafe { slice::<C>(*r) })
            .collect(),
        ro,
    };
    let mut al = vec![C::ZERO; n];
    let gtd = lbfgs::direction(level, q, grad, &history, h, &mut al);
    for (value, run) in al.into_iter().zip(&written[1..]) {
        // SAFETY: the caller's contract: one element of `C`, overlapping nothing else.
        unsafe { slice_mut::<C>(*run)[0] = value };
    }
    gtd
}

/// torch's `_add_grad`: `p.add_(d[offset:offset + numel].view_as(p), alpha=t)`
/// for every parameter, in one call. Every parameter must be contiguous, of
/// `d`'s dtype, and overlap neither `d` nor another parameter; their sizes
/// must add up to `d`'s.
#[pyfunction]
pub fn lbfgs_add(
    py: Python<'_>,
    params: Vec<Bound<'_, PyAny>>,
    t: f64,
    d: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let dtype = dtype_of(d, "d")?;
    let rd = run_of(d, dtype, &|| "d".into())?;
    let runs: Vec<Run> = params
        .iter()
        .enumerate()
        .map(|(i, p)| run_of(p, dtype, &|| format!("parameter {i}")))
        .collect::<PyResult<_>>()?;
    if runs.iter().map(|r| r.len).sum::<usize>() != rd.len {
        return Err(PyValueError::new_err(
            "the parameters' sizes do not add up to the direction's",
        ));
    }
    check_disjoint(&runs, &[rd], dtype, "parameter update")?;
    let level = simd::active_level();
    run_caught(py, move || {
        let mut offset = 0;
        for run in runs {
            let range = offset..offset + run.len;
            offset += run.len;
            // SAFETY: every run checked above, parameters disjoint from each
            // other and from `d`.
            unsafe {
                match dtype {
                    Format::F32 => lbfgs::add_scaled::<f32>(
                        level,
                        slice_mut(run),
                        f32::from_f64(t),
                        &slice::<f32>(rd)[range],
                    ),
                    _ => {
                        lbfgs::add_scaled::<f64>(level, slice_mut(run), t, &slice::<f64>(rd)[range])
                    }
                }
            }
        }
    })
}

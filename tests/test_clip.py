"""Gradient clipping: ``ferroptim.clip_grad_norm_`` / ``clip_grad_value_`` /
``get_total_norm`` against ``torch.nn.utils``, and ``max_grad_norm=`` inside ``step()``
against ``torch.nn.utils.clip_grad_norm_`` followed by torch's ``step()``.

Norms accumulate in float64, so float32 results may differ from torch's by a few ulps
(rtol 1e-5 for the norm and the clipped gradients); norms that involve no rounding
(inf, -inf, 0) and clamping are exact, and compared bitwise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from conftest import (
    CLIPPING,
    GRAD_LAYOUTS,
    GradStream,
    GroupSpec,
    ParamSpec,
    Run,
    assert_as_exact_as_torch,
    assert_same_trajectory,
    assign_grads,
    build,
    ferroptim,
    one_per_kernel,
    randn64,
    some_flag_params,
    standard_layout,
    tol,
)

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
NORM_TYPES = [2.0, 1.0, 3.0, 0.5, 0.0, math.inf, -math.inf]
#: Norms computed without rounding: ferroptim's equal torch's bitwise.
EXACT_NORMS = (0.0, math.inf, -math.inf)


def norm_tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-12, "atol": 0.0} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 0.0}


# ----------------------------------------------------------------------------------------
# Gradient sets
# ----------------------------------------------------------------------------------------

#: Shapes and grad layouts: ragged SIMD tails, a >64K-element tensor (several parallel
#: chunks), non-contiguous grads of every kind; ``None``: a param without a grad.
GRAD_SPECS: list[ParamSpec | None] = [
    ParamSpec((4099,)),
    ParamSpec((263, 271)),
    ParamSpec((33, 65), grad_layout="transposed"),
    None,
    ParamSpec((7,)),
    ParamSpec((1,)),
    ParamSpec((3, 5, 17), grad_layout="permuted"),
    ParamSpec((19, 13), grad_layout="strided"),
    ParamSpec((8, 3, 5, 5), grad_layout="channels_last"),
    ParamSpec((130_001,)),
]


def make_params(
    dtype: torch.dtype,
    specs: Sequence[ParamSpec | None] = GRAD_SPECS,
    seed: int = 0,
    edit: Callable[[int, torch.Tensor], None] | None = None,
) -> list[torch.nn.Parameter]:
    """Params with grads (per-tensor scales from 1e-3 to 10, some exact zeros), laid out
    as their spec says. Identical for identical arguments."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, spec in enumerate(specs):
        shape = spec.shape if spec is not None else (5,)
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if spec is not None:
            scale = 10.0 ** (4.0 * float(torch.rand((), generator=gen, dtype=torch.float64)) - 3)
            g = randn64(shape, gen) * scale
            g[torch.rand(shape, generator=gen) < 0.05] = 0.0
            g = g.to(dtype)
            if edit is not None:
                edit(i, g)
            p.grad = GRAD_LAYOUTS[spec.grad_layout](g)
        params.append(p)
    return params


def grads_of(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def torch_error(theirs: torch.Tensor, tensors: Sequence[torch.Tensor], norm_type: float) -> float:
    """Relative error of torch's float32 norm against the norm computed in float64: over
    hundreds of thousands of elements torch's float32 accumulation drifts by ~1e-5."""
    exact = float(torch.nn.utils.get_total_norm([t.double() for t in tensors], norm_type))
    return abs(float(theirs) - exact) / exact if exact else 0.0


def torch_error_of(params: Sequence[torch.Tensor], norm_type: float) -> float:
    return torch_error(
        torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], norm_type),
        [p.grad for p in params if p.grad is not None],
        norm_type,
    )


def assert_norm_matches(
    ours: torch.Tensor,
    theirs: torch.Tensor,
    exact: bool,
    precision: torch.dtype | None = None,
    slack: float = 0.0,
) -> None:
    """``precision``: the least precise gradient dtype (a float64 total over float32
    grads holds float32-rounded per-tensor norms, in torch as in ferroptim). ``slack``:
    torch's own relative error (see :func:`torch_error`), added to the tolerance."""
    assert isinstance(ours, torch.Tensor)
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    assert ours.shape == theirs.shape == torch.Size([])
    assert ours.device == theirs.device
    assert not ours.requires_grad
    if exact:
        assert torch.equal(ours, theirs) or (ours.isnan() and theirs.isnan()), (ours, theirs)
    else:
        tolerance = norm_tol(precision or theirs.dtype)
        tolerance["rtol"] += slack
        torch.testing.assert_close(ours, theirs, **tolerance, equal_nan=True)


def assert_grads_match(
    ours: Sequence[torch.Tensor],
    theirs: Sequence[torch.Tensor],
    exact: bool,
    precision: torch.dtype | None = None,
    slack: float = 0.0,
) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if b.grad is None:
            assert a.grad is None, f"param {i} got a grad"
            continue
        assert a.grad.stride() == b.grad.stride(), f"param {i}: the grad's layout changed"
        if exact:
            assert torch.equal(a.grad, b.grad) or torch.allclose(
                a.grad, b.grad, rtol=0, atol=0, equal_nan=True
            ), f"param {i}: clipped grads differ"
        else:
            tolerance = norm_tol(precision or b.grad.dtype)
            tolerance["rtol"] += slack
            torch.testing.assert_close(
                a.grad,
                b.grad,
                **tolerance,
                equal_nan=True,
                msg=f"param {i}",
            )


# ----------------------------------------------------------------------------------------
# clip_grad_norm_
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.05, 1e30], ids=["clipping", "not-clipping"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_matches_torch(dtype, norm_type, max_norm):
    ours, theirs = make_params(dtype), make_params(dtype)
    original = grads_of(ours)
    slack = torch_error_of(theirs, norm_type) if dtype == torch.float32 else 0.0
    n_ours = ferroptim.clip_grad_norm_(ours, max_norm, norm_type)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    exact = norm_type in EXACT_NORMS
    assert_norm_matches(n_ours, n_theirs, exact, slack=slack)
    if norm_type == -math.inf:
        assert float(n_theirs) == 0.0  # some grads hold zeros
    assert_grads_match(ours, theirs, exact or max_norm > 1e6, slack=slack)
    if max_norm > 1e6:  # coefficient 1: the grads are untouched
        for p, g in zip(ours, original, strict=True):
            assert g is None or torch.equal(p.grad, g)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_norm_accepts_foreach(foreach):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    n_ours = ferroptim.clip_grad_norm_(ours, 0.1, foreach=foreach)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.1, foreach=foreach)
    assert_norm_matches(n_ours, n_theirs, exact=False)
    assert_grads_match(ours, theirs, exact=False)


@pytest.mark.parametrize("norm_type", [2, 1, "inf", 3], ids=str)
def test_norm_type_given_as_int_or_str(norm_type):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    n_ours = ferroptim.clip_grad_norm_(ours, 0.1, norm_type)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
    assert_norm_matches(n_ours, n_theirs, exact=norm_type == "inf")
    assert_grads_match(ours, theirs, exact=norm_type == "inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_single_tensor(dtype):
    (ours,), (theirs,) = make_params(dtype, GRAD_SPECS[1:2]), make_params(dtype, GRAD_SPECS[1:2])
    n_ours = ferroptim.clip_grad_norm_(ours, 0.5)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert_norm_matches(n_ours, n_theirs, exact=False)
    assert_grads_match([ours], [theirs], exact=False)


def test_clip_grad_norm_generator_and_module_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 2))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 40)
    for m in (model, twin):
        (m(x) ** 2).sum().backward()
    n_ours = ferroptim.clip_grad_norm_(model.parameters(), 0.01)
    n_theirs = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    assert_norm_matches(n_ours, n_theirs, exact=False)
    assert_grads_match(list(model.parameters()), list(twin.parameters()), exact=False)


def test_clip_grad_norm_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator") as theirs:
        n_theirs = torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning, match="empty generator") as ours:
        n_ours = ferroptim.clip_grad_norm_((p for p in []), 1.0)
    assert str(ours[0].message) == str(theirs[0].message)
    assert_norm_matches(n_ours, n_theirs, exact=True)


def test_clip_grad_norm_empty_list_and_no_grads():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty list is not an empty generator: no warning
        assert_norm_matches(
            ferroptim.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0), True
        )
        no_grads = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(70_000))]
        assert_norm_matches(
            ferroptim.clip_grad_norm_(no_grads, 1.0),
            torch.nn.utils.clip_grad_norm_(no_grads, 1.0),
            True,
        )
        assert all(p.grad is None for p in no_grads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_params_are_counted_and_scaled_twice(dtype):
    """torch takes the list as given: a param listed twice counts twice in the norm and
    has its grad scaled twice."""

    def listed(ps):
        return [ps[0], ps[1], ps[0], ps[4], ps[1]]

    ours, theirs = make_params(dtype), make_params(dtype)
    n_ours = ferroptim.clip_grad_norm_(listed(ours), 0.1)
    n_theirs = torch.nn.utils.clip_grad_norm_(listed(theirs), 0.1)
    assert_norm_matches(n_ours, n_theirs, exact=False)
    assert_grads_match(ours, theirs, exact=False)
    # ... and the result differs from listing each once.
    once = make_params(dtype)
    n_once = torch.nn.utils.clip_grad_norm_([once[0], once[1], once[4]], 0.1)
    assert not torch.allclose(n_once, n_ours)


def test_grads_sharing_memory():
    """Two grads that are views of one buffer: torch scales the shared memory twice."""

    def make():
        base = torch.linspace(-3, 3, 2 * 70_001)
        a, b = torch.nn.Parameter(torch.zeros(70_001)), torch.nn.Parameter(torch.zeros(70_001))
        a.grad, b.grad = base[:70_001], base[:70_001]  # the same memory, two tensors
        c = torch.nn.Parameter(torch.zeros(70_001))
        c.grad = base[70_001:]
        return [a, b, c], base

    (ours, base_ours), (theirs, base_theirs) = make(), make()
    n_ours = ferroptim.clip_grad_norm_(ours, 0.5)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert_norm_matches(n_ours, n_theirs, exact=False)
    torch.testing.assert_close(base_ours, base_theirs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_if_nonfinite(dtype, norm_type, bad):
    """A non-finite total norm: RuntimeError with torch's message, grads untouched."""

    def poison(i, g):
        if i == 9:
            g.view(-1)[12_345] = bad

    ours, theirs = make_params(dtype, edit=poison), make_params(dtype, edit=poison)
    original = grads_of(ours)
    with pytest.raises(RuntimeError) as theirs_error:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours_error:
        ferroptim.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)
    assert str(ours_error.value) == str(theirs_error.value)
    for p, g in zip(ours, original, strict=True):
        assert g is None or torch.equal(p.grad, g) or torch.allclose(p.grad, g, equal_nan=True)
        if g is not None:
            assert p.grad.isnan().sum() == g.isnan().sum(), "grads were written"
    assert all(
        torch.allclose(p.grad, q.grad, equal_nan=True)
        for p, q in zip(ours, theirs, strict=True)
        if q.grad is not None
    )


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_without_error_scales_like_torch(dtype, norm_type, bad):
    """Without error_if_nonfinite torch scales by the non-finite coefficient anyway:
    ``max_norm / (inf + 1e-6) = 0`` (inf * 0 = nan), ``nan`` for a nan norm."""

    def poison(i, g):
        if i == 2:
            g[3, 7] = bad

    ours, theirs = make_params(dtype, edit=poison), make_params(dtype, edit=poison)
    n_ours = ferroptim.clip_grad_norm_(ours, 1.0, norm_type)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert not torch.isfinite(n_theirs)
    assert_norm_matches(n_ours, n_theirs, exact=True)
    assert_grads_match(ours, theirs, exact=True)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=str)
def test_mixed_float32_float64_grads(norm_type):
    specs = GRAD_SPECS

    def make():
        p32 = make_params(torch.float32, specs[:5], seed=1)
        p64 = make_params(torch.float64, specs[5:], seed=2)
        return [p64[0], *p32, *p64[1:]]

    ours, theirs = make(), make()
    n_ours = ferroptim.clip_grad_norm_(ours, 0.1, norm_type)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
    assert n_theirs.dtype == torch.float64
    assert_norm_matches(n_ours, n_theirs, exact=norm_type == math.inf, precision=torch.float32)
    # The float64 grads are scaled by a coefficient of float32 precision.
    assert_grads_match(ours, theirs, exact=norm_type == math.inf, precision=torch.float32)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=str)
def test_low_precision_grads_go_through_torch(low, norm_type):
    """bf16/fp16 grads (alone, or next to float32 ones) give torch's results exactly."""
    for with_f32 in (False, True):

        def make(with_f32=with_f32):
            ps = make_params(low, GRAD_SPECS[:3], seed=3)
            return ps + (make_params(torch.float32, GRAD_SPECS[4:6], seed=4) if with_f32 else [])

        ours, theirs = make(), make()
        n_ours = ferroptim.clip_grad_norm_(ours, 0.1, norm_type)
        n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
        assert_norm_matches(n_ours, n_theirs, exact=not with_f32)
        assert_grads_match(ours, theirs, exact=not with_f32)


def test_forced_torch_backend_is_torchs_clip():
    ferroptim.set_backend("torch")
    for norm_type in (2.0, 1.0, math.inf):
        ours, theirs = make_params(torch.float32), make_params(torch.float32)
        n_ours = ferroptim.clip_grad_norm_(ours, 0.1, norm_type)
        n_theirs = torch.nn.utils.clip_grad_norm_(theirs, 0.1, norm_type)
        assert_norm_matches(n_ours, n_theirs, exact=True)
        assert_grads_match(ours, theirs, exact=True)


# ----------------------------------------------------------------------------------------
# clip_grad_value_ and get_total_norm
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_value", [0.01, 1.0, 0.0, 1e30], ids=str)
@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.bfloat16, id="bf16")])
def test_clip_grad_value_is_bitwise_torchs(dtype, clip_value):
    def poison(i, g):
        if i == 0:
            g[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])

    ours, theirs = make_params(dtype, edit=poison), make_params(dtype, edit=poison)
    assert ferroptim.clip_grad_value_(ours, clip_value) is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    assert_grads_match(ours, theirs, exact=True)
    # NaN stays NaN, as torch.clamp keeps it.
    assert ours[0].grad[0].isnan()


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_value_single_tensor_and_foreach(foreach):
    (ours,), (theirs,) = (
        make_params(torch.float32, GRAD_SPECS[9:]),
        make_params(torch.float32, GRAD_SPECS[9:]),
    )
    ferroptim.clip_grad_value_(ours, 0.1, foreach=foreach)
    torch.nn.utils.clip_grad_value_(theirs, 0.1, foreach=foreach)
    assert torch.equal(ours.grad, theirs.grad)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_get_total_norm_matches_torch(dtype, norm_type):
    tensors = [p.grad for p in make_params(dtype) if p.grad is not None]
    before = [t.clone() for t in tensors]
    ours = ferroptim.get_total_norm(tensors, norm_type)
    theirs = torch.nn.utils.get_total_norm(tensors, norm_type)
    slack = torch_error(theirs, tensors, norm_type) if dtype == torch.float32 else 0.0
    assert_norm_matches(ours, theirs, exact=norm_type in EXACT_NORMS, slack=slack)
    # ferroptim accumulates in float64: its float32 norm is the exact one, rounded.
    exact = torch.nn.utils.get_total_norm([t.double() for t in tensors], norm_type)
    torch.testing.assert_close(
        ours.double(), exact, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0
    )
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    # A single tensor, and a generator.
    single = torch.nn.utils.get_total_norm(tensors[1], norm_type)
    assert_norm_matches(
        ferroptim.get_total_norm(tensors[1], norm_type),
        single,
        exact=norm_type in EXACT_NORMS,
        slack=torch_error(single, tensors[1:2], norm_type) if dtype == torch.float32 else 0.0,
    )
    assert_norm_matches(
        ferroptim.get_total_norm(iter(tensors), norm_type),
        theirs,
        exact=norm_type in EXACT_NORMS,
        slack=slack,
    )


def test_get_total_norm_error_if_nonfinite():
    tensors = [torch.ones(70_000), torch.tensor([1.0, math.inf])]
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.get_total_norm(tensors, 2.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        ferroptim.get_total_norm(tensors, 2.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    assert_norm_matches(
        ferroptim.get_total_norm(tensors), torch.nn.utils.get_total_norm(tensors), exact=True
    )
    assert_norm_matches(ferroptim.get_total_norm([]), torch.nn.utils.get_total_norm([]), exact=True)


# ----------------------------------------------------------------------------------------
# Determinism: threads and SIMD levels
# ----------------------------------------------------------------------------------------

BIG_SPECS = [
    ParamSpec((300_007,)),
    ParamSpec((65_537,)),
    ParamSpec((7,)),
    ParamSpec((301, 333), grad_layout="transposed"),
    ParamSpec((131_071,)),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_bitwise_identical_across_threads_and_simd_levels(dtype, simd_levels):
    base = make_params(dtype, BIG_SPECS)
    grads = [p.grad for p in base]
    results: dict[Any, Any] = {}
    for threads in (1, 2, 3):
        for level in simd_levels:
            ferroptim.set_num_threads(threads)
            ferroptim.set_simd_level(level)
            norms = [ferroptim.get_total_norm(grads, norm_type) for norm_type in NORM_TYPES]
            ps = [torch.nn.Parameter(p.detach()) for p in base]
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            norms.append(ferroptim.clip_grad_norm_(ps, 0.1))
            results[threads, level] = (norms, [p.grad for p in ps])
    (ref_norms, ref_grads), *_ = results.values()
    for key, (norms, clipped) in results.items():
        for n, r, norm_type in zip(norms, ref_norms, [*NORM_TYPES, "clip"], strict=True):
            assert torch.equal(n, r), f"{key} norm {norm_type}: {float(n)!r} != {float(r)!r}"
        for g, r in zip(clipped, ref_grads, strict=True):
            assert torch.equal(g, r), f"{key}: clipped grads differ"
    ferroptim.set_simd_level(None)
    for norm_type, ours in zip(NORM_TYPES, ref_norms, strict=False):
        theirs = torch.nn.utils.get_total_norm(grads, norm_type)
        if norm_type in EXACT_NORMS or dtype == torch.float64:
            assert_norm_matches(ours, theirs, exact=norm_type in EXACT_NORMS)
            continue
        # Over half a million float32 elements torch's own float32 accumulation drifts
        # (~2e-5 for the 3-norm): ferroptim's (float64) must be within rtol 1e-5 of it or
        # closer than it to the exact norm.
        exact = torch.nn.utils.get_total_norm([g.double() for g in grads], norm_type)
        assert ours.dtype == theirs.dtype
        ours_err, theirs_err = abs(float(ours) - float(exact)), abs(float(theirs) - float(exact))
        assert ours_err <= 1e-6 * float(exact), (norm_type, float(ours), float(exact))
        assert abs(float(ours) - float(theirs)) <= 1e-5 * float(theirs) or ours_err < theirs_err


# ----------------------------------------------------------------------------------------
# max_grad_norm: clipping inside step()
# ----------------------------------------------------------------------------------------

STEPS = 100
MAX_NORM = 5.0


def _clipped_runs(case, dtype, specs, steps=STEPS, max_norm=MAX_NORM, **kwargs):
    """ferroptim with ``max_grad_norm`` and torch with ``clip_grad_norm_`` + ``step``, on
    identical params and grads; even steps' grads are 1000x the odd steps'. Checks
    ``last_grad_norm`` every step and (Rust path) that ``p.grad`` stays unclipped."""
    family, flags = case.family, {"lr": 1e-2, **case.kwargs, **kwargs}
    fset, tset = build(specs, dtype), build(specs, dtype)
    fopt = family.make_ferro(fset.param_groups(), max_grad_norm=max_norm, **flags)
    topt = family.make_torch(tset.param_groups(), **flags)
    assert fopt.max_grad_norm == max_norm and fopt.last_grad_norm is None
    stream = GradStream(fset.param_specs, dtype, seed=1, none_prob=0.15)
    active = inactive = 0
    for step in range(steps):
        grads = [
            None if g is None else g * (1.0 if step % 2 == 0 else 1e-3) for g in stream.draw(step)
        ]
        assign_grads(fset.params, fset.param_specs, grads)
        assign_grads(tset.params, tset.param_specs, grads)
        unclipped = grads_of(fset.params)
        fopt.step()
        norm = torch.nn.utils.clip_grad_norm_(tset.params, max_norm)
        topt.step()
        assert_norm_matches(fopt.last_grad_norm, norm, exact=False)
        if float(norm) > max_norm:
            active += 1
        else:
            inactive += 1
        if ferroptim.get_backend() == "auto" and family.rust:
            for p, g in zip(fset.params, unclipped, strict=True):
                assert g is None or torch.equal(p.grad, g), "the Rust path clipped p.grad"
    assert active >= 10 and inactive >= 10, (active, inactive)
    return fopt, fset, topt, tset


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", some_flag_params(CLIPPING))
def test_max_grad_norm_matches_clip_then_step(case, dtype):
    specs = standard_layout(case.family, case.kwargs)
    fopt, fset, topt, tset = _clipped_runs(case, dtype, specs)
    ferro, ref = Run(fopt, fset), Run(topt, tset, lambda: _clipped_float64_shadow(case, specs))
    assert_as_exact_as_torch(ferro, ref, state_keys=case.family.state_keys)


def _clipped_float64_shadow(case, specs, steps=STEPS, max_norm=MAX_NORM):
    """torch's clip_grad_norm_ + step in float64 on the float32 run's exact inputs."""
    f32, shadow = build(specs, torch.float32), build(specs, torch.float64)
    with torch.no_grad():
        for p64, p32 in zip(shadow.params, f32.params, strict=True):
            p64.copy_(p32)
    opt = case.family.make_torch(shadow.param_groups(), lr=1e-2, **case.kwargs)
    stream = GradStream(f32.param_specs, torch.float32, seed=1, none_prob=0.15)
    for step in range(steps):
        grads = [
            None if g is None else (g * (1.0 if step % 2 == 0 else 1e-3)).double()
            for g in stream.draw(step)
        ]
        assign_grads(shadow.params, shadow.param_specs, grads)
        torch.nn.utils.clip_grad_norm_(shadow.params, max_norm)
        opt.step()
    return Run(opt, shadow)


@pytest.mark.parametrize("case", some_flag_params(CLIPPING))
def test_max_grad_norm_on_the_forced_torch_backend(case):
    """How params on other devices are clipped: the norm over torch's gradients, the
    coefficient applied before torch's step."""
    ferroptim.set_backend("torch")
    # Params that are not one run of memory on torch's path are the subject of
    # test_parity.py::test_forced_torch_backend_steps_non_dense_params_correctly.
    specs = [
        GroupSpec(tuple(s for s in g.params if s.layout != "slice"), g.hyper)
        for g in standard_layout(case.family, case.kwargs, large=False)
    ]
    fopt, fset, topt, tset = _clipped_runs(case, torch.float32, specs)
    assert_same_trajectory(
        Run(fopt, fset), Run(topt, tset), state_keys=case.family.state_keys, **tol(torch.float32)
    )


def _single_case(name: str):
    return next(c.values[0] for c in some_flag_params() if c.values[0].family.name == name)


@pytest.mark.parametrize("family", [f for f in one_per_kernel("AdamW") if f in CLIPPING])
def test_max_grad_norm_with_mixed_dtypes_and_no_grads(family):
    """A float32 and a float64 group: the norm is float64, as torch's; a step where no
    param has a grad gives torch's norm (0) and moves nothing."""
    case = _single_case(family)
    specs = [
        GroupSpec((ParamSpec((1000,)), ParamSpec((30, 7), grad_layout="transposed"))),
        GroupSpec((ParamSpec((129,)),), {"lr": 5e-3}),
    ]

    def build_mixed():
        ps = build(specs, torch.float32)
        ps.groups[1] = [torch.nn.Parameter(p.detach().double()) for p in ps.groups[1]]
        return ps

    fset, tset = build_mixed(), build_mixed()
    kwargs = {"lr": 1e-2, **case.kwargs}
    fopt = case.family.make_ferro(fset.param_groups(), max_grad_norm=0.5, **kwargs)
    topt = case.family.make_torch(tset.param_groups(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    for step in range(40):
        for p, q in zip(fset.params, tset.params, strict=True):
            g = randn64(p.shape, gen) * (step % 3)
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        fopt.step()
        norm = torch.nn.utils.clip_grad_norm_(tset.params, 0.5)
        topt.step()
        assert norm.dtype == torch.float64
        assert_norm_matches(fopt.last_grad_norm, norm, exact=False, precision=torch.float32)
    # The float64 group's grads are scaled by a coefficient of float32 precision.
    for p, q in zip(fset.params, tset.params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32))
    # No grads at all.
    before = [p.detach().clone() for p in fset.params]
    for p, q in zip(fset.params, tset.params, strict=True):
        p.grad = q.grad = None
    fopt.step()
    assert_norm_matches(
        fopt.last_grad_norm, torch.nn.utils.clip_grad_norm_(tset.params, 0.5), exact=True
    )
    assert all(torch.equal(p, b) for p, b in zip(fset.params, before, strict=True))


@pytest.mark.parametrize("family", [f for f in one_per_kernel("AdamW") if f in CLIPPING])
def test_max_grad_norm_changed_between_steps(family):
    """``max_grad_norm`` is a plain attribute: changing it (or switching it off with None)
    takes effect at the next step."""
    case = _single_case(family)
    specs = [GroupSpec((ParamSpec((500,)), ParamSpec((20, 9), grad_layout="transposed")))]
    fset, tset = build(specs, torch.float32), build(specs, torch.float32)
    kwargs = {"lr": 1e-2, **case.kwargs}
    fopt = case.family.make_ferro(fset.param_groups(), max_grad_norm=1.0, **kwargs)
    topt = case.family.make_torch(tset.param_groups(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    for step, max_norm in enumerate([1.0, 1.0, 0.1, 0.1, None, None, 3.0, 3.0]):
        fopt.max_grad_norm = max_norm
        for p, q in zip(fset.params, tset.params, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        fopt.step()
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(tset.params, max_norm)
            assert_norm_matches(fopt.last_grad_norm, norm, exact=False)
        topt.step()
        for p, q in zip(fset.params, tset.params, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32), msg=str(step))


@pytest.mark.parametrize("family", [f for f in one_per_kernel("AdamW") if f in CLIPPING])
def test_max_grad_norm_with_nonfinite_grads_scales_like_torch(family):
    """An inf gradient: torch's clip_grad_norm_ (error_if_nonfinite=False) scales by
    ``max_norm / inf = 0``, turning the inf into nan; the step then spreads nans exactly
    as torch's does."""
    case = _single_case(family)
    specs = [GroupSpec((ParamSpec((500,)), ParamSpec((20, 9))))]
    fset, tset = build(specs, torch.float32), build(specs, torch.float32)
    kwargs = {"lr": 1e-2, **case.kwargs}
    fopt = case.family.make_ferro(fset.param_groups(), max_grad_norm=1.0, **kwargs)
    topt = case.family.make_torch(tset.param_groups(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        for p, q in zip(fset.params, tset.params, strict=True):
            g = torch.randn(p.shape, generator=gen)
            if step == 2 and p.dim() == 1:
                g[17] = math.inf
            p.grad, q.grad = g.clone(), g.clone()
        fopt.step()
        norm = torch.nn.utils.clip_grad_norm_(tset.params, 1.0)
        topt.step()
        assert_norm_matches(fopt.last_grad_norm, norm, exact=not math.isfinite(norm))
    for p, q in zip(fset.params, tset.params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_coefficient_in_python_floats_equals_torchs_tensor_arithmetic(dtype):
    """The coefficient used on the Rust path is computed in Python floats rounded as
    torch rounds; it must equal torch's ``clamp(max_norm / (norm + 1e-6), max=1)``
    bitwise, for tiny, ordinary, huge and non-finite norms."""
    from ferroptim._norms import clip_coefficient, clip_coefficient_value

    special = [0.0, 1e-45, 1e-30, 1e-7, 1e-6, 0.999999, 1.0, 1.0000001, 3e38, 1e300]
    special += [math.inf, math.nan]
    spread = torch.exp(20 * torch.randn(2000, generator=torch.Generator().manual_seed(3)))
    norms = torch.cat([torch.tensor(special, dtype=torch.float64), spread.double()]).to(dtype)
    for max_norm in (1.0, 0.25, 1e-3, 3.7, 1e9, 1e39):
        for norm in norms:
            expected = float(clip_coefficient(max_norm, norm))
            got = clip_coefficient_value(max_norm, norm)
            assert got == expected or (math.isnan(got) and math.isnan(expected)), (
                max_norm,
                float(norm),
            )


def test_inverse_scale_in_python_floats_equals_gradscalers_tensor_arithmetic():
    """GradScaler's ``scale.double().reciprocal().float()``, computed in Python floats
    on the Rust path, bitwise: powers of two, arbitrary, tiny, huge, zero, inf, nan."""
    from ferroptim._norms import inverse_scale_value

    special = [2.0**k for k in range(-30, 31)] + [0.0, -0.0, 1e-45, 3e38, math.inf, math.nan]
    spread = torch.exp(20 * torch.randn(2000, generator=torch.Generator().manual_seed(4)))
    for scale in torch.cat([torch.tensor(special), spread]).to(torch.float32):
        expected = float(scale.double().reciprocal().float())
        got = inverse_scale_value(scale)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), float(scale)
        assert math.copysign(1.0, got) == math.copysign(1.0, expected)

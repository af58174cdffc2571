"""``ferroptim.functional``: optimizer steps on NumPy arrays, without torch.

The same kernels as the torch classes, so the same numbers: each case steps lists of
float32/float64 arrays (ragged SIMD tails, a >64K-element array split into parallel
chunks, a 2-D array) 200 times and compares params and every state array with
``torch.optim``'s for-loop implementation fed ``torch.from_numpy`` copies. Bad
arguments raise before anything is written; without torch, the module still works.
"""

from __future__ import annotations

import array
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FAMILIES, Family, Functional, assert_tensors_as_exact_as_torch, ferroptim

F = ferroptim.functional


pytestmark = pytest.mark.usefixtures("torch_single_threaded")


DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]

#: Ragged lengths (SIMD tails), one >64K (parallel chunks), one 2-D.
SHAPES: tuple[tuple[int, ...], ...] = ((4099,), (7,), (1,), (70_001,), (33, 65))
STEPS = 200
CHECK_AT = (1, 2, 10, STEPS)


@dataclass(frozen=True)
class Case:
    """One functional call and its torch.optim counterpart."""

    fn: str
    torch_cls: type
    #: Hyperparameters both sides take by the same names.
    hyper: dict[str, Any] = field(default_factory=dict)
    #: Functional state argument -> torch state key.
    states: dict[str, str] = field(default_factory=dict)
    #: Initial value of each state array (default 0).
    init: dict[str, float] = field(default_factory=dict)
    #: Constructor kwargs only torch takes.
    torch_only: dict[str, Any] = field(default_factory=dict)
    #: Whether the call takes ``step=``.
    has_step: bool = True
    #: SGD with momentum: pass ``first_step=True`` on the first call.
    first_step: bool = False
    #: Functional scalar-state argument -> torch state key: one 1-element float32 array
    #: per param, starting at 1 (NAdam's ``mu_products``, float32 as torch's 0-d state
    #: tensors under its default dtype, whatever the params' dtype).
    scalars: dict[str, str] = field(default_factory=dict)


def _case(family: Family, functional: Functional, hyper: dict[str, Any]) -> Case:
    both, init, torch_only = functional.split({**functional.base, **family.fixed, **hyper})
    return Case(
        functional.fn,
        family.torch,
        both,
        functional.states(both),
        init=init,
        torch_only=torch_only,
        has_step=functional.has_step,
        first_step=functional.first_step(both),
        scalars=functional.scalars,
    )


#: Every functional case of the registry (test id -> case).
CASES: dict[str, Case] = {
    name: _case(family, family.functional, hyper)
    for family in FAMILIES.values()
    if family.functional is not None
    for name, hyper in family.functional.cases.items()
}
#: One family per functional call: (family, functional) by function name (those with
#: scalar state arrays, NAdam's, have their own argument checks below).
FUNCTIONALS: dict[str, tuple[Family, Functional]] = {
    family.functional.fn: (family, family.functional)
    for family in FAMILIES.values()
    if family.functional is not None and family.variant_of is None and not family.functional.scalars
}


def random_arrays(
    rng: np.random.Generator, dtype: type, shapes: tuple[tuple[int, ...], ...] = SHAPES
) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def random_grads(rng: np.random.Generator, dtype: type, shapes=SHAPES) -> list[np.ndarray]:
    """Per-array random scales (1e-3 .. 10), so eps matters for some elements."""
    return [(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(dtype) for s in shapes]


class Runner:
    """The functional state (arrays) and torch's optimizer over copies of the params."""

    def __init__(self, case: Case, dtype: type, seed: int = 0, shapes=SHAPES) -> None:
        self.case = case
        self.dtype = dtype
        self.shapes = shapes
        rng = np.random.default_rng(seed)
        self.params = random_arrays(rng, dtype, shapes)
        self.states = {
            name: [np.full(s, case.init.get(name, 0.0), dtype) for s in shapes]
            for name in case.states
        }
        # (1-element float32 arrays: NAdam's mu_products start at 1, ASGD's etas at lr)
        self.scalars = {
            name: [np.full(1, case.init.get(name, 1.0), np.float32) for _ in shapes]
            for name in case.scalars
        }
        self.tparams = [torch.from_numpy(p.copy()).requires_grad_() for p in self.params]
        self.topt = case.torch_cls(self.tparams, **case.hyper, **case.torch_only, foreach=False)
        self.rng = np.random.default_rng(seed + 1)
        self.seed = seed
        self.t = 0

    def step(self) -> None:
        self.t += 1
        grads = random_grads(self.rng, self.dtype, self.shapes)
        kwargs = dict(self.case.hyper)
        if self.case.has_step:
            kwargs["step"] = self.t
        if self.case.first_step:
            kwargs["first_step"] = self.t == 1
        getattr(F, self.case.fn)(self.params, grads, **self.states, **self.scalars, **kwargs)
        for p, g in zip(self.tparams, grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        self.topt.step()

    def torch_tensors(self, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> list:
        """torch's params, then each state buffer of each, in :meth:`ours`' order."""
        return [p.detach() for p in params] + [
            opt.state[p][key] for key in self.case.states.values() for p in params
        ]

    def ours(self) -> list[torch.Tensor]:
        return [torch.from_numpy(p) for p in self.params] + [
            torch.from_numpy(a) for name in self.case.states for a in self.states[name]
        ]

    def shadow(self) -> list[torch.Tensor]:
        """torch's for-loop in float64 on this run's exact inputs (the float32 initial
        arrays and gradients, upcast), ``self.t`` steps: the exact yardstick."""
        replay = Runner(self.case, self.dtype, self.seed, self.shapes)
        params = [torch.from_numpy(p.astype(np.float64)).requires_grad_() for p in replay.params]
        opt = self.case.torch_cls(params, **self.case.hyper, **self.case.torch_only, foreach=False)
        for _ in range(self.t):
            for p, g in zip(params, random_grads(replay.rng, self.dtype, self.shapes), strict=True):
                p.grad = torch.from_numpy(g.astype(np.float64))
            opt.step()
        return self.torch_tensors(params, opt)

    def check(self) -> None:
        for p in self.params:
            assert p.dtype == self.dtype
        # float64: tight; float32: as exact as torch on any CPU (conftest's oracle).
        assert_tensors_as_exact_as_torch(
            self.ours(),
            self.torch_tensors(self.tparams, self.topt),
            self.shadow,
            f"step {self.t}: param/state",
        )
        if self.case.has_step:
            for tp in self.tparams:
                assert float(self.topt.state[tp]["step"]) == self.t
        for name, key in self.case.scalars.items():
            for value, tp in zip(self.scalars[name], self.tparams, strict=True):
                assert value.dtype == np.float32 and value.shape == (1,)
                assert float(value[0]) == float(self.topt.state[tp][key]), f"{name}: {key}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch(name, dtype):
    runner = Runner(CASES[name], dtype)
    for _ in range(STEPS):
        runner.step()
        if runner.t in CHECK_AT:
            runner.check()


@pytest.mark.parametrize("fn", list(FUNCTIONALS))
def test_single_arrays_and_lists_agree(fn):
    """One array (not in a list) steps like a one-element list; a 2-D array like its
    flattening."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((17, 9)).astype(np.float32)
    g = rng.standard_normal((17, 9)).astype(np.float32)
    functional = FUNCTIONALS[fn][1]
    kwargs: dict[str, Any] = dict(functional.smoke)
    n_states = len(functional.states(kwargs))
    single = [w.copy(), g.copy()] + [np.zeros_like(w) for _ in range(n_states)]
    listed = [[a.copy().reshape(-1)] for a in single]
    getattr(F, fn)(*single, **kwargs)
    getattr(F, fn)(*listed, **kwargs)
    for a, b in zip(single, listed, strict=True):
        np.testing.assert_array_equal(a.reshape(-1), b[0])
    assert not np.array_equal(single[0], w), "the param was not updated"


def test_array_module_buffers():
    """Any writable C-contiguous float buffer works, e.g. ``array.array``."""
    w = array.array("f", [0.5, -1.0, 2.0, 0.0])
    g = array.array("f", [0.1, 0.2, -0.3, 0.0])
    m, v = array.array("f", [0.0] * 4), array.array("f", [0.0] * 4)
    F.adamw_(w, g, m, v, step=1, lr=0.1)
    ref = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    F.adamw_(
        ref,
        np.array(g, np.float32),
        np.zeros(4, np.float32),
        np.zeros(4, np.float32),
        step=1,
        lr=0.1,
    )
    np.testing.assert_array_equal(np.array(w, np.float32), ref)


def test_mixed_dtypes_and_a_shared_gradient_in_one_call():
    """float32 and float64 params in one list, and one gradient array read for two params
    (reading twice is harmless): each param steps as it would alone."""
    rng = np.random.default_rng(11)
    p32 = rng.standard_normal(1000).astype(np.float32)
    p64 = rng.standard_normal(70_001)
    shared = rng.standard_normal(1000).astype(np.float32)
    g64 = rng.standard_normal(70_001)
    together = [p32.copy(), p64.copy(), p32.copy() * 2]
    states = [[np.zeros_like(p) for p in together] for _ in range(2)]
    F.adamw_(together, [shared, g64, shared], *states, step=1, lr=0.1)
    for i, (p, g) in enumerate(zip([p32, p64, p32 * 2], [shared, g64, shared], strict=True)):
        alone = p.copy()
        F.adamw_(alone, g, np.zeros_like(p), np.zeros_like(p), step=1, lr=0.1)
        np.testing.assert_array_equal(together[i], alone)
        assert together[i].dtype == p.dtype


def test_zero_dim_arrays_step_like_one_element_arrays():
    """A scalar parameter held in a 0-d array (C-contiguous, one float) steps like a
    1-element array, as torch steps a 0-d tensor."""
    p0, g0 = np.array(0.5, np.float32), np.array(0.25, np.float32)
    m0, v0 = np.zeros((), np.float32), np.zeros((), np.float32)
    F.adamw_(p0, g0, m0, v0, step=1, lr=0.1)
    p1 = np.array([0.5], np.float32)
    F.adamw_(
        p1,
        np.array([0.25], np.float32),
        np.zeros(1, np.float32),
        np.zeros(1, np.float32),
        step=1,
        lr=0.1,
    )
    assert p0.shape == () and float(p0) == float(p1[0])


def test_numpy_integer_step_numbers_are_accepted():
    """``step`` from ``np.arange`` (a NumPy integer) is an int >= 1 like any other."""
    w, g = _good(1)[0], _good(1)[0]
    m, v = np.zeros_like(w), np.zeros_like(w)
    ref = w.copy()
    for t in np.arange(1, 4):
        F.adamw_(w, g, m, v, step=t)
    m2, v2 = np.zeros_like(ref), np.zeros_like(ref)
    for t in range(1, 4):
        F.adamw_(ref, g, m2, v2, step=t)
    np.testing.assert_array_equal(w, ref)


def test_results_do_not_depend_on_threads():
    """Contract 3 through the functional API: bitwise the same for any thread count."""
    results = []
    threads = ferroptim.get_num_threads()
    try:
        for n in (1, 2, 3):
            ferroptim.set_num_threads(n)
            runner = Runner(CASES["adam-amsgrad-maximize-wd"], np.float32, seed=5)
            for _ in range(5):
                runner.step()
            results.append([p.copy() for p in runner.params])
    finally:
        ferroptim.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------
# Bad arguments: a clear error, raised before any array is written
# ----------------------------------------------------------------------------------------


def _good(n: int = 2, size: int = 100, dtype: type = np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(n * 1000 + size)
    return [rng.standard_normal(size).astype(dtype) for _ in range(n)]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _adam_call(**over: Any) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    """adam_ on two-array lists; ``over`` replaces an argument (the bad one is always the
    *last* array of its list, so a kernel writing as it goes would be caught)."""
    args: dict[str, Any] = {
        "params": _good(),
        "grads": _good(),
        "exp_avgs": [np.zeros(100, np.float32) for _ in range(2)],
        "exp_avg_sqs": [np.zeros(100, np.float32) for _ in range(2)],
        "step": 3,
        "lr": 0.1,
    }
    args.update(over)
    return F.adam_, [], args


def _with_last(name: str, make: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    arrays = _good() if name in ("params", "grads") else _zeros2()
    arrays[-1] = make(arrays[-1])
    return {name: arrays}


def _same_twice_states() -> dict[str, Any]:
    shared = np.zeros(100, np.float32)
    return {
        "exp_avgs": [np.zeros(100, np.float32), shared],
        "exp_avg_sqs": [np.zeros(100, np.float32), shared],
    }


def _param_is_state() -> dict[str, Any]:
    params = _good()
    return {"params": params, "exp_avg_sqs": [np.zeros(100, np.float32), params[1]]}


def _param_is_grad() -> dict[str, Any]:
    params = _good()
    return {"params": params, "grads": [_good()[0], params[1]]}


def _overlapping_views() -> dict[str, Any]:
    base = np.zeros(150, np.float32)
    return {
        "exp_avgs": [np.zeros(100, np.float32), base[:100]],
        "exp_avg_sqs": [np.zeros(100, np.float32), base[50:]],
    }


def _grad_is_state_of_other_param() -> dict[str, Any]:
    states = [np.zeros(100, np.float32), np.zeros(100, np.float32)]
    return {"exp_avgs": states, "grads": [_good()[0], states[0]]}


BAD_ADAM: dict[str, tuple[Callable[[], dict[str, Any]], type, str]] = {
    "readonly-param": (lambda: _with_last("params", _readonly), ValueError, "read-only"),
    "readonly-state": (lambda: _with_last("exp_avg_sqs", _readonly), ValueError, "read-only"),
    "noncontiguous-param": (
        lambda: _with_last("params", lambda a: np.repeat(a, 2)[::2]),
        ValueError,
        "contiguous",
    ),
    "noncontiguous-grad": (
        lambda: _with_last("grads", lambda a: np.repeat(a, 2)[::2]),
        ValueError,
        "contiguous",
    ),
    "noncontiguous-state": (
        lambda: _with_last("exp_avgs", lambda a: np.zeros(200, np.float32)[::2]),
        ValueError,
        "contiguous",
    ),
    "fortran-2d-param": (
        lambda: _with_last("params", lambda a: np.asfortranarray(a.reshape(10, 10))),
        ValueError,
        "contiguous",
    ),
    "int32-param": (
        lambda: _with_last("params", lambda a: a.astype(np.int32)),
        TypeError,
        "float32",
    ),
    "float16-param": (
        lambda: _with_last("params", lambda a: a.astype(np.float16)),
        TypeError,
        "float32",
    ),
    "int32-grad": (lambda: _with_last("grads", lambda a: a.astype(np.int32)), TypeError, "float32"),
    "big-endian-param": (
        lambda: _with_last("params", lambda a: a.astype(">f4")),
        TypeError,
        "byte order",
    ),
    "float64-state-float32-param": (
        lambda: _with_last("exp_avgs", lambda a: a.astype(np.float64)),
        TypeError,
        "float64",
    ),
    "float64-grad-float32-param": (
        lambda: _with_last("grads", lambda a: a.astype(np.float64)),
        TypeError,
        "float64",
    ),
    "short-state": (lambda: _with_last("exp_avgs", lambda a: a[:99].copy()), ValueError, "99"),
    "long-grad": (
        lambda: _with_last("grads", lambda a: np.zeros(101, np.float32)),
        ValueError,
        "101",
    ),
    "fewer-grads": (lambda: {"grads": _good(1)}, ValueError, "grads"),
    "more-states": (
        lambda: {"exp_avgs": [np.zeros(100, np.float32) for _ in range(3)]},
        ValueError,
        "exp_avgs",
    ),
    "same-array-as-two-states": (_same_twice_states, ValueError, "same array|share memory"),
    "param-is-state": (_param_is_state, ValueError, "same array|share memory"),
    "param-is-grad": (_param_is_grad, ValueError, "same array|share memory"),
    "overlapping-state-views": (_overlapping_views, ValueError, "share memory"),
    "grad-is-another-params-state": (
        _grad_is_state_of_other_param,
        ValueError,
        "same array|share memory",
    ),
    "step-0": (lambda: {"step": 0}, ValueError, "step"),
    "step-negative": (lambda: {"step": -1}, ValueError, "step"),
    "step-float": (lambda: {"step": 1.5}, ValueError, "step"),
    "step-bool": (lambda: {"step": True}, ValueError, "step"),
    "amsgrad-without-max_exp_avg_sqs": (lambda: {"amsgrad": True}, ValueError, "max_exp_avg_sqs"),
    "negative-lr": (lambda: {"lr": -1e-3}, ValueError, "learning rate"),
    "nan-lr": (lambda: {"lr": float("nan")}, ValueError, "learning rate"),
    "negative-eps": (lambda: {"eps": -1e-8}, ValueError, "epsilon"),
    "negative-weight-decay": (lambda: {"weight_decay": -0.1}, ValueError, "weight_decay"),
    "beta1-is-1": (lambda: {"betas": (1.0, 0.999)}, ValueError, "beta parameter at index 0"),
    "beta2-negative": (lambda: {"betas": (0.9, -0.1)}, ValueError, "beta parameter at index 1"),
}


def _snapshot(args: dict[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for name, value in args.items():
        arrays = value if isinstance(value, list) else [value]
        for i, a in enumerate(arrays):
            if isinstance(a, np.ndarray):
                out.append((f"{name}[{i}]", a, a.copy()))
    return out


def _assert_untouched(snap: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    for name, live, before in snap:
        assert np.array_equal(live, before, equal_nan=True), f"{name} was written"


@pytest.mark.parametrize("bad", list(BAD_ADAM))
def test_bad_adam_arguments_raise_before_writing(bad):
    make, exc, match = BAD_ADAM[bad]
    fn, _, args = _adam_call(**make())
    snap = _snapshot(args)
    with pytest.raises(exc, match=match):
        fn(**args)
    _assert_untouched(snap)
    # The same call with the culprit fixed would have written: the snapshot is meaningful.
    good_fn, _, good_args = _adam_call()
    before = [p.copy() for p in good_args["params"]]
    good_fn(**good_args)
    assert not all(np.array_equal(a, b) for a, b in zip(before, good_args["params"], strict=True))


def _sgd_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"params": _good(), "grads": _good(), "lr": 0.1}
    args.update(over)
    return args


def _rms_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "params": _good(),
        "grads": _good(),
        "square_avgs": [np.zeros(100, np.float32) for _ in range(2)],
        "step": 1,
    }
    args.update(over)
    return args


def _adagrad_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "params": _good(),
        "grads": _good(),
        "state_sums": [np.zeros(100, np.float32) for _ in range(2)],
        "step": 1,
    }
    args.update(over)
    return args


def _nadam_args(**over: Any) -> dict[str, Any]:
    params = _good()
    args: dict[str, Any] = {
        "params": params,
        "grads": _good(),
        "exp_avgs": _zeros2(),
        "exp_avg_sqs": _zeros2(),
        "mu_products": [np.ones(1, np.float32) for _ in range(2)],
        "step": 1,
    }
    args.update(over)
    return args


def _zeros2() -> list[np.ndarray]:
    return [np.zeros(100, np.float32), np.zeros(100, np.float32)]


BAD_OTHER: dict[str, tuple[str, Callable[[], dict[str, Any]], type, str]] = {
    "sgd-momentum-without-buffers": (
        "sgd_",
        lambda: _sgd_args(momentum=0.9),
        ValueError,
        "momentum_buffers",
    ),
    "sgd-nesterov-without-momentum": (
        "sgd_",
        lambda: _sgd_args(nesterov=True),
        ValueError,
        "Nesterov",
    ),
    "sgd-nesterov-with-dampening": (
        "sgd_",
        lambda: _sgd_args(momentum_buffers=_zeros2(), momentum=0.9, dampening=0.1, nesterov=True),
        ValueError,
        "Nesterov",
    ),
    "sgd-negative-lr": ("sgd_", lambda: _sgd_args(lr=-0.1), ValueError, "learning rate"),
    "sgd-negative-momentum": (
        "sgd_",
        lambda: _sgd_args(momentum_buffers=_zeros2(), momentum=-0.5),
        ValueError,
        "momentum",
    ),
    "sgd-readonly-buffer": (
        "sgd_",
        lambda: _sgd_args(
            momentum_buffers=[np.zeros(100, np.float32), _readonly(np.zeros(100, np.float32))],
            momentum=0.9,
        ),
        ValueError,
        "read-only",
    ),
    "rmsprop-centered-without-grad_avgs": (
        "rmsprop_",
        lambda: _rms_args(centered=True),
        ValueError,
        "grad_avgs",
    ),
    "rmsprop-momentum-without-buffers": (
        "rmsprop_",
        lambda: _rms_args(momentum=0.9),
        ValueError,
        "momentum_buffers",
    ),
    "rmsprop-negative-alpha": ("rmsprop_", lambda: _rms_args(alpha=-0.1), ValueError, "alpha"),
    "rmsprop-step-0": ("rmsprop_", lambda: _rms_args(step=0), ValueError, "step"),
    "rmsprop-short-grad-avg": (
        "rmsprop_",
        lambda: _rms_args(
            centered=True, grad_avgs=[np.zeros(100, np.float32), np.zeros(50, np.float32)]
        ),
        ValueError,
        "50",
    ),
    "adagrad-negative-lr_decay": (
        "adagrad_",
        lambda: _adagrad_args(lr_decay=-0.1),
        ValueError,
        "lr_decay",
    ),
    "adagrad-step-bool": ("adagrad_", lambda: _adagrad_args(step=True), ValueError, "step"),
    "adamax-beta1-one": (
        "adamax_",
        lambda: {
            "params": _good(),
            "grads": _good(),
            "exp_avgs": _zeros2(),
            "exp_infs": _zeros2(),
            "step": 1,
            "betas": (1.0, 0.999),
        },
        ValueError,
        "beta parameter at index 0",
    ),
    "nadam-negative-momentum_decay": (
        "nadam_",
        lambda: _nadam_args(momentum_decay=-1e-3),
        ValueError,
        "Invalid momentum_decay value",
    ),
    "nadam-mu_product-two-elements": (
        "nadam_",
        lambda: _nadam_args(mu_products=[np.ones(1, np.float32), np.ones(2, np.float32)]),
        ValueError,
        r"mu_products\[1\] has 2 elements",
    ),
    "nadam-mu_product-missing": (
        "nadam_",
        lambda: _nadam_args(mu_products=[np.ones(1, np.float32)]),
        ValueError,
        "1 mu_products",
    ),
    "nadam-mu_product-inside-a-param": (
        "nadam_",
        lambda: (lambda a: {**a, "mu_products": [a["params"][0][5:6], np.ones(1, np.float32)]})(
            _nadam_args()
        ),
        ValueError,
        "share memory",
    ),
    "nadam-mu_product-twice": (
        "nadam_",
        lambda: (lambda m: _nadam_args(mu_products=[m, m]))(np.ones(1, np.float32)),
        ValueError,
        "same array",
    ),
    "nadam-mu_product-float16": (
        "nadam_",
        lambda: _nadam_args(mu_products=[np.ones(1, np.float32), np.ones(1, np.float16)]),
        TypeError,
        "float32",
    ),
    "adagrad-float16-state": (
        "adagrad_",
        lambda: _adagrad_args(state_sums=[np.zeros(100, np.float32), np.zeros(100, np.float16)]),
        TypeError,
        "float32",
    ),
}


@pytest.mark.parametrize("bad", list(BAD_OTHER))
def test_bad_arguments_of_other_optimizers_raise_before_writing(bad):
    fn, make, exc, match = BAD_OTHER[bad]
    args = make()
    snap = _snapshot(args)
    with pytest.raises(exc, match=match):
        getattr(F, fn)(**args)
    _assert_untouched(snap)


def test_readonly_grad_is_fine():
    """Gradients are only read: a read-only gradient array is accepted."""
    w, g = _good()
    g.flags.writeable = False
    m, v = np.zeros_like(w), np.zeros_like(w)
    F.adamw_(w, g, m, v, step=1)
    assert np.isfinite(w).all() and m.any()


# ----------------------------------------------------------------------------------------
# Without torch
# ----------------------------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    import numpy as np
    import ferroptim.functional as F
    import ferroptim

    w = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    g = np.array([0.3, -0.1, 0.0, 2.0], np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    F.adamw_(w, g, m, v, step=1, lr=0.1, weight_decay=0.01)
    # First AdamW step: decay, then lr * g / (|g| + eps) (bias-corrected m and v).
    expected = np.array([1.0, -2.0, 0.5, 3.0]) * (1 - 0.1 * 0.01)
    expected -= 0.1 * np.array([0.3, -0.1, 0.0, 2.0]) / (np.abs([0.3, -0.1, 0.0, 2.0]) + 1e-8)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_allclose(m, 0.1 * g, rtol=1e-6)

    buf = np.zeros(4)
    p = np.ones(4)
    F.sgd_([p], [np.full(4, 2.0)], [buf], lr=0.5, momentum=0.9, first_step=True)
    np.testing.assert_array_equal(p, np.zeros(4))

    assert sys.modules["torch"] is None, "something imported torch behind our back"
    for name in ("AdamW", "SGD", "clip_grad_norm_"):
        try:
            getattr(ferroptim, name)
        except ImportError as exc:
            print(f"{name}: ImportError: {exc}")
        else:
            print(f"{name}: no error")
    try:
        from ferroptim import Adam  # noqa: F401
    except ImportError as exc:
        print(f"from-import: ImportError: {exc}")
    print("DONE")
    """
)


def test_functional_works_without_torch():
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DONE", proc.stdout
    for name in ("AdamW", "SGD", "clip_grad_norm_", "from-import"):
        line = next(line for line in lines if line.startswith(f"{name}:"))
        assert "ImportError" in line, line
        assert "install" in line and "torch" in line, (
            f"the error should say to install torch: {line}"
        )


#: Every functional call steps 16-bit arrays with torch's for-loop rounding (Lion with
#: ``lion_pytorch``'s).
ROUNDED_CASES = list(CASES)
LOW_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's memory as the array the functional API takes: float16 as is,
    bfloat16 as its uint16 bits (the buffer protocol has no bfloat16 code)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so NaN equals NaN, and -0 differs from +0)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("name", ROUNDED_CASES)
def test_16bit_arrays_step_as_the_classes_do(name: str, dtype: torch.dtype) -> None:
    """float16 arrays, and bfloat16 as uint16 views, step in place exactly as the
    ferroptim class steps the same bfloat16/float16 tensors (torch's for-loop rounding,
    checked against torch in test_low_params_torch_semantics): bit for bit, states too."""
    case = CASES[name]
    shapes = ((4099,), (7,), (33, 65))
    g = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    tparams = [p.clone().requires_grad_() for p in start]
    # (the registry's Lion oracle subclasses lion_pytorch.Lion under the same name)
    ferro_cls = getattr(ferroptim, case.torch_cls.__name__)
    opt = ferro_cls(tparams, **case.hyper, **case.torch_only)
    params = [p.clone() for p in start]
    states = {
        arg: [torch.full(s, case.init.get(arg, 0.0), dtype=dtype) for s in shapes]
        for arg in case.states
    }
    scalars = {
        arg: [np.full(1, case.init.get(arg, 1.0), np.float32) for _ in shapes]
        for arg in case.scalars
    }
    for t in range(1, 8):
        grads = [(torch.randn(s, generator=g) * 0.1).to(dtype) for s in shapes]
        kwargs = dict(case.hyper)
        if case.has_step:
            kwargs["step"] = t
        if case.first_step:
            kwargs["first_step"] = t == 1
        getattr(F, case.fn)(
            [_as_array(p) for p in params],
            [_as_array(x) for x in grads],
            **{arg: [_as_array(x) for x in xs] for arg, xs in states.items()},
            **scalars,
            **kwargs,
        )
        for p, x in zip(tparams, grads, strict=True):
            p.grad = x.clone()
        opt.step()
        for i, (ours, theirs) in enumerate(zip(params, tparams, strict=True)):
            # (float16 Adam's eps rounds to 0: a gradient that underflows gives NaN)
            assert _same_bits(ours, theirs.detach()), f"step {t}: params[{i}]"
            for arg, key in case.states.items():
                want = opt.state[theirs][key]
                assert _same_bits(states[arg][i], want), f"{arg}[{i}]"
    assert not all(torch.equal(p, q) for p, q in zip(params, start, strict=True))


def test_16bit_arrays_must_agree_in_dtype() -> None:
    """A float16 param with bfloat16 (uint16) states is refused, naming both."""
    w = np.zeros(10, np.float16)
    with pytest.raises(TypeError, match="bfloat16"):
        F.sgd_(w, np.zeros(10, np.float16), np.zeros(10, np.uint16), momentum=0.9)

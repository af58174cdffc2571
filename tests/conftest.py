"""Shared machinery for ferroptim's tests.

* :data:`FAMILIES` — the optimizer registry (defined in ``optim_db``, re-exported
  here): one entry per optimizer, read by every test file; its docstring lists what
  one entry gives a new optimizer.
* :class:`ParamSpec` / :func:`standard_layout` — parameter sets (shapes, param
  layouts, grad layouts, groups with their own hyperparameters) built
  identically, as many times as needed, from a seed.
* :func:`run_pair` / :func:`run_steps` — N steps of one or two optimizers on
  independent copies of the same parameters, fed identical gradients (some of
  them ``None`` on some steps).
* :func:`assert_same_trajectory` — params *and* every state tensor compared.
* :func:`rust_calls` — counts calls into the Rust step kernels (where a step ran).
* An autouse fixture restores ferroptim's thread count, SIMD level and backend
  after every test, and runs torch's reference on one intra-op thread.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: xdist workers there do not keep `alone` tests apart
    fcntl = None  # type: ignore[assignment]

import pytest
import torch

# The optimizer registry lives in optim_db (one entry per optimizer); re-exported here.
from optim_db import (
    ALL_FAMILIES,
    CLIPPING,
    FAMILIES,
    FULL_GRID,
    NEW_FAMILIES,
    OPTIMIZERS,
    Family,
    FlagCase,
    Functional,
    ferroptim,
    flag_cases,
    flag_params,
    one_per_kernel,
    runs_in_rust,
    some_flag_params,
    taking,
    train_cases,
    weight_decay,
)

#: What test files import from here rather than from optim_db.
__all__ = [
    "ALL_FAMILIES",
    "CLIPPING",
    "FAMILIES",
    "FULL_GRID",
    "NEW_FAMILIES",
    "OPTIMIZERS",
    "Family",
    "FlagCase",
    "Functional",
    "ferroptim",
    "flag_cases",
    "flag_params",
    "one_per_kernel",
    "runs_in_rust",
    "some_flag_params",
    "taking",
    "train_cases",
    "weight_decay",
]


def _check_installed_package() -> None:
    """Under CI (``CI=true``, as ``.ci/run`` sets it) the suite must test the installed
    wheel, not the source tree: ferroptim imported from a site-packages directory, not
    from ``python/`` (an editable install or a ``sys.path`` entry would put it there)."""
    if os.environ.get("CI", "").lower() != "true":
        return
    location = Path(ferroptim.__file__).resolve()
    source = Path(__file__).resolve().parent.parent / "python"
    if source in location.parents or "site-packages" not in location.parts:
        raise RuntimeError(
            f"CI=true but ferroptim was imported from {location}, not from an installed "
            f"wheel in site-packages (source tree: {source})"
        )


_check_installed_package()

# ----------------------------------------------------------------------------------------
# Tolerances (DESIGN.md, contract 2)
# ----------------------------------------------------------------------------------------

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.complex64: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.complex128: {"rtol": 1e-12, "atol": 1e-12},
    # torch's for-loop in bf16/fp16 rounds after every op (in bf16, ``v * 0.999`` often
    # rounds back to ``v``), its fused kernel computes in float32: after hundreds of steps
    # they are a few ulps of the 8-bit (bf16) / 11-bit (fp16) mantissa apart.
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]


# ----------------------------------------------------------------------------------------
# Parameter sets
# ----------------------------------------------------------------------------------------

#: Grad layouts: how a freshly drawn (contiguous) gradient is laid out in memory.
GRAD_LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda g: g.clone(),
    # A row-major-transposed copy: dense, but with strides unlike a contiguous param's.
    "transposed": lambda g: g.transpose(0, -1).contiguous().transpose(0, -1),
    # Dimension order reversed entirely (3-d and up).
    "permuted": lambda g: (
        g.permute(*reversed(range(g.dim()))).contiguous().permute(*reversed(range(g.dim())))
    ),
    # Every other element of a buffer twice as long: gaps in memory.
    "strided": lambda g: torch.zeros((*g.shape[:-1], 2 * g.shape[-1]), dtype=g.dtype)[
        ..., ::2
    ].copy_(g),
    # Channels-last (4-d).
    "channels_last": lambda g: g.contiguous(memory_format=torch.channels_last),
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: shape, memory layout, gradient layout.

    layouts: ``contiguous``; ``transposed`` (an ``nn.Parameter`` wrapping ``base.t()``:
    dense, non-contiguous); ``channels_last`` (4-d); ``slice`` (``base[:, ::2]``: gaps in
    memory).
    """

    shape: tuple[int, ...]
    layout: str = "contiguous"
    grad_layout: str = "contiguous"

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape}:{self.layout}:{self.grad_layout}"

    def make(self, gen: torch.Generator, dtype: torch.dtype) -> torch.nn.Parameter:
        if self.layout == "contiguous":
            data = torch.randn(self.shape, generator=gen, dtype=dtype)
        elif self.layout == "transposed":
            if len(self.shape) != 2:
                raise ValueError("transposed params are 2-d")
            data = torch.randn(tuple(reversed(self.shape)), generator=gen, dtype=dtype).t()
        elif self.layout == "channels_last":
            data = torch.randn(self.shape, generator=gen, dtype=dtype).contiguous(
                memory_format=torch.channels_last
            )
        elif self.layout == "slice":
            wide = (*self.shape[:-1], 2 * self.shape[-1])
            data = torch.randn(wide, generator=gen, dtype=dtype)[..., ::2]
        else:
            raise ValueError(self.layout)
        param = torch.nn.Parameter(data)
        assert param.stride() == data.stride()
        return param


@dataclass(frozen=True)
class GroupSpec:
    params: tuple[ParamSpec, ...]
    #: Hyperparameters of this group (on top of the optimizer's kwargs).
    hyper: dict[str, Any] = field(default_factory=dict)


def standard_layout(
    family: Family, kwargs: dict[str, Any], *, large: bool = True
) -> list[GroupSpec]:
    """The parity workhorse: ragged SIMD tails, every param/grad layout, two groups with
    different hyperparameters, and (``large``) a >64K-element tensor so the work is split
    into parallel chunks."""
    group0 = (
        ParamSpec((4099,)),
        ParamSpec((33, 65), grad_layout="transposed"),
        ParamSpec((7,)),
        ParamSpec((1,)),
        ParamSpec((3, 5, 17), grad_layout="permuted"),
        ParamSpec((24, 40), layout="transposed"),  # grad contiguous: strides differ
        ParamSpec((5, 9), layout="transposed", grad_layout="transposed"),  # same strides
    )
    group1 = [
        ParamSpec((8, 3, 5, 5), layout="channels_last"),  # grad contiguous (NCHW)
        ParamSpec((4, 3, 3, 3), layout="channels_last", grad_layout="channels_last"),
        ParamSpec((20, 17), layout="slice"),
        ParamSpec((19, 13), grad_layout="strided"),
        ParamSpec((2, 3), grad_layout="transposed"),
    ]
    if large:
        group1.append(ParamSpec((263, 271)))  # 71273 elements: > 64K
    hyper = {**family.second_group, **family.second_group_extra(kwargs)}
    wd = kwargs.get("weight_decay", 0.0)
    if wd:
        hyper["weight_decay"] = 2 * wd
    return [GroupSpec(group0), GroupSpec(tuple(group1), hyper)]


def small_layout() -> list[GroupSpec]:
    return [
        GroupSpec(
            (
                ParamSpec((37,)),
                ParamSpec((6, 11), grad_layout="transposed"),
                ParamSpec((1,)),
                ParamSpec((9, 4), layout="transposed"),
            )
        )
    ]


def threaded_layout() -> list[GroupSpec]:
    """Enough elements for many parallel chunks, with ragged tensor boundaries."""
    return [
        GroupSpec(
            (
                ParamSpec((200_003,)),
                ParamSpec((65_537,)),
                ParamSpec((7,)),
                ParamSpec((301, 333), grad_layout="transposed"),
                ParamSpec((140, 150), layout="transposed"),
            )
        ),
        GroupSpec((ParamSpec((131_071,)), ParamSpec((3,))), {"lr": 2e-3}),
    ]


@dataclass
class ParamSet:
    """Built parameters: ``groups[i]`` lists group i's params, ``specs`` mirrors it."""

    specs: list[GroupSpec]
    groups: list[list[torch.nn.Parameter]]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g]

    @property
    def param_specs(self) -> list[ParamSpec]:
        return [s for g in self.specs for s in g.params]

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"params": list(ps), **spec.hyper}
            for ps, spec in zip(self.groups, self.specs, strict=True)
        ]


def build(specs: list[GroupSpec], dtype: torch.dtype, seed: int = 0) -> ParamSet:
    gen = torch.Generator().manual_seed(seed)
    groups = [[s.make(gen, dtype) for s in g.params] for g in specs]
    return ParamSet(specs, groups)


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------


def randn64(shape: Sequence[int] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Standard normal draws in float64, sampled in float32: torch's float64 normal sampler
    is ~8× slower on the CPU, and per-step gradients are most of a parity test's time. (A
    draw times a scale is a full-precision float64 number; only the draw has 24 bits.)"""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).double()


class GradStream:
    """Identical gradients for every copy of a ParamSet, step after step.

    Each step, each param gets ``None`` with probability ``none_prob``, else a fresh
    gradient with a per-param random scale (so ``eps`` matters for some elements), in
    the param spec's grad layout. Draws come from a seeded generator.
    """

    def __init__(
        self,
        specs: list[ParamSpec],
        dtype: torch.dtype,
        seed: int = 1,
        none_prob: float = 0.15,
        first_none_prob: float = 0.5,
    ) -> None:
        self.specs = specs
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.none_prob = none_prob
        self.first_none_prob = first_none_prob

    def draw(self, step: int) -> list[torch.Tensor | None]:
        grads: list[torch.Tensor | None] = []
        for spec in self.specs:
            u = torch.rand(2, generator=self.gen, dtype=torch.float64)
            # The first step gives every param a grad only half the time, so some
            # state is created late; later steps drop grads at none_prob.
            if float(u[0]) < (self.first_none_prob if step == 0 else self.none_prob):
                grads.append(None)
                continue
            scale = 10.0 ** (4.0 * float(u[1]) - 3.0)  # 1e-3 .. 10
            raw = randn64(spec.shape, self.gen) * scale
            if self.dtype.is_complex:
                imag = randn64(spec.shape, self.gen)
                raw = torch.complex(raw, imag * scale)
            grads.append(raw.to(self.dtype))
        return grads


def assign_grads(
    params: Sequence[torch.Tensor], specs: Sequence[ParamSpec], grads: Sequence[torch.Tensor | None]
) -> None:
    for p, spec, g in zip(params, specs, grads, strict=True):
        p.grad = None if g is None else GRAD_LAYOUTS[spec.grad_layout](g)
        if g is not None:
            assert p.grad.shape == p.shape


# ----------------------------------------------------------------------------------------
# Running optimizers
# ----------------------------------------------------------------------------------------


@dataclass
class Run:
    opt: torch.optim.Optimizer
    pset: ParamSet
    #: For torch's float32 reference runs: builds the same run in float64 (the exact
    #: yardstick of :func:`assert_as_exact_as_torch`), on demand.
    shadow: Callable[[], Run] | None = None


def run_steps(
    make_opt: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    specs: list[GroupSpec],
    dtype: torch.dtype,
    steps: int,
    *,
    seed: int = 0,
    grad_seed: int = 1,
    none_prob: float = 0.15,
    first_none_prob: float = 0.5,
    check_grads_untouched: bool = False,
) -> Run:
    """Builds a ParamSet, an optimizer over it, and steps it ``steps`` times."""
    pset = build(specs, dtype, seed)
    opt = make_opt(pset.param_groups())
    stream = GradStream(pset.param_specs, dtype, grad_seed, none_prob, first_none_prob)
    for step in range(steps):
        grads = stream.draw(step)
        assign_grads(pset.params, pset.param_specs, grads)
        before = [None if p.grad is None else p.grad.clone() for p in pset.params]
        opt.step()
        if check_grads_untouched:
            for p, g in zip(pset.params, before, strict=True):
                if g is not None:
                    assert torch.equal(p.grad, g), "the step wrote to a gradient"
    return Run(opt, pset)


def _grads_untouched_checked(step: int) -> bool:
    """Steps on which run_pair checks the step left the gradients alone (a write would be
    systematic; cloning and comparing every grad every step costs more than the step)."""
    return step < 3 or step % 10 == 0


def run_pair(
    family: Family,
    kwargs: dict[str, Any],
    specs: list[GroupSpec],
    dtype: torch.dtype,
    steps: int,
    *,
    ferro_kwargs: dict[str, Any] | None = None,
    torch_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    grad_seed: int = 1,
    none_prob: float = 0.15,
    first_none_prob: float = 0.5,
    check_grads_untouched: bool = False,
) -> tuple[Run, Run]:
    """``steps`` steps of ferroptim and of torch's for-loop reference, on identical params
    and identical grads (drawn once, stepped in lockstep). Returns (ferro, torch)."""
    fset, tset = build(specs, dtype, seed), build(specs, dtype, seed)
    fopt = family.make_ferro(fset.param_groups(), **kwargs, **(ferro_kwargs or {}))
    torch_all = {**kwargs, **(torch_kwargs or {})}
    topt = family.make_torch(tset.param_groups(), **torch_all)
    stream = GradStream(fset.param_specs, dtype, grad_seed, none_prob, first_none_prob)
    for step in range(steps):
        grads = stream.draw(step)
        assign_grads(fset.params, fset.param_specs, grads)
        assign_grads(tset.params, tset.param_specs, grads)
        check = check_grads_untouched and _grads_untouched_checked(step)
        before = [None if p.grad is None else p.grad.clone() for p in fset.params] if check else []
        fopt.step()
        topt.step()
        for p, g in zip(fset.params, before, strict=False):
            if g is not None:
                assert torch.equal(p.grad, g), "the step wrote to a gradient"
    shadow = None
    if dtype in SHADOW_DTYPES:

        def shadow() -> Run:
            return run_torch_float64_shadow(
                family,
                torch_all,
                specs,
                steps,
                dtype=dtype,
                seed=seed,
                grad_seed=grad_seed,
                none_prob=none_prob,
                first_none_prob=first_none_prob,
            )

    return Run(fopt, fset), Run(topt, tset, shadow)


# ----------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------


def _state_of(run: Run, index: int) -> dict[str, Any]:
    return run.opt.state.get(run.pset.params[index], {})


def assert_same_trajectory(
    a: Run,
    b: Run,
    *,
    exact: bool = False,
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]] | None = None,
    values: bool = True,
    **tolerance: float,
) -> None:
    """Params and every state tensor of ``a`` match ``b`` (bitwise if ``exact``; not
    ``values``: only their structure, layouts and step counts)."""
    assert len(a.pset.params) == len(b.pset.params)
    for i, (pa, pb) in enumerate(zip(a.pset.params, b.pset.params, strict=True)):
        what = f"param {i} ({a.pset.param_specs[i].id})"
        assert pa.shape == pb.shape and pa.dtype == pb.dtype, what
        assert pa.stride() == pb.stride(), f"{what}: the step changed the param's layout"
        if values:
            _compare(pa.detach(), pb.detach(), what, exact, tolerance)
        sa, sb = _state_of(a, i), _state_of(b, i)
        assert set(sa) == set(sb), f"{what}: state keys {sorted(sa)} != {sorted(sb)}"
        if state_keys is not None and sb:
            group = next(g for g in b.opt.param_groups if any(p is pb for p in g["params"]))
            assert set(state_keys(group)) <= set(sa), f"{what}: missing state"
        for key in sb:
            va, vb = sa[key], sb[key]
            if isinstance(vb, torch.Tensor):
                assert isinstance(va, torch.Tensor), f"{what}: state[{key!r}] not a tensor"
                assert va.dtype == vb.dtype, f"{what}: state[{key!r}] dtype"
                assert va.shape == vb.shape, f"{what}: state[{key!r}] shape"
                if key == "step":
                    assert float(va) == float(vb), f"{what}: step {float(va)} != {float(vb)}"
                elif values:
                    _compare(va, vb, f"{what} state[{key!r}]", exact, tolerance)
            else:
                assert va == vb, f"{what}: state[{key!r}]"


#: Low-precision dtypes whose torch results are judged against an exact shadow, and
#: the dtype that shadow runs in.
SHADOW_DTYPES: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.float64,
    torch.complex64: torch.complex128,
}


def run_torch_float64_shadow(
    family: Family,
    kwargs: dict[str, Any],
    specs: list[GroupSpec],
    steps: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    grad_seed: int = 1,
    none_prob: float = 0.15,
    first_none_prob: float = 0.5,
) -> Run:
    """torch's for-loop reference in float64 on a float32 run's exact inputs: the float32
    initial params and the float32 gradient stream, upcast (complex64: complex128). The
    yardstick for how far any float32 implementation is from the exact trajectory."""
    low = build(specs, dtype, seed)
    shadow = build(specs, SHADOW_DTYPES[dtype], seed)
    with torch.no_grad():
        for high, p in zip(shadow.params, low.params, strict=True):
            high.copy_(p)
    opt = family.make_torch(shadow.param_groups(), **kwargs)
    stream = GradStream(low.param_specs, dtype, grad_seed, none_prob, first_none_prob)
    for step in range(steps):
        grads = stream.draw(step)
        assign_grads(
            shadow.params,
            shadow.param_specs,
            [None if g is None else g.to(SHADOW_DTYPES[dtype]) for g in grads],
        )
        opt.step()
    return Run(opt, shadow)


def assert_as_exact_as_torch(
    ferro: Run,
    ref: Run,
    shadow: Callable[[], Run] | None = None,
    *,
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]] | None = None,
) -> None:
    """ferroptim's run against torch's for-loop ``ref`` (DESIGN.md, contract 2), the same
    verdict on any CPU: params and every state tensor.

    float64 (complex128): within the tight float64 tolerance of torch. float32
    (complex64): within the float32 tolerance of torch's result, or, where it is not
    (torch's vectorised float32 kernels round differently from one CPU model to the
    next, and lr=10 or momentum=1 amplify a 1-ulp difference past any tolerance), as
    exact as torch against the float64 shadow (see
    :func:`assert_tensor_as_exact_as_torch`). ``shadow`` builds that float64 run (default:
    ``ref.shadow``, which :func:`run_pair` records), only when needed."""
    dtype = ref.pset.params[0].dtype
    if dtype not in SHADOW_DTYPES:
        assert_same_trajectory(ferro, ref, state_keys=state_keys, **tol(dtype))
        return
    try:
        assert_same_trajectory(ferro, ref, state_keys=state_keys, **tol(dtype))
        return
    except AssertionError:
        make_shadow = shadow or ref.shadow
        assert make_shadow is not None, "no float64 shadow for a float32 comparison"
        exact = make_shadow()
    # Structure first (state keys, dtypes, steps): exactly torch's.
    assert_same_trajectory(ferro, ref, state_keys=state_keys, values=False)
    for i, (pa, pb) in enumerate(zip(ferro.pset.params, ref.pset.params, strict=True)):
        what = f"param {i} ({ferro.pset.param_specs[i].id})"
        assert_tensor_as_exact_as_torch(pa, pb, exact.pset.params[i], what)
        sa, sb, s64 = _state_of(ferro, i), _state_of(ref, i), _state_of(exact, i)
        for key, value in sb.items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert_tensor_as_exact_as_torch(sa[key], value, s64[key], f"{what} state[{key!r}]")


def assert_tensors_as_exact_as_torch(
    actual: Sequence[torch.Tensor],
    ref: Sequence[torch.Tensor],
    shadow: Callable[[], Sequence[torch.Tensor]],
    what: str = "tensor",
) -> None:
    """:func:`assert_as_exact_as_torch` for lists of tensors (params, or state buffers, in
    any order): ``ref`` is torch's for-loop result, ``shadow()`` the same tensors from a
    float64 run on the same inputs, built only if some float32 tensor is not within the
    float32 tolerance of torch's. float64 tensors: the tight float64 tolerance."""
    assert len(actual) == len(ref)
    exact: Sequence[torch.Tensor] | None = None
    for i, (a, r) in enumerate(zip(actual, ref, strict=True)):
        a, r = a.detach(), r.detach()
        assert a.dtype == r.dtype and a.shape == r.shape, f"{what} {i}: dtype or shape"
        if r.dtype not in SHADOW_DTYPES:
            _compare(a, r, f"{what} {i}", False, tol(r.dtype))
            continue
        try:
            _compare(a, r, f"{what} {i}", False, tol(r.dtype))
        except AssertionError:
            if exact is None:
                exact = shadow()
            assert_tensor_as_exact_as_torch(a, r, exact[i], f"{what} {i}")


def assert_tensor_as_exact_as_torch(
    actual: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str
) -> None:
    """``actual`` (ferroptim, float32) is as exact as torch's float32 ``ref32``, judged
    against the exact ``ref64``: element by element, ``actual`` is within the float32
    tolerance of ``ref32`` plus twice torch's own worst error in the tensor
    (``max |ref32 - ref64|``). Where torch is exact to the tolerance this is the plain
    tolerance; where the problem amplifies rounding (lr=10, momentum=1: each element's
    trajectory depends on every last bit of every sqrt and division) it admits any
    float32 result as far from the exact one as torch's own, on whichever CPU torch
    rounded its vectorised kernels.

    Why not "ferroptim's worst error <= torch's worst error": in those problems the
    worst element is chaotic. Simulating another CPU (torch's float32 ``sqrt`` one ulp
    off on random elements) moves torch's worst error in a tensor by up to 2.3x either
    way while ferroptim's stays put, so a strict comparison would pass or fail by the
    CPU model; the check above passed every simulated CPU (see
    ``test_parity.py::test_oracle_is_hardware_independent``)."""
    base = tol(torch.float32)

    def as_real(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return torch.view_as_real(t) if t.is_complex() else t

    a, r32, r64 = (as_real(t).double() for t in (actual, ref32, ref64))
    assert a.shape == r32.shape == r64.shape, f"{what}: shapes differ"
    nan_a, nan_t = torch.isnan(a), torch.isnan(r32)
    assert torch.equal(nan_a, nan_t), f"{what}: NaNs where torch has none (or the reverse)"
    a, r32, r64 = a[~nan_a], r32[~nan_a], r64[~nan_a]
    if not a.numel():
        return
    torch_error = float((r32 - r64).abs().nan_to_num(math.inf).max())
    allowed = base["atol"] + base["rtol"] * r32.abs() + 2 * torch_error
    excess = (a - r32).abs() - allowed
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        raise AssertionError(
            f"{what}: element {i}: ferroptim {float(a[i])!r}, torch float32 "
            f"{float(r32[i])!r}, exact (float64) {float(r64[i])!r}: the difference exceeds "
            f"the float32 tolerance plus twice torch's own error ({torch_error:.3g}); "
            f"ferroptim's error vs float64 is {float((a - r64).abs().max()):.3g}"
        )


def _compare(
    x: torch.Tensor, y: torch.Tensor, what: str, exact: bool, tolerance: dict[str, float]
) -> None:
    if exact:
        if not torch.equal(x, y):
            diff = (x - y).abs().max().item()
            raise AssertionError(f"{what}: not bitwise identical (max abs diff {diff:g})")
    else:
        torch.testing.assert_close(
            x, y, **(tolerance or tol(y.dtype)), msg=lambda m: f"{what}: {m}"
        )


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values as raw bytes (NaN payloads and signed zeros included)."""
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def snapshot(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Copies of every param, grad and optimizer-state value, to check a failing step
    wrote nothing (see :func:`assert_unchanged`)."""
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
        "state": {
            i: {
                k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                for k, v in opt.state.get(p, {}).items()
            }
            for i, p in enumerate(params)
        },
    }


#: State values torch's ``_init_group`` creates other than zeros (NAdam's running
#: product of its momentum schedule starts at 1).
#: (``"lr"``: the param group's learning rate, which Rprop's ``step_size`` and ASGD's
#: ``eta`` start at)
PRISTINE_STATE: dict[str, float | str] = {
    "mu_product": 1.0,
    "step_size": "lr",
    "eta": "lr",
    "mu": 1.0,
    # (Schedule-Free's `z` starts as a copy of the param)
    "z": "param",
}


def _pristine(key: str, opt: torch.optim.Optimizer, param: torch.Tensor, value: Any) -> Any:
    pristine = PRISTINE_STATE.get(key, 0.0)
    if pristine == "param":
        return param.detach()
    if pristine != "lr":
        return pristine
    lr = next(g["lr"] for g in opt.param_groups if any(p is param for p in g["params"]))
    return torch.full_like(value, lr)  # as torch creates it (an int tensor rounds lr)


def assert_unchanged(
    before: dict[str, Any], opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> None:
    """Every param, grad and state value is byte for byte what :func:`snapshot` saw; state
    the failing step created lazily (as torch's ``_init_group`` does before its step
    raises) is allowed only if pristine (zeros, or :data:`PRISTINE_STATE`: nothing
    uninitialised, nothing stepped)."""
    after = snapshot(opt, params)
    for i, (x, y) in enumerate(zip(before["params"], after["params"], strict=True)):
        assert _same_bytes(x, y), f"param {i} was written by a failing step"
    for i, (x, y) in enumerate(zip(before["grads"], after["grads"], strict=True)):
        assert (x is None) == (y is None), f"grad {i} was set or removed by a failing step"
        assert x is None or _same_bytes(x, y), f"grad {i} was written by a failing step"
    for i in before["state"]:
        sb, sa = before["state"][i], after["state"][i]
        for key in sb:
            assert key in sa, f"state {key!r} of param {i} disappeared"
            vb, va = sb[key], sa[key]
            if isinstance(vb, torch.Tensor):
                assert isinstance(va, torch.Tensor), f"state {key!r} of param {i} replaced"
                assert _same_bytes(vb, va), f"state {key!r} of param {i} was written"
            else:
                assert va == vb, f"state {key!r} of param {i} was changed"
        for key in set(sa) - set(sb):
            value = sa[key]
            if isinstance(value, torch.Tensor):
                pristine = _pristine(key, opt, params[i], value)
                assert not (value != pristine).count_nonzero(), (
                    f"state {key!r} of param {i} was created and written by a failing step"
                )


def structure(obj: Any) -> Any:
    """The shape of a (state-dict-like) object: tensors by dtype/shape/device, containers
    recursively, everything else by value."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.dtype, tuple(obj.shape), obj.device.type)
    if isinstance(obj, dict):
        return {k: structure(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(structure(v) for v in obj)
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    return obj


def iter_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{path}/{i}")


@contextlib.contextmanager
def rust_calls() -> Iterator[Counter]:
    """Counts calls into ferroptim's Rust step kernels, keyed ``"<kernel>_step"``."""
    from _kernels import kernel_calls

    with kernel_calls() as counts:
        yield counts


# ----------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------


def error_of(fn: Callable[[], Any]) -> BaseException | None:
    """The exception ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as exc:
        return exc
    return None


@pytest.fixture
def torch_single_threaded() -> Iterator[None]:
    """torch's reference on one intra-op thread: its OpenMP workers spin-wait, and on a
    shared 2-core machine that turns milliseconds into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def alone_under_xdist(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Under pytest-xdist, a test marked ``alone`` (one that measures how the machine
    schedules threads) runs while no other worker runs a test: every test holds a shared
    lock on a file all workers see, an ``alone`` test an exclusive one. A turnstile lock
    taken before either keeps the exclusive request from starving behind a stream of
    shared ones."""
    if "PYTEST_XDIST_WORKER" not in os.environ or fcntl is None:
        yield
        return
    alone = request.node.get_closest_marker("alone") is not None
    shared_dir = tmp_path_factory.getbasetemp().parent  # the same for every worker
    with (
        open(shared_dir / "ferroptim-turnstile.lock", "a") as turnstile,
        open(shared_dir / "ferroptim-alone.lock", "a") as gate,
    ):
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def restore_ferroptim_config() -> Iterator[None]:
    """Every test starts and ends with ferroptim's default threads / SIMD / backend.

    torch's reference runs on one intra-op thread: its elementwise results do not depend
    on the thread count, and its OpenMP workers spin-wait — on a shared 2-core machine
    whose other core is busy, that turns a 0.3 ms for-loop step into 30 ms.
    """
    threads = ferroptim.get_num_threads()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ferroptim.set_simd_level(None)
    ferroptim.set_backend("auto")
    yield
    torch.set_num_threads(torch_threads)
    ferroptim.set_num_threads(threads)
    ferroptim.set_simd_level(None)
    ferroptim.set_backend("auto")


@pytest.fixture
def simd_levels() -> list[str]:
    levels = ferroptim.supported_simd_levels()
    assert levels, "no SIMD level reported"
    assert "scalar" in levels, "the scalar reference level must always be available"
    return levels

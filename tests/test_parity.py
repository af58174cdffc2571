"""Numerical parity with torch.optim's for-loop reference (DESIGN.md contracts 2–4).

Every family of the registry in conftest.py, every flag combination of its grid,
float32 and float64, ragged shapes, every param and grad layout, two groups with
their own hyperparameters, a tensor large enough to be split into parallel chunks.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import (
    ALL_FAMILIES,
    FAMILIES,
    FULL_GRID,
    OPTIMIZERS,
    GroupSpec,
    ParamSpec,
    Run,
    assert_as_exact_as_torch,
    assert_same_trajectory,
    assert_tensors_as_exact_as_torch,
    build,
    error_of,
    ferroptim,
    flag_params,
    one_per_kernel,
    run_pair,
    run_steps,
    run_torch_float64_shadow,
    rust_calls,
    small_layout,
    some_flag_params,
    standard_layout,
    taking,
    threaded_layout,
    tol,
)

STEPS = 200
REAL_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
COMPLEX_DTYPES = [
    pytest.param(torch.complex64, id="c64"),
    pytest.param(torch.complex128, id="c128"),
]


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("case", flag_params())
def test_matches_torch_for_loop(case, dtype):
    specs = standard_layout(case.family, case.kwargs)
    ferro, ref = run_pair(
        case.family, {"lr": 1e-2, **case.kwargs}, specs, dtype, STEPS, check_grads_untouched=True
    )
    assert_as_exact_as_torch(ferro, ref, state_keys=case.family.state_keys)


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
@pytest.mark.parametrize(
    "case",
    # Adam's full grid; the other families' representative cases (complex params are
    # stepped as real views: no flag of theirs treats them differently).
    flag_params([f for f in FULL_GRID if FAMILIES[f].complex_params])
    + some_flag_params(
        [f for f in ALL_FAMILIES if f not in FULL_GRID and FAMILIES[f].complex_params]
    ),
)
def test_complex_params_match_torch(case, dtype):
    specs = [
        GroupSpec(
            (
                ParamSpec((37,)),
                ParamSpec((6, 11), grad_layout="transposed"),
                ParamSpec((1,)),
                ParamSpec((9, 4), layout="transposed"),
                ParamSpec((5, 8), layout="slice"),
            )
        ),
        GroupSpec((ParamSpec((3, 5, 7), grad_layout="permuted"),), {"lr": 3e-3}),
    ]
    ferro, ref = run_pair(case.family, {"lr": 1e-2, **case.kwargs}, specs, dtype, STEPS)
    assert_as_exact_as_torch(ferro, ref, state_keys=case.family.state_keys)


#: Per family (one per kernel): flags of the mixed float32/float64 test (the registry's
#: ``mixed_dtype_kwargs``).
MIXED_DTYPE_CASES = {
    name: FAMILIES[name].mixed_dtype_kwargs
    for name in one_per_kernel("AdamW")
    if FAMILIES[name].mixed_dtype_kwargs is not None
}


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("family", list(MIXED_DTYPE_CASES))
def test_mixed_float32_float64_groups(family, dtype):
    """A float32 group and a float64 group in one optimizer (and both dtypes in one group)."""
    flags = MIXED_DTYPE_CASES[family]
    family = FAMILIES[family]

    def make(opt_factory, upcast: bool = False):
        # upcast: the same inputs (rounded to each param's dtype) stepped in float64.
        def exact(t: torch.Tensor) -> torch.Tensor:
            return t.double() if upcast else t

        gen = torch.Generator().manual_seed(3)
        a = torch.nn.Parameter(exact(torch.randn(1000, generator=gen, dtype=torch.float32)))
        b = torch.nn.Parameter(exact(torch.randn(33, 7, generator=gen, dtype=torch.float64)))
        c = torch.nn.Parameter(exact(torch.randn(129, generator=gen, dtype=dtype)))
        params = [a, b, c]
        dtypes = [torch.float32, torch.float64, dtype]
        opt = opt_factory([{"params": [a, b]}, {"params": [c], "lr": 5e-3}])
        ggen = torch.Generator().manual_seed(4)
        for _ in range(STEPS):
            for p, d in zip(params, dtypes, strict=True):
                p.grad = exact(torch.randn(p.shape, generator=ggen, dtype=torch.float64).to(d))
            opt.step()
        return params, opt

    def tensors(params, opt, keys):
        return [p.detach() for p in params] + [
            opt.state[p][k] for p, ks in zip(params, keys, strict=True) for k in ks
        ]

    fp, fo = make(lambda g: family.make_ferro(g, lr=1e-2, **flags))
    tp, to = make(lambda g: family.make_torch(g, lr=1e-2, **flags))
    # (per param: Adafactor's state keys depend on its shape)
    keys = [[k for k in to.state[p] if k not in family.scalar_state] for p in tp]
    if family.has_step:
        assert float(fo.state[fp[0]]["step"]) == STEPS
    assert_tensors_as_exact_as_torch(
        tensors(fp, fo, keys),
        tensors(tp, to, keys),
        lambda: tensors(*make(lambda g: family.make_torch(g, lr=1e-2, **flags), True), keys),
    )
    for x, y in zip(fp, tp, strict=True):
        assert list(fo.state[x]) == list(to.state[y])
        assert to.state[y], "every param has state"
        for key, value in to.state[y].items():
            if key in family.scalar_state:  # torch's scalar dtype, whatever the param's
                assert float(fo.state[x][key]) == float(value)
                assert fo.state[x][key].dtype == value.dtype
            else:
                assert fo.state[x][key].dtype == y.dtype


#: Per family: hyperparameters outside the usual range or of unusual types (the
#: registry's ``unusual``).
UNUSUAL_HYPERPARAMETERS = {name: family.unusual for name, family in FAMILIES.items()}


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize(
    ("family", "hyper"),
    [
        pytest.param(name, *case.values, id=f"{name}-{case.id}")
        for name, cases in UNUSUAL_HYPERPARAMETERS.items()
        for case in cases
    ],
)
def test_unusual_hyperparameters(family, hyper, dtype):
    family = FAMILIES[family]
    ferro, ref = run_pair(family, hyper, small_layout(), dtype, STEPS)
    assert_as_exact_as_torch(ferro, ref)


TENSOR_BETAS = [
    pytest.param((torch.tensor(0.9), torch.tensor(0.999)), id="f32-tensors"),
    pytest.param(
        (torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64)),
        id="f64-tensors",
    ),
    pytest.param((torch.tensor([0.9]), torch.tensor([0.99])), id="1-element-tensors"),
]


@pytest.mark.parametrize("lr", [1e-2, torch.tensor(1e-2)], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize(
    ("family", "betas"),
    [
        pytest.param(family, *betas.values, id=f"{family}-{betas.id}")
        for family in taking("betas")
        # (AdEMAMix's betas are three: test_ademamix covers its tensor hyperparameters)
        if len(inspect.signature(FAMILIES[family].ferro).parameters["betas"].default) == 2
        for betas in TENSOR_BETAS
        # (torch's Adamax and NAdam cannot step with 1-element betas: see below)
        if family in ("Adam", "AdamW") or betas.id != "1-element-tensors"
    ],
)
def test_tensor_betas_match_torch_exactly(family, betas, dtype, lr):
    """torch computes with tensor betas in their own (float32) tensor arithmetic
    (``1 - beta2``, ``1 - beta1 ** step``, ``lr / bias_correction1``): float64 params
    drifted 1.8e-8 from torch after 20 steps when those scalars came out of float64
    Python. ferroptim hands such groups to torch's for-loop: bitwise torch's numbers,
    also when betas become tensors mid-training."""
    family = FAMILIES[family]
    flags = {"amsgrad": True} if "amsgrad" in family.grid else {}
    kwargs = {"lr": lr, "betas": betas, "weight_decay": 0.05, **flags}
    ferro, ref = run_pair(family, kwargs, small_layout(), dtype, 20)
    assert_same_trajectory(ferro, ref, exact=True)

    # Set mid-training (a scheduler stepping betas as tensors): from then on torch's.
    fset, tset = build(small_layout(), dtype), build(small_layout(), dtype)
    fopt = family.make_ferro(fset.param_groups(), lr=lr, **flags)
    topt = family.make_torch(tset.param_groups(), lr=lr, **flags)
    gen = torch.Generator().manual_seed(2)
    for step in range(20):
        if step == 10:
            for opt in (fopt, topt):
                opt.param_groups[0]["betas"] = betas
        for p, q in zip(fset.params, tset.params, strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            q.grad = p.grad.clone()
        fopt.step()
        topt.step()
    # (the first 10 steps ran in Rust: tight tolerance, which a 1.8e-8 drift would fail)
    assert_same_trajectory(Run(fopt, fset), Run(topt, tset), **tol(dtype))


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("family", ["Adamax", "NAdam"])
def test_one_element_tensor_betas_raise_torchs_error(family, dtype):
    """torch's Adamax and NAdam fail on 1-element (not 0-d) tensor betas (an in-place
    op cannot broadcast its shape-[1] result into a 0-d state); ferroptim raises the
    same error."""
    family = FAMILIES[family]
    kwargs = {"betas": (torch.tensor([0.9]), torch.tensor([0.99]))}
    errors = []
    for make in (family.make_torch, family.make_ferro):
        pset = build(small_layout(), dtype)
        opt = make(pset.param_groups(), **kwargs)
        for p in pset.params:
            p.grad = torch.ones_like(p)
        errors.append(error_of(opt.step))
    torch_error, ferro_error = errors
    assert torch_error is not None
    assert type(ferro_error) is type(torch_error)
    assert str(ferro_error) == str(torch_error)


# ----------------------------------------------------------------------------------------
# The oracle: the same verdict on any CPU
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_on_another_cpu(seed: int) -> Iterator[None]:
    """torch as it runs on a CPU whose vectorised float32 ``sqrt`` rounds differently:
    one ulp up on a random 30% of the elements (torch's for-loop calls ``Tensor.sqrt``
    and ``Tensor.sqrt_``; float64 results are left as this machine's torch computes them,
    which on some CPUs is itself one ulp off on a few of them)."""
    sqrt, sqrt_ = torch.Tensor.sqrt, torch.Tensor.sqrt_
    gen = torch.Generator().manual_seed(seed)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float32:
            return t
        up = torch.nextafter(t, torch.full_like(t, math.inf))
        return torch.where(torch.rand(t.shape, generator=gen) < 0.3, up, t)

    def other_sqrt(self: torch.Tensor) -> torch.Tensor:
        return nudge(sqrt(self))

    def other_sqrt_(self: torch.Tensor) -> torch.Tensor:
        out = sqrt_(self)
        return out.copy_(nudge(out.clone()))

    torch.Tensor.sqrt, torch.Tensor.sqrt_ = other_sqrt, other_sqrt_
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.sqrt_ = sqrt, sqrt_


@contextlib.contextmanager
def _torch_with_exact_sqrt() -> Iterator[None]:
    """torch whose ``Tensor.sqrt``/``sqrt_`` are correctly rounded (NumPy's, computed on
    the same dtype): torch's own vectorised ones are off by an ulp on ~0.7% of inputs,
    float64 included, on this project's Xeons."""
    sqrt, sqrt_ = torch.Tensor.sqrt, torch.Tensor.sqrt_

    def exact_sqrt(self: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.sqrt(self.detach().numpy()))

    def exact_sqrt_(self: torch.Tensor) -> torch.Tensor:
        return self.copy_(exact_sqrt(self))

    torch.Tensor.sqrt, torch.Tensor.sqrt_ = exact_sqrt, exact_sqrt_
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.sqrt_ = sqrt, sqrt_


#: (family, flags) whose kernels transcribe torch's for-loop op for op.
BITWISE_CASES = [
    pytest.param("RAdam", {}, id="RAdam"),
    pytest.param("RAdam", {"weight_decay": 0.05, "maximize": True}, id="RAdam-wd-maximize"),
    pytest.param(
        "RAdam",
        {"lr": torch.tensor(1e-2), "weight_decay": 0.1, "decoupled_weight_decay": True},
        id="RAdam-tensor-lr-decoupled",
    ),
    pytest.param("RAdam", {"betas": (0.8, 0.9), "eps": 1e-3}, id="RAdam-fast-betas"),
    pytest.param("Adadelta", {}, id="Adadelta"),
    pytest.param(
        "Adadelta",
        {"weight_decay": 0.05, "maximize": True, "lr": 0.5, "rho": 0.95},
        id="Adadelta-wd-maximize",
    ),
    pytest.param("Adadelta", {"lr": torch.tensor(0.3), "eps": 1e-3}, id="Adadelta-tensor-lr"),
]


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize(("family", "hyper"), BITWISE_CASES)
def test_bitwise_torch_where_its_sqrt_is_correctly_rounded(family, hyper, dtype):
    """The kernel computes each element with torch's operations in torch's order and
    torch's roundings (fused multiply-adds where its CPU kernels fuse, ``a / s`` as a
    division, ``s / t`` as ``t.reciprocal() * s``): with a correctly rounded ``sqrt`` in
    torch, every param and state bit equals torch's for-loop, over 30 steps on ragged
    sizes (both branches of RAdam's rectification included)."""
    family = FAMILIES[family]
    gen = torch.Generator().manual_seed(0)
    sizes = [*range(1, 300, 7), 4099]
    values = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    ours = [v.clone().requires_grad_() for v in values]
    theirs = [v.clone().requires_grad_() for v in values]
    fopt = family.make_ferro(ours, **hyper)
    topt = family.make_torch(theirs, **hyper)
    for _ in range(30):
        for p, q in zip(ours, theirs, strict=True):
            scale = 10 ** torch.empty((), dtype=torch.float64).uniform_(-3, 1, generator=gen)
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * scale
            q.grad = p.grad.clone()
        fopt.step()
        with _torch_with_exact_sqrt():
            topt.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p.detach(), q.detach())
        for key, value in topt.state[q].items():
            assert torch.equal(fopt.state[p][key], value), key


#: The amplifying cases that failed on AMD Zen 5 (torch's float32 differs by an ulp).
AMPLIFYING = [
    pytest.param("Adam", {"lr": 10.0, "weight_decay": 0.01}, id="Adam-huge-lr"),
    pytest.param("RMSprop", {"momentum": 1.0, "eps": 1e-3, "lr": 1e-4}, id="RMSprop-momentum-one"),
    pytest.param("Adagrad", {"lr": 10.0, "weight_decay": 0.01}, id="Adagrad-huge-lr"),
]


@pytest.mark.parametrize(("family", "hyper"), AMPLIFYING)
def test_oracle_is_hardware_independent(family, hyper):
    """ferroptim against torch as it would run on other CPUs: where the plain float32
    tolerance fails (a 1-ulp sqrt difference amplified by lr=10 or momentum=1), the
    oracle still passes, judging both against the exact float64 shadow."""
    family = FAMILIES[family]
    ferro, _ = run_pair(family, hyper, small_layout(), torch.float32, STEPS)
    shadow = run_torch_float64_shadow(family, hyper, small_layout(), STEPS)
    plain_failures = 0
    for seed in range(3):
        with _torch_on_another_cpu(seed):
            other = run_steps(
                lambda g: family.make_torch(g, **hyper), small_layout(), torch.float32, STEPS
            )
        plain_failures += error_of(lambda o=other: assert_same_trajectory(ferro, o)) is not None
        assert_as_exact_as_torch(ferro, other, lambda: shadow)
    if family.name != "Adagrad":  # (Adagrad's amplification is milder)
        assert plain_failures, "the simulated CPU should have defeated the plain tolerance"


def test_oracle_rejects_a_result_less_exact_than_torchs():
    """The oracle is not a blank cheque: a result further from the exact trajectory than
    torch's own float32 error allows fails, in an amplifying case as in a plain one."""
    for name, hyper in (("RMSprop", {"momentum": 1.0, "eps": 1e-3, "lr": 1e-4}), ("Adam", {})):
        family = FAMILIES[name]
        ferro, ref = run_pair(family, hyper, small_layout(), torch.float32, 50)
        exact = run_torch_float64_shadow(family, hyper, small_layout(), 50)
        assert_as_exact_as_torch(ferro, ref, lambda e=exact: e)
        param, ref32, ref64 = ferro.pset.params[0], ref.pset.params[0], exact.pset.params[0]
        torch_error = float((ref32.detach().double() - ref64.detach().double()).abs().max())
        with torch.no_grad():  # one element 3 torch-errors (and tolerances) off
            param[5] = ref32[5] + 3 * (torch_error + 1e-6 + 1e-5 * abs(float(ref32[5])))
        with pytest.raises(AssertionError, match="twice torch's own error"):
            assert_as_exact_as_torch(ferro, ref, lambda e=exact: e)


# ----------------------------------------------------------------------------------------
# SIMD levels and thread counts: bitwise identical
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("case", some_flag_params())
def test_every_simd_level_is_bitwise_identical(case, dtype, simd_levels):
    specs = standard_layout(case.family, case.kwargs, large=False)
    kwargs = {"lr": 1e-2, **case.kwargs}
    runs = {}
    for level in simd_levels:
        assert ferroptim.set_simd_level(level) == level
        assert ferroptim.simd_level() == level
        runs[level] = run_steps(
            lambda groups: case.family.make_ferro(groups, **kwargs), specs, dtype, STEPS
        )
    ferroptim.set_simd_level(None)
    ref = run_steps(lambda groups: case.family.make_torch(groups, **kwargs), specs, dtype, STEPS)
    first, *others = simd_levels
    for level in others:
        assert_same_trajectory(runs[level], runs[first], exact=True)
    # (bitwise identical: one comparison with torch covers every level)
    assert_as_exact_as_torch(
        runs[first],
        ref,
        lambda: run_torch_float64_shadow(case.family, kwargs, specs, STEPS, dtype=dtype),
    )


def test_set_simd_level_none_restores_the_default_level(simd_levels):
    """None restores ``FERROPTIM_SIMD`` when set (the whole suite can run under a forced
    level), else the best level this CPU has."""
    default = ferroptim.simd_level()
    assert default == (os.environ.get("FERROPTIM_SIMD", "").strip().lower() or simd_levels[0])
    assert ferroptim.set_simd_level("scalar") == "scalar"
    assert ferroptim.simd_level() == "scalar"
    assert ferroptim.set_simd_level(None) == default
    assert ferroptim.simd_level() == default


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("case", some_flag_params())
def test_thread_counts_are_bitwise_identical(case, dtype):
    steps = 25  # tensors are large: ~600K elements per step
    kwargs = {"lr": 1e-2, **case.kwargs}
    runs = {}
    for threads in (1, 2, 3):
        ferroptim.set_num_threads(threads)
        assert ferroptim.get_num_threads() == threads
        runs[threads] = run_steps(
            lambda groups: case.family.make_ferro(groups, **kwargs),
            threaded_layout(),
            dtype,
            steps,
            none_prob=0.1,
        )
    assert_same_trajectory(runs[2], runs[1], exact=True)
    assert_same_trajectory(runs[3], runs[1], exact=True)
    ref = run_steps(
        lambda groups: case.family.make_torch(groups, **kwargs),
        threaded_layout(),
        dtype,
        steps,
        none_prob=0.1,
    )
    assert_as_exact_as_torch(
        runs[2],
        ref,
        lambda: run_torch_float64_shadow(
            case.family, kwargs, threaded_layout(), steps, none_prob=0.1
        ),
    )


@pytest.mark.parametrize("family", one_per_kernel("AdamW"))
def test_single_tensor_chunking_is_bitwise_identical_to_small_tensors(family):
    """A long tensor stepped as one param equals the same values stepped as many short
    params: chunk and tensor boundaries never change the arithmetic."""
    family = FAMILIES[family]
    kwargs = {"lr": 1e-2, **family.common, **family.variants[0]}
    n, pieces = 3 * 65_536 + 11, 7
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(20)]
    bounds = torch.linspace(0, n, pieces + 1).long().tolist()

    ferroptim.set_num_threads(2)
    whole = torch.nn.Parameter(data.clone())
    opt = family.make_ferro([whole], **kwargs)
    for g in grads:
        whole.grad = g.clone()
        opt.step()

    ferroptim.set_num_threads(1)
    if family.per_tensor_reductions:
        # Pieces would be another problem (their own norms): the whole tensor again, on
        # one thread (other chunk owners, the same chunk cuts).
        again = torch.nn.Parameter(data.clone())
        opt = family.make_ferro([again], **kwargs)
        for g in grads:
            again.grad = g.clone()
            opt.step()
        ferroptim.set_num_threads(2)
        assert torch.equal(whole.detach(), again.detach())
        return
    parts = [torch.nn.Parameter(data[a:b].clone()) for a, b in itertools.pairwise(bounds)]
    opt = family.make_ferro(parts, **kwargs)
    for g in grads:
        for p, (a, b) in zip(parts, itertools.pairwise(bounds), strict=True):
            p.grad = g[a:b].clone()
        opt.step()
    assert torch.equal(whole.detach(), torch.cat([p.detach() for p in parts]))


# ----------------------------------------------------------------------------------------
# The torch path (how non-CPU tensors step), forced on CPU
# ----------------------------------------------------------------------------------------

TORCH_IMPLS = [
    pytest.param({}, id="default"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"foreach": False}, id="for-loop"),
    pytest.param({"fused": True}, id="fused"),
]


def _matching_layout(family) -> list[GroupSpec]:
    """Grads laid out exactly like their params (torch's fused CPU kernel needs that)."""
    return [
        GroupSpec(
            (
                ParamSpec((4099,)),
                ParamSpec((33, 65)),
                ParamSpec((7,)),
                ParamSpec((1,)),
                ParamSpec((24, 40), layout="transposed", grad_layout="transposed"),
            )
        ),
        GroupSpec(
            (
                ParamSpec((4, 3, 3, 3), layout="channels_last", grad_layout="channels_last"),
                ParamSpec((3, 5, 17)),
            ),
            family.second_group,
        ),
    ]


def _assert_fused_refused_like_torch(family, kwargs):
    """torch has no fused implementation of this family: ``fused=True`` is refused by the
    constructor, with torch's error. (A pytorch-optimizer reference takes any keyword into
    its defaults, ``fused`` included, and ignores it: so does ferroptim's class.)"""
    p = [torch.nn.Parameter(torch.zeros(3))]
    try:
        family.torch(p, **kwargs, fused=True)
    except Exception as torch_error:
        with pytest.raises(type(torch_error)) as ferro_error:
            family.ferro(p, **kwargs, fused=True)
        assert str(ferro_error.value) == str(torch_error)
    else:
        assert family.ferro(p, **kwargs, fused=True).defaults["fused"] is True


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("case", some_flag_params())
def test_forced_torch_backend_matches_reference(case, impl, dtype):
    ferroptim.set_backend("torch")
    assert ferroptim.get_backend() == "torch"
    family, kwargs = case.family, {"lr": 1e-2, **case.kwargs}
    if impl.get("fused") and not family.has_fused:
        _assert_fused_refused_like_torch(family, case.kwargs)
        return
    if impl:
        # A user's explicit choice of implementation behaves as torch's own: where torch
        # itself fails (its fused SGD with momentum cannot step a param whose first grad
        # comes after the others'), so does the forced torch path, with torch's error.
        torch_error = error_of(
            lambda: run_steps(
                lambda g: family.torch(g, **family.fixed, **kwargs, **impl),
                _matching_layout(family),
                dtype,
                STEPS,
            )
        )
        if torch_error is not None:
            with pytest.raises(type(torch_error)) as ferro_error:
                run_steps(
                    lambda g: family.make_ferro(g, **kwargs, **impl),
                    _matching_layout(family),
                    dtype,
                    STEPS,
                )
            assert str(ferro_error.value) == str(torch_error)
            return
    # The reference is torch's own implementation of the same choice (ASGD's foreach
    # arithmetic differs from its for-loop's: `p - eta * (g + lambd * p)`).
    ferro, ref = run_pair(
        family,
        kwargs,
        _matching_layout(family),
        dtype,
        STEPS,
        ferro_kwargs=impl,
        torch_kwargs=impl,
    )
    assert_same_trajectory(ferro, ref, state_keys=case.family.state_keys, **tol(dtype))


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("family", one_per_kernel())
def test_forced_torch_backend_steps_noncontiguous_grads_correctly(family, impl):
    """Contract 5: non-contiguous grads are stepped correctly on every path. torch's fused
    CPU kernel mis-steps a grad whose strides differ from its param's, so ferroptim must
    not hand it such a grad."""
    ferroptim.set_backend("torch")
    family = FAMILIES[family]
    if impl.get("fused") and not family.has_fused:
        _assert_fused_refused_like_torch(family, family.common)
        return
    specs = [
        GroupSpec(
            (
                ParamSpec((33, 65), grad_layout="transposed"),
                ParamSpec((24, 40), layout="transposed"),
                ParamSpec((3, 5, 17), grad_layout="permuted"),
                ParamSpec((19, 13), grad_layout="strided"),
                ParamSpec((300,)),
            )
        )
    ]
    kwargs = {"lr": 1e-2, **family.common}
    for first_none_prob in (0.0, 0.5):  # every first grad at step 0 / some come late
        if impl.get("fused"):
            # torch's own fused SGD cannot step a param whose first grad comes late: an
            # explicit fused=True gets torch's error (see the test above).
            def steps(factory, fnp=first_none_prob):
                run_steps(factory, specs, torch.float32, 50, first_none_prob=fnp)

            torch_error = error_of(
                lambda: steps(lambda g: family.torch(g, **family.fixed, **kwargs, **impl))
            )
            if torch_error is not None:
                assert family.name == "SGD" and first_none_prob > 0, torch_error
                with pytest.raises(type(torch_error)):
                    steps(lambda g: family.make_ferro(g, **kwargs, **impl))
                continue
        ferro, ref = run_pair(
            family,
            kwargs,
            specs,
            torch.float32,
            50,
            ferro_kwargs=impl,
            first_none_prob=first_none_prob,
        )
        assert_same_trajectory(ferro, ref, **tol(torch.float32))


@pytest.mark.parametrize("family", one_per_kernel())
def test_large_tensors_match_torch(family):
    """Half a million float32 elements in tensors of a few hundred thousand, 25 steps,
    every state buffer in play: the contract's tolerance holds element by element (the
    more elements, the likelier a rounding difference lands where it shows)."""
    case = next(c.values[0] for c in some_flag_params() if c.values[0].family.name == family)
    ferroptim.set_num_threads(1)
    kwargs = {"lr": 1e-2, **case.kwargs}
    ferro, ref = run_pair(case.family, kwargs, threaded_layout(), torch.float32, 25, none_prob=0.1)
    assert_as_exact_as_torch(ferro, ref)


@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("family", one_per_kernel())
def test_implementation_kwargs_on_the_rust_path(family, impl):
    """``foreach=`` / ``fused=`` only choose torch's implementation for tensors torch
    steps: CPU float tensors still step in Rust, to the reference numbers."""
    family = FAMILIES[family]
    if impl.get("fused") and not family.has_fused:
        _assert_fused_refused_like_torch(family, family.common)
        return
    kwargs = {"lr": 1e-2, **family.common, **family.variants[0]}
    with rust_calls() as calls:
        ferro, ref = run_pair(family, kwargs, small_layout(), torch.float32, 50, ferro_kwargs=impl)
    assert sum(calls.values()) >= 50, dict(calls)
    assert_as_exact_as_torch(ferro, ref)


@pytest.mark.parametrize("impl", TORCH_IMPLS[:3])
@pytest.mark.parametrize("family", one_per_kernel())
def test_forced_torch_backend_steps_non_dense_params_correctly(family, impl):
    """Contract 5 on torch's path: params that are not one run of memory (a strided slice
    of a bigger tensor) are stepped correctly by whatever implementation ferroptim
    chooses (torch's fused CPU kernels mis-step them: an explicit ``fused=True`` is the
    user's choice, the default is ferroptim's)."""
    ferroptim.set_backend("torch")
    family = FAMILIES[family]
    specs = [
        GroupSpec(
            (
                ParamSpec((20, 17), layout="slice"),
                ParamSpec((5, 9), layout="slice", grad_layout="strided"),
                ParamSpec((300,)),
            )
        )
    ]
    ferro, ref = run_pair(
        family,
        {"lr": 1e-2, **family.common},
        specs,
        torch.float32,
        30,
        ferro_kwargs=impl,
        none_prob=0.0,
        first_none_prob=0.0,
    )
    assert_same_trajectory(ferro, ref, **tol(torch.float32))


@pytest.mark.parametrize("family", one_per_kernel("AdamW"))
def test_backend_switch_mid_training_keeps_the_trajectory(family):
    family = FAMILIES[family]
    kwargs = {"lr": 1e-2, **family.common, **family.variants[0]}
    specs = _matching_layout(family)
    pset = build(specs, torch.float32)
    ref_set = build(specs, torch.float32)
    opt = family.make_ferro(pset.param_groups(), **kwargs)
    ref = family.make_torch(ref_set.param_groups(), **kwargs)
    shadow_set = build(specs, torch.float64)  # the same inputs, stepped in float64
    with torch.no_grad():
        for s, p in zip(shadow_set.params, pset.params, strict=True):
            s.copy_(p)
    shadow = family.make_torch(shadow_set.param_groups(), **kwargs)
    gen = torch.Generator().manual_seed(5)
    for step in range(60):
        ferroptim.set_backend("torch" if (step // 10) % 2 else "auto")
        for p, q, s in zip(pset.params, ref_set.params, shadow_set.params, strict=True):
            # Grads laid out like their params (see the non-contiguous-grad test for others).
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = torch.empty_like(p).copy_(g), torch.empty_like(q).copy_(g)
            s.grad = torch.empty_like(s).copy_(g)
        opt.step()
        ref.step()
        shadow.step()

    def tensors(params, o):
        return [p.detach() for p in params] + [
            v for p in params for k, v in o.state[p].items() if k != "step"
        ]

    assert_tensors_as_exact_as_torch(
        tensors(pset.params, opt),
        tensors(ref_set.params, ref),
        lambda: tensors(shadow_set.params, shadow),
    )
    for p, q in zip(pset.params, ref_set.params, strict=True):
        assert list(opt.state[p]) == list(ref.state[q])
        assert float(opt.state[p].get("step", 60)) == float(ref.state[q].get("step", 60)) == 60


#: Per family: kwargs of the mixed Rust / torch-routed group test (the registry's
#: ``mixed_routing_kwargs``: an eps float16 represents).
MIXED_ROUTING_FLAGS = {
    name: family.mixed_routing_kwargs
    for name, family in FAMILIES.items()
    if family.mixed_routing_kwargs is not None
}


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(MIXED_ROUTING_FLAGS))
def test_group_mixing_rust_and_torch_routed_params(family, low):
    """float32 params (Rust) and bf16/fp16 params (torch) in one group both step right."""
    kwargs = MIXED_ROUTING_FLAGS[family]
    family = FAMILIES[family]

    def make(factory, upcast: bool = False):
        # upcast: the same inputs (rounded to each param's dtype) stepped in float64.
        def exact(t: torch.Tensor) -> torch.Tensor:
            return t.double() if upcast else t

        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(exact(torch.randn(1031, generator=gen))),
            torch.nn.Parameter(exact(torch.randn(17, 9, generator=gen).to(low))),
            torch.nn.Parameter(exact(torch.randn(5, 7, generator=gen).t())),
            torch.nn.Parameter(exact(torch.randn(300, generator=gen).to(low))),
        ]
        dtypes = [torch.float32, low, torch.float32, low]
        opt = factory([{"params": params}])
        ggen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            for p, d in zip(params, dtypes, strict=True):
                p.grad = exact(torch.randn(p.shape, generator=ggen).to(d))
            opt.step()
        return params, opt

    fp, fo = make(lambda g: family.make_ferro(g, **kwargs))
    tp, to = make(lambda g: family.make_torch(g, **kwargs))
    # The low-precision params went through one of torch's own implementations, exactly.
    impls = [{"foreach": False}, {"foreach": True}] + ([{"fused": True}] * family.has_fused)
    candidates = [
        make(lambda g, impl=impl: family.torch(g, **{**family.fixed, **kwargs, **impl}))[0]
        for impl in impls
    ]
    for i in (1, 3):
        if family.ferro._ferro_spec.rounds_like_torch:
            # Stepped in Rust as torch's for-loop steps them: bitwise in the bulk torch
            # vectorises (the few trailing elements it steps with scalar 16-bit arithmetic
            # round intermediates too: tests/test_low_params_torch_semantics.py).
            got, loop = fp[i].detach().flatten(), candidates[0][i].detach().flatten()
            bulk = got.numel() - got.numel() % 32
            # (all but an element whose float32 intermediate torch's vectorised math on
            # another CPU puts an ulp from ours, on a tie of the 16-bit rounding)
            same = (got[:bulk] == loop[:bulk]).float().mean().item()
            assert same > 0.99, f"param {i} ({low}): {same:.4f} as torch's for-loop"
            torch.testing.assert_close(got, loop, **tol(low))
            continue
        assert any(torch.equal(fp[i].detach(), c[i].detach()) for c in candidates), (
            f"param {i} ({low}) matches none of torch's implementations bitwise"
        )
    # (per param: Adafactor's state keys depend on its shape)
    keys = [[k for k in to.state[p] if k != "step"] for p in tp]

    def tensors(params, opt):
        return [p.detach() for p in params] + [
            opt.state[p][k] for p, ks in zip(params, keys, strict=True) for k in ks
        ]

    # float32 (Rust) against torch's for-loop and its float64 shadow; bf16/fp16 (torch's
    # path) within their tolerance.
    assert_tensors_as_exact_as_torch(
        tensors(fp, fo),
        tensors(tp, to),
        lambda: tensors(*make(lambda g: family.make_torch(g, **kwargs), True)),
    )
    for x, y in zip(fp, tp, strict=True):
        assert x.dtype == y.dtype
        assert list(fo.state[x]) == list(to.state[y])
        for key, value in to.state[y].items():
            if key == "step":
                assert float(fo.state[x]["step"]) == float(value) == STEPS
            elif key in family.scalar_state:
                assert float(fo.state[x][key]) == float(value)
            else:
                assert fo.state[x][key].dtype == y.dtype


#: Every registry configuration of differentiable=True (``differentiable_cases``).
DIFFERENTIABLE_CASES = [
    pytest.param(name, flags, id=case)
    for name, family in FAMILIES.items()
    for case, flags in family.differentiable_cases.items()
]


@pytest.mark.parametrize(("family", "flags"), DIFFERENTIABLE_CASES)
def test_differentiable_matches_torch(family, flags):
    """differentiable=True delegates to torch: same values, and the step is differentiable
    (the gradient through it matches torch's)."""
    family = FAMILIES[family]

    def run(factory):
        gen = torch.Generator().manual_seed(0)
        leaf = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_()
        p = leaf.clone()  # a non-leaf param: in-place steps are recorded
        opt = factory([p], lr=0.05, differentiable=True, **flags)
        ggen = torch.Generator().manual_seed(1)
        for _ in range(5):
            p.grad = torch.randn(4, 6, generator=ggen, dtype=torch.float64)
            opt.step()
        (p * p).sum().backward()
        return p.detach().clone(), leaf.grad.clone(), opt

    fp, fgrad, fopt = run(family.make_ferro)
    tp, tgrad, topt = run(lambda *a, **k: family.torch(*a, **{**family.fixed, **k}))
    torch.testing.assert_close(fp, tp, rtol=0, atol=0)
    torch.testing.assert_close(fgrad, tgrad, rtol=0, atol=0)
    assert fgrad.abs().sum() > 0
    assert fopt.state_dict()["state"].keys() == topt.state_dict()["state"].keys()

    # ... and close to the plain reference. torch's differentiable branch computes the
    # bias corrections from the float32 step tensor, so float32-level tolerance.
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=torch.float64))
    ref = family.make_torch([q], lr=0.05, **flags)
    ggen = torch.Generator().manual_seed(1)
    for _ in range(5):
        q.grad = torch.randn(4, 6, generator=ggen, dtype=torch.float64)
        ref.step()
    torch.testing.assert_close(fp, q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_default_dtype_float64(family):
    """With float64 as the default dtype torch keeps ``step`` as a float64 tensor."""
    family = FAMILIES[family]
    kwargs = {"lr": 1e-2, **family.common, **family.variants[0]}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ferro, ref = run_pair(family, kwargs, small_layout(), torch.float64, STEPS)
    finally:
        torch.set_default_dtype(previous)
    assert_as_exact_as_torch(ferro, ref)
    if family.has_step:
        step = ferro.opt.state[ferro.pset.params[0]]["step"]
        assert step.dtype == torch.float64

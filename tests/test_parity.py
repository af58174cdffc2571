"""Numerical parity with torch.optim's for-loop reference (DESIGN.md contracts 2–4).

Every family of the registry in conftest.py, every flag combination of its grid,
float32 and float64, ragged shapes, every param and grad layout, two groups with
their own hyperparameters, a tensor large enough to be split into parallel chunks.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    FAMILIES,
    GroupSpec,
    ParamSpec,
    assert_same_trajectory,
    build,
    ferroptim,
    flag_params,
    run_pair,
    run_steps,
    small_layout,
    some_flag_params,
    standard_layout,
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
    assert_same_trajectory(ferro, ref, state_keys=case.family.state_keys, **tol(dtype))


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
@pytest.mark.parametrize("case", flag_params())
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
    assert_same_trajectory(ferro, ref, state_keys=case.family.state_keys, **tol(dtype))


@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_mixed_float32_float64_groups(dtype):
    """A float32 group and a float64 group in one optimizer (and both dtypes in one group)."""
    family = FAMILIES["AdamW"]

    def make(opt_factory):
        gen = torch.Generator().manual_seed(3)
        a = torch.nn.Parameter(torch.randn(1000, generator=gen, dtype=torch.float32))
        b = torch.nn.Parameter(torch.randn(33, 7, generator=gen, dtype=torch.float64))
        c = torch.nn.Parameter(torch.randn(129, generator=gen, dtype=dtype))
        params = [a, b, c]
        opt = opt_factory([{"params": [a, b]}, {"params": [c], "lr": 5e-3}])
        ggen = torch.Generator().manual_seed(4)
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=ggen, dtype=torch.float64).to(p.dtype)
            opt.step()
        return params, opt

    fp, fo = make(lambda g: family.make_ferro(g, lr=1e-2, amsgrad=True))
    tp, to = make(lambda g: family.make_torch(g, lr=1e-2, amsgrad=True))
    for x, y in zip(fp, tp, strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), **tol(y.dtype))
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert fo.state[x][key].dtype == y.dtype
            torch.testing.assert_close(fo.state[x][key], to.state[y][key], **tol(y.dtype))
        assert float(fo.state[x]["step"]) == float(to.state[y]["step"]) == STEPS


@pytest.mark.parametrize(
    "hyper",
    [
        pytest.param({"lr": torch.tensor(1e-2)}, id="tensor-lr"),  # float32 tensor
        pytest.param({"lr": torch.tensor(1e-2, dtype=torch.float64)}, id="f64-tensor-lr"),
        pytest.param({"lr": torch.tensor([1e-2])}, id="1-element-tensor-lr"),
        pytest.param({"betas": (0.0, 0.0)}, id="betas-zero"),
        pytest.param({"betas": (0.99, 0.9999), "eps": 1e-3}, id="slow-betas-big-eps"),
        pytest.param({"lr": 0.0}, id="lr-zero"),
        pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
        pytest.param({"weight_decay": 0.1, "amsgrad": True, "maximize": True}, id="all"),
    ],
)
@pytest.mark.parametrize("family", ["Adam", "Adam-decoupled", "AdamW"])
@pytest.mark.parametrize("dtype", REAL_DTYPES)
def test_unusual_hyperparameters(family, hyper, dtype):
    family = FAMILIES[family]
    ferro, ref = run_pair(family, hyper, small_layout(), dtype, STEPS)
    assert_same_trajectory(ferro, ref, **tol(dtype))


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
    for level in simd_levels:
        assert_same_trajectory(runs[level], ref, **tol(dtype))


def test_set_simd_level_none_restores_the_best_level(simd_levels):
    best = ferroptim.simd_level()
    assert best == simd_levels[0]
    assert ferroptim.set_simd_level("scalar") == "scalar"
    assert ferroptim.simd_level() == "scalar"
    assert ferroptim.set_simd_level(None) == best
    assert ferroptim.simd_level() == best


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
    assert_same_trajectory(runs[2], ref, **tol(dtype))


def test_single_tensor_chunking_is_bitwise_identical_to_small_tensors():
    """A long tensor stepped as one param equals the same values stepped as many short
    params: chunk and tensor boundaries never change the arithmetic."""
    n, pieces = 3 * 65_536 + 11, 7
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(20)]
    bounds = torch.linspace(0, n, pieces + 1).long().tolist()

    ferroptim.set_num_threads(2)
    whole = torch.nn.Parameter(data.clone())
    opt = ferroptim.AdamW([whole], lr=1e-2, amsgrad=True)
    for g in grads:
        whole.grad = g.clone()
        opt.step()

    ferroptim.set_num_threads(1)
    parts = [torch.nn.Parameter(data[a:b].clone()) for a, b in itertools_pairwise(bounds)]
    opt = ferroptim.AdamW(parts, lr=1e-2, amsgrad=True)
    for g in grads:
        for p, (a, b) in zip(parts, itertools_pairwise(bounds), strict=True):
            p.grad = g[a:b].clone()
        opt.step()
    assert torch.equal(whole.detach(), torch.cat([p.detach() for p in parts]))


def itertools_pairwise(xs):
    return list(itertools.pairwise(xs))


# ----------------------------------------------------------------------------------------
# The torch path (how non-CPU tensors step), forced on CPU
# ----------------------------------------------------------------------------------------

TORCH_IMPLS = [
    pytest.param({}, id="default"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"foreach": False}, id="for-loop"),
    pytest.param({"fused": True}, id="fused"),
]


def _matching_layout() -> list[GroupSpec]:
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
            {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
        ),
    ]


@pytest.mark.parametrize("dtype", REAL_DTYPES)
@pytest.mark.parametrize("impl", TORCH_IMPLS)
@pytest.mark.parametrize("case", some_flag_params())
def test_forced_torch_backend_matches_reference(case, impl, dtype):
    ferroptim.set_backend("torch")
    assert ferroptim.get_backend() == "torch"
    ferro, ref = run_pair(
        case.family,
        {"lr": 1e-2, **case.kwargs},
        _matching_layout(),
        dtype,
        STEPS,
        ferro_kwargs=impl,
    )
    assert_same_trajectory(ferro, ref, state_keys=case.family.state_keys, **tol(dtype))


@pytest.mark.parametrize("impl", TORCH_IMPLS)
def test_forced_torch_backend_steps_noncontiguous_grads_correctly(impl):
    """Contract 5: non-contiguous grads are stepped correctly on every path. torch's fused
    CPU kernel mis-steps a grad whose strides differ from its param's, so ferroptim must
    not hand it such a grad."""
    ferroptim.set_backend("torch")
    family = FAMILIES["Adam"]
    specs = [
        GroupSpec(
            (
                ParamSpec((33, 65), grad_layout="transposed"),
                ParamSpec((24, 40), layout="transposed"),
                ParamSpec((3, 5, 17), grad_layout="permuted"),
                ParamSpec((19, 13), grad_layout="strided"),
            )
        )
    ]
    ferro, ref = run_pair(family, {"lr": 1e-2}, specs, torch.float32, 50, ferro_kwargs=impl)
    assert_same_trajectory(ferro, ref, **tol(torch.float32))


def test_backend_switch_mid_training_keeps_the_trajectory():
    family = FAMILIES["AdamW"]
    specs = _matching_layout()
    pset = build(specs, torch.float32)
    ref_set = build(specs, torch.float32)
    opt = family.make_ferro(pset.param_groups(), lr=1e-2, amsgrad=True)
    ref = family.make_torch(ref_set.param_groups(), lr=1e-2, amsgrad=True)
    gen = torch.Generator().manual_seed(5)
    for step in range(60):
        ferroptim.set_backend("torch" if (step // 10) % 2 else "auto")
        for p, q in zip(pset.params, ref_set.params, strict=True):
            # Grads laid out like their params (see the non-contiguous-grad test for others).
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = torch.empty_like(p).copy_(g), torch.empty_like(q).copy_(g)
        opt.step()
        ref.step()
    for p, q in zip(pset.params, ref_set.params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **tol(torch.float32))
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], **tol(torch.float32))
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == 60


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["Adam", "AdamW"])
def test_group_mixing_rust_and_torch_routed_params(family, low):
    """float32 params (Rust) and bf16/fp16 params (torch) in one group both step right."""
    family = FAMILIES[family]
    # fp16's for-loop reference underflows eps=1e-8 to 0 (and then divides 0 by 0): use an
    # eps float16 represents comfortably.
    kwargs = {"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01, "amsgrad": True}

    def make(factory):
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(1031, generator=gen)),
            torch.nn.Parameter(torch.randn(17, 9, generator=gen).to(low)),
            torch.nn.Parameter(torch.randn(5, 7, generator=gen).t()),
            torch.nn.Parameter(torch.randn(300, generator=gen).to(low)),
        ]
        opt = factory([{"params": params}])
        ggen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=ggen).to(p.dtype)
            opt.step()
        return params, opt

    fp, fo = make(lambda g: family.make_ferro(g, **kwargs))
    tp, to = make(lambda g: family.make_torch(g, **kwargs))
    # The low-precision params went through one of torch's own implementations, exactly.
    candidates = [
        make(lambda g, impl=impl: family.torch(g, **{**family.fixed, **kwargs, **impl}))[0]
        for impl in ({"foreach": False}, {"foreach": True}, {"fused": True})
    ]
    for i in (1, 3):
        assert any(torch.equal(fp[i].detach(), c[i].detach()) for c in candidates), (
            f"param {i} ({low}) matches none of torch's implementations bitwise"
        )
    for x, y in zip(fp, tp, strict=True):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.detach(), y.detach(), **tol(y.dtype))
        assert set(fo.state[x]) == set(to.state[y])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert fo.state[x][key].dtype == y.dtype
            torch.testing.assert_close(fo.state[x][key], to.state[y][key], **tol(y.dtype))
        assert float(fo.state[x]["step"]) == STEPS


DIFFERENTIABLE_CASES = [
    # torch's own differentiable Adam cannot backprop through amsgrad with L2 decay.
    pytest.param("Adam", {"weight_decay": 0.1}, id="Adam-wd"),
    pytest.param("Adam", {"amsgrad": True, "maximize": True}, id="Adam-amsgrad-maximize"),
    pytest.param("AdamW", {"weight_decay": 0.1, "amsgrad": True}, id="AdamW-wd-amsgrad"),
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


@pytest.mark.parametrize("family", ["Adam", "AdamW"])
def test_default_dtype_float64(family):
    """With float64 as the default dtype torch keeps ``step`` as a float64 tensor."""
    family = FAMILIES[family]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ferro, ref = run_pair(
            family, {"lr": 1e-2, "amsgrad": True}, small_layout(), torch.float64, STEPS
        )
    finally:
        torch.set_default_dtype(previous)
    assert_same_trajectory(ferro, ref, **tol(torch.float64))
    step = ferro.opt.state[ferro.pset.params[0]]["step"]
    assert step.dtype == torch.float64

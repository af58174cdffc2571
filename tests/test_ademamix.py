"""ferroptim.AdEMAMix against the real ``pytorch_optimizer.AdEMAMix`` (not the registry's
oracle subclass, which adds per-group ``maximize`` and leaves gradients untouched):
signature, param-group keys, the per-group step counter, checkpoints written and read by
the reference itself, and bitwise-equal trajectories on both of ferroptim's paths (Rust,
torch ops) wherever torch's ``sqrt`` is correctly rounded. The registry-driven tests
(parity over every flag combination, interop, bad input, ...) cover the rest through
``optim_db``'s entry.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import pytorch_optimizer
import torch
from _kernels import kernel_calls
from _pytorch_optimizer_reference import ADEMAMIX_EXTRA_GROUP_KEYS
from conftest import ferroptim, randn64
from pytorch_optimizer.base.exception import NoComplexParameterError, NoSparseGradientError

#: Ragged sizes: SIMD tails, one parallel-chunked tensor, a scalar-like one.
SHAPES = ((1,), (15,), (17, 3), (257,), (130_001,), (8, 33))

CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"lr": 1e-2, "weight_decay": 0.1, "t_alpha_beta3": 40.0}, id="l2-warmup"),
    pytest.param(
        {"lr": 3e-3, "betas": (0.8, 0.99, 0.995), "weight_decay": 0.5, "weight_decouple": True},
        id="decoupled",
    ),
    pytest.param(
        {"weight_decay": 0.01, "weight_decouple": True, "fixed_decay": True, "alpha": 8.0},
        id="fixed-decay",
    ),
    pytest.param({"maximize": True, "eps": 1e-3, "t_alpha_beta3": 7.0}, id="maximize"),
]


@contextlib.contextmanager
def correctly_rounded_sqrt() -> Iterator[None]:
    """torch whose ``Tensor.sqrt``/``sqrt_`` are correctly rounded (NumPy's, on the same
    dtype): torch's vectorised ones are an ulp off on ~0.7% of inputs on some CPUs, ours
    never are."""
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


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
    ]


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [
        {"params": params[:4]},
        {"params": params[4:], "lr": 7e-4, "betas": (0.5, 0.9, 0.99), "alpha": 2.0},
    ]


def _run(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int,
    dtype: torch.dtype = torch.float32,
    params: list[torch.nn.Parameter] | None = None,
    opt: torch.optim.Optimizer | None = None,
    seed: int = 1,
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params(dtype) if params is None else params
    opt = make(params) if opt is None else opt
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for i, p in enumerate(params):
            scale = 10.0 ** ((k % 7) - 4)  # gradients of many magnitudes
            g = (randn64(p.shape, gen) * scale).to(dtype)
            # Some params miss their gradient on some steps (no update, no decay).
            p.grad = None if (i + k) % 5 == 0 else g
        opt.step()
    return params, opt


def _assert_bitwise(
    ours: tuple[list[torch.Tensor], torch.optim.Optimizer],
    theirs: tuple[list[torch.Tensor], torch.optim.Optimizer],
) -> None:
    (fp, fo), (tp, to) = ours, theirs
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
        assert list(fo.state[a]) == list(to.state[b])
        for key in to.state[b]:
            torch.testing.assert_close(
                fo.state[a][key], to.state[b][key], rtol=0, atol=0, equal_nan=True
            )
    assert [g["step"] for g in fo.param_groups] == [g["step"] for g in to.param_groups]


def test_signature_is_the_references_plus_keywords():
    ours = inspect.signature(ferroptim.AdEMAMix.__init__).parameters
    theirs = inspect.signature(pytorch_optimizer.AdEMAMix.__init__).parameters
    positional = [n for n, p in theirs.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(ours)[: len(positional)] == positional
    for name in positional:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    extra = [p for name, p in ours.items() if name not in theirs]
    assert {p.name for p in extra} >= {"differentiable", "max_grad_norm", "skip_nonfinite"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_group_keys_are_the_references_plus_torch_conventions():
    f = ferroptim.AdEMAMix(_params(), t_alpha_beta3=10.0)
    t = pytorch_optimizer.AdEMAMix(_params(), t_alpha_beta3=10.0)
    ours, theirs = f.param_groups[0], t.param_groups[0]
    assert set(ours) == set(theirs) | set(ADEMAMIX_EXTRA_GROUP_KEYS)
    assert {k: ours[k] for k in theirs if k != "params"} == {
        k: v for k, v in theirs.items() if k != "params"
    }
    assert isinstance(f, torch.optim.Optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_bitwise_equal_to_the_reference(kwargs, dtype):
    """The reference's torch ops in its order, rounded alike: the same bits over 300
    steps and two groups, with torch's ``sqrt`` correctly rounded (the one op where
    torch's CPU kernel is not)."""
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.AdEMAMix(_groups(ps), **kwargs), 300, dtype)
    assert calls["ademamix_step"] > 0
    with correctly_rounded_sqrt():
        theirs = _run(
            lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), foreach=False, **kwargs),
            300,
            dtype,
        )
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_close_to_the_references_default_flavour(kwargs):
    """Against the reference's default CPU flavour (foreach) as it is: equal but for the
    last bits of the elements where torch's ``sqrt`` rounds the other way."""
    ours = _run(lambda ps: ferroptim.AdEMAMix(_groups(ps), **kwargs), 100)
    theirs = _run(lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), **kwargs), 100)
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_torch_path_bitwise_equal_to_the_reference(kwargs):
    """ferroptim's torch-op code (other devices, the backend forced to torch)."""
    ferroptim.set_backend("torch")
    with correctly_rounded_sqrt():
        with kernel_calls() as calls:
            ours = _run(lambda ps: ferroptim.AdEMAMix(_groups(ps), **kwargs), 50)
        assert not calls
        theirs = _run(
            lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), foreach=False, **kwargs), 50
        )
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_on_the_torch_path_step_like_the_reference(dtype):
    """The torch-op code (other devices, ``set_backend("torch")``): the reference's
    half-precision branch (it divides, then adds, instead of ``addcdiv``), bit for bit.
    (On the CPU they step in Rust with the same rounding:
    tests/test_low_params_torch_semantics.py.)"""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "t_alpha_beta3": 10.0}
    ferroptim.set_backend("torch")
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.AdEMAMix(ps, **kwargs), 30, dtype)
    assert not calls
    theirs = _run(lambda ps: pytorch_optimizer.AdEMAMix(ps, foreach=False, **kwargs), 30, dtype)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("direction", ["reference-to-ferroptim", "ferroptim-to-reference"])
def test_checkpoints_interchange_with_the_reference(kwargs, direction):
    """A state_dict written by one loads into the other (the group's step counter with
    it: the warmup and bias corrections continue) and training continues to the same
    bits as an uninterrupted run of the reference."""
    first, second = (
        (pytorch_optimizer.AdEMAMix, ferroptim.AdEMAMix)
        if direction == "reference-to-ferroptim"
        else (ferroptim.AdEMAMix, pytorch_optimizer.AdEMAMix)
    )
    kwargs = {**kwargs, "foreach": False}
    with correctly_rounded_sqrt():
        params, opt = _run(lambda ps: first(_groups(ps), **kwargs), 20)
        saved = copy.deepcopy(opt.state_dict())
        assert set(saved["state"][0]) == {"exp_avg", "exp_avg_sq", "exp_avg_slow"}
        assert [g["step"] for g in saved["param_groups"]] == [20, 20]
        resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        resumed = second(_groups(resumed_params), **kwargs)
        resumed.load_state_dict(saved)
        resumed_run = _run(lambda ps: resumed, 20, params=resumed_params, opt=resumed, seed=2)

        straight_params, straight = _run(
            lambda ps: pytorch_optimizer.AdEMAMix(_groups(ps), **kwargs), 20
        )
        straight_run = _run(lambda ps: straight, 20, params=straight_params, opt=straight, seed=2)
    _assert_bitwise(resumed_run, straight_run)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"lr": -1.0}, r"learning rate must be positive\. \(-1\.0 > 0\)"),
        ({"betas": (1.0, 0.999, 0.9999)}, r"beta1 must be in the range \[0\.0, 1\.0\)"),
        ({"betas": (0.9, -0.1, 0.9999)}, r"beta2 must be in the range \[0\.0, 1\.0\)"),
        ({"betas": (0.9, 0.999, 1.5)}, r"beta3 must be in the range \[0\.0, 1\.0\]"),
        ({"alpha": -1.0}, "alpha must be non-negative"),
        ({"t_alpha_beta3": -1.0}, "t_alpha_beta3 must be non-negative"),
        ({"weight_decay": -0.1}, "weight_decay must be non-negative"),
        ({"eps": -1e-8}, "eps must be non-negative"),
    ],
)
def test_constructor_errors_have_the_references_messages(kwargs, words):
    with pytest.raises(Exception, match=words) as theirs:
        pytorch_optimizer.AdEMAMix(_params(), **kwargs)
    with pytest.raises(Exception, match=words) as ours:
        ferroptim.AdEMAMix(_params(), **kwargs)
    assert type(ours.value) is type(theirs.value)  # NegativeLRError, ValueError
    assert str(ours.value) == str(theirs.value)


def test_every_group_counts_its_steps_and_a_skipped_step_counts_none():
    """The reference increments ``group['step']`` in every group on every step, a group
    without gradients included; a step skipped for non-finite gradients is not taken."""
    params = _params()
    opt = ferroptim.AdEMAMix(_groups(params), skip_nonfinite=True)
    for p in params[:4]:
        p.grad = torch.ones_like(p)
    opt.step()  # the second group has no gradient
    assert [g["step"] for g in opt.param_groups] == [1, 1]
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    assert [g["step"] for g in opt.param_groups] == [1, 1]
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_sparse_gradient_raises_the_references_error_before_any_write():
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    opt = ferroptim.AdEMAMix(params)
    params[0].grad = torch.randn(8, 4)
    params[1].grad = torch.randn(8, 4).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(NoSparseGradientError, match="AdEMAMix does not"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert opt.param_groups[0].get("step", 0) == 0
    # (state made before the error is all zeros, as the reference's init_group leaves it)
    assert all(not v.any() for state in opt.state.values() for v in state.values())


def test_errors_are_built_in_exceptions_without_pytorch_optimizer(monkeypatch):
    """pytorch-optimizer is not a dependency: without it, the same messages on built-in
    exception types."""
    real_import_module = importlib.import_module

    def import_module(name: str, package: str | None = None) -> Any:
        if name.startswith("pytorch_optimizer"):
            raise ImportError(name)
        return real_import_module(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ValueError, match=r"learning rate must be positive\. \(-1\.0 > 0\)"):
        ferroptim.AdEMAMix(_params(), lr=-1.0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="AdEMAMix does not support sparse gradient"):
        ferroptim.AdEMAMix([p]).step()


def test_complex_params_step_as_real_views_where_the_reference_refuses_them():
    """An extension, as torch.optim's algorithms step complex params: each complex param
    steps exactly as its real view would, on the Rust path and on torch's."""
    for backend in ("auto", "torch"):
        ferroptim.set_backend(backend)
        gen = torch.Generator().manual_seed(0)
        z = torch.nn.Parameter(torch.randn(40, dtype=torch.complex64, generator=gen))
        r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
        kwargs = {"weight_decay": 0.1, "t_alpha_beta3": 5.0, "maximize": True}
        fz, fr = ferroptim.AdEMAMix([z], **kwargs), ferroptim.AdEMAMix([r], **kwargs)
        for _ in range(10):
            z.grad = torch.randn(40, dtype=torch.complex64, generator=gen)
            r.grad = torch.view_as_real(z.grad).clone()
            fz.step()
            fr.step()
        assert torch.equal(torch.view_as_real(z.detach()), r.detach())
        assert torch.equal(
            torch.view_as_real(fz.state[z]["exp_avg_slow"]), fr.state[r]["exp_avg_slow"]
        )
    with pytest.raises(NoComplexParameterError):
        pytorch_optimizer.AdEMAMix([z]).step()


def test_the_reference_itself_changes_gradients_and_we_do_not():
    """What the oracle subclass smooths over: the reference negates (maximize) and decays
    (L2) ``p.grad`` in place; ferroptim leaves it as backward wrote it."""
    kwargs = {"maximize": True, "weight_decay": 0.1}
    for cls, changed in ((pytorch_optimizer.AdEMAMix, True), (ferroptim.AdEMAMix, False)):
        p = torch.nn.Parameter(torch.randn(33))
        p.grad = torch.randn(33)
        grad = p.grad.clone()
        cls([p], **kwargs).step()
        assert (not torch.equal(p.grad, grad)) is changed, cls

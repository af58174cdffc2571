"""ferroptim.Lion against the real ``lion_pytorch.Lion`` (not the registry's oracle
subclass, which adds ``maximize``): signature, param-group keys, checkpoints written
and read by the reference itself, and bitwise-equal float32 trajectories on both of
ferroptim's paths (Rust, torch ops). The registry-driven tests (parity over every flag
combination, interop, bad input, ...) cover the rest through ``optim_db``'s entry.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import lion_pytorch
import numpy as np
import pytest
import torch
from _kernels import kernel_calls
from _lion_reference import LION_EXTRA_GROUP_KEYS
from conftest import ferroptim, randn64
from optim_db import LION_BAD

#: Ragged sizes: SIMD tails, one parallel-chunked tensor, a scalar-like one.
SHAPES = ((1,), (15,), (17, 3), (257,), (130_001,), (8, 33))


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
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
            g = randn64(p.shape, gen).to(dtype)
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
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
        assert list(fo.state[a]) == list(to.state[b])
        for key in to.state[b]:
            torch.testing.assert_close(fo.state[a][key], to.state[b][key], rtol=0, atol=0)


CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"lr": 1e-2, "weight_decay": 0.1}, id="wd"),
    pytest.param(
        {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5, "decoupled_weight_decay": True},
        id="decoupled",
    ),
]


def test_signature_is_the_references_plus_keywords():
    ours = inspect.signature(ferroptim.Lion.__init__).parameters
    theirs = inspect.signature(lion_pytorch.Lion.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name
    extra = [p for name, p in ours.items() if name not in theirs]
    assert {p.name for p in extra} >= {"maximize", "max_grad_norm", "skip_nonfinite"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_group_keys_are_the_references_plus_torch_conventions():
    f = ferroptim.Lion(_params())
    t = lion_pytorch.Lion(_params())
    ours, theirs = f.param_groups[0], t.param_groups[0]
    assert set(ours) == set(theirs) | set(LION_EXTRA_GROUP_KEYS)
    assert {k: ours[k] for k in theirs if k != "params"} == {
        k: v for k, v in theirs.items() if k != "params"
    }
    assert ours["init_lr"] == t._init_lr and ours["decoupled_weight_decay"] == t.decoupled_wd
    assert not ours["maximize"] and ours["foreach"] is None and not ours["differentiable"]
    assert isinstance(f, torch.optim.Optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_bitwise_equal_to_the_reference(kwargs, dtype):
    """The same torch ops in the same order, rounded alike: the same bits (300 steps,
    two groups: the decoupled decay divides by the constructor's lr in both)."""

    def groups(ps: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": ps[:4]}, {"params": ps[4:], "lr": 7e-4, "betas": (0.5, 0.9)}]

    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Lion(groups(ps), **kwargs), 300, dtype)
    assert calls["lion_step"] > 0
    theirs = _run(lambda ps: lion_pytorch.Lion(groups(ps), **kwargs), 300, dtype)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_torch_path_bitwise_equal_to_the_reference(kwargs, foreach):
    """ferroptim's torch-op code (other devices, the backend forced to torch)."""
    ferroptim.set_backend("torch")
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Lion(ps, foreach=foreach, **kwargs), 50)
    assert not calls
    theirs = _run(lambda ps: lion_pytorch.Lion(ps, **kwargs), 50)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_on_the_torch_path_step_like_the_reference(dtype):
    """The torch-op code (other devices, ``set_backend("torch")``): the reference's
    arithmetic in the param's dtype, bit for bit. (On the CPU they step in Rust with the
    same rounding: tests/test_low_params_torch_semantics.py.)"""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    ferroptim.set_backend("torch")
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Lion(ps, **kwargs), 30, dtype)
    assert not calls
    theirs = _run(lambda ps: lion_pytorch.Lion(ps, **kwargs), 30, dtype)
    _assert_bitwise(ours, theirs)


def test_maximize_is_descent_on_the_negated_gradient():
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    ours = _run(lambda ps: ferroptim.Lion(ps, maximize=True, **kwargs), 40)
    params, opt = _params(), None
    gen = torch.Generator().manual_seed(1)
    opt = lion_pytorch.Lion(params, **kwargs)
    for k in range(40):
        for i, p in enumerate(params):
            g = randn64(p.shape, gen).float()
            p.grad = None if (i + k) % 5 == 0 else -g
        opt.step()
    _assert_bitwise(ours, (params, opt))


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("direction", ["reference-to-ferroptim", "ferroptim-to-reference"])
def test_checkpoints_interchange_with_the_reference(kwargs, direction):
    """A state_dict written by one loads into the other and training continues to the
    same bits as an uninterrupted run of the reference."""
    first, second = (
        (lion_pytorch.Lion, ferroptim.Lion)
        if direction == "reference-to-ferroptim"
        else (ferroptim.Lion, lion_pytorch.Lion)
    )
    params, opt = _run(lambda ps: first(ps, **kwargs), 20)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"exp_avg"}
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = second(resumed_params, **kwargs)
    resumed.load_state_dict(saved)
    resumed_run = _run(lambda ps: resumed, 20, params=resumed_params, opt=resumed, seed=2)

    straight_params, straight = _run(lambda ps: lion_pytorch.Lion(ps, **kwargs), 20)
    straight_run = _run(lambda ps: straight, 20, params=straight_params, opt=straight, seed=2)
    _assert_bitwise(resumed_run, straight_run)
    if second is ferroptim.Lion:
        group = resumed.param_groups[0]
        assert group["init_lr"] == resumed.defaults["lr"]
        assert group["decoupled_weight_decay"] == kwargs.get("decoupled_weight_decay", False)


@pytest.mark.parametrize(("kwargs", "words"), [p.values for p in LION_BAD])
def test_constructor_errors_are_the_references(kwargs, words):
    """The reference asserts (an AssertionError without a message); ferroptim raises an
    AssertionError too, saying what is wrong, before anything is built."""
    with pytest.raises(AssertionError):
        lion_pytorch.Lion(_params(), **kwargs)
    with pytest.raises(AssertionError, match=words):
        ferroptim.Lion(_params(), **kwargs)


def test_constructor_errors():
    p = _params()
    with pytest.raises(AssertionError, match="learning rate"):
        ferroptim.Lion(p, lr=0.0)
    with pytest.raises(AssertionError):
        lion_pytorch.Lion(p, lr=0.0)
    with pytest.raises(AssertionError, match="betas"):
        ferroptim.Lion(p, betas=(0.9, 1.01))
    with pytest.raises(ValueError, match="use_triton"):
        ferroptim.Lion(p, use_triton=True)
    ferroptim.Lion(p, use_triton=False)


def test_sign_of_zero_and_nan_like_the_reference():
    """torch's ``sgn_`` gives +0 for 0 and NaN: such elements only decay."""

    def run(cls: type) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5, 2.0] * 9))
        p.grad = torch.tensor([0.0, -0.0, float("nan"), 1.0] * 9)
        opt = cls([p], lr=0.1, weight_decay=0.5)
        opt.step()
        return [p], opt

    ours, theirs = run(ferroptim.Lion), run(lion_pytorch.Lion)
    torch.testing.assert_close(ours[0][0].detach(), theirs[0][0].detach(), equal_nan=True)
    assert ours[0][0][0].item() == pytest.approx(1.0 - 0.1 * 0.5)


def test_functional_equals_the_class():
    F = ferroptim.functional
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    ms = [np.zeros_like(w) for w in ws]
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in ws]
    kwargs = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5}
    opt = lion_pytorch.Lion(params, decoupled_weight_decay=True, **kwargs)
    for _ in range(20):
        gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        F.lion_(ws, gs, ms, decoupled_weight_decay=True, **kwargs)
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    for w, m, p in zip(ws, ms, params, strict=True):
        assert np.array_equal(w, p.detach().numpy())
        assert np.array_equal(m, opt.state[p]["exp_avg"].numpy())
    with pytest.raises(ValueError, match="learning rate"):
        F.lion_(ws, ws, ms, lr=0.0)


def test_grad_that_is_its_param_steps_like_the_reference():
    """``p.grad = p.detach()``: the reference reads the decayed param, then (for the
    momentum) the updated one; ferroptim hands such a param to its torch-op code, which
    does the same."""

    def run(cls: type) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
        params = _params()
        opt = cls(params, lr=1e-2, weight_decay=0.1)
        for _ in range(5):
            for i, p in enumerate(params):
                p.grad = p.detach() if i % 2 else torch.ones_like(p)
            opt.step()
        return params, opt

    _assert_bitwise(run(ferroptim.Lion), run(lion_pytorch.Lion))


@pytest.mark.parametrize("decoupled", [False, True])
def test_tensor_lr_steps_like_the_reference(decoupled):
    """A float32 tensor ``lr`` (torch's recipe for compiled steps) makes the reference
    compute ``1 - lr * wd`` in float32: the kernel does the same; a tensor initial lr
    dividing the decoupled decay takes ferroptim's torch-op code."""
    # (lr and wd chosen so that float32 and float64 arithmetic round `1 - lr * wd` apart)
    kwargs = {"weight_decay": 0.6606084576410584, "decoupled_weight_decay": decoupled}
    lr = 0.012895902480748482
    assert float(1.0 - torch.tensor(lr) * kwargs["weight_decay"]) != float(
        torch.tensor(1.0 - float(torch.tensor(lr)) * kwargs["weight_decay"])
    )
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Lion(ps, lr=torch.tensor(lr), **kwargs), 30)
    assert (calls["lion_step"] > 0) is not decoupled
    theirs = _run(lambda ps: lion_pytorch.Lion(ps, lr=torch.tensor(lr), **kwargs), 30)
    _assert_bitwise(ours, theirs)


def test_differentiable_step_is_recorded():
    """``differentiable=True`` runs the torch-op code under autograd: the reference's
    values, and a gradient through the steps (the sign's derivative is 0, so each step
    scales the param's gradient by ``1 - lr * wd``). The registry's differentiable test
    does not apply: the reference's own step (``no_grad``, ``p.data``) records nothing."""
    gen = torch.Generator().manual_seed(0)
    leaf = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_()
    p = leaf.clone()  # a non-leaf param: in-place steps are recorded
    q = torch.nn.Parameter(leaf.detach().clone())
    kwargs = {"lr": 0.05, "weight_decay": 0.2}
    opt = ferroptim.Lion([p], differentiable=True, **kwargs)
    ref = lion_pytorch.Lion([q], **kwargs)
    ggen = torch.Generator().manual_seed(1)
    for _ in range(5):
        p.grad = torch.randn(4, 6, generator=ggen, dtype=torch.float64)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    (p * p).sum().backward()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    decay = 1.0 - kwargs["lr"] * kwargs["weight_decay"]
    torch.testing.assert_close(leaf.grad, 2.0 * p.detach() * decay**5)


def test_misfit_state_raises_the_references_error_before_any_write():
    """A complex param's ``exp_avg`` replaced by its real view: the reference fails in
    that param's ops after stepping the params before it; ferroptim raises the same error
    (type and message) before writing anything."""
    errors = []
    for cls in (lion_pytorch.Lion, ferroptim.Lion):
        a = torch.nn.Parameter(torch.randn(5))
        c = torch.nn.Parameter(torch.randn(64, dtype=torch.complex128))
        opt = cls([a, c], lr=torch.tensor(0.01), weight_decay=0.1)
        a.grad, c.grad = torch.randn(5), torch.randn(64, dtype=torch.complex128)
        opt.step()
        opt.state[c]["exp_avg"] = torch.view_as_real(opt.state[c]["exp_avg"])
        before = a.detach().clone()
        with pytest.raises(RuntimeError) as error:
            opt.step()
        errors.append(str(error.value))
        if cls is ferroptim.Lion:
            assert torch.equal(a.detach(), before)
    assert errors[0] == errors[1]

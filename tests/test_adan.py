"""ferroptim.Adan against the real ``pytorch_optimizer.Adan`` (not the registry's oracle
subclass, which adds per-group ``maximize`` and leaves gradients untouched): signature,
param-group keys, the per-group step counter, its own ``max_grad_norm`` clipping,
checkpoints written and read by the reference itself, and bitwise-equal trajectories on
both of ferroptim's paths wherever torch's ``sqrt`` is correctly rounded. The
registry-driven tests cover the rest through ``optim_db``'s entry.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import pytorch_optimizer
import torch
from _kernels import kernel_calls
from conftest import ferroptim, randn64
from pytorch_optimizer.base.exception import NoSparseGradientError
from test_ademamix import _assert_bitwise, _params, _run, correctly_rounded_sqrt

CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"lr": 1e-2, "weight_decay": 0.1}, id="divided-decay"),
    pytest.param(
        {"lr": 3e-3, "betas": (0.9, 0.8, 0.995), "weight_decay": 0.5, "weight_decouple": True},
        id="decoupled",
    ),
    pytest.param({"maximize": True, "eps": 1e-3}, id="maximize"),
]


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [{"params": params[:4]}, {"params": params[4:], "lr": 7e-4, "betas": (0.5, 0.9, 0.99)}]


def test_signature_is_the_references_plus_keywords():
    ours = inspect.signature(ferroptim.Adan.__init__).parameters
    theirs = inspect.signature(pytorch_optimizer.Adan.__init__).parameters
    named = [n for n, p in theirs.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(ours)[: len(named)] == named
    for name in named:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    assert list(ours)[-1] == "kwargs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_bitwise_equal_to_the_reference(kwargs, dtype):
    """The reference's ops in its order, rounded alike: the same bits over 300 steps, two
    groups, params missing gradients on some steps (their first step comes late)."""
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Adan(_groups(ps), **kwargs), 300, dtype)
    assert calls["adan_step"] > 0
    with correctly_rounded_sqrt():
        theirs = _run(
            lambda ps: pytorch_optimizer.Adan(_groups(ps), foreach=False, **kwargs), 300, dtype
        )
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_close_to_the_references_default_flavour(kwargs):
    ours = _run(lambda ps: ferroptim.Adan(_groups(ps), **kwargs), 100)
    theirs = _run(lambda ps: pytorch_optimizer.Adan(_groups(ps), **kwargs), 100)
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_torch_path_bitwise_equal_to_the_reference(kwargs):
    ferroptim.set_backend("torch")
    with correctly_rounded_sqrt():
        with kernel_calls() as calls:
            ours = _run(lambda ps: ferroptim.Adan(_groups(ps), **kwargs), 50)
        assert not calls
        theirs = _run(lambda ps: pytorch_optimizer.Adan(_groups(ps), foreach=False, **kwargs), 50)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("max_grad_norm", [0.5, 1e6])
def test_the_references_global_clipping(max_grad_norm):
    """``max_grad_norm`` is the reference's (its norm in float32 tensor arithmetic over
    every group, ``+ eps``, the first step's ``previous_grad`` scaled too): the same bits
    through ferroptim's torch ops."""
    kwargs = {"max_grad_norm": max_grad_norm, "weight_decay": 0.1, "lr": 1e-2}
    with correctly_rounded_sqrt():
        with kernel_calls() as calls:
            ours = _run(lambda ps: ferroptim.Adan(_groups(ps), **kwargs), 40)
        assert not calls
        theirs = _run(lambda ps: pytorch_optimizer.Adan(_groups(ps), foreach=False, **kwargs), 40)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("direction", ["reference-to-ferroptim", "ferroptim-to-reference"])
def test_checkpoints_interchange_with_the_reference(kwargs, direction):
    first, second = (
        (pytorch_optimizer.Adan, ferroptim.Adan)
        if direction == "reference-to-ferroptim"
        else (ferroptim.Adan, pytorch_optimizer.Adan)
    )
    kwargs = {**kwargs, "foreach": False}
    with correctly_rounded_sqrt():
        params, opt = _run(lambda ps: first(_groups(ps), **kwargs), 20)
        saved = copy.deepcopy(opt.state_dict())
        assert set(saved["state"][1]) == {"exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad"}
        assert [g["step"] for g in saved["param_groups"]] == [20, 20]
        resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        resumed = second(_groups(resumed_params), **kwargs)
        resumed.load_state_dict(saved)
        resumed_run = _run(lambda ps: resumed, 20, params=resumed_params, opt=resumed, seed=2)
        straight_params, straight = _run(
            lambda ps: pytorch_optimizer.Adan(_groups(ps), **kwargs), 20
        )
        straight_run = _run(lambda ps: straight, 20, params=straight_params, opt=straight, seed=2)
    _assert_bitwise(resumed_run, straight_run)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"lr": -1.0}, r"learning rate must be positive"),
        ({"betas": (1.0, 0.92, 0.99)}, r"beta1 must be in the range \[0\.0, 1\.0\)"),
        ({"betas": (0.98, 0.92, 1.5)}, r"beta3 must be in the range \[0\.0, 1\.0\]"),
        ({"weight_decay": -0.1}, "weight_decay must be non-negative"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be non-negative"),
        ({"eps": -1e-8}, "eps must be non-negative"),
    ],
)
def test_constructor_errors_have_the_references_messages(kwargs, words):
    with pytest.raises(Exception, match=words) as theirs:
        pytorch_optimizer.Adan(_params(), **kwargs)
    with pytest.raises(Exception, match=words) as ours:
        ferroptim.Adan(_params(), **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_options_not_implemented_are_refused():
    with pytest.raises(ValueError, match="adanorm"):
        ferroptim.Adan(_params(), adanorm=True)


def test_sparse_gradient_raises_the_references_error_before_any_write():
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    opt = ferroptim.Adan(params)
    params[0].grad = torch.randn(8, 4)
    params[1].grad = torch.randn(8, 4).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(NoSparseGradientError, match="Adan does not"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert opt.param_groups[0].get("step", 0) == 0


def test_state_made_by_the_step_for_a_staged_param():
    """``previous_grad`` is made by the step itself: for a param that steps in a staged
    copy (a lazily negated, transposed view, its grad the param itself) it is laid out
    like that copy, and the step is the reference's (found by the stateful safety test)."""
    from _pytorch_optimizer_reference import AdanReference

    def run(cls: type) -> tuple[list[torch.nn.Parameter], Any]:
        gen = torch.Generator().manual_seed(0)
        shapes = [(37,), (33, 7), (16, 16)]
        ps = [
            torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes
        ]
        opt = cls(ps, lr=0.01, weight_decay=0.05, foreach=False)
        p = ps[2]
        p.data = torch._neg_view(p.data.clone()).t()
        p.grad = p.detach()
        for q in ps[:2]:
            q.grad = randn64(q.shape, gen)
        opt.step()
        return ps, opt

    (fp, fo), (tp, to) = run(ferroptim.Adan), run(AdanReference)
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach().resolve_neg(), b.detach().resolve_neg())
        for key, value in to.state[b].items():
            torch.testing.assert_close(fo.state[a][key], value)

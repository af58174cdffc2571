"""ferroptim.ScheduleFreeAdamW / ScheduleFreeSGD against the real ``schedulefree`` 1.4.1
classes (``AdamWScheduleFree``, ``SGDScheduleFree``): signature, param-group keys and
per-group state (``k``, ``lr_max``, ``weight_sum``, ``scheduled_lr``, ``train_mode``),
``train()``/``eval()``, checkpoints written and read by the reference itself, and
bitwise-equal trajectories on both of ferroptim's paths (Rust, torch ops) over every flag
combination, with ``train()``/``eval()`` switches mid-run (AdamW: wherever torch's ``sqrt``
is correctly rounded, see :func:`correctly_rounded_sqrt`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import schedulefree
import torch
from _kernels import kernel_calls
from conftest import ferroptim, randn64
from test_ademamix import correctly_rounded_sqrt

#: Ragged sizes: SIMD tails (wider than any SIMD width), one parallel-chunked tensor, a
#: scalar-like one, a matrix.
SHAPES = ((1,), (15,), (17, 3), (257,), (70_001,), (8, 33))

#: ferroptim class -> the reference class.
PAIRS = {
    "adamw": (lambda: ferroptim.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree),
    "sgd": (lambda: ferroptim.ScheduleFreeSGD, schedulefree.SGDScheduleFree),
}

_GRID = {
    "warmup_steps": (0, 25),
    "weight_decay": (0, 0.05),
    "r": (0.0, 0.5),
    "weight_lr_power": (2.0, 0.0),
}


def _configs(kind: str) -> list[Any]:
    """Every combination of the flags, each with non-default betas/momentum half of the
    time."""
    out = []
    for i, values in enumerate(itertools.product(*_GRID.values())):
        kwargs: dict[str, Any] = dict(zip(_GRID, values, strict=True))
        if i % 2:
            kwargs.update(
                {"betas": (0.8, 0.99), "lr": 0.01} if kind == "adamw" else {"momentum": 0.5}
            )
        elif kind == "sgd":
            kwargs["lr"] = 0.1
        out.append(pytest.param(kwargs, id="-".join(f"{k}={v}" for k, v in kwargs.items())))
    return out


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
    ]


def _groups(kind: str, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    second = (
        {"lr": 7e-4, "betas": (0.5, 0.9), "warmup_steps": 3}
        if kind == "adamw"
        else {"lr": 0.3, "momentum": 0.7, "r": 1.0}
    )
    return [{"params": params[:4]}, {"params": params[4:], **second}]


def _run(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int,
    dtype: torch.dtype = torch.float32,
    params: list[torch.nn.Parameter] | None = None,
    opt: torch.optim.Optimizer | None = None,
    seed: int = 1,
) -> tuple[list[torch.nn.Parameter], Any]:
    """``steps`` steps with gradients of many magnitudes, some missing, and an
    ``eval()``/``train()`` round trip every 13 steps; ends in eval mode (``x``)."""
    params = _params(dtype) if params is None else params
    opt = make(params) if opt is None else opt
    opt.train()
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for i, p in enumerate(params):
            scale = 10.0 ** ((k % 7) - 4)
            g = (randn64(p.shape, gen) * scale).to(dtype)
            p.grad = None if (i + k) % 5 == 0 else g
        opt.step()
        if k % 13 == 12:
            opt.eval()
            opt.train()
    opt.eval()
    return params, opt


_GROUP_STATE = ("k", "lr_max", "weight_sum", "scheduled_lr", "train_mode")


def _assert_bitwise(ours: tuple[list[Any], Any], theirs: tuple[list[Any], Any]) -> None:
    (fp, fo), (tp, to) = ours, theirs
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
        assert list(fo.state[a]) == list(to.state[b])
        for key in to.state[b]:
            torch.testing.assert_close(
                fo.state[a][key], to.state[b][key], rtol=0, atol=0, equal_nan=True
            )
    for ours_group, theirs_group in zip(fo.param_groups, to.param_groups, strict=True):
        assert {k: ours_group[k] for k in _GROUP_STATE} == {
            k: theirs_group[k] for k in _GROUP_STATE
        }


def _reference_run(kind: str, kwargs: dict[str, Any], steps: int, **run: Any) -> Any:
    ref = PAIRS[kind][1]
    return _run(lambda ps: ref(_groups(kind, ps), **{"foreach": False, **kwargs}), steps, **run)


def _ours_run(kind: str, kwargs: dict[str, Any], steps: int, **run: Any) -> Any:
    cls = PAIRS[kind][0]()
    return _run(lambda ps: cls(_groups(kind, ps), **kwargs), steps, **run)


# -- the constructor ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", PAIRS)
def test_signature_is_the_references_plus_keywords(kind):
    ours = inspect.signature(PAIRS[kind][0]().__init__).parameters
    theirs = inspect.signature(PAIRS[kind][1].__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name in theirs:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    extra = [p for name, p in ours.items() if name not in theirs]
    assert {p.name for p in extra} == {
        "maximize",
        "max_grad_norm",
        "skip_nonfinite",
        "nonfinite_group",
        "ema_decay",
        "state_dtype",
        "seed",
        "stochastic_rounding",
        "master_weights",
        "min_8bit_size",
    }
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


@pytest.mark.parametrize("kind", PAIRS)
def test_group_keys_are_the_references_plus_maximize(kind):
    f = PAIRS[kind][0]()(_params(), warmup_steps=5)
    t = PAIRS[kind][1](_params(), warmup_steps=5)
    ours, theirs = f.param_groups[0], t.param_groups[0]
    assert set(ours) == set(theirs) | {"maximize"}
    assert {k: ours[k] for k in theirs if k != "params"} == {
        k: v for k, v in theirs.items() if k != "params"
    }
    # (the reference's foreach default on CPU: True, the flavour the benchmarks compare)
    assert ours["foreach"] is True
    assert isinstance(f, torch.optim.Optimizer)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"lr": -1.0}, r"Invalid learning rate: -1\.0"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay value: -0\.1"),
        ({"momentum": 0.0}, r"Momentum must be between 0 and 1 exclusive: 0\.0"),
        ({"momentum": 1.0}, r"Momentum must be between 0 and 1 exclusive: 1\.0"),
    ],
)
def test_sgd_constructor_errors_are_the_references(kwargs, words):
    with pytest.raises(ValueError, match=words):
        schedulefree.SGDScheduleFree(_params(), **kwargs)
    with pytest.raises(ValueError, match=words):
        ferroptim.ScheduleFreeSGD(_params(), **kwargs)


# -- trajectories -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", _configs("adamw"))
def test_adamw_bitwise_equal_to_the_reference(kwargs, dtype):
    """The reference's torch ops in its order, rounded alike: the same bits over 200
    steps, two groups, missing gradients and train/eval switches, with torch's ``sqrt``
    correctly rounded (the one op where torch's CPU kernel is not)."""
    with kernel_calls() as calls:
        ours = _ours_run("adamw", kwargs, 200, dtype=dtype)
    assert calls["schedulefree_adamw_step"] > 0
    with correctly_rounded_sqrt():
        theirs = _reference_run("adamw", kwargs, 200, dtype=dtype)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", _configs("sgd"))
def test_sgd_bitwise_equal_to_the_references_default_flavour(kwargs, dtype):
    """No ``sqrt``: the same bits as the reference's default (foreach) flavour as it is."""
    with kernel_calls() as calls:
        ours = _ours_run("sgd", kwargs, 200, dtype=dtype)
    assert calls["schedulefree_sgd_step"] > 0
    theirs = _reference_run("sgd", {"foreach": True, **kwargs}, 200, dtype=dtype)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kwargs", _configs("adamw")[::5])
def test_adamw_close_to_the_references_default_flavour(kwargs):
    """Against the reference's default CPU flavour (foreach) as it is: equal but for the
    last bits where torch's ``sqrt`` rounds the other way."""
    ours = _ours_run("adamw", kwargs, 100)
    theirs = _reference_run("adamw", {"foreach": True, **kwargs}, 100)
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", PAIRS)
def test_torch_path_bitwise_equal_to_the_reference(kind, foreach):
    """ferroptim's torch-op code (other devices, the backend forced to torch), in both of
    the reference's flavours, bitwise (the same torch ops: no sqrt to correct)."""
    kwargs = {"weight_decay": 0.05, "warmup_steps": 10, "r": 0.5, "foreach": foreach}
    ferroptim.set_backend("torch")
    with kernel_calls() as calls:
        ours = _ours_run(kind, kwargs, 50)
    assert not calls
    theirs = _reference_run(kind, kwargs, 50)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", PAIRS)
def test_half_params_on_the_torch_path_step_like_the_reference(kind, dtype):
    """The torch-op code (other devices, ``set_backend("torch")``): the reference's ops on
    half tensors, bitwise. (On the CPU they step in Rust with the same rounding in the
    bulk of each tensor: tests/test_low_params_torch_semantics.py.)"""
    ferroptim.set_backend("torch")
    for foreach in (False, True):
        kwargs = {"weight_decay": 0.05, "warmup_steps": 5, "foreach": foreach}
        ours = _ours_run(kind, kwargs, 30, dtype=dtype)
        theirs = _reference_run(kind, kwargs, 30, dtype=dtype)
        _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kind", PAIRS)
def test_thread_counts_and_simd_levels_give_identical_bits(kind):
    kwargs = {"weight_decay": 0.05, "warmup_steps": 10, "r": 0.5}
    runs = []
    for threads in (1, 4):
        ferroptim.set_num_threads(threads)
        runs.append(_ours_run(kind, kwargs, 20))
    ferroptim.set_num_threads(2)
    for level in ferroptim.supported_simd_levels():
        ferroptim.set_simd_level(level)
        runs.append(_ours_run(kind, kwargs, 20))
    for other in runs[1:]:
        _assert_bitwise(other, runs[0])


@pytest.mark.parametrize("kind", PAIRS)
def test_maximize_is_descent_on_the_negated_gradient(kind):
    """The extra ``maximize`` keyword: the same bits as the reference stepping ``-grad``."""
    cls, ref = PAIRS[kind][0](), PAIRS[kind][1]
    kwargs = {"weight_decay": 0.05}
    fp, tp = _params(), _params()
    ours, theirs = cls(fp, maximize=True, **kwargs), ref(tp, foreach=False, **kwargs)
    ours.train()
    theirs.train()
    gen = torch.Generator().manual_seed(3)
    with correctly_rounded_sqrt():
        for _ in range(20):
            for a, b in zip(fp, tp, strict=True):
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = -a.grad
            ours.step()
            theirs.step()
    for a, b in zip(fp, tp, strict=True):
        assert torch.equal(a.detach(), b.detach())


# -- train() / eval() ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", PAIRS)
def test_step_in_eval_mode_raises_the_references_exception_before_the_closure(kind):
    for cls in (PAIRS[kind][0](), PAIRS[kind][1]):
        params = _params()
        opt = cls(params)
        calls: list[int] = []

        def closure(calls: list[int] = calls) -> None:
            calls.append(1)

        with pytest.raises(Exception, match="Optimizer was not in train mode") as error:
            opt.step(closure)
        assert type(error.value) is Exception
        assert not calls
        opt.train()
        opt.eval()
        with pytest.raises(Exception, match="not in train mode"):
            opt.step()


@pytest.mark.parametrize("kind", PAIRS)
def test_eval_and_train_move_the_params_like_the_reference(kind):
    """``eval()`` sets x, ``train()`` sets y, by the reference's lerps; params without
    state (no step yet) stay; repeated calls change nothing."""
    ours, theirs = _ours_run(kind, {}, 7), _reference_run(kind, {"foreach": True}, 7)
    for opt in (ours[1], theirs[1]):
        opt.eval()  # (already in eval mode: a no-op)
        opt.train()
        opt.train()
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    fresh = _params()
    opt = PAIRS[kind][0]()(fresh)
    opt.train()
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(fresh, _params(), strict=True))


@pytest.mark.parametrize("kind", PAIRS)
def test_train_and_eval_keep_the_cached_plan(kind):
    """The swaps write the params in place: the cached plan stays valid (no slow
    preparation after the first step) and sees the new values."""
    params = _params()
    opt = PAIRS[kind][0]()(params)
    slow = []
    original = opt._prepare_slow

    def spy(*args: Any, **kwargs: Any) -> Any:
        slow.append(1)
        return original(*args, **kwargs)

    opt._prepare_slow = spy  # type: ignore[method-assign]
    opt.train()
    ref_params = _params()
    ref = PAIRS[kind][1](ref_params, foreach=False)
    ref.train()
    gen = torch.Generator().manual_seed(5)
    with correctly_rounded_sqrt():
        for _ in range(10):
            for a, b in zip(params, ref_params, strict=True):
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
            opt.step()
            ref.step()
            opt.eval()
            ref.eval()
            opt.train()
            ref.train()
    assert len(slow) == 1  # the first step only: the swaps keep the plan valid
    for a, b in zip(params, ref_params, strict=True):
        assert torch.equal(a.detach(), b.detach())


# -- checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("direction", ["reference-to-ferroptim", "ferroptim-to-reference"])
@pytest.mark.parametrize("kind", PAIRS)
def test_checkpoints_interchange_with_the_reference(kind, direction, mode):
    """A state_dict written by one loads into the other (``k``, ``lr_max``, ``weight_sum``,
    ``train_mode`` with it) and training continues to the same bits as an uninterrupted
    run of the reference."""
    ours, ref = PAIRS[kind][0](), PAIRS[kind][1]
    first, second = (ref, ours) if direction == "reference-to-ferroptim" else (ours, ref)
    kwargs = {"foreach": False, "warmup_steps": 30, "weight_decay": 0.05}
    with correctly_rounded_sqrt():
        params, opt = _run(lambda ps: first(_groups(kind, ps), **kwargs), 20)
        if mode == "train":
            opt.train()
        saved = copy.deepcopy(opt.state_dict())
        assert set(saved["state"][0]) == ({"z", "exp_avg_sq"} if kind == "adamw" else {"z"})
        assert [g["k"] for g in saved["param_groups"]] == [20, 20]
        resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        resumed = second(_groups(kind, resumed_params), **kwargs)
        resumed.load_state_dict(saved)
        assert resumed.param_groups[0]["train_mode"] is (mode == "train")
        resumed_run = _run(lambda ps: resumed, 20, params=resumed_params, opt=resumed, seed=2)

        straight_params, straight = _run(lambda ps: ref(_groups(kind, ps), **kwargs), 20)
        if mode == "train":
            straight.train()
        straight_run = _run(lambda ps: straight, 20, params=straight_params, opt=straight, seed=2)
    _assert_bitwise(resumed_run, straight_run)
    assert all(g["maximize"] is False for g in resumed_run[1].param_groups) or (
        direction == "ferroptim-to-reference"
    )


# -- group state, skips and errors --------------------------------------------------------


@pytest.mark.parametrize("kind", PAIRS)
def test_every_group_advances_and_a_skipped_step_advances_none(kind):
    """The reference moves ``k``, ``lr_max``, ``weight_sum`` on in every group, one
    without gradients included; a step skipped for non-finite gradients is not taken."""
    params = _params()
    opt = PAIRS[kind][0]()(_groups(kind, params), skip_nonfinite=True, warmup_steps=4)
    ref = PAIRS[kind][1](_groups(kind, _params()), warmup_steps=4)
    opt.train()
    ref.train()
    for p in params[:4]:
        p.grad = torch.ones_like(p)
    opt.step()  # the second group has no gradient
    ref.step()
    groups = [{k: g[k] for k in _GROUP_STATE} for g in opt.param_groups]
    assert groups == [{k: g[k] for k in _GROUP_STATE} for g in ref.param_groups]
    assert [g["k"] for g in groups] == [1, 1]
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    assert [{k: g[k] for k in _GROUP_STATE} for g in opt.param_groups] == groups
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("kind", PAIRS)
def test_bad_gradient_raises_before_any_write(kind):
    params = _params()
    opt = PAIRS[kind][0]()(_groups(kind, params))
    opt.train()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    states = copy.deepcopy(opt.state_dict())
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad.data = torch.randn(3, 3)  # the wrong shape, in the last group
    with pytest.raises(RuntimeError):
        opt.step()
    params[-1].grad = torch.randn_like(params[-1])
    opt.param_groups[-1]["eps" if kind == "adamw" else "momentum"] = "0.1"  # not a number
    with pytest.raises(TypeError):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    after = opt.state_dict()
    assert [g["k"] for g in after["param_groups"]] == [1, 1]
    for key, state in states["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value)


@pytest.mark.parametrize("kind", PAIRS)
def test_the_reference_overwrites_gradients_and_we_do_not(kind):
    for cls, changed in ((PAIRS[kind][1], True), (PAIRS[kind][0](), False)):
        p = torch.nn.Parameter(torch.randn(33))
        p.grad = torch.randn(33)
        grad = p.grad.clone()
        opt = cls([p], weight_decay=0.1)
        opt.train()
        opt.step()
        assert (not torch.equal(p.grad, grad)) is changed, cls


@pytest.mark.parametrize("kind", PAIRS)
def test_max_grad_norm_clips_like_clipping_first(kind):
    """ferroptim's ``max_grad_norm``: the same bits as the reference stepping gradients
    clipped by ``torch.nn.utils.clip_grad_norm_`` (foreach norm)."""
    fp, tp = _params(), _params()
    ours = PAIRS[kind][0]()(fp, max_grad_norm=0.5)
    theirs = PAIRS[kind][1](tp, foreach=False)
    ours.train()
    theirs.train()
    gen = torch.Generator().manual_seed(4)
    with correctly_rounded_sqrt():
        for _ in range(5):
            for a, b in zip(fp, tp, strict=True):
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
            ours.step()
            torch.nn.utils.clip_grad_norm_(tp, 0.5)
            theirs.step()
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", PAIRS)
def test_tensor_lr_with_a_scheduler_steps_in_rust_to_the_references_bits(kind):
    """torch's recipe for a compiled step (``lr`` a tensor, moved by a scheduler): the
    reference then computes ``lr_max``, ``weight_sum`` and ``ckp1`` in float32 tensor
    arithmetic; ferroptim computes them with the same expressions and steps in Rust."""

    def run(cls: Any, **extra: Any) -> tuple[list[Any], Any]:
        def make(ps: list[torch.nn.Parameter]) -> Any:
            opt = cls(ps, lr=torch.tensor(0.01), warmup_steps=5, weight_decay=0.05, **extra)
            opt.sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=7)
            return opt

        params = _params()
        opt = make(params)
        opt.train()
        gen = torch.Generator().manual_seed(6)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            opt.sched.step()
        opt.eval()
        return params, opt

    with kernel_calls() as calls:
        ours = run(PAIRS[kind][0]())
    assert sum(calls.values()) == 30
    with correctly_rounded_sqrt():
        theirs = run(PAIRS[kind][1], foreach=False)
    _assert_bitwise(ours, theirs)
    assert isinstance(ours[1].param_groups[0]["lr_max"], torch.Tensor)

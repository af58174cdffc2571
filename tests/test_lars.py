"""ferroptim.LARS against the real ``pytorch_optimizer.LARS`` (pytorch-optimizer 4.1.0),
side by side over hundreds of steps.

The one place the two may round differently is the norms behind the trust ratio: ours
come from the engine's float64 reduction (correctly rounded to the tensor's dtype), the
reference's from ``torch._foreach_norm`` (float32 accumulation, not always correctly
rounded). So the bitwise comparisons run the reference with correctly rounded norms
(``exact_norms``: float64 norms rounded to the dtype, what the engine computes); against
the unpatched reference, trajectories agree to a tolerance that a last-bit difference
of a trust ratio explains.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytorch_optimizer
import torch
from _kernels import kernel_calls
from conftest import ferroptim, randn64

#: 1-D params (plain SGD in LARS), matrices, a conv kernel, ragged SIMD tails, one
#: parallel-chunked tensor, an all-zero param (trust ratio 1).
SHAPES = ((7,), (33, 65), (1,), (4, 3, 3, 3), (300, 257), (17,), (2, 3))

Make = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@contextlib.contextmanager
def exact_norms() -> Iterator[None]:
    """``torch._foreach_norm`` returning float64 norms rounded to each tensor's dtype."""
    real = torch._foreach_norm

    def exact(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [torch.linalg.vector_norm(t.double()).to(t.dtype) for t in tensors]

    torch._foreach_norm = exact  # type: ignore[assignment]
    try:
        yield
    finally:
        torch._foreach_norm = real


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
    ]
    with torch.no_grad():
        params[-1].zero_()
    return params


def _run(
    make: Make,
    steps: int,
    dtype: torch.dtype = torch.float32,
    *,
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
            # Some params miss their gradient on some steps (no update).
            p.grad = None if (i + k) % 5 == 0 else g
        opt.step()
    return params, opt


def _compare(
    ours: tuple[list[torch.nn.Parameter], torch.optim.Optimizer],
    theirs: tuple[list[torch.nn.Parameter], torch.optim.Optimizer],
    **tolerance: float,
) -> None:
    (fp, fo), (tp, to) = ours, theirs
    assert [g["step"] for g in fo.param_groups] == [g["step"] for g in to.param_groups]
    for i, (a, b) in enumerate(zip(fp, tp, strict=True)):
        sa, sb = fo.state.get(a, {}), to.state.get(b, {})
        assert sa.keys() == sb.keys(), f"param {i}: state keys"
        pairs = [(a, b)] + [(sa[k], sb[k]) for k in sa]
        for x, y in pairs:
            if tolerance:
                torch.testing.assert_close(x, y, **tolerance)
            else:
                assert torch.equal(x, y), f"param {i} {tuple(a.shape)}: {(x - y).abs().max()}"


def _reference(ps: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    # The reference writes its update into p.grad: give it its own gradients.
    return pytorch_optimizer.LARS(ps, **kwargs)


GRID = [
    dict(zip(("weight_decay", "momentum", "nesterov", "dampening", "maximize"), v, strict=True))
    for v in itertools.product((0.0, 0.01), (0.0, 0.9), (False, True), (0.0, 0.1), (False, True))
    if v[1] > 0.0 or (not v[2] and v[3] == 0.0)  # nesterov/dampening need momentum
]


def _id(kwargs: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("flags", GRID, ids=_id)
def test_float32_bitwise_with_correctly_rounded_norms(flags: dict[str, Any]) -> None:
    kwargs = {"lr": 0.05, "trust_coefficient": 0.02, **flags}
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.LARS(ps, **kwargs), 200)
    assert calls["lars_step"] == 200
    with exact_norms():
        theirs = _run(lambda ps: _reference(ps, **kwargs), 200)
    _compare(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("flags", [GRID[0], GRID[-1]], ids=_id)
def test_against_the_unpatched_reference(flags: dict[str, Any], dtype: torch.dtype) -> None:
    kwargs = {"lr": 0.05, "trust_coefficient": 0.02, **flags}
    ours = _run(lambda ps: ferroptim.LARS(ps, **kwargs), 300, dtype)
    theirs = _run(lambda ps: _reference(ps, **kwargs), 300, dtype)
    # A trust ratio one ulp apart (torch's norms are not correctly rounded) moves an
    # update by one part in 2**24 (2**53); over 300 steps that stays far below these.
    if dtype == torch.float32:
        _compare(ours, theirs, rtol=1e-5, atol=1e-6)
    else:
        _compare(ours, theirs, rtol=1e-12, atol=1e-13)


def test_engine_norms_are_correctly_rounded() -> None:
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(s, generator=gen) for s in SHAPES]
    plan = ferroptim._core.GroupPlan.from_grads(tensors)
    norms, _ = ferroptim._core.grad_norms([plan], 2.0)
    for t, n in zip(tensors, norms, strict=True):
        assert n == float(torch.linalg.vector_norm(t.double()).float())


def test_groups_float64_forced_torch_path_and_bf16() -> None:
    def make(cls: Callable[..., torch.optim.Optimizer]) -> Make:
        def build(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            return cls(
                [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.2, "nesterov": True}],
                lr=0.05,
                weight_decay=0.01,
                trust_coefficient=0.01,
            )

        return build

    with exact_norms():
        theirs = _run(make(_reference), 50)
    ferroptim.set_backend("torch")
    try:
        with kernel_calls() as calls, exact_norms():
            forced = _run(make(ferroptim.LARS), 50)
    finally:
        ferroptim.set_backend("auto")
    assert calls["lars_step"] == 0
    _compare(forced, theirs)
    ours = _run(make(ferroptim.LARS), 50)
    _compare(ours, theirs)
    # bfloat16 params: torch-op code, the reference's numbers
    with kernel_calls() as calls:
        ours16 = _run(make(ferroptim.LARS), 20, torch.bfloat16)
    assert calls["lars_step"] == 0
    _compare(ours16, _run(make(_reference), 20, torch.bfloat16))


def test_gradients_are_not_written() -> None:
    params = _params(torch.float32)
    opt = ferroptim.LARS(params, weight_decay=0.1, maximize=True)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


def test_signature_defaults_and_group_keys_are_the_references() -> None:
    ours = dict(inspect.signature(ferroptim.LARS.__init__).parameters)
    theirs = inspect.signature(pytorch_optimizer.LARS.__init__).parameters
    # (plus ferroptim's keyword-only `ema_decay`)
    assert ours.pop("ema_decay").kind is inspect.Parameter.KEYWORD_ONLY
    assert [(n, p.default) for n, p in ours.items()] == [(n, p.default) for n, p in theirs.items()]
    ps = [torch.nn.Parameter(torch.zeros(3, 4))]
    assert ferroptim.LARS(ps).defaults == pytorch_optimizer.LARS(ps).defaults
    assert str(ferroptim.LARS(ps)) == str(pytorch_optimizer.LARS(ps))


@pytest.mark.parametrize("direction", ["reference_to_ferro", "ferro_to_reference"])
def test_checkpoint_interchange_mid_training(direction: str) -> None:
    first, second = (
        (_reference, ferroptim.LARS)
        if direction == "reference_to_ferro"
        else (ferroptim.LARS, _reference)
    )
    kwargs: dict[str, Any] = {"lr": 0.05, "weight_decay": 0.01, "nesterov": True}
    with exact_norms():
        params, opt = _run(lambda ps: first(ps, **kwargs), 20)
        saved = copy.deepcopy(opt.state_dict())
        assert saved["param_groups"][0]["step"] == 20
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        reference = first(ref_params, **kwargs)
        reference.load_state_dict(copy.deepcopy(saved))
        resumed = second([torch.nn.Parameter(p.detach().clone()) for p in params], **kwargs)
        resumed.load_state_dict(saved)
        ours = _run(lambda ps: resumed, 20, params=list(resumed.param_groups[0]["params"]), seed=9)
        theirs = _run(lambda ps: reference, 20, params=ref_params, seed=9)
    _compare(ours, theirs)


BAD = [
    pytest.param({"lr": -1.0}, "learning rate must be positive", id="lr"),
    pytest.param({"weight_decay": -1.0}, "weight_decay must be non-negative", id="wd"),
    pytest.param({"momentum": 1.0}, r"momentum must be in the range \[0.0, 1.0\)", id="momentum"),
    pytest.param({"dampening": -0.1}, "dampening must be in the range", id="dampening"),
    pytest.param({"trust_coefficient": -1.0}, "trust_coefficient must be non-negative", id="tc"),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD)
def test_constructor_errors_as_the_reference(kwargs: dict[str, Any], words: str) -> None:
    ps = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(Exception, match=words):
        pytorch_optimizer.LARS(ps, **kwargs)
    with pytest.raises(ValueError, match=words):
        ferroptim.LARS(ps, **kwargs)


def test_sparse_gradient_raises_before_any_write() -> None:
    params = _params(torch.float32)
    opt = ferroptim.LARS([{"params": params[:3]}, {"params": params[3:]}])
    for p in params:
        p.grad = torch.ones_like(p)
    params[-2].grad = torch.ones_like(params[-2]).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="does not support sparse gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert not opt.state


def test_plain_tensors_keep_a_cached_plan_bitwise() -> None:
    # After the first step, the 1-D tensors' plan is re-checked, not rebuilt: their
    # kernel ("lars_plain") runs once per group and step, the rest still step exactly.
    kwargs = {"lr": 0.05, "weight_decay": 0.01, "nesterov": True, "dampening": 0.0}
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.LARS(ps, **kwargs), 30)
    assert calls["lars_plain_step"] >= 25
    with exact_norms():
        theirs = _run(lambda ps: _reference(ps, **kwargs), 30)
    _compare(ours, theirs)


def test_replaced_state_and_sparse_grads_are_seen_by_the_cached_path() -> None:
    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(4)]
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ferroptim.LARS(params, lr=0.1)
    reference = pytorch_optimizer.LARS(reference_params, lr=0.1)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        grads = [torch.randn(50, generator=gen) for _ in params]
        for p, q, g in zip(params, reference_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:  # a buffer replaced in place of the cached one
            for o, p in ((opt, params[1]), (reference, reference_params[1])):
                o.state[p]["momentum_buffer"] = torch.full((50,), 0.5)
        opt.step()
        reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference_params, strict=True))
    params[2].grad = params[2].grad.to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="does not support sparse gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))

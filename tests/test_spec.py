"""An optimizer torch lacks, expressed as an :class:`~ferroptim._spec.OptimizerSpec`.

The spec must carry an optimizer that has no ``torch.optim`` class to borrow from: a
``torch.optim.Optimizer`` subclass that builds its own ``defaults``, creates its state
with ``init_state`` (no ``_init_group``) and whose non-CPU path is torch-op code of
ours. This one is heavy-ball momentum (the update of SGD with momentum, its buffer
created as zeros rather than cloned from the first gradient), stepped by the SGD
kernel on CPU and by our torch ops elsewhere: both must agree with the same
arithmetic written out here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _kernels import kernel_calls
from conftest import ferroptim, flag_params
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, OptimizerSpec
from ferroptim.sgd import sgd_kernel
from torch import Tensor


def _heavy_ball_kernel(group: dict[str, Any]) -> Any:
    # SGD's kernel with dampening 0: buf = momentum * buf + grad; param -= lr * buf.
    return sgd_kernel({**group, "dampening": 0.0, "nesterov": False, "maximize": False})


def _init_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}


def _torch_ops(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    for param, grad, buf in zip(gathered.params, gathered.grads, gathered.states[0], strict=True):
        buf.mul_(group["momentum"]).add_(grad)
        param.add_(buf, alpha=-group["lr"])


HEAVY_BALL_SPEC = OptimizerSpec(
    state_keys=lambda group: ("momentum_buffer",),
    kernel=_heavy_ball_kernel,
    torch_step=_torch_ops,
    init_state=_init_state,
    step_key=None,
    has_fused=False,
    numbers=("lr", "momentum"),
)


class HeavyBall(RustStepMixin, torch.optim.Optimizer):
    _ferro_spec = HEAVY_BALL_SPEC

    def __init__(self, params: Any, lr: float = 1e-2, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": 0.0})
        self._ferro_init(None)


def _reference(params: list[Tensor], grads: list[list[Tensor]], lr: float, mom: float) -> list:
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, b, g in zip(params, bufs, step_grads, strict=True):
            b.mul_(mom).add_(g)
            p.add_(b, alpha=-lr)
    return params


def test_spec_needs_gather_or_init_state():
    with pytest.raises(TypeError, match="exactly one of gather and init_state"):
        OptimizerSpec(state_keys=lambda g: (), kernel=_heavy_ball_kernel, torch_step=_torch_ops)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_optimizer_without_torch_counterpart(backend):
    """Rust on CPU (``auto``) and our torch ops (``torch``) both step it to the same
    numbers as the update written out, and its state is what ``init_state`` made."""
    ferroptim.set_backend(backend)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((300,), (7, 5))]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(5)]
    expected = _reference(params, grads, 0.05, 0.8)
    opt = HeavyBall(params, lr=0.05, momentum=0.8)
    with kernel_calls() as calls:
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
    assert calls["sgd_step"] == (5 if backend == "auto" else 0)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in params)
    # A state_dict loaded into a fresh instance continues identically.
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = HeavyBall(twin_params, 0.05, 0.8)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # (else they share buffers)
    for p, q in zip(params, twin_params, strict=True):
        p.grad = q.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", flag_params())
def test_spec_state_keys_are_the_kernels(case):
    """The Python spec lists the state buffers the plan gathers; the Rust kernel, read
    from the same group by name, lists the ones it steps: for every flag combination of
    every registered optimizer they must be the same keys in the same order."""
    family = case.family
    opt = family.make_ferro([torch.nn.Parameter(torch.zeros(3))], **case.kwargs)
    group = opt.param_groups[0]
    # The spec's own kernel where it makes one (Schedule-Free's adds this step's group
    # scalars to the group's hyperparameters).
    made = getattr(opt._ferro_spec.kernel(group), "__self__", None)
    kernel = (
        # (Adafactor's own entry point: its moments are not element-wise state)
        ferroptim._core.AdafactorKernel(group, 1e-30, 1e-3)
        if family.kernel == "adafactor_step"
        else made
        if isinstance(made, ferroptim._core.Kernel)
        else ferroptim._core.Kernel(family.kernel.removesuffix("_step"), group)
    )
    assert tuple(kernel.state_keys) == tuple(opt._ferro_spec.state_keys(group))
    spec = opt._ferro_spec
    step = [spec.step_key] if spec.step_key is not None else []
    assert list(kernel.scalar_keys) == step + list(spec.scalar_keys)

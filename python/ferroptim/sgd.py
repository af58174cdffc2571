"""SGD: torch.optim's class with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import sgd as torch_sgd
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import check_number, flag, is_number
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["SGD"]


# -- the Rust kernel call (hyperparameters converted and checked in the prepare phase) --


def sgd_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("sgd", group).step


# -- the rest of the family ---------------------------------------------------------------


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=_state_keys(group))
    buffers: list[Tensor | None] = []
    g.has_sparse_grad = init_group(optimizer, group, g.params, g.grads, buffers)
    g.states = [buffers] if g.keys else []
    return g


_PLAIN = (float, int)


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # torch's first momentum step only clones the grad: it steps with a momentum or
    # dampening it could not compute with (`momentum=None` set mid-training), and
    # fails at the next step. Its for-loop gives exactly that.
    momentum, dampening = group["momentum"], group["dampening"]
    if type(momentum) in _PLAIN and type(dampening) in _PLAIN:
        return False  # (every step asks: the common case without calls)
    return not (is_number(momentum) and is_number(dampening))


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    # momentum and dampening are read only once a momentum buffer exists (or, for
    # momentum, with Nesterov).
    momentum = group["momentum"] != 0
    buffers = gathered.states[0] if gathered.states else [None] * len(gathered.params)
    if momentum and any(b is not None for b in buffers):  # buf.mul_(momentum).add_(...)
        check_number(group["momentum"], "momentum")
        check_number(group["dampening"], "dampening")
    if momentum and flag(group["nesterov"]):  # grad.add(buf, alpha=momentum)
        check_number(group["momentum"], "momentum")
    if gathered.has_sparse_grad or any(b is not None and b.is_sparse for b in buffers):
        _check_sparse_adds(gathered, group, buffers)


def _check_sparse_adds(gathered: Gathered, group: dict[str, Any], buffers: list[Any]) -> None:
    # torch's for-loop adds a sparse grad to dense tensors (weight decay, Nesterov's
    # look-ahead) and a dense grad to a sparse momentum buffer: "add(sparse, dense)"
    # after earlier params were stepped. Raised here, before anything is written.
    momentum = group["momentum"] != 0
    for grad, buffer in zip(gathered.grads, buffers, strict=True):
        if (
            (grad.is_sparse and group["weight_decay"] != 0)
            or (momentum and buffer is not None and buffer.is_sparse and not grad.is_sparse)
            or (
                momentum
                and flag(group["nesterov"])
                and grad.is_sparse
                and buffer is not None
                and not buffer.is_sparse
            )
        ):
            raise RuntimeError(
                "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
            )


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    buffers = gathered.states[0] if gathered.states else [None] * len(gathered.params)
    torch_sgd.sgd(
        gathered.params,
        gathered.grads,
        buffers,
        has_sparse_grad=gathered.has_sparse_grad,
        foreach=foreach,
        fused=fused,
        grad_scale=gathered.grad_scale,
        found_inf=gathered.found_inf,
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    if group["momentum"] != 0:
        # torch's functional creates first-step buffers in the list; keep them.
        for p, buffer in zip(gathered.params, buffers, strict=True):
            optimizer.state[p]["momentum_buffer"] = buffer


SGD_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=sgd_kernel,
    torch_step=_torch_step,
    gather=_gather,
    step_key=None,
    sparse_to_torch=True,
    # momentum and dampening are read only once a momentum buffer exists (or, for
    # momentum, with Nesterov): see _check_torch_path.
    numbers=("lr", "weight_decay"),
    rust_unsupported=_rust_unsupported,
    check_torch_path=_check_torch_path,
    rounds_like_torch=True,
)


class SGD(RustStepMixin, torch.optim.SGD):
    """Drop-in :class:`torch.optim.SGD` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format
    (``momentum_buffer``, created on a parameter's first step as torch does);
    results match torch's for-loop implementation, momentum, dampening,
    Nesterov, weight decay and maximize included. Sparse gradients (from
    ``nn.Embedding(sparse=True)``) step through torch's own implementation, as
    do parameters on other devices or dtypes (but bfloat16 and float16, which Rust
    steps rounding every op as torch's for-loop does).

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

    _ferro_spec = SGD_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
        ema_decay: float | None = None,
        state_dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._ferro_init(
            max_grad_norm,
            skip_nonfinite,
            nonfinite_group,
            ema_decay,
            state_dtype,
            seed,
            stochastic_rounding,
            master_weights,
            min_8bit_size,
        )

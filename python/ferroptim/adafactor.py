"""Adafactor: torch.optim's class with the CPU step in Rust (``rust/kernels/adafactor.rs``).

A param with two or more dimensions keeps a factored second moment: ``row_var`` (its
shape with the last dimension 1) and ``col_var`` (the second-to-last 1), over its last
two dimensions, batch dimensions kept; vectors and scalars keep a full ``variance``.
Those shapes are not the param's, so the moments reach the kernel beside the plan
(:attr:`~ferroptim._spec.OptimizerSpec.plan_extras`), checked in the prepare phase; the
kernel walks rows and columns, so params laid out otherwise than row-major step in a
staged contiguous copy (``contiguous_only``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import _adafactor as torch_adafactor
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import flag
from ferroptim._layout import is_lazy, storage_key
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["Adafactor"]

#: A tensor's second moment as the kernel takes it: ``(variance, None, 0, 0, 0)`` or
#: ``(row_var, col_var, batch, rows, cols)``.
Moment = tuple[Tensor, Tensor | None, int, int, int]


def resolved_eps1(group: dict[str, Any]) -> float:
    """torch's ``eps1``: ``eps[0]``, or where it is None, ``finfo(dtype).eps`` of the first
    param with a gradient in the group (torch's for-loop keeps the value it set for the
    first param for every later one, whatever their dtypes)."""
    eps1, _ = group["eps"]
    if eps1 is not None:
        return eps1
    first = next((p for p in group["params"] if p.grad is not None), None)
    return torch.finfo(first.dtype if first is not None else torch.float32).eps


def adafactor_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust step, its hyperparameters read by name from the group now (a
    missing or non-numeric one raises torch's KeyError/TypeError here)."""
    _, eps2 = group["eps"]
    kernel = _core.AdafactorKernel(group, resolved_eps1(group), eps2)

    def call(
        plan: _core.GroupPlan, unscale: float, clip: float, fresh: bool, moments: list[Moment]
    ) -> None:
        kernel.step(plan, moments, unscale, clip)

    return call


def _usable(state: dict[str, Any], key: str, param: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``state[key]`` as the kernel can read it: of the param's dtype and the shape torch
    gives it (else torch's step fails: its error, now), one contiguous run of memory
    (else, once, a contiguous copy of the same values takes its place)."""
    value = state.get(key)
    if value is None:
        what = "row_var and col_var" if key != "variance" else "variance"
        kind = "multidimensional" if key != "variance" else "a vector"
        raise AssertionError(f"{what} should be defined when grad is {kind}")
    if not isinstance(value, Tensor) or value.dtype != param.dtype or value.shape != shape:
        found = (
            f"shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise RuntimeError(
            f"Adafactor: state {key!r} of a parameter of shape {tuple(param.shape)} and dtype "
            f"{param.dtype} has {found}, not shape {shape}"
        )
    if not (value.is_cpu and value.is_contiguous()) or is_lazy(value):
        value = state[key] = value.to(device=param.device).resolve_neg().contiguous().clone()
    return value


def _check_sizes(params: list[Tensor]) -> None:
    # torch's `param.norm(2).item() / (param.numel() ** 0.5)`: Python's error for an
    # empty param, raised now, before anything is written.
    if any(p.numel() == 0 for p in params):
        raise ZeroDivisionError("float division by zero")


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    _check_sizes(gathered.params)


def moments(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Moment]:
    """The second moments of ``params`` (in plan order) for the kernel."""
    _check_sizes(params)
    out: list[Moment] = []
    for p in params:
        state = optimizer.state[p]
        shape = tuple(p.shape)
        moment: Moment
        if p.dim() > 1:
            rows, cols = shape[-2], shape[-1]
            row = _usable(state, "row_var", p, (*shape[:-1], 1))
            col = _usable(state, "col_var", p, (*shape[:-2], 1, cols))
            moment = (row, col, math.prod(shape[:-2]), rows, cols)
        else:
            moment = (_usable(state, "variance", p, shape), None, 0, 0, 0)
        # A grad in the variance's memory (the only moment of its shape): torch's error
        # now (any other overlap, the kernel refuses before it writes this group).
        grad = p.grad
        if moment[1] is None and grad is not None and grad.numel():
            if storage_key(grad) == storage_key(moment[0]):
                raise RuntimeError(
                    "Adafactor: a gradient shares memory with the optimizer's own state "
                    "(e.g. p.grad = opt.state[p][...]); give it a gradient of its own"
                )
        out.append(moment)
    return out


def _aliased_grad(param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
    # A gradient in the param's own memory (``p.grad = p.detach()``): torch's for-loop
    # reads it after `param.mul_(1 - lr * weight_decay)` unless `maximize` negated it
    # into a new tensor first.
    if group["weight_decay"] != 0 and not flag(group["maximize"]):
        return grad.clone().mul_(1 - group["lr"] * group["weight_decay"])
    return grad.clone()


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=())
    row_vars: list[Tensor | None] = []
    col_vars: list[Tensor | None] = []
    variances: list[Tensor | None] = []
    g.has_complex = init_group(
        optimizer, group, g.params, g.grads, row_vars, col_vars, variances, g.steps
    )
    return g


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    states = [optimizer.state[p] for p in gathered.params]
    _, eps2 = group["eps"]
    torch_adafactor.adafactor(
        gathered.params,
        gathered.grads,
        [s.get("row_var") for s in states],
        [s.get("col_var") for s in states],
        [s.get("variance") for s in states],
        gathered.steps,
        # torch's default is its for-loop (foreach only when asked for: it needs a
        # param-sized temporary per tensor), on every device
        foreach=flag(group["foreach"]) if group.get("foreach") is not None else False,
        d=group["d"],
        lr=group["lr"],
        beta2_decay=group["beta2_decay"],
        weight_decay=group["weight_decay"],
        eps1=resolved_eps1(group),
        eps2=eps2,
        maximize=group["maximize"],
        has_complex=gathered.has_complex,
    )


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ()


def _grad_error(param: Tensor, grad: Tensor, state: dict[str, Any]) -> type[Exception]:
    # torch's step picks the moment by the grad's dims: a state without it fails its
    # assertion; an integer matrix grad fails in `vector_norm`; the rest in an in-place op.
    if state and ("row_var" if grad.dim() > 1 else "variance") not in state:
        return AssertionError
    if grad.dim() > 1 and not (grad.is_floating_point() or grad.is_complex()):
        return NotImplementedError
    return RuntimeError


ADAFACTOR_SPEC = OptimizerSpec(
    keeps_state_dtype=False,
    state_keys=_state_keys,
    kernel=adafactor_kernel,
    torch_step=_torch_step,
    gather=_gather,
    has_fused=False,
    # torch refuses complex params (its error, from `_init_group`)
    complex_as_real=False,
    numbers=("lr", "beta2_decay", "d", "weight_decay"),
    contiguous_only=True,
    # A DTensor's rows and columns span ranks: torch's ops reduce across them.
    dtensor_in_rust=False,
    plan_extras=moments,
    aliased_grad=_aliased_grad,
    grad_error=_grad_error,
    check_torch_path=_check_torch_path,
    step_type_message="`state_steps` argument must contain a list of singleton tensors",
)


class Adafactor(RustStepMixin, torch.optim.Adafactor):
    """Drop-in :class:`torch.optim.Adafactor` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``, and
    ``row_var``/``col_var`` for params with two or more dimensions, ``variance`` for
    vectors and scalars); results match torch's for-loop implementation (norms and
    means are accumulated in float64: at least as close to the exact values as
    torch's). CPU float32/float64 parameters step in Rust, in three passes over memory;
    parameters on other devices, in other dtypes, or DTensors step through torch's own
    implementation (its for-loop unless ``foreach=True``, as torch's default).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = ADAFACTOR_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            beta2_decay,
            eps,
            d,
            weight_decay,
            foreach=foreach,
            maximize=maximize,
        )
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group, ema_decay)

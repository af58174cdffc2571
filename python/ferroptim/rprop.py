"""Rprop: torch.optim's class with the CPU step in Rust (``rust/kernels/rprop.rs``).

Each parameter's state keeps ``prev`` (the last gradient, zeroed where its sign
flipped) and ``step_size`` (created by torch's own ``_init_group`` as
``full_like(grad, lr)``: ``lr`` is read only then, which is torch's behaviour).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import rprop as torch_rprop
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["Rprop"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def rprop_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("rprop", group).step


# -- the rest of the family ---------------------------------------------------------------

_KEYS = ("prev", "step_size")


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return _KEYS


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=_KEYS)
    prevs: list[Tensor] = []
    step_sizes: list[Tensor] = []
    g.has_complex = init_group(optimizer, group, g.params, g.grads, prevs, step_sizes, g.steps)
    g.states = [prevs, step_sizes]
    for p, grad in zip(g.params, g.grads, strict=True):
        if not grad.is_sparse and (grad.shape != p.shape or grad.dtype != p.dtype):
            # A gradient set through `p.grad.data` (its new `step_size` was made like it):
            # torch's error type, before the state checks see that `step_size`.
            raise _grad_error(p, grad, optimizer.state[p])(
                f"Rprop: a gradient of shape {tuple(grad.shape)}, dtype {grad.dtype} does "
                f"not match its parameter (shape {tuple(p.shape)}, dtype {p.dtype})"
            )
    return g


def _pair(value: Any) -> tuple[Any, ...]:
    if (type(value) is tuple or type(value) is list) and len(value) == 2:
        return tuple(value)
    return ()


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # `clamp_(None, hi)` / `clamp_(lo, None)` is a one-sided clamp in torch: such groups
    # take torch's for-loop (the kernel clamps on both sides).
    return any(bound is None for bound in _pair(group["step_sizes"]))


def _more_numbers(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    # torch's step unpacks both pairs first (`etaminus, etaplus = group["etas"]`); the
    # etas are written into a tensor (`sign[sign.gt(0)] = etaplus`), the bounds go to
    # `clamp_` (where None means "no bound").
    etaminus, etaplus = group["etas"]
    step_size_min, step_size_max = group["step_sizes"]
    bounds = (("step_size_min", step_size_min), ("step_size_max", step_size_max))
    return (
        ("etaminus", etaminus),
        ("etaplus", etaplus),
        *((name, value) for name, value in bounds if value is not None),
    )


def _grad_error(param: Tensor, grad: Tensor, state: dict[str, Any]) -> type[Exception]:
    # What torch's for-loop hits first with a gradient set through `p.grad.data`: the
    # `sign` of a complex product, then `step_size.mul_(sign)` (an in-place op cannot
    # broadcast its result), then `grad[sign.eq(etaminus)] = 0` (a boolean mask of
    # another shape). A new state's `prev` is `zeros_like(p)`, its `step_size`
    # `full_like(grad, lr)`.
    if grad.is_complex() and not param.is_complex():
        return NotImplementedError
    prev = state.get("prev", param)
    step_size = state.get("step_size", grad)
    try:
        shape = torch.broadcast_shapes(grad.shape, prev.shape)
        fits = torch.broadcast_shapes(step_size.shape, shape) == step_size.shape
    except RuntimeError:
        return RuntimeError
    return IndexError if fits and grad.shape != shape else RuntimeError


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    etaminus, etaplus = group["etas"]
    step_size_min, step_size_max = group["step_sizes"]
    torch_rprop.rprop(
        gathered.params,
        gathered.grads,
        gathered.states[0],
        gathered.states[1],
        gathered.steps,
        step_size_min=step_size_min,
        step_size_max=step_size_max,
        etaminus=etaminus,
        etaplus=etaplus,
        foreach=foreach,
        maximize=group["maximize"],
        differentiable=group["differentiable"],
        capturable=group["capturable"],
        has_complex=gathered.has_complex,
    )


RPROP_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=rprop_kernel,
    torch_step=_torch_step,
    gather=_gather,
    # torch's for-loop only increments the counter (`step += 1`), never reads it.
    reads_step=False,
    has_fused=False,
    # `lr` is read only when a param's state is created (torch's `_init_group`).
    numbers=(),
    more_numbers=_more_numbers,
    rust_unsupported=_rust_unsupported,
    grad_error=_grad_error,
    rounds_like_torch=True,
)


class Rprop(RustStepMixin, torch.optim.Rprop):
    """Drop-in :class:`torch.optim.Rprop` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``prev``, ``step_size``); results are bitwise those of torch's for-loop implementation
    (every operation of Rprop is exactly rounded). CPU float32/float64 (and complex)
    parameters step in Rust; parameters on other devices, in other dtypes (but bfloat16 and
    float16, which Rust steps rounding every op as torch's for-loop does), or with
    ``differentiable=True`` step through torch's own implementation (foreach where it can:
    torch has no fused Rprop).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`; Rprop reads only the gradient's sign, but the
    clipped gradient is what ``prev`` keeps, as after ``clip_grad_norm_``);
    ``skip_nonfinite`` skips steps whose gradients hold an inf or nan.
    """

    _ferro_spec = RPROP_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
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
            etas,
            step_sizes,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
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

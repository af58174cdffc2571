"""Muon: ``torch.optim.Muon`` (torch 2.15) with its element-wise half in Rust
(``rust/kernels/muon.rs``).

torch's step, per 2-D parameter (``_single_tensor_muon``)::

    buf.lerp_(grad, 1 - momentum)                       element-wise  -> Rust
    update = grad.lerp(buf, momentum) if nesterov else buf          -> Rust (same pass)
    O = NS(update.to(bfloat16))      Newton–Schulz: norm, div, 3 x ns_steps matmuls
    param.mul_(1 - lr * weight_decay)
    param.add_(O, alpha=-adjust_lr(lr, adjust_lr_fn, param.shape))

The momentum buffer and the (Nesterov) update are one Rust pass over the group
(``_core.Kernel("muon", group)``: the engine's param role is the momentum buffer, its
state 0 a scratch tensor laid out like the gradient, as torch's ``lerp`` output is). The
rest is torch's own code, called as is (``torch.optim._muon._zeropower_via_newtonschulz``
and ``_adjust_lr``): the Newton–Schulz products run through torch's ``mm``/``addmm`` in
bfloat16 on the same layouts torch uses, so every step equals torch's bit for bit. Those
matrix products are almost all of a Muon step's time (see ``benches/test_muon.py``): the
Rust pass saves two of torch's element-wise passes, not the matmuls.

Other devices, other dtypes, non-dense or differently laid out gradients and
``set_backend("torch")`` take torch's ``_single_tensor_muon`` unchanged. Bad input
(complex or sparse gradients, non-2-D gradients, ``ns_steps >= 100``, coefficients that
are not three) raises torch's error before any tensor of any group is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import _muon as torch_muon
from torch.optim.optimizer import ParamsT, _to_scalar

from ferroptim import _config, _core
from ferroptim._ema import EmaMixin
from ferroptim._torch_compat import hooked_step

__all__ = ["Muon"]

_RUST_DTYPES = (torch.float32, torch.float64)


def _dense(t: Tensor) -> bool:
    # A 2-D tensor the engine steps element by element in memory order: row- or
    # column-major without gaps (the momentum buffer is created with the grad's strides).
    return t.is_contiguous() or t.mT.is_contiguous()


def _rust_eligible(param: Tensor, grad: Tensor, buf: Tensor) -> bool:
    return (
        param.device.type == "cpu"
        and param.dtype in _RUST_DTYPES
        and type(grad) is Tensor
        and type(buf) is Tensor
        and grad.layout == torch.strided
        and buf.layout == torch.strided
        and grad.device.type == "cpu"
        and buf.device.type == "cpu"
        and grad.dtype == param.dtype
        and buf.dtype == param.dtype
        and grad.shape == param.shape
        and buf.shape == param.shape
        and grad.stride() == buf.stride()
        and _dense(grad)
    )


def _check_group(group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
    """Raises what torch's step raises for this group, before anything is written.

    torch checks these per param in the middle of its loop (after stepping the params
    before): the grad's dimensions, then (inside Newton–Schulz) ``ns_steps`` and the
    coefficients; here every group is checked before any is stepped."""
    for grad in grads:
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")
    coefficients = group["ns_coefficients"]
    if params:
        if group["ns_steps"] >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        if len(coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
    for param, grad in zip(params, grads, strict=True):
        if grad.shape != param.shape:
            # torch's in-place add would fail after the momentum update.
            raise RuntimeError(
                f"The size of tensor a ({param.shape}) must match the size of tensor b "
                f"({grad.shape}): the gradient of a Muon parameter must have its shape"
            )


def _finish(param: Tensor, update: Tensor, group: dict[str, Any], lr: float) -> None:
    """torch's lines after the momentum, op for op (torch's own functions)."""
    ortho = torch_muon._zeropower_via_newtonschulz(
        update, group["ns_coefficients"], group["ns_steps"], group["eps"]
    )
    adjusted_lr = torch_muon._adjust_lr(lr, group["adjust_lr_fn"], param.shape)
    param.mul_(1 - lr * group["weight_decay"])
    param.add_(ortho, alpha=-adjusted_lr)


def _step_group(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
) -> None:
    """Steps one checked group: momentum in Rust where it can, the rest as torch does."""
    # (the kernel reads `momentum` as a Python number and `nesterov` as a bool; anything
    # else takes torch's ops, which accept what they accept)
    use_rust = (
        _config.get_backend() != "torch"
        and type(group["momentum"]) in (int, float)
        and type(group["nesterov"]) is bool
    )
    rust = [
        i for i in range(len(params)) if use_rust and _rust_eligible(params[i], grads[i], bufs[i])
    ]
    updates: list[Tensor] = []
    if rust:
        updates = [torch.empty_like(grads[i]) for i in rust]
        try:
            plan = _core.GroupPlan.from_tensors(
                [bufs[i] for i in rust], [grads[i] for i in rust], [updates], []
            )
        except ValueError:
            # Buffers the engine cannot step as one plan (e.g. a grad sharing memory
            # with its momentum buffer): torch's path steps them.
            rust, updates = [], []
        else:
            _core.Kernel("muon", group).step(plan, 1.0, 1.0, False)
    rest = sorted(set(range(len(params))) - set(rust))
    if rest:
        torch_muon._single_tensor_muon(
            [params[i] for i in rest],
            [grads[i] for i in rest],
            [bufs[i] for i in rest],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            ns_steps=group["ns_steps"],
            eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"],
            has_complex=False,
        )
    if rust:
        lr = _to_scalar(group["lr"])
        for i, update in zip(rust, updates, strict=True):
            _finish(params[i], update, group, lr)


class Muon(EmaMixin, torch.optim.Muon):
    """Drop-in ``torch.optim.Muon`` whose element-wise momentum runs in Rust.

    torch's signature, defaults, param-group keys, state (``momentum_buffer``) and
    ``state_dict``; every step equals torch's bit for bit (the Newton–Schulz products
    are torch's own bfloat16 ``mm``/``addmm``). Only 2-D parameters, as torch's.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (
            torch_muon.DEFAULT_A,
            torch_muon.DEFAULT_B,
            torch_muon.DEFAULT_C,
        ),
        eps: float = torch_muon.EPS,
        ns_steps: int = torch_muon.DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        self._ema_init(ema_decay)

    def _gather(
        self, group: dict[str, Any], created: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor] = []
        for p in group["params"]:
            if p.grad is not None and "momentum_buffer" not in self.state.get(p, {}):
                created.append(p)
        self._init_group(group, params, grads, bufs)
        return params, grads, bufs

    @torch.no_grad()
    def _ferro_step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        created: list[Tensor] = []
        prepared = []
        try:
            for group in self.param_groups:
                params, grads, bufs = self._gather(group, created)
                _check_group(group, params, grads)
                if params:
                    _to_scalar(group["lr"])  # (a bad tensor lr fails here, not mid-step)
                prepared.append((group, params, grads, bufs))
        except BaseException:
            for p in created:  # a failed step leaves no trace
                self.state.pop(p, None)
            raise
        for group, params, grads, bufs in prepared:
            if params:
                _step_group(group, params, grads, bufs)
        if any(group.get("ema_decay") is not None for group in self.param_groups):
            self._ema_after_step({})
        return loss

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        return self._ferro_step(closure)

    step = hooked_step(step)

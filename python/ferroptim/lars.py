"""LARS: ``pytorch_optimizer.LARS`` (pytorch-optimizer 4.1.0) with the CPU step in Rust
(``rust/kernels/lars.rs``).

torch has no LARS: the class subclasses ``torch.optim.Optimizer`` and takes the
reference's constructor arguments, defaults, param-group keys (``step`` counted in the
group, as the reference does) and state key (``momentum_buffer``, only with
``momentum > 0``), so checkpoints interchange with ``pytorch_optimizer.LARS``.

Its step, per param (the reference's default flavour on CPU, ``_step_foreach``)::

    g = -g                                  if maximize
    for params with more than one dimension:
        pn, gn = ||p||, ||g||
        trust = tc * pn / (gn + wd * pn)    1 where pn == 0 or the denominator is 0
        g = (g + wd * p) * trust
    m = momentum * m + (1 - dampening) * g  if momentum > 0
    g = g + momentum * m  if nesterov, else m
    p = p - lr * g

Every norm of the group comes from one parallel Rust pass (``_core.grad_norms`` over
the params and the grads: float64 in a fixed tree, then rounded to the tensor's dtype);
the trust ratios are computed from them with the reference's float32 (or float64)
tensor arithmetic, and the update is one Rust pass (read p, g, m; write p, m). The
reference's own norms (``torch._foreach_norm``) are not correctly rounded; ours are, so
a trust ratio can differ from the reference's in its last bit (see tests/test_lars.py).

Unlike the reference, the step reads the gradients without writing them (the
reference leaves its update in ``p.grad``). Other devices and dtypes, tensor
hyperparameters, and non-dense layouts take torch-op code computing what the
reference's ``_step_foreach`` computes (on copies of the gradients).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _config, _core
from ferroptim._ema import EmaMixin
from ferroptim._torch_compat import hooked_step

__all__ = ["LARS"]

_RUST_DTYPES = (torch.float32, torch.float64)
_NUMBERS = ("lr", "weight_decay", "momentum", "dampening", "trust_coefficient")


def _f32(x: float) -> float:
    """``x`` rounded to float32 (a float32 operation's result: the float64 result of two
    float32 operands rounded once is the correctly rounded float32 result)."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def trust_ratio(
    param_norm: float, grad_norm: float, weight_decay: float, trust_coefficient: float, f32: bool
) -> float:
    """The reference's ``torch.where(pn > 0, torch.where(den > 0, tc * pn / den, 1), 1)``
    with ``den = gn + wd * pn``, each operation rounded as its float32 (or float64)
    tensor arithmetic rounds (Python scalars rounded to the tensor's dtype first)."""
    r = _f32 if f32 else float
    denominator = r(grad_norm + r(r(weight_decay) * param_norm))
    if not param_norm > 0.0 or not denominator > 0.0:
        return 1.0
    return r(r(r(trust_coefficient) * param_norm) / denominator)


def _dense(t: Tensor) -> bool:
    # Row-major, or a 2-D tensor stored column-major: what the engine steps (grads and
    # buffers must have the same strides, checked too).
    return t.is_contiguous() or (t.ndim == 2 and t.mT.is_contiguous())


def _rust_eligible(param: Tensor, grad: Tensor, buf: Tensor | None) -> bool:
    return (
        param.device.type == "cpu"
        and param.dtype in _RUST_DTYPES
        and type(grad) is Tensor
        and grad.layout == torch.strided
        and grad.device.type == "cpu"
        and grad.dtype == param.dtype
        and grad.shape == param.shape
        and grad.stride() == param.stride()
        and _dense(param)
        and (
            buf is None
            or (type(buf) is Tensor and buf.dtype == param.dtype and buf.stride() == param.stride())
        )
    )


def _torch_ops(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    maximize: bool,
) -> None:
    """The reference's ``_step_foreach`` on each (device, dtype) part of the lists, as the
    reference splits them (``group_tensors_by_device_and_dtype``)."""
    parts: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        parts.setdefault((p.device, p.dtype), []).append(i)
    for indices in parts.values():
        _foreach_part(
            group,
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [bufs[i] for i in indices] if bufs else [],
            maximize,
        )


def _foreach_part(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    maximize: bool,
) -> None:
    """The reference's ``_step_foreach``, op for op, on copies of the gradients."""
    grads = [g.clone() for g in grads]
    if maximize:
        torch._foreach_neg_(grads)
    masked = [i for i, p in enumerate(params) if p.ndim > 1]
    if masked:
        masked_params = [params[i] for i in masked]
        masked_grads = [grads[i] for i in masked]
        param_norms = torch.stack(torch._foreach_norm(masked_params))
        grad_norms = torch.stack(torch._foreach_norm(masked_grads))
        denominator = grad_norms + group["weight_decay"] * param_norms
        trust_ratios = torch.where(
            param_norms > 0.0,
            torch.where(
                denominator > 0.0, group["trust_coefficient"] * param_norms / denominator, 1.0
            ),
            1.0,
        ).unbind()
        torch._foreach_add_(masked_grads, masked_params, alpha=group["weight_decay"])
        torch._foreach_mul_(masked_grads, trust_ratios)
    if group["momentum"] > 0.0:
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads, alpha=1.0 - group["dampening"])
        if group["nesterov"]:
            torch._foreach_add_(grads, bufs, alpha=group["momentum"])
        else:
            torch._foreach_copy_(grads, bufs)
    lr = group["lr"]
    if isinstance(lr, Tensor):
        dtype = torch.promote_types(params[0].dtype, lr.dtype)
        torch._foreach_add_(params, torch._foreach_mul([g.to(dtype=dtype) for g in grads], lr))
    else:
        torch._foreach_add_(params, grads, alpha=-lr)


def _plain_numbers(group: dict[str, Any]) -> bool:
    return all(type(group[k]) in (int, float) for k in _NUMBERS) and type(group["nesterov"]) is bool


def _step_rust(
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    maximize: bool,
) -> bool:
    """Steps the tensors in Rust; False (nothing written) where the engine cannot plan
    them (tensors sharing memory, ...): the caller's torch-op code steps them then."""
    # One parallel pass for every norm of the group (params and grads of the tensors
    # with more than one dimension), then one for the update.
    lars = [i for i, p in enumerate(params) if p.ndim > 1]
    ratios = torch.ones(len(params), dtype=torch.float64)
    flags = torch.zeros(len(params), dtype=torch.float64)
    try:
        norm_plans = [
            _core.GroupPlan.from_grads([params[i] for i in lars]),
            _core.GroupPlan.from_grads([grads[i] for i in lars]),
        ]
        states = [bufs] if group["momentum"] > 0.0 else []
        slots = [list(ratios.unbind()), list(flags.unbind())]
        plan = _core.GroupPlan.from_tensors(params, grads, states, slots)
    except ValueError:
        return False
    if lars:
        norms, _ = _core.grad_norms(norm_plans, 2.0)
        n = len(lars)
        wd, tc = float(group["weight_decay"]), float(group["trust_coefficient"])
        for j, i in enumerate(lars):
            f32 = params[i].dtype == torch.float32
            ratios[i] = trust_ratio(norms[j], norms[n + j], wd, tc, f32)
            flags[i] = 1.0
    _core.Kernel("lars", {**group, "maximize": maximize}).step(plan, 1.0, 1.0, False)
    return True


@dataclass
class _PlainPlan:
    """A group's cached plan of its plain tensors (see ``LARS._plain_plan``)."""

    group: dict[str, Any]
    #: The group's params (identities) when the plan was made.
    ids: tuple[int, ...]
    momentum: bool
    plan: _core.GroupPlan
    #: The group's params not in the plan (stepped through the listed path).
    others: list[Tensor]


class LARS(EmaMixin, torch.optim.Optimizer):
    """Drop-in ``pytorch_optimizer.LARS`` whose CPU step runs in Rust.

    The reference's signature and defaults (``lr=1e-3``, ``weight_decay=0.0``,
    ``momentum=0.9``, ``dampening=0.0``, ``trust_coefficient=1e-3``, ``nesterov=False``,
    ``foreach=None``, ``maximize=False``), its param-group keys (``step`` included) and
    state (``momentum_buffer``). The gradients are read, not written.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        # The reference's checks, messages and types (its NegativeLRError is a plain
        # Exception subclass: ValueError here, a subclass of Exception all the same).
        if lr is not None and lr < 0.0:
            raise ValueError(f"learning rate must be positive. ({lr} > 0)")
        if weight_decay < 0.0:
            raise ValueError("weight_decay must be non-negative")
        if not 0.0 <= momentum < 1.0:
            raise ValueError("momentum must be in the range [0.0, 1.0)")
        if not 0.0 <= dampening < 1.0:
            raise ValueError("dampening must be in the range [0.0, 1.0)")
        if trust_coefficient < 0.0:
            raise ValueError("trust_coefficient must be non-negative")
        self.foreach = foreach
        self.maximize = maximize
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "dampening": dampening,
            "trust_coefficient": trust_coefficient,
            "nesterov": nesterov,
            "foreach": foreach,
        }
        super().__init__(params, defaults)
        self._ema_init(ema_decay)

    def __str__(self) -> str:
        return "Lars"

    def _gather(
        self, group: dict[str, Any], created: list[Tensor], among: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The params of ``among`` (default: the group's) that have a grad, their grads
        and momentum buffers (created where missing)."""
        params, grads, bufs = [], [], []
        momentum = group["momentum"] > 0.0
        for p in group["params"] if among is None else among:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{self} does not support sparse gradient.")
            params.append(p)
            grads.append(p.grad)
            if momentum:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    created.append(p)
                bufs.append(state["momentum_buffer"])
        return params, grads, bufs

    # -- the cached plan of a group's plain tensors --------------------------------------
    #
    # Tensors with at most one dimension need no norms: a plan of them is kept from step
    # to step and re-checked in Rust (`GroupPlan.gather`: same params, same state
    # tensors, fitting grads) instead of being rebuilt, so a list of many small tensors
    # costs no Python work per tensor. Anything the re-check does not confirm (a changed
    # param list, replaced state, a grad of another dtype or layout, a sparse grad) takes
    # the slow path, which raises the reference's errors and rebuilds the plan.

    def _plain_plan(self, group: dict[str, Any]) -> _PlainPlan | None:
        cached: dict[int, _PlainPlan] = self.__dict__.setdefault("_ferro_plain", {})
        entry = cached.get(id(group))
        if (
            entry is None
            or entry.group is not group
            or entry.momentum != (group["momentum"] > 0.0)
            or entry.ids != tuple(map(id, group["params"]))
            or _config.get_backend() == "torch"
            or not _plain_numbers(group)
        ):
            return None
        return entry

    def _cache_plain(self, group: dict[str, Any]) -> None:
        cached: dict[int, _PlainPlan] = self.__dict__.setdefault("_ferro_plain", {})
        cached.pop(id(group), None)
        if _config.get_backend() == "torch" or not _plain_numbers(group):
            return
        momentum = group["momentum"] > 0.0
        plain = [
            p
            for p in group["params"]
            if p.ndim <= 1
            and p.device.type == "cpu"
            and p.dtype in _RUST_DTYPES
            and type(p) in (Tensor, torch.nn.Parameter)
            and (not momentum or "momentum_buffer" in self.state.get(p, {}))
        ]
        if not plain:
            return
        keys = ["momentum_buffer"] if momentum else []
        try:
            plan = _core.GroupPlan(plain, [self.state.get(p, {}) for p in plain], keys, [])
        except (ValueError, RuntimeError):
            return  # not plannable: the slow path stays correct
        chosen = {id(p) for p in plain}
        others = [p for p in group["params"] if id(p) not in chosen]
        cached[id(group)] = _PlainPlan(
            group, tuple(map(id, group["params"])), momentum, plan, others
        )

    @torch.no_grad()
    def _ferro_step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        snapshot = self.__dict__.get("_ferro_snapshot")
        if snapshot is None or not snapshot.matches(self.state):
            self.__dict__["_ferro_plain"] = {}  # the state was replaced: no plan holds
        slow = False
        for group, plan, params, grads, bufs in self._prepare():
            group.setdefault("step", 0)
            group["step"] += 1
            if plan is not None:
                hyper = {**group, "maximize": self.maximize}
                _core.Kernel("lars_plain", hyper).step(plan, 1.0, 1.0, False)
            else:
                slow = True
            if params:
                self._step_listed(group, params, grads, bufs)
            if plan is None:
                self._cache_plain(group)
        if any(group.get("ema_decay") is not None for group in self.param_groups):
            self._ema_after_step({})
        if slow:
            self.__dict__["_ferro_snapshot"] = _core.StateSnapshot(self.state)
        return loss

    def _prepare(
        self,
    ) -> list[tuple[dict[str, Any], Any, list[Tensor], list[Tensor], list[Tensor]]]:
        """Every group checked and gathered before anything is written: (group, its
        re-checked plan of plain tensors or None, the other params with a grad, their
        grads and momentum buffers)."""
        created: list[Tensor] = []
        prepared: list[tuple[dict[str, Any], Any, list[Tensor], list[Tensor], list[Tensor]]] = []
        try:
            for group in self.param_groups:
                entry = self._plain_plan(group)
                if entry is not None and entry.plan.gather():
                    listed = self._gather(group, created, entry.others)
                    prepared.append((group, entry.plan, *listed))
                else:
                    prepared.append((group, None, *self._gather(group, created)))
        except BaseException:
            for _, plan, *_rest in prepared:
                if plan is not None:
                    plan.release()
            for p in created:  # a failed step leaves no trace
                self.state.pop(p, None)
            raise
        return prepared

    def _step_listed(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], bufs: list[Tensor]
    ) -> None:
        """Steps listed tensors: in Rust where they can be, else with torch ops."""
        momentum = group["momentum"] > 0.0
        rust: list[int] = []
        if _config.get_backend() != "torch" and _plain_numbers(group):
            rust = [
                i
                for i, (p, g) in enumerate(zip(params, grads, strict=True))
                if _rust_eligible(p, g, bufs[i] if momentum else None)
            ]
        chosen = set(rust)
        rest = [i for i in range(len(params)) if i not in chosen]
        if rust and not _step_rust(
            group,
            [params[i] for i in rust],
            [grads[i] for i in rust],
            [bufs[i] for i in rust] if momentum else [],
            self.maximize,
        ):
            rest = list(range(len(params)))
        if rest:
            _torch_ops(
                group,
                [params[i] for i in rest],
                [grads[i] for i in rest],
                [bufs[i] for i in rest] if momentum else [],
                self.maximize,
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here too: every cached plan may be stale.
        self.__dict__.pop("_ferro_plain", None)
        self.__dict__.pop("_ferro_snapshot", None)
        super().__setstate__(state)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        return self._ferro_step(closure)

    step = hooked_step(step)

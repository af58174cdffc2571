"""LAMB: ``pytorch_optimizer.Lamb`` (pytorch-optimizer 4.1.0) with the CPU step in Rust
(``rust/kernels/lamb.rs``).

torch has no LAMB: the class subclasses ``torch.optim.Optimizer`` and takes the
reference's constructor arguments, defaults, param-group keys (``step`` counted in the
group, as the reference does) and state (``exp_avg``, ``exp_avg_sq``, and after each step
the 0-d tensors ``weight_norm``, ``adam_norm``, ``trust_ratio``), so checkpoints
interchange with ``pytorch_optimizer.Lamb``. Its step, per param (the reference's
default flavour on CPU, ``_step_foreach``)::

    g = -g                                   if maximize
    g = g * pre                              pre_norm: min(max_grad_norm / (||grads|| + eps), 1)
    p = p * (1 - wd * lr)                    weight_decouple (fixed_decay: 1 - wd)
    m = beta1 * m + beta3 * g                beta3 = 1 - beta1 (grad_averaging) or 1
    v = beta2 * v + (1 - beta2) * g * g
    u = m * (1 / (sqrt(v) + eps))  (+ wd * p without weight_decouple)
    wn = min(||p||, 10); un = ||u||; r = wn / (un + eps) (1 where either is 0)
    p = p - lr / (1 - beta1**step) * r * u   (r = 1 with adam=True; adam_debias: no 1/bc1)

CPU float32/float64 params step in Rust in two passes over memory: the first updates the
moments and takes every tensor's ``||p||²`` and ``||u||²`` (float64, a fixed tree:
bitwise the same for any thread count and SIMD level), the trust ratios follow in the
tensor's dtype as the reference's tensor arithmetic computes them, the second applies the
update. The norms are correctly rounded; torch's float32 ``_foreach_norm`` may differ
from them in the last bit, so a trust ratio can differ from the reference's by an ulp
(see tests/test_lamb.py).

The reference's other flavour (its per-parameter ``update``: taken for groups with
``rectify``, ``adanorm``, ``foreach=False``, complex params) divides where the default
multiplies by a reciprocal: those groups, other devices and dtypes, tensor
hyperparameters and ``differentiable=True`` step through torch-op code computing what
the reference computes. Unlike the reference, the step reads the gradients without
writing them (the reference negates them in place for ``maximize`` and scales them for
``pre_norm``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _core, _step
from ferroptim._hyper import flag
from ferroptim._optimizer import RustStepMixin
from ferroptim._reference_errors import check_constructor, no_sparse_gradient
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import hooked_step

__all__ = ["LAMB", "Lamb"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_NORM_KEYS = ("weight_norm", "adam_norm", "trust_ratio")
#: The reference's ``Lamb.clamp``: the weight norm's upper bound.
CLAMP = 10.0


def step_size(
    group: dict[str, Any], step: int, n_sma_threshold: int = 5, degenerated_to_sgd: bool = False
) -> tuple[float, float]:
    """``(step_size, n_sma)`` of step ``step``: the reference's ``get_rectify_step_size``
    then ``apply_adam_debias``, in float64 as its Python computes them."""
    beta1, beta2 = group["betas"]
    bias_correction1 = 1.0 - math.pow(beta1, step)
    size: float = group["lr"]
    n_sma = 0.0
    if group["rectify"]:
        n_sma_max = 2.0 / (1.0 - beta2) - 1.0
        beta2_t = beta2**step
        n_sma = n_sma_max - 2 * step * beta2_t / (1.0 - beta2_t)
        if n_sma >= n_sma_threshold:
            rt = math.sqrt(
                (1.0 - beta2_t)
                * (n_sma - 4)
                / (n_sma_max - 4)
                * (n_sma - 2)
                / n_sma
                * n_sma_max
                / (n_sma_max - 2)
            )
        elif degenerated_to_sgd:
            rt = 1.0
        else:
            rt = -1.0
        size = size * rt
    if not group.get("adam_debias", False):
        size = size / bias_correction1
    return size, n_sma


def lamb_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust step, its hyperparameters read by name from the group now (the
    step size of this step: ``group['step']`` counts the steps before it)."""
    size, _ = step_size(group, group.get("step", 0) + 1)
    kernel = _core.LambKernel(group, size)

    def call(
        plan: _core.GroupPlan, unscale: float, clip: float, fresh: bool, extras: _Extras
    ) -> None:
        values = kernel.step(plan, unscale, clip, extras.pre_scale)
        extras.keep_norms(values)

    return call


@dataclass
class _Extras:
    """What a Rust step needs beside its plan: the pre-norm scale, and where the norms it
    returns go (the params' states, in plan order)."""

    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    states: list[dict[str, Any]]
    pre_scale: float

    def keep_norms(self, values: list[float]) -> None:
        """Stores each param's ``weight_norm``, ``adam_norm`` and ``trust_ratio`` as the
        reference does: 0-d tensors of the param's dtype, views of one tensor per plan.
        Where the states still hold the views stored last step, their values are
        overwritten in place (making 3 views per param costs a few µs per param, more
        than the step of a small tensor)."""
        n = len(self.states)
        if not n:
            return
        dtype = self.params[0].dtype
        if any(p.dtype != dtype for p in self.params):
            for i, (state, p) in enumerate(zip(self.states, self.params, strict=True)):
                for k, key in enumerate(_NORM_KEYS):
                    state[key] = torch.tensor(values[k * n + i], dtype=p.dtype)
            return
        cache: dict[tuple[int, ...], tuple[Tensor, list[tuple[Tensor, ...]]]]
        cache = self.optimizer.__dict__.setdefault("_ferro_lamb_norms", {})
        ids = tuple(map(id, self.params))
        entry = cache.get(ids)
        if entry is not None and entry[0].dtype == dtype and self._hold(entry[1]):
            # (float64 values, each already rounded to the dtype: the copy is exact)
            entry[0].copy_(torch.tensor(values, dtype=torch.float64).view(3, n))
            return
        buffer = torch.tensor(values, dtype=dtype).view(3, n)
        views = [row.unbind() for row in buffer]
        for state, wn, an, tr in zip(self.states, *views, strict=True):
            state["weight_norm"], state["adam_norm"], state["trust_ratio"] = wn, an, tr
        if len(cache) > 64:  # (plans come and go with param lists: keep a few)
            cache.clear()
        cache[ids] = (buffer, views)

    def _hold(self, views: list[tuple[Tensor, ...]]) -> bool:
        """Whether every state still holds the views stored last step."""
        return all(
            all(map(operator.is_, (s.get(key) for s in self.states), row))
            for key, row in zip(_NORM_KEYS, views, strict=True)
        )


def _pre_scale(optimizer: torch.optim.Optimizer) -> Tensor | float:
    """This step's ``pre_norm`` scale (set by ``Lamb.step``; 1.0 without pre_norm)."""
    scale = optimizer.__dict__.get("_ferro_pre_norm")
    return 1.0 if scale is None else scale


def _plan_extras(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> _Extras:
    # Where the kernel's norms go (in plan order), and the pre-norm scale.
    state = optimizer.state
    return _Extras(optimizer, params, [state[p] for p in params], float(_pre_scale(optimizer)))


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return _STATE_KEYS


def _init_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # The reference's init_group.
    state = {key: torch.zeros_like(param) for key in _STATE_KEYS}
    if group.get("adanorm"):
        state["exp_grad_adanorm"] = torch.zeros((1,), dtype=param.dtype, device=param.device)
    return state


def _betas(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    beta1, beta2 = group["betas"]  # the reference's unpacking (and its errors)
    return (("beta1", beta1), ("beta2", beta2))


def _uses_foreach(group: dict[str, Any]) -> bool:
    """Whether the reference steps the group with ``_step_foreach`` (else its
    per-parameter ``update``): its ``_can_use_foreach``."""
    if group.get("foreach") is False or group.get("adanorm") or group.get("rectify"):
        return False
    # (every step reads this: attribute reads only. A sparse gradient raises the
    # reference's error whichever the flavour, and a group without gradients steps
    # nothing in either.)
    return not any(p.dtype.is_complex and p.grad is not None for p in group["params"])


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # Tensor hyperparameters make the reference compute its scalars in tensor arithmetic,
    # and its per-parameter flavour rounds differently: torch ops below for both.
    _betas(group)  # (betas that do not unpack: the reference's error, first)
    numbers = (group["lr"], group["weight_decay"], group["eps"], *group["betas"])
    return any(isinstance(v, Tensor) for v in numbers) or not _uses_foreach(group)


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    """LAMB in torch ops: the reference's ``_step_foreach`` per (device, dtype) part, or
    its per-parameter ``update`` where the reference takes that, op for op."""
    if not gathered.params:
        return
    step = group.get("step", 0) + 1
    size, n_sma = step_size(
        group,
        step,
        getattr(optimizer, "n_sma_threshold", 5),
        getattr(optimizer, "degenerated_to_sgd", False),
    )
    exp_avgs, exp_avg_sqs = gathered.states
    pre = _pre_scale(optimizer)
    if not _uses_foreach(group):
        for p, grad, exp_avg, exp_avg_sq in zip(
            gathered.params, gathered.grads, exp_avgs, exp_avg_sqs, strict=True
        ):
            _update(optimizer, group, p, grad, exp_avg, exp_avg_sq, pre, n_sma, size)
        return
    parts: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(gathered.params):
        parts.setdefault((p.device, p.dtype), []).append(i)
    for index in parts.values():
        _foreach_part(
            optimizer,
            group,
            [gathered.params[i] for i in index],
            [gathered.grads[i] for i in index],
            [exp_avgs[i] for i in index],
            [exp_avg_sqs[i] for i in index],
            pre,
            size,
        )


def _foreach_part(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    pre: Tensor | float,
    size: float,
) -> None:
    """The reference's ``_step_foreach``, op for op, on copies of the gradients."""
    beta1, beta2 = group["betas"]
    eps, lr, weight_decay = group["eps"], group["lr"], group["weight_decay"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    grads = [g.clone() for g in grads]
    if flag(group["maximize"]):
        torch._foreach_neg_(grads)
    if isinstance(pre, Tensor):
        torch._foreach_mul_(grads, pre.reshape(()))
    if group["weight_decouple"] and weight_decay != 0.0:
        factor = 1.0 - weight_decay * (1.0 if group["fixed_decay"] else lr)
        torch._foreach_mul_(params, factor)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=beta3)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    updates = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(updates, eps)
    torch._foreach_reciprocal_(updates)
    torch._foreach_mul_(updates, exp_avgs)
    if not group["weight_decouple"] and weight_decay > 0.0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    weight_norms = torch.stack(torch._foreach_norm(params)).clamp_(max=CLAMP)
    p_norms = torch.stack(torch._foreach_norm(updates))
    trust_ratios = torch.where(
        (weight_norms != 0) & (p_norms != 0), weight_norms / (p_norms + eps), 1.0
    ).unbind()
    for p, wn, pn, trust_ratio in zip(params, weight_norms, p_norms, trust_ratios, strict=True):
        state = optimizer.state[p]
        state["weight_norm"], state["adam_norm"], state["trust_ratio"] = wn, pn, trust_ratio
    if not group["adam"]:
        torch._foreach_mul_(updates, trust_ratios)
    torch._foreach_add_(params, updates, alpha=-size)


def _adanorm_grad(grad: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    """The reference's ``get_adanorm_gradient``."""
    exp_grad_norm = state.get("exp_grad_adanorm")
    if not group.get("adanorm", False) or exp_grad_norm is None:
        return grad
    r = group.get("adanorm_r")
    if r is None:
        r = 0.95
    grad_norm = torch.linalg.norm(grad)
    exp_grad_norm.mul_(r).add_(grad_norm, alpha=1.0 - r)
    if grad_norm > 0 and exp_grad_norm > grad_norm:
        return grad.mul(exp_grad_norm.reshape(())).div_(grad_norm)
    return grad


def _update(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    p: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    pre: Tensor | float,
    n_sma: float,
    size: float,
) -> None:
    """The reference's per-parameter ``update``, op for op, on a copy of the gradient."""
    beta1, beta2 = group["betas"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    eps, lr, weight_decay = group["eps"], group["lr"], group["weight_decay"]
    state = optimizer.state[p]
    grad = grad.mul(pre) if isinstance(pre, Tensor) else grad.clone()
    if flag(group["maximize"]):
        grad.neg_()
    if torch.is_complex(p):
        p, grad, exp_avg, exp_avg_sq = (
            torch.view_as_real(t) if torch.is_complex(t) else t
            for t in (p, grad, exp_avg, exp_avg_sq)
        )
    s_grad = _adanorm_grad(grad, group, state)
    exp_avg.mul_(beta1).add_(s_grad, alpha=beta3)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if weight_decay != 0.0 and group["weight_decouple"]:
        p.mul_(1.0 - weight_decay * (1.0 if group["fixed_decay"] else lr))
    if group["rectify"] and size <= 0:
        return
    de_nom: Tensor | None = None
    threshold = getattr(optimizer, "n_sma_threshold", 5)
    if group["rectify"]:
        update = p.clone()
        if n_sma >= threshold:
            de_nom = exp_avg_sq.sqrt().add_(eps)
            update.addcdiv_(exp_avg, de_nom, value=-size)
        else:
            update.add_(exp_avg, alpha=-size)
    else:
        update = exp_avg_sq.sqrt().add_(eps)
        torch.div(exp_avg, update, out=update)
        if not group["weight_decouple"] and weight_decay > 0.0:
            update.add_(p, alpha=weight_decay)
    weight_norm = torch.linalg.norm(p).clamp_(min=0, max=CLAMP)
    p_norm = torch.linalg.norm(update)
    trust_ratio: Any = 1.0 if weight_norm == 0 or p_norm == 0 else weight_norm / (p_norm + eps)
    state["weight_norm"], state["adam_norm"], state["trust_ratio"] = (
        weight_norm,
        p_norm,
        trust_ratio,
    )
    if group["adam"]:
        trust_ratio = 1.0
    if group["rectify"]:
        if n_sma >= threshold:
            assert de_nom is not None
            p.addcdiv_(exp_avg, de_nom, value=-size * trust_ratio)
        else:
            p.add_(exp_avg, alpha=-size * trust_ratio)
    else:
        p.add_(update, alpha=-size * trust_ratio)


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    """The reference's error for a sparse gradient, raised before anything is written."""
    if any(grad.is_sparse for grad in gathered.grads):
        raise no_sparse_gradient("Lamb")


LAMB_SPEC = OptimizerSpec(
    keeps_state_dtype=False,
    state_keys=_state_keys,
    kernel=lamb_kernel,
    torch_step=_torch_step,
    init_state=_init_state,
    step_key=None,
    group_step_key="step",
    has_fused=False,
    sparse_to_torch=True,
    # The reference steps complex params with its per-parameter flavour.
    complex_as_real=False,
    # A DTensor's norms span ranks: torch's ops reduce across them.
    dtensor_in_rust=False,
    numbers=("lr", "weight_decay", "eps"),
    more_numbers=_betas,
    rust_unsupported=_rust_unsupported,
    check_torch_path=_check_torch_path,
    plan_extras=_plan_extras,
)


def global_grad_scale(optimizer: torch.optim.Optimizer) -> Tensor | float:
    """The reference's ``Lamb.get_global_gradient_norm`` (its ``pre_norm`` scale):
    ``min(max_grad_norm / (||all grads|| + eps), 1)`` as a float32 0-d tensor, or 1.0
    where ``max_grad_norm`` is 0."""
    defaults = optimizer.defaults
    if defaults["max_grad_norm"] == 0.0:
        return 1.0
    groups = optimizer.param_groups
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    if not grads:
        squared = torch.zeros(1, dtype=torch.float32, device=device)
    else:
        low = (torch.float16, torch.bfloat16)
        # (the reference's has_foreach_support: dense, one device and dtype)
        batched = (
            all(g.layout == torch.strided for g in grads)
            and len({(g.device, g.dtype) for g in grads}) == 1
            and grads[0].dtype not in low
        )
        norms = (
            list(torch._foreach_norm(grads))
            if batched
            else [(g.float() if g.dtype in low else g).norm() for g in grads]
        )
        squared = torch.stack([n.to(device) for n in norms]).float().square_().sum().reshape(1)
    squared.sqrt_().add_(defaults["eps"])
    return torch.clamp(defaults["max_grad_norm"] / squared, max=1.0).squeeze(0)


class Lamb(RustStepMixin, torch.optim.Optimizer):
    """Drop-in ``pytorch_optimizer.Lamb`` whose CPU step runs in Rust.

    The reference's signature and defaults (``lr=1e-3``, ``betas=(0.9, 0.999)``,
    ``weight_decay=0.0``, ``weight_decouple=True``, ``fixed_decay=False``,
    ``rectify=False``, ``degenerated_to_sgd=False``, ``n_sma_threshold=5``,
    ``grad_averaging=True``, ``max_grad_norm=1.0`` (the ``pre_norm`` reference norm),
    ``adam=False``, ``pre_norm=False``, ``eps=1e-6``, ``foreach=None``,
    ``maximize=False``), its ``state_dict`` format (state ``exp_avg``, ``exp_avg_sq``,
    ``weight_norm``, ``adam_norm``, ``trust_ratio``; the step counter in each param
    group) and its numbers (see the module docs). Like the reference, any other keyword
    is kept in the param groups (``adam_debias``, ``adanorm``, ``adanorm_r`` are read).

    Extra keywords (torch's conventions): ``differentiable`` as in torch.optim;
    ``skip_nonfinite`` skips steps whose gradients hold an inf or nan;
    ``nonfinite_group``: the process group whose ranks agree on skipping; ``ema_decay``
    keeps a moving average of the params (see :mod:`ferroptim._ema`). (The
    reference's ``max_grad_norm`` keeps its meaning: ferroptim's in-step clipping is
    not offered here.)
    """

    _ferro_spec = LAMB_SPEC

    clamp: float = CLAMP

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = False,
        degenerated_to_sgd: bool = False,
        n_sma_threshold: int = 5,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        adam: bool = False,
        pre_norm: bool = False,
        eps: float = 1e-6,
        foreach: bool | None = None,
        maximize: bool = False,
        *,
        differentiable: bool = False,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        # The reference's checks, with its messages.
        check_constructor(
            lr, betas, {"weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "eps": eps}
        )
        # (not swallowed into the defaults as the reference's other extra keywords are:
        # LAMB's two passes keep full-precision states, and says so)
        state_dtype, seed = kwargs.pop("state_dtype", None), kwargs.pop("seed", None)
        rounding = kwargs.pop("stochastic_rounding", False)
        master = kwargs.pop("master_weights", False)
        min_8bit_size = kwargs.pop("min_8bit_size", 4096)
        self.degenerated_to_sgd = degenerated_to_sgd
        self.n_sma_threshold = n_sma_threshold
        self.pre_norm = pre_norm
        self.foreach = foreach
        self.maximize = maximize
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "rectify": rectify,
            "grad_averaging": grad_averaging,
            "max_grad_norm": max_grad_norm,
            "adam": adam,
            "eps": eps,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            **kwargs,
        }
        super().__init__(params, defaults)
        self._ferro_init(
            None,
            skip_nonfinite,
            nonfinite_group,
            ema_decay,
            state_dtype,
            seed,
            rounding,
            master,
            min_8bit_size,
        )

    def __str__(self) -> str:
        return "Lamb"

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A checkpoint of the reference has no `maximize`/`differentiable` group keys
        # (it keeps `maximize` on the optimizer): this optimizer's values fill them.
        for group in self.param_groups:
            group.setdefault("maximize", self.defaults["maximize"])
            group.setdefault("differentiable", False)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The reference scales by the global gradient norm of the gradients the closure
        # left, taken before any group steps.
        with torch.no_grad():
            pre = global_grad_scale(self) if getattr(self, "pre_norm", False) else None
        self.__dict__["_ferro_pre_norm"] = pre
        try:
            _step.step(self, None)
        finally:
            self.__dict__["_ferro_pre_norm"] = None
        return loss

    step = hooked_step(step)


#: The class under the issue's name (``ferroptim.LAMB``); ``Lamb`` is the reference's.
LAMB = Lamb

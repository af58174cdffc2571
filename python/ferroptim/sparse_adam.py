"""SparseAdam: torch.optim's class, its CPU step in Rust over the touched rows
(``rust/kernels/sparse_adam.rs``).

torch's ``sparse_adam`` coalesces each sparse gradient and then runs a dozen sparse and
dense tensor ops over the touched entries (``sparse_mask`` twice, the moment updates, three
sparse additions into dense tensors). Here the gradient is coalesced by torch (so duplicate
indices are summed as torch sums them) and the touched rows are stepped in one pass in
Rust: each row is one run of memory of the (contiguous) param and of its states, and
``GroupPlan.from_rows`` checks that every row lies inside them before anything is written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _config, _core
from ferroptim._hyper import flag
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import sparse_adam, sparse_rows
from ferroptim.adamax import betas_as_numbers

__all__ = ["SparseAdam"]

_KEYS = ("exp_avg", "exp_avg_sq")
_RUST_DTYPES = (torch.float32, torch.float64)
_DENSE_GRAD = "SparseAdam does not support dense gradients, please consider Adam instead"


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return _KEYS


def _rows_step_only(group: dict[str, Any]) -> bool:
    # The shared machinery's dense Rust path (cached plans, one dense kernel per group)
    # never steps SparseAdam: every param takes the "torch" step below, which runs the
    # sparse rows in Rust itself.
    return True


def _no_dense_kernel(group: dict[str, Any]) -> KernelCall:
    raise RuntimeError(_DENSE_GRAD)  # never called: see _rows_step_only


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    params = [p for p in group["params"] if p.grad is not None]
    # torch raises for a dense gradient in its loop, after stepping the counters of the
    # params before it: here before anything is created or written.
    if any(not p.grad.is_sparse for p in params):
        raise RuntimeError(_DENSE_GRAD)
    gathered = Gathered(keys=_KEYS, states=[[], []], has_sparse_grad=bool(params))
    for p in params:
        state = optimizer.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        gathered.params.append(p)
        gathered.grads.append(p.grad)
        gathered.states[0].append(state["exp_avg"])
        gathered.states[1].append(state["exp_avg_sq"])
    return gathered


def _row_plan(param: Tensor, grad: Tensor, states: list[Tensor]) -> _core.GroupPlan | None:
    """The Rust plan over the rows ``grad`` touches, or None when torch's implementation
    must step this param (another device or dtype, a param or state that is not one
    contiguous run, a gradient of another dtype)."""
    if not (
        param.device.type == "cpu"
        and param.dtype in _RUST_DTYPES
        and grad.dtype == param.dtype
        and grad.device.type == "cpu"
        and type(param) in (Tensor, torch.nn.Parameter)
        and param.is_contiguous()
        and all(s.dtype == param.dtype and s.is_contiguous() for s in states)
        and all(s.device.type == "cpu" and s.shape == param.shape for s in states)
        and grad.sparse_dim() > 0
    ):
        return None
    sparse_dim = grad.sparse_dim()
    indices, values = sparse_rows(grad)  # torch's sums of duplicates; sorted, unique rows
    values = values.contiguous()
    row_len = math.prod(param.shape[sparse_dim:])
    strides = torch.tensor(param.stride()[:sparse_dim], dtype=torch.int64)
    offsets = (indices * strides[:, None]).sum(0)
    return _core.GroupPlan.from_rows(
        param.detach(),
        [s.detach() for s in states],
        values.detach(),
        offsets.contiguous().numpy(),
        row_len,
    )


def _kernel_lr(lr: Any) -> bool:
    """Whether the kernel computes torch's step size for this ``lr``: a number, or a
    float32/float64 tensor (torch's arithmetic in that dtype)."""
    return not isinstance(lr, Tensor) or lr.dtype in _RUST_DTYPES


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.dim() != 0:  # torch's `_to_scalar`
        lr = lr.squeeze()
    maximize = group.get("maximize", False)
    in_rust = _config.get_backend() != "torch"
    # Every Rust plan is built (and checked) before anything is written.
    plans: dict[int, _core.GroupPlan] = {}
    for i, (param, grad) in enumerate(zip(gathered.params, gathered.grads, strict=True)):
        states = [gathered.states[0][i], gathered.states[1][i]]
        plan = _row_plan(param, grad, states) if in_rust and _kernel_lr(lr) else None
        if plan is not None:
            plans[i] = plan
    steps = []
    for param in gathered.params:
        state = optimizer.state[param]
        state["step"] += 1
        steps.append(state["step"])
    by_torch = [i for i in range(len(gathered.params)) if i not in plans]
    if by_torch:
        sparse_adam(
            [gathered.params[i] for i in by_torch],
            [gathered.grads[i] for i in by_torch],
            [gathered.states[0][i] for i in by_torch],
            [gathered.states[1][i] for i in by_torch],
            [steps[i] for i in by_torch],
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            maximize=maximize,
        )
    hyper = {"lr": lr, "betas": (beta1, beta2), "eps": group["eps"], "maximize": flag(maximize)}
    for i, plan in plans.items():
        _core.Kernel("sparse_adam", {**hyper, "step": steps[i]}).step(plan)


SPARSE_ADAM_SPEC = OptimizerSpec(
    keeps_state_dtype=False,
    state_keys=_state_keys,
    kernel=_no_dense_kernel,
    torch_step=_torch_step,
    gather=_gather,
    step_key=None,  # a Python int, kept by the torch step above as torch keeps it
    has_fused=False,
    sparse_to_torch=True,
    rust_unsupported=_rows_step_only,
    numbers=("lr", "eps"),
    more_numbers=betas_as_numbers,
)


class SparseAdam(RustStepMixin, torch.optim.SparseAdam):
    """Drop-in :class:`torch.optim.SparseAdam` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step`` as a
    Python int, ``exp_avg``, ``exp_avg_sq``); results match torch's. Sparse (COO)
    gradients of contiguous CPU float32/float64 params step in Rust, one pass over the
    rows they touch; other params step through torch's own implementation.

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = SPARSE_ADAM_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, maximize)
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group, ema_decay)

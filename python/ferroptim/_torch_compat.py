"""Every use of torch's private (underscore or undocumented) APIs, in one place.

ferroptim is a drop-in for ``torch.optim``: to raise torch's errors, create state
exactly as torch does and hand other devices to torch's own kernels, it reaches
into a few of torch's internals. They are gathered here so that a torch upgrade
that moves one breaks one file, and so that a reader sees at a glance what
ferroptim depends on beyond torch's public API.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import _functional as _torch_functional
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import _get_capturable_supported_devices, _get_scalar_dtype
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
)

__all__ = [
    "capturable_devices",
    "foreach_kernel_devices",
    "foreach_mul_",
    "full",
    "fused_kernel_devices",
    "fused_kernel_devices_of",
    "hooked_step",
    "init_group",
    "is_dtensor",
    "lbfgs_cubic_interpolate",
    "lbfgs_torch_step",
    "local",
    "module_tensor_slots",
    "scalar_dtype",
    "sparse_adam",
    "sparse_rows",
    "sparse_values",
    "to_scalar",
]


# -- torch.optim internals ------------------------------------------------------------


def init_group(optimizer: torch.optim.Optimizer, group: dict[str, Any], *lists: Any) -> Any:
    """torch's ``Optimizer._init_group``: creates missing state lazily (raising torch's
    errors) and fills ``lists`` with the group's params that have a grad, their grads,
    state buffers and step counters, in the order each torch class defines; returns what
    that class's ``_init_group`` returns (``has_complex``, ``has_sparse_grad``, ...)."""
    return optimizer._init_group(group, *lists)  # type: ignore[attr-defined]


def scalar_dtype() -> torch.dtype:
    """The dtype torch gives a fresh step counter (float32, or float64 by default dtype)."""
    return _get_scalar_dtype()


def to_scalar(value: Any) -> Any:
    """torch's ``_to_scalar``: a 1-element tensor hyperparameter (``lr``) as a Python number."""
    return _torch_optimizer._to_scalar(value)


def lbfgs_cubic_interpolate(*args: Any, **kwargs: Any) -> Any:
    """``torch.optim.lbfgs._cubic_interpolate``: the line search's scalar interpolation
    (pure scalar code: reused as is, so its arithmetic is torch's)."""
    from torch.optim import lbfgs

    return lbfgs._cubic_interpolate(*args, **kwargs)


def lbfgs_torch_step() -> Callable[..., Any]:
    """``torch.optim.LBFGS.step`` without torch's hook wrapper (which wraps it on the first
    construction of a torch LBFGS): ferroptim's own wrapper has run the hooks already."""
    step = torch.optim.LBFGS.__dict__["step"]
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


def capturable_devices(supports_xla: bool = True) -> list[str]:
    """Device types on which torch accepts ``capturable=True`` (``supports_xla=False``:
    as the optimizers whose check leaves XLA out, Adadelta's for-loop, list them)."""
    return _get_capturable_supported_devices(supports_xla=supports_xla)


def foreach_kernel_devices() -> list[str]:
    """Device types with torch's foreach (multi-tensor) kernels."""
    return _get_foreach_kernels_supported_devices()


def fused_kernel_devices() -> list[str]:
    """Device types with torch's fused optimizer kernels."""
    return _get_fused_kernels_supported_devices()


@functools.cache
def fused_kernel_devices_of(optimizer_class: type) -> frozenset[str]:
    """Device types whose fused kernels ``optimizer_class`` (a ``torch.optim`` class)
    accepts in this torch. torch's device list is shared by every class, but a class
    may refuse one of them: Adagrad's ``fused=True`` refuses CUDA tensors in torch 2.11
    and takes them in 2.15. One tiny fused step on a CUDA device (once per class and
    process) tells."""
    devices = set(_get_fused_kernels_supported_devices())
    if "cuda" in devices and torch.cuda.is_available():
        param = torch.zeros(1, device="cuda", requires_grad=True)
        param.grad = torch.zeros_like(param)
        try:
            optimizer_class([param], fused=True).step()
        except (RuntimeError, ValueError):
            devices.discard("cuda")
    return frozenset(devices)


def hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` wrapped the way ``torch.optim.Optimizer`` wraps it (step pre/post hooks, a
    profiler range), but the machinery is skipped when there is nothing to run it for:
    torch's wrapper opens a ``record_function`` range every step, which alone costs more
    than stepping a small model. The check reads torch's hook dicts in place (no calls:
    it runs every step)."""
    full_wrapper = torch.optim.Optimizer.profile_hook_step(step)
    # Under torch.compile the step runs eagerly, as one graph break at the call: its
    # Rust calls are opaque to dynamo, and tracing into them would only add breaks (and
    # warnings) inside.
    eager = torch.compiler.disable(full_wrapper, recursive=True)
    profiler_enabled = torch._C._autograd._profiler_enabled

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager(self, *args, **kwargs)
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _torch_optimizer._global_optimizer_pre_hooks
            or _torch_optimizer._global_optimizer_post_hooks
            or profiler_enabled()
        ):
            return full_wrapper(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()  # what torch's wrapper runs after each step
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]  # tells torch not to wrap it again
    return wrapper


# -- nn.Module internals ------------------------------------------------------------------


def module_tensor_slots(module: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The module's own parameter and buffer dicts (name -> tensor or None), as stored:
    assigning into them restores a slot without the checks ``setattr`` runs."""
    return module._parameters, module._buffers


# -- tensor internals --------------------------------------------------------------------


def foreach_mul_(tensors: list[Tensor], factor: Tensor) -> None:
    """``torch._foreach_mul_``: multiplies every tensor in place (GradScaler's unscale)."""
    torch._foreach_mul_(tensors, factor)


def sparse_values(tensor: Tensor) -> Tensor:
    """The values of a sparse tensor, duplicates summed."""
    return tensor.coalesce()._values()


def sparse_rows(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """(indices, values) of a sparse COO tensor, duplicates summed by torch, sorted."""
    coalesced = tensor.coalesce()
    return coalesced._indices(), coalesced._values()


#: torch's functional SparseAdam (no public ``torch.optim.sparse_adam``).
sparse_adam = _torch_functional.sparse_adam


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (only possible once the user has imported
    ``torch.distributed.tensor``: this never imports it)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor), else the tensor."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def full(tensor: Tensor) -> Tensor:
    """A replicated DTensor as a plain tensor."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]

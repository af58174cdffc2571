"""Bitwise snapshots of everything a tuning run touches, restored in place afterwards.

A tuning run trains for real (forward, backward, ``optimizer.step()``), so it changes the
model's parameters, buffers (BatchNorm's running statistics and ``num_batches_tracked``),
gradients and train/eval flags, the optimizer's state and hyperparameters, a GradScaler's
scale and growth tracker, and every random number generator it draws from (dropout, a
shuffling DataLoader). :class:`Snapshot` records all of them before the run and puts them
back bit for bit afterwards, whether the run finished, stopped early, raised or was
interrupted (the caller restores in a ``finally``).

Parameters and buffers are restored *in place* (``copy_`` into the original tensors, the
original objects put back into their modules), so the optimizer, hooks and anything else
holding a reference to them keep seeing the same tensors.
"""

from __future__ import annotations

import copy
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ferroptim._torch_compat import module_tensor_slots

_MISSING = object()


@dataclass
class _TensorSlot:
    """One entry of a module's ``_parameters`` or ``_buffers`` dict, and its saved value."""

    container: dict[str, Any]
    name: str
    original: Tensor | None


@dataclass
class ModuleSnapshot:
    """Parameters, buffers, gradients and train/eval flags of a module tree."""

    slots: list[_TensorSlot] = field(default_factory=list)
    values: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    grads: list[tuple[Tensor, Tensor | None, Tensor | None]] = field(default_factory=list)
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)

    @classmethod
    def take(cls, model: nn.Module, extra: list[Tensor] | None = None) -> ModuleSnapshot:
        """``extra``: tensors stepped alongside the model (an optimizer's params that are
        not the model's, such as a learned temperature kept outside it)."""
        snap = cls()
        for module in model.modules():
            snap.training.append((module, module.training))
            for container in module_tensor_slots(module):
                for name, tensor in container.items():
                    snap.slots.append(_TensorSlot(container, name, tensor))
                    if tensor is not None and id(tensor) not in snap.values:
                        # A tensor shared by several modules (tied weights) is saved once.
                        snap.values[id(tensor)] = (tensor, tensor.detach().clone())
        params: list[Tensor] = list(model.parameters())
        for tensor in extra or []:
            if id(tensor) not in snap.values:
                snap.values[id(tensor)] = (tensor, tensor.detach().clone())
                params.append(tensor)
        for param in params:
            grad = param.grad
            snap.grads.append((param, grad, None if grad is None else grad.detach().clone()))
        return snap

    @torch.no_grad()
    def restore(self) -> None:
        for slot in self.slots:
            # Put the original object back if the run replaced it (``module.buf = new``).
            slot.container[slot.name] = slot.original
        for tensor, saved in self.values.values():
            _copy_back(tensor, saved)
        for param, grad, saved_grad in self.grads:
            param.grad = grad
            if grad is not None and saved_grad is not None:
                _copy_back(grad, saved_grad)
        for module, training in self.training:
            module.training = training  # not .train(): that would recurse into children


def _copy_back(tensor: Tensor, saved: Tensor) -> None:
    if tensor.shape == saved.shape and tensor.dtype == saved.dtype:
        if tensor.device == saved.device:
            tensor.copy_(saved)
            return
    # The run changed the tensor's dtype, shape or device (``model.half()``, ``.to()``):
    # swap the saved data back in under the same Python object.
    tensor.data = saved


@dataclass
class RngSnapshot:
    """Python's ``random``, NumPy's global generator (if NumPy is imported), torch's CPU
    generator and every CUDA device's generator."""

    python: Any
    numpy: Any
    cpu: Tensor
    cuda: list[Tensor] | None
    cuda_was_initialized: bool

    @classmethod
    def take(cls) -> RngSnapshot:
        numpy = sys.modules.get("numpy")
        # Reading the CUDA states initialises CUDA; a process that has not touched CUDA yet
        # is left alone here and handled in restore().
        cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            python=random.getstate(),
            numpy=None if numpy is None else numpy.random.get_state(),
            cpu=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state_all() if cuda_ready else None,
            cuda_was_initialized=cuda_ready,
        )

    def restore(self) -> None:
        random.setstate(self.python)
        numpy = sys.modules.get("numpy")
        if self.numpy is not None and numpy is not None:
            numpy.random.set_state(self.numpy)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            # CUDA was first initialised during the run. Its generators started from their
            # seed at offset 0 (the seed torch.manual_seed queued, or the default one);
            # reseeding each with its own initial seed returns it to exactly that state.
            for generator in torch.cuda.default_generators:
                generator.manual_seed(generator.initial_seed())


@dataclass
class OptimizerSnapshot:
    """The optimizer's full ``state_dict`` (state tensors copied, step counters included)
    and ferroptim's ``last_grad_norm``, which is not part of it."""

    optimizer: torch.optim.Optimizer
    state_dict: dict[str, Any]
    last_grad_norm: Any

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
        # state_dict() hands out the live state tensors: copy them, they change in place.
        return cls(
            optimizer,
            copy.deepcopy(optimizer.state_dict()),
            getattr(optimizer, "last_grad_norm", _MISSING),
        )

    def restore(self) -> None:
        # load_state_dict is every optimizer's own way back (ferroptim's restores
        # skipped_steps with it; third-party optimizers may keep extra entries there).
        self.optimizer.load_state_dict(self.state_dict)
        if self.last_grad_norm is not _MISSING:
            self.optimizer.last_grad_norm = self.last_grad_norm  # type: ignore[attr-defined]


@dataclass
class ScalerSnapshot:
    """Everything a GradScaler holds. Its public ``state_dict`` leaves out the lazily
    created scale tensor and the per-optimizer stage that an interruption between
    ``scaler.step`` and ``scaler.update`` would leave behind, so the whole instance
    dictionary is copied instead."""

    scaler: Any
    attributes: dict[str, Any]

    @classmethod
    def take(cls, scaler: Any) -> ScalerSnapshot:
        return cls(scaler, copy.deepcopy(vars(scaler)))

    def restore(self) -> None:
        attributes = vars(self.scaler)
        attributes.clear()
        attributes.update(self.attributes)


@dataclass
class Snapshot:
    """Model, optimizer, GradScaler and RNG states, taken together, restored together."""

    model: ModuleSnapshot
    rng: RngSnapshot
    optimizer: OptimizerSnapshot | None = None
    scaler: ScalerSnapshot | None = None

    @classmethod
    def take(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
    ) -> Snapshot:
        return cls(
            model=ModuleSnapshot.take(model, _optimizer_params(optimizer)),
            rng=RngSnapshot.take(),
            optimizer=None if optimizer is None else OptimizerSnapshot.take(optimizer),
            scaler=None if scaler is None else ScalerSnapshot.take(scaler),
        )

    def restore(self) -> None:
        # The model first: the optimizer's load_state_dict casts its state to the params'
        # dtype and device, which must be the restored ones if the run moved the model.
        self.model.restore()
        if self.optimizer is not None:
            self.optimizer.restore()
        if self.scaler is not None:
            self.scaler.restore()
        self.rng.restore()


def _optimizer_params(optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    if optimizer is None:
        return []
    return [p for group in optimizer.param_groups for p in group["params"]]

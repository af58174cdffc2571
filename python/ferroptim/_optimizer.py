"""The base of every ferroptim optimizer: :class:`RustStepMixin`.

Each optimizer class subclasses its ``torch.optim`` counterpart (so the
constructor, defaults, validation, ``state_dict`` format and hooks are torch's
own; an optimizer torch lacks subclasses ``torch.optim.Optimizer``), mixes in
:class:`RustStepMixin`, which replaces ``step``, and declares its family in one
:class:`~ferroptim._spec.OptimizerSpec` (``_ferro_spec``).

Where the machinery lives:

* :mod:`ferroptim._step` — the step driver: prepare every group, clip / unscale /
  skip, run (so an error in any group leaves every tensor as it was).
* :mod:`ferroptim._prepare` — the slow path: routing to Rust or torch, torch's
  errors raised up front, tensor layout for the kernels, plan caching.
* :mod:`ferroptim._jobs` — what the prepare phase hands the run phase.
* :mod:`ferroptim._layout` — tensor layout helpers.
* :mod:`ferroptim._hyper` — reading hyperparameters as torch's step reads them.
* :mod:`ferroptim._torch_compat` — every use of torch's private APIs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ferroptim import _core, _step
from ferroptim._ema import EmaMixin
from ferroptim._jobs import CachedPlan, Job
from ferroptim._lowp import LowPrecisionMixin
from ferroptim._prepare import prepare_slow
from ferroptim._spec import OptimizerSpec
from ferroptim._torch_compat import hooked_step, scalar_dtype

__all__ = ["RustStepMixin"]

# Locate where torch keeps tensor metadata (the cached plans' re-check reads it
# directly, see rust/py/native.rs) now, on plain CPU probe tensors, rather than at a
# first step that may run under inference mode.
with torch.inference_mode(False):
    _core._native_recheck()


class RustStepMixin(EmaMixin, LowPrecisionMixin):
    """Steps CPU float tensors in Rust, everything else through torch (see module docs).

    Subclasses describe their optimizer family with one :class:`OptimizerSpec`, their
    ``_ferro_spec``; they override nothing.
    """

    #: The optimizer family: what the shared machinery needs to know about it.
    _ferro_spec: ClassVar[OptimizerSpec]

    # torch.optim.Optimizer provides these.
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    #: Clip the global L2 norm of all gradients to this inside ``step`` (None: off).
    max_grad_norm: float | None
    #: Global gradient norm seen by the last ``step`` when ``max_grad_norm`` is set.
    last_grad_norm: Tensor | None
    #: Skip steps whose gradients hold an inf or nan (``"warn"``: and warn).
    skip_nonfinite: bool | str
    #: Steps skipped because of non-finite gradients (with ``skip_nonfinite``).
    skipped_steps: int
    #: Process group whose ranks agree on skipping (an optimizer that sees only this
    #: rank's shard of the parameters, as under ZeroRedundancyOptimizer); None: local.
    nonfinite_group: Any

    def _ferro_init(
        self,
        max_grad_norm: float | None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
        ema_decay: float | None = None,
        state_dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        """Call at the end of ``__init__``."""
        self._ema_init(ema_decay)
        self._lowp_init(state_dtype, seed, stochastic_rounding, master_weights, min_8bit_size)
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
            if not max_grad_norm > 0.0:
                raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if skip_nonfinite not in (False, True, "warn"):
            raise ValueError(
                f"skip_nonfinite must be False, True or 'warn', got {skip_nonfinite!r}"
            )
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.nonfinite_group = nonfinite_group
        self.skipped_steps = 0
        self.last_grad_norm = None
        # `_step_supports_amp_scaling` is torch's to set: its __init__ (run above) sets it
        # only with `fused=True`, and Lightning and accelerate read it as "fused" (no
        # gradient clipping, no skip reporting). With it, GradScaler hands `step` its
        # `grad_scale` and `found_inf` and the kernel unscales as it reads (the in-kernel
        # path `fused=True` asks for, or a user who sets the attribute). Without it,
        # GradScaler unscales the gradients itself and skips non-finite steps, as for
        # torch's default optimizers. `__setstate__` (so `load_state_dict`) leaves it alone,
        # as torch's does.

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        return _step.step(self, closure)

    step = hooked_step(step)

    def _prepare_slow(self, group: dict[str, Any], plans: dict[int, CachedPlan]) -> Job:
        # The step's slow path for one group (a method, so that a test can count the
        # slow preparations of one optimizer; see tests/_safety.py).
        return prepare_slow(self, group, plans)

    _FERRO_SETTINGS = ("max_grad_norm", "skip_nonfinite", "skipped_steps", "nonfinite_group")

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[assignment]
        for name in self._FERRO_SETTINGS:
            state[name] = self.__dict__.get(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here too: every cached pointer may be stale.
        self.__dict__.pop("_ferro_plans", None)
        self.__dict__.pop("_ferro_snapshot", None)
        settings = {name: state.pop(name, self.__dict__.get(name)) for name in self._FERRO_SETTINGS}
        super().__setstate__(state)  # type: ignore[misc]
        self.max_grad_norm = settings["max_grad_norm"]
        self.skip_nonfinite = settings["skip_nonfinite"] or False
        self.skipped_steps = settings["skipped_steps"] or 0
        self.nonfinite_group = settings["nonfinite_group"]
        self.__dict__.setdefault("last_grad_norm", None)

    def state_dict(self, compact: bool = False) -> dict[str, Any]:
        """torch's ``state_dict``; with ``skip_nonfinite`` it also records ``skipped_steps``
        (torch's ``load_state_dict`` ignores the extra key). 8-bit states
        (``state_dtype="8bit"``) are saved dequantized, as float32 tensors shaped like
        their params, which torch.optim and every ferroptim optimizer load; with
        ``compact=True`` as they are kept, packed (about a quarter of the bytes), which
        ferroptim optimizers load into any ``state_dtype``."""
        state_dict = super().state_dict()  # type: ignore[misc]
        if not compact:
            self._lowp_dequantize(state_dict)
        if self.skip_nonfinite:
            state_dict["skipped_steps"] = self.skipped_steps
        self._steps_on_host(state_dict)
        return state_dict

    def _steps_on_host(self, state_dict: dict[str, Any]) -> None:
        """Where ferroptim chose torch's fused kernels for a group (CUDA params, ``fused``
        left unset), they count ``step`` on the device; torch's default there (foreach)
        counts it on the CPU, and torch's ``load_state_dict`` leaves a ``step`` where it
        is unless the saved group says fused or capturable. So the checkpoint holds it
        on the CPU, as torch's default optimizer's would (the live state is untouched;
        loaded back, the next fused step moves it to the device again)."""
        step_key = self._ferro_spec.step_key
        if step_key is None or not self._ferro_spec.has_fused:
            return
        states = state_dict["state"]
        for group in state_dict["param_groups"]:
            if group.get("fused") or group.get("capturable"):
                continue
            for index in group["params"]:
                state = states.get(index)
                step = state.get(step_key) if state else None
                if isinstance(step, Tensor) and step.device.type != "cpu":
                    host = torch.tensor(float(step), dtype=scalar_dtype())
                    states[index] = {**state, step_key: host}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        skipped = state_dict.get("skipped_steps")
        settings = self._lowp_before_load(state_dict)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._ema_defaults()
        self._lowp_after_load(settings)
        if skipped is not None:
            self.skipped_steps = int(skipped)

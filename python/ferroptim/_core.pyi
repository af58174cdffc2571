"""Type stub for ferroptim's Rust extension (rust/py/). Internal: use the public API."""

from collections.abc import Sequence

import torch

__version__: str

class GroupPlan:
    """A parameter group as engine buffers (rust/py/plan.rs)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        states: Sequence[dict[str, object]],
        state_keys: Sequence[str],
        step_key: str | None,
    ) -> None: ...
    @staticmethod
    def from_tensors(
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[Sequence[torch.Tensor]],
        steps: Sequence[torch.Tensor | None],
    ) -> GroupPlan: ...
    @staticmethod
    def from_grads(grads: Sequence[torch.Tensor]) -> GroupPlan: ...
    @staticmethod
    def from_arrays(
        params: Sequence[object],
        grads: Sequence[object],
        states: Sequence[tuple[str, Sequence[object]]],
        step: float | None,
    ) -> GroupPlan: ...
    def gather(self) -> bool: ...
    def release(self) -> None: ...

class StateSnapshot:
    """The optimizer's ``state`` mapping as plans saw it."""

    def __init__(self, state: dict[object, object]) -> None: ...
    def matches(self, state: dict[object, object]) -> bool: ...

def adam_step(
    plan: GroupPlan,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    unscale: float,
    clip: float,
    lr_is_f32: bool,
) -> None: ...
def sgd_step(
    plan: GroupPlan,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    unscale: float,
    clip: float,
) -> None: ...
def rmsprop_step(
    plan: GroupPlan,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    unscale: float,
    clip: float,
) -> None: ...
def adagrad_step(
    plan: GroupPlan,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    unscale: float,
    clip: float,
    lr_is_f32: bool,
) -> None: ...
def grad_norms(
    plans: Sequence[GroupPlan], norm_type: float, grads_only: bool, unscale: float = 1.0
) -> tuple[list[float], bool]: ...
def grads_finite(plans: Sequence[GroupPlan], grads_only: bool) -> bool: ...
def scale_grads(plan: GroupPlan, factor: float) -> None: ...
def clamp_grads(plan: GroupPlan, clip: float) -> None: ...
def stream_probe(plan: GroupPlan) -> None: ...
def simd_level() -> str: ...
def set_simd_level(level: str | None) -> str: ...
def supported_simd_levels() -> list[str]: ...
def environment_errors() -> list[str]: ...
def get_num_threads() -> int: ...
def set_num_threads(threads: int) -> None: ...
def max_num_threads() -> int: ...
def _panic_for_tests() -> None: ...
def _native_recheck(disable: bool | None = None) -> bool: ...

"""The slow path of the prepare phase: a group without a valid cached plan.

1. **Route** each param to Rust (CPU float32/float64, complex as real views, plain
   tensors or DTensors) or to torch (other devices and dtypes, sparse grads where
   torch takes them, tensor subclasses, ``differentiable=True``, the backend forced to
   ``"torch"``, hyperparameters the kernels cannot reproduce).
2. **Check** what torch would raise mid-step (hyperparameters, step counters,
   capturable devices, per-step scalars), before any tensor is written.
3. **Gather** with the spec (torch's ``_init_group``, creating state lazily).
4. **Lay out** the Rust-routed tensors (:func:`prepare_rust`: staged copies, state
   re-laid out, aliased grads) and build one-shot plans; choose torch's implementation
   for the rest (:func:`prepare_torch`).
5. After the run, **cache** a plan (:func:`cache_plan`) the next step re-checks instead.

Every function reads the optimizer's family from its ``_ferro_spec``
(:class:`~ferroptim._spec.OptimizerSpec`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ferroptim import _config, _core, _q8
from ferroptim._ema import EMA_KEY, ema_weight, fused_ema_keys
from ferroptim._hyper import flag
from ferroptim._jobs import CachedPlan, GradFactors, Job
from ferroptim._layout import (
    is_dense,
    is_lazy,
    is_plain,
    laid_out_like,
    real,
    resolved,
    same_layout,
    staged,
    storage_key,
)
from ferroptim._lowp import (
    LOW_PARAM_DTYPES,
    MASTER_KEY,
    MASTER_STATE,
    MIN_8BIT_KEY,
    QUANTIZED_STATES,
    ROUNDING_KEY,
    STATE_DTYPE_KEY,
    check_low_grads,
    fits_as_master,
    has_master,
    is_packed,
    low_params,
    narrow_states,
    pack,
    quantized_keys,
    round_new_states,
    rounding_key,
    stand_ins,
    state_dtype_for,
    states_of_stand_ins,
    store_params,
    widen_states,
)
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec, always, never
from ferroptim._torch_compat import (
    capturable_devices,
    foreach_kernel_devices,
    foreach_mul_,
    fused_kernel_devices_of,
    is_dtensor,
    local,
    scalar_dtype,
)

if TYPE_CHECKING:
    from ferroptim._optimizer import RustStepMixin

__all__ = ["cache_plan", "plan_key", "prepare_slow"]

RUST_DTYPES = (torch.float32, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
NO_STATE: dict[str, Any] = {}


def _as_torch(optimizer: RustStepMixin) -> torch.optim.Optimizer:
    # Every RustStepMixin is also a torch.optim.Optimizer (the class mixes both in).
    return cast("torch.optim.Optimizer", optimizer)


def plan_key(optimizer: RustStepMixin, group: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a cached plan was made for; None: this group always takes the slow path
    (where torch's errors are raised and torch's path is chosen)."""
    # Every step reads this: plain truthiness (torch's `if capturable:`), the backend
    # global, and no calls to the specs' default checks.
    spec = optimizer._ferro_spec
    usual, unsupported = spec.usual, spec.rust_unsupported
    if (
        group.get("capturable")
        or (usual is not always and not usual(group))
        or (unsupported is not never and unsupported(group))
    ):
        return None
    return (
        spec.state_keys(group) + fused_ema_keys(spec, group),
        group.get("differentiable", False),
        _config._backend,
        group.get(STATE_DTYPE_KEY),
        group.get(MIN_8BIT_KEY),
        bool(group.get(ROUNDING_KEY)),
        bool(group.get(MASTER_KEY)),
        # (bfloat16 params: fused=True hands them to torch's fused kernel)
        group.get("fused"),
    )


# -- the slow path ------------------------------------------------------------------------


def prepare_slow(
    optimizer: RustStepMixin, group: dict[str, Any], plans: dict[int, CachedPlan]
) -> Job:
    """Prepares ``group`` from scratch (see module docs); the job caches a plan after it
    runs."""
    spec = optimizer._ferro_spec
    differentiable = group.get("differentiable", False)
    new_state = [p for p in group["params"] if p.grad is not None and not optimizer.state.get(p)]
    with torch.set_grad_enabled(differentiable):
        rust_params, torch_params = route(optimizer, group)
        has_grads = any(p.grad is not None for p in rust_params)
        # Hyperparameters first: converted (or refused) before any state is made.
        kernel = spec.kernel(group) if has_grads else None
        if torch_params:
            spec.check_hyperparameters(group)
        if has_grads:
            _init_master_states(optimizer, group, rust_params)
        gathered = (
            spec.gather_group(_as_torch(optimizer), {**group, "params": rust_params})
            if has_grads
            else None
        )
        torch_run, torch_grads = (
            prepare_torch(optimizer, group, torch_params) if torch_params else (None, [])
        )
        rust = None
        if gathered is not None and gathered.params:
            check_torch_step(spec, gathered, group)
            rust = prepare_rust(optimizer, gathered, group)

    stochastic = rounding_key(optimizer.param_groups, group)

    def run(factors: GradFactors) -> None:
        if rust is not None and kernel is not None:
            rust.run(kernel, factors, stochastic)
        if torch_run is not None:
            with torch.set_grad_enabled(differentiable):
                torch_run(factors)
        cache_plan(optimizer, group, plans)

    if rust is None:
        return Job([], torch_grads, run, new_state)
    return Job(
        [plan for plan, _, _, _ in rust.plans],
        torch_grads,
        run,
        new_state,
        rust.norm_plans,
        rust.dtensor_grads,
        rust.ema_fused,
    )


def route(optimizer: RustStepMixin, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    """Splits the group's params into (Rust, torch) by device, dtype, type, grad, state
    and settings."""
    if (
        group.get("differentiable", False)
        or _config.get_backend() == "torch"
        or optimizer._ferro_spec.rust_unsupported(group)
    ):
        low = low_params(group)
        for p in group["params"]:
            _check_low_param_off_rust(optimizer, group, p, low)
        return [], list(group["params"])
    rust: list[Tensor] = []
    other: list[Tensor] = []
    low = low_params(group)
    narrow_in_rust = low or _rounds_like_torch_in_rust(optimizer._ferro_spec, group)
    for p in group["params"]:
        if _steps_in_rust(optimizer, p, narrow_in_rust):
            rust.append(p)
            continue
        if p.grad is not None and not (p.is_floating_point() or p.is_complex()):
            raise RuntimeError(
                f"{type(optimizer).__name__}: a parameter of dtype {p.dtype} has a gradient; "
                "only floating-point and complex parameters can be optimized"
            )
        _check_low_param_off_rust(optimizer, group, p, low)
        other.append(p)
    return rust, other


def _check_low_param_off_rust(
    optimizer: RustStepMixin, group: dict[str, Any], p: Tensor, low: bool
) -> None:
    # master_weights / stochastic_rounding step float32 stand-ins on torch's path (any
    # device); not through autograd (differentiable=True) nor for tensor subclasses
    # (DTensor shards), where a bfloat16 param would silently step as torch's for-loop does.
    if (
        low
        and p.grad is not None
        and p.dtype in LOW_PARAM_DTYPES
        and (group.get("differentiable", False) or not is_plain(p))
    ):
        raise ValueError(
            f"{type(optimizer).__name__}: master_weights and stochastic_rounding step "
            f"plain bfloat16/float16 params without differentiable=True; this one "
            f"({type(p).__name__}, differentiable={group.get('differentiable', False)}) "
            "cannot have them"
        )


def _init_master_states(
    optimizer: RustStepMixin, group: dict[str, Any], params: list[Tensor]
) -> None:
    """A param with a float32 master copy gets, on its first step, the state the float32
    optimizer would make for the master (Adagrad's initial accumulator, Rprop's step
    sizes are not bfloat16 values): the spec gathers float32 stand-ins, whose state and
    values (the master copy) become the param's."""
    fresh = [
        p
        for p in params
        if has_master(group, p) and p.grad is not None and not optimizer.state.get(p)
    ]
    if not fresh:
        return
    stand_ins = []
    for p in fresh:
        stand_in = torch.empty_like(p, dtype=torch.float32).copy_(p.detach())
        stand_in.grad = cast("Tensor", p.grad).float()
        stand_ins.append(stand_in)
    optimizer._ferro_spec.gather_group(_as_torch(optimizer), {**group, "params": stand_ins})
    for p, stand_in in zip(fresh, stand_ins, strict=True):
        state = optimizer.state.pop(stand_in, {})
        state[MASTER_STATE] = stand_in
        stand_in.grad = None
        optimizer.state[p] = state


def _rounds_like_torch_in_rust(spec: OptimizerSpec, group: dict[str, Any]) -> bool:
    """Whether the group's bfloat16/float16 params (without master copies or stochastic
    rounding) step in Rust as torch's for-loop steps them (its foreach implementation
    rounds alike): a kernel that has that loop, states in the param's dtype, plain-number
    hyperparameters, and not ``fused=True`` (torch's fused kernels compute in float32
    and round once: they stay torch's)."""
    return (
        spec.rounds_like_torch
        and group.get(STATE_DTYPE_KEY) is None
        and not group.get("fused")
        and not isinstance(group.get("lr"), Tensor)
        and not _tensor_betas(group.get("betas"))
    )


def _tensor_betas(betas: Any) -> bool:
    # (malformed betas are torch's to refuse, with its own error, wherever they step)
    return isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas)


def _steps_in_rust(optimizer: RustStepMixin, p: Tensor, narrow_in_rust: bool) -> bool:
    """Whether ``p`` steps in Rust; ``narrow_in_rust``: its group steps bfloat16/float16
    params there (master copies, stochastic rounding, or torch's for-loop rounding)."""
    grad = p.grad
    spec = optimizer._ferro_spec
    return (
        p.device.type == "cpu"
        and (
            p.dtype in RUST_DTYPES
            or (spec.complex_as_real and p.dtype in _COMPLEX_DTYPES)
            or (narrow_in_rust and p.dtype in LOW_PARAM_DTYPES and is_plain(p))
        )
        and not (spec.sparse_to_torch and grad is not None and grad.is_sparse)
        and (is_plain(p) or (spec.dtensor_in_rust and is_dtensor(p)))
        and (grad is None or is_plain(grad) or is_dtensor(grad))
        and step_plannable(optimizer, p)
        and not any(
            isinstance(v, Tensor) and v.is_sparse for v in optimizer.state.get(p, NO_STATE).values()
        )
        and not (
            spec.own_grad_alias_to_torch
            and grad is not None
            and is_plain(grad)
            and storage_key(grad) is not None
            and storage_key(grad) == storage_key(p)
        )
    )


def step_plannable(optimizer: RustStepMixin, param: Tensor) -> bool:
    """Whether the param's step counter is one the Rust step can keep: a family whose
    torch step only increments it (RMSprop) steps any other shape of counter torch's
    way; the others raise torch's error in the prepare phase."""
    spec = optimizer._ferro_spec
    state = optimizer.state.get(param, NO_STATE)
    if spec.scalar_dtype_kept and any(
        isinstance(v, Tensor) and v.dtype not in RUST_DTYPES
        for v in (state.get(key) for key in spec.scalar_keys)
    ):
        return False
    if spec.step_key is None:
        return True
    step = state.get(spec.step_key)
    if not spec.step_must_be_tensor and step is not None and not isinstance(step, Tensor):
        return False
    return spec.reads_step or not isinstance(step, Tensor) or step.numel() == 1


# -- what torch would raise mid-step ----------------------------------------------------


def check_torch_step(
    spec: OptimizerSpec, gathered: Gathered, group: dict[str, Any], *, for_loop: bool = True
) -> None:
    """Raises now what torch's functional (``for_loop``: its for-loop) would raise
    while stepping ``gathered``: a step counter that is not a tensor, a capturable step
    on CPU, a counter that is not a 1-element tensor (where the step reads it),
    per-step scalars its Python cannot compute."""
    if (
        spec.step_key is not None
        and spec.step_must_be_tensor
        and not all(isinstance(s, Tensor) for s in gathered.steps)
    ):
        raise RuntimeError(spec.step_type_message)
    _check_capturable(spec, gathered, group)
    if spec.step_key is not None and for_loop and spec.reads_step:
        for s in gathered.steps:
            if isinstance(s, Tensor) and s.numel() != 1:  # torch's `step_t.item()`
                raise RuntimeError(
                    f"a Tensor with {s.numel()} elements cannot be converted to Scalar"
                )
        if not spec.usual(group):
            spec.check_step_scalars(group, gathered)


def _check_capturable(spec: OptimizerSpec, gathered: Gathered, group: dict[str, Any]) -> None:
    """torch's check (an AssertionError) that a capturable step runs on a device CUDA
    graphs can capture, with the step counter (and other scalar state, NAdam's
    ``mu_product``) on the param's device."""
    if not flag(group.get("capturable", False)):
        return
    devices = capturable_devices(supports_xla=spec.capturable_xla)
    scalars = [gathered.scalars.get(key, []) for key in spec.scalar_keys]
    for i, (param, step) in enumerate(zip(gathered.params, gathered.steps, strict=False)):
        on_device = [step, *(values[i] for values in scalars if i < len(values))]
        if not (
            all(isinstance(t, Tensor) and t.device.type == param.device.type for t in on_device)
            and param.device.type in devices
        ):
            # (torch names the scalar state lists: "params, mu_products and state_steps")
            names = spec.capturable_names or (
                ", ".join(["params", *(f"{key}s" for key in spec.scalar_keys)]) + " and state_steps"
            )
            raise AssertionError(
                f"If capturable=True, {names} must be on supported devices: {devices}."
            )


# -- torch's path -------------------------------------------------------------------------


def _foreach_supported(params: list[Tensor]) -> bool:
    devices = foreach_kernel_devices()
    return all(p.device.type in devices for p in params)


def _torch_class(optimizer: RustStepMixin) -> type:
    """The ``torch.optim`` class a ferroptim class subclasses (``torch.optim.Optimizer``
    itself for the optimizers torch lacks)."""
    return next(c for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim"))


def torch_implementation(
    spec: OptimizerSpec,
    group: dict[str, Any],
    params: list[Tensor],
    has_sparse_grad: bool,
    torch_class: type,
) -> tuple[bool, bool]:
    """(foreach, fused) for torch's implementation: the user's choice if made, else
    torch's fused kernels where they exist, else foreach, else the for-loop. Tensor
    subclasses and CPU groups the Rust kernels cannot reproduce take the for-loop, as
    in torch's own default."""
    if group.get("differentiable", False) or has_sparse_grad:
        return False, False
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        return False, True
    if fused is not None or foreach is not None:
        return bool(foreach), False
    if not all(is_plain(p) for p in params) or (
        spec.rust_unsupported(group) and all(p.device.type == "cpu" for p in params)
    ):
        return False, False
    if spec.has_fused and all(
        p.device.type in fused_kernel_devices_of(torch_class) and p.is_floating_point()
        for p in params
    ):
        return False, True
    return _foreach_supported(params), False


def _fused_fits(spec: OptimizerSpec, gathered: Gathered) -> bool:
    """Whether the gathered state (made earlier, perhaps for another implementation)
    and params suit torch's fused kernels, which we chose for the user."""
    if spec.step_key is not None and not all(
        s.dtype == torch.float32 and s.device == p.device
        for s, p in zip(gathered.steps, gathered.params, strict=True)
    ):
        return False  # foreach takes any step tensor
    if any(
        any(b is None for b in buffers) and not all(b is None for b in buffers)
        for buffers in gathered.states
    ):
        return False  # torch's fused SGD creates momentum buffers only when all are new
    return True


def _steps_to_devices(optimizer: RustStepMixin, gathered: Gathered) -> None:
    """torch's fused kernels count steps in float32 tensors on the param's device. A
    step kept on the CPU (a checkpoint: ours keeps it there, as torch's default
    optimizer does, see ``RustStepMixin.state_dict``) moves there, as torch's
    ``load_state_dict`` moves it for a fused group; its value is unchanged."""
    step_key = optimizer._ferro_spec.step_key
    if step_key is None:
        return
    for i, (step, param) in enumerate(zip(gathered.steps, gathered.params, strict=True)):
        if step.device != param.device and step.device.type == "cpu" and step.dim() == 0:
            moved = step.to(device=param.device, dtype=torch.float32)
            gathered.steps[i] = optimizer.state[param][step_key] = moved


def _lay_out_for_fused(optimizer: RustStepMixin, gathered: Gathered) -> None:
    """torch's fused kernels walk a grad (and each state buffer) in its param's memory
    order: anything laid out differently would be mis-stepped."""
    gathered.grads = [
        g if g.is_sparse else laid_out_like(g, p)
        for g, p in zip(gathered.grads, gathered.params, strict=True)
    ]
    # Our state buffers (SGD's, cloned from a grad, keep its layout): re-laid out once,
    # for good, values unchanged.
    for key, buffers in zip(gathered.keys, gathered.states, strict=True):
        for i, (param, buffer) in enumerate(zip(gathered.params, buffers, strict=True)):
            if buffer is not None and not same_layout(buffer, param):
                buffers[i] = optimizer.state[param][key] = laid_out_like(buffer, param)


def prepare_torch(
    optimizer: RustStepMixin, group: dict[str, Any], params: list[Tensor]
) -> tuple[Callable[[GradFactors], None], list[Tensor]]:
    """Gathers ``params`` for torch's implementation (or the spec's own torch-op code)
    and returns the run function and the grads it reads. bfloat16/float16 params with
    master copies or stochastic rounding step as float32 stand-ins (see
    :func:`ferroptim._lowp.stand_ins`)."""
    check_low_grads(group, params)
    _init_master_states(optimizer, group, params)
    pairs = stand_ins(optimizer, group, params)
    stand_in_of = {id(p): stand_in for p, stand_in in pairs}
    stepped = [stand_in_of.get(id(p), p) for p in params]
    with states_of_stand_ins(optimizer, pairs):
        run_torch, grads = _prepare_torch_step(optimizer, group, params, stepped)

    def run(factors: GradFactors) -> None:
        with states_of_stand_ins(optimizer, pairs):
            run_torch(factors)
        store_params(optimizer, group, pairs)

    return (run if pairs else run_torch), grads


def _prepare_torch_step(
    optimizer: RustStepMixin, group: dict[str, Any], params: list[Tensor], stepped: list[Tensor]
) -> tuple[Callable[[GradFactors], None], list[Tensor]]:
    """:func:`prepare_torch` for ``stepped``: ``params`` or their float32 stand-ins."""
    spec = optimizer._ferro_spec
    has_sparse = any(p.grad is not None and p.grad.is_sparse for p in stepped)
    foreach, fused = torch_implementation(spec, group, stepped, has_sparse, _torch_class(optimizer))
    implied_fused = fused and not group.get("fused")
    # torch creates state for fused kernels on the param's device; ask for
    # that when we choose fused for the user.
    init_group = {**group, "params": stepped}
    if implied_fused:
        init_group["fused"] = True
    # narrow states (state_dtype) step as float32 copies, rounded back after the step
    widened = widen_states(optimizer, spec, group, params)
    gathered = spec.gather_group(_as_torch(optimizer), init_group)
    round_new_states(optimizer, spec, group, params, widened)
    if implied_fused:
        _steps_to_devices(optimizer, gathered)
    check_torch_step(spec, gathered, group, for_loop=not foreach and not fused)
    spec.check_torch_path(gathered, group)
    if (implied_fused and not _fused_fits(spec, gathered)) or (
        # torch's fused kernels walk a param as one run of memory: a strided view
        # (a slice with gaps) would be mis-stepped. foreach steps it correctly.
        fused and not all(is_dense(p) for p in gathered.params)
    ):
        foreach, fused = _foreach_supported(gathered.params), False
    if fused:
        _lay_out_for_fused(optimizer, gathered)

    def run(factors: GradFactors) -> None:
        dense = [g for g in gathered.grads if not g.is_sparse]
        if factors.unscale_tensor is not None and not fused and dense:
            # What GradScaler.unscale_ would have done (torch's fused kernels take
            # grad_scale themselves).
            foreach_mul_(dense, factors.unscale_tensor.to(dense[0].device))
        if factors.clip_tensor is not None:
            for g in gathered.grads:  # as clip_grad_norm_ does
                g.mul_(factors.clip_tensor.to(g.device))
        if fused:
            gathered.grad_scale, gathered.found_inf = factors.grad_scale, factors.found_inf
        spec.torch_step(_as_torch(optimizer), gathered, group, foreach=foreach, fused=fused)
        narrow_states(optimizer, spec, group, params, widened)

    return run, list(gathered.grads)


# -- the Rust path ------------------------------------------------------------------------


@dataclass
class RustWork:
    """A group's Rust-routed tensors, ready to run: one-shot plans (``fresh``: their
    lazily created buffers are new), staged copies of params that are not one run
    of memory (written back after the step), and buffers to add to the state."""

    #: (plan, fresh, extras, ema): ``extras`` is the spec's ``plan_extras`` result, or
    #: None; ``ema`` the weight of the moving average the plan's step updates, or None.
    plans: list[tuple[_core.GroupPlan, bool, Any, float | None]] = field(default_factory=list)
    staged: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    created: list[tuple[dict[str, Any], str, Tensor]] = field(default_factory=list)
    #: Plans whose gradients count in a norm computed on this rank alone.
    norm_plans: list[_core.GroupPlan] = field(default_factory=list)
    #: DTensor params (stepped through their local shards) and their grads.
    dtensors: list[Tensor] = field(default_factory=list)
    dtensor_grads: list[Tensor] = field(default_factory=list)
    #: Params whose moving average the plans' steps update.
    ema_fused: list[Tensor] = field(default_factory=list)

    def run(self, kernel: KernelCall, factors: GradFactors, stochastic: int | None) -> None:
        for plan, fresh, extras, ema in self.plans:
            if stochastic is not None:
                kernel(plan, factors.unscale, factors.clip, fresh, ema=ema, stochastic=stochastic)
            elif ema is not None:
                kernel(plan, factors.unscale, factors.clip, fresh, ema=ema)
            elif extras is None:
                kernel(plan, factors.unscale, factors.clip, fresh)
            else:
                kernel(plan, factors.unscale, factors.clip, fresh, extras)
        for state, key, buffer in self.created:
            # Lazily created buffers join the state only now that the kernel has
            # written them: a failed call leaves no uninitialised buffer behind
            # (torch stores nothing on a failed step).
            state[key] = buffer
        with torch.no_grad():
            for original, work in self.staged:
                original.copy_(work)
        if self.dtensors:  # their local shards were bumped; the wrappers too
            torch.autograd.graph.increment_version(self.dtensors)


@dataclass
class _LaidOut:
    """The Rust-routed params of a group as the kernel walks them: ``works`` (the param
    or its staged copy), ``states[k][i]``, ``kinds[i]`` = (fresh, dtensor), and the
    storages the step writes (``written``) or the state owns (``state_storages``)."""

    states: list[list[Tensor]]
    works: list[Tensor] = field(default_factory=list)
    #: (fresh, dtensor, averaged, mastered): ``averaged``, the param's moving average is
    #: updated in the kernel's pass (``emas[i]``); ``mastered``, it steps its float32
    #: master copy (``masters[i]``).
    kinds: list[tuple[bool, bool, bool, bool]] = field(default_factory=list)
    emas: list[Tensor | None] = field(default_factory=list)
    #: Each param's float32 master copy (``master_weights``), or None.
    masters: list[Tensor | None] = field(default_factory=list)
    written: set[int | None] = field(default_factory=set)
    state_storages: set[int | None] = field(default_factory=set)


def prepare_rust(optimizer: RustStepMixin, gathered: Gathered, group: dict[str, Any]) -> RustWork:
    """Lays the gathered tensors out for the kernel — one run of memory per tensor,
    the same layout for a param, its grad and its states (DTensors: their local
    shards) — and builds one-shot plans, split by whether their lazily created
    buffers are new (``fresh``) and by whether they hold DTensor shards (whose
    norms only make sense across ranks)."""
    if len({id(p) for p in gathered.params}) != len(gathered.params):
        raise ValueError(
            f"{type(optimizer).__name__}: a parameter appears more than once in a param "
            "group; list each parameter once"
        )
    out = RustWork()
    laid = _lay_out_params(
        optimizer, gathered, group, out, bool(fused_ema_keys(optimizer._ferro_spec, group))
    )
    grads = _lay_out_grads(optimizer, gathered, group, laid, out)
    _build_plans(optimizer, gathered, group, laid, grads, out)
    return out


def _cpu_scalar(state: dict[str, Any], key: str, value: Tensor) -> Tensor:
    """Per-tensor scalar state the kernel can keep: a CPU float32/float64 tensor (one on
    another device, from a capturable or fused step, is replaced in the state by a CPU
    tensor of torch's scalar dtype holding its value)."""
    if value.device.type != "cpu" or value.dtype not in RUST_DTYPES:
        value = state[key] = torch.tensor(float(value), dtype=scalar_dtype())
    return value


def _lay_out_params(
    optimizer: RustStepMixin,
    gathered: Gathered,
    group: dict[str, Any],
    out: RustWork,
    fuse_ema: bool,
) -> _LaidOut:
    step_key = optimizer._ferro_spec.step_key
    contiguous_only = optimizer._ferro_spec.contiguous_only
    laid = _LaidOut(states=[[] for _ in gathered.keys])
    for i, p in enumerate(gathered.params):
        dtensor = is_dtensor(p)
        local_p = local(p)
        # A param that is not one run of memory (or, for a kernel that walks rows, not
        # row-major), or a lazily negated/conjugated view, steps in a staged copy
        # written back through the original.
        in_place = is_dense(local_p) and not is_lazy(local_p)
        if contiguous_only:
            in_place = in_place and local_p.is_contiguous()
        work = local_p if in_place else staged(local_p)
        if work is not local_p:
            out.staged.append((local_p, work))
        if dtensor:
            out.dtensors.append(p)
        # (touching optimizer.state[p] would create an entry: torch's SGD without
        # momentum keeps none)
        keeps_state = gathered.keys or step_key is not None or has_master(group, p)
        state = optimizer.state[p] if keeps_state else NO_STATE
        fresh = _lay_out_states(optimizer, gathered, group, i, work, state, laid, out)
        if step_key is not None:
            gathered.steps[i] = _cpu_scalar(state, step_key, gathered.steps[i])
        for key in optimizer._ferro_spec.scalar_keys:
            values = gathered.scalars[key]
            values[i] = _cpu_scalar(state, key, values[i])
        average = _lay_out_ema(optimizer, p, work) if fuse_ema and not dtensor else None
        laid.emas.append(average)
        if average is not None:
            laid.state_storages.add(storage_key(average))
        master = _lay_out_master(p, work, state) if has_master(group, p) else None
        laid.masters.append(master)
        if master is not None:
            laid.state_storages.add(storage_key(master))
        laid.works.append(work)
        laid.kinds.append((fresh, dtensor, average is not None, master is not None))
        laid.written.add(storage_key(work))
        # A staged param's own memory is written too (the copy back): a grad in it
        # (``p.grad = p.detach()``) must be read as torch would, not as it was.
        laid.written.add(storage_key(local_p))
        laid.state_storages.update(storage_key(s[i]) for s in laid.states)
    laid.written |= laid.state_storages
    laid.written.discard(None)
    laid.state_storages.discard(None)
    return laid


def _lay_out_states(
    optimizer: RustStepMixin,
    gathered: Gathered,
    group: dict[str, Any],
    i: int,
    work: Tensor,
    state: dict[str, Any],
    laid: _LaidOut,
    out: RustWork,
) -> bool:
    """Appends param ``i``'s state buffers to ``laid.states``; True when one is created
    by this step (SGD's momentum buffer: the plan is ``fresh``)."""
    p = gathered.params[i]
    dtensor = is_dtensor(p)
    fresh = False
    dtype = state_dtype_for(group, p)
    quantized = quantized_keys(gathered.keys, group, p)
    for k, key in enumerate(gathered.keys):
        buffer = gathered.states[k][i]
        if key in quantized:
            buffer, created = _lay_out_packed(optimizer, state, key, buffer, work, quantized[key])
            if created:
                out.created.append((state, key, buffer))
                fresh = True
            laid.states[k].append(buffer)
            continue
        if buffer is None:  # created by the step itself (SGD's momentum buffer)
            # laid out like the memory the kernel steps (a staged copy of a strided or
            # lazily negated param: the buffer stays laid out like it, as our own state
            # is re-laid out below); a DTensor param's state is a DTensor
            buffer = torch.empty_like(p if dtensor else work, dtype=dtype)
            out.created.append((state, key, buffer))
            fresh = True
        elif (
            (dtype != p.dtype or has_master(group, p))
            and buffer.dtype in (p.dtype, torch.float32)
            and buffer.dtype != dtype
            and buffer.shape == p.shape
        ):
            # (torch's _init_group made it, or a checkpoint or the user put it there, in
            # the param's or the master's dtype: kept in the group's state dtype from now
            # on, rounded to nearest)
            buffer = state[key] = torch.empty_like(buffer if dtensor else work, dtype=dtype).copy_(
                buffer
            )
        elif buffer.dtype != dtype or buffer.shape != p.shape:
            raise RuntimeError(
                f"{type(optimizer).__name__}: state {key!r} of a parameter of shape "
                f"{tuple(p.shape)} and dtype {p.dtype} has shape {tuple(buffer.shape)} and "
                f"dtype {buffer.dtype}"
            )
        elif not dtensor and (
            buffer.device != p.device or not same_layout(buffer, work) or is_lazy(buffer)
        ):
            # Our own state: re-lay it out once, for good.
            buffer = torch.empty_like(work, dtype=dtype).copy_(buffer)
            state[key] = buffer
        laid.states[k].append(local(buffer))
    return fresh


def _lay_out_packed(
    optimizer: RustStepMixin,
    state: dict[str, Any],
    key: str,
    buffer: Tensor | None,
    work: Tensor,
    signed: bool,
) -> tuple[Tensor, bool]:
    """A packed 8-bit state of ``work``'s elements for the kernel (and whether it is new:
    created by this step, written before it is read): ours as it is, or one in any
    floating dtype shaped like the param (torch's ``_init_group``, a checkpoint, the
    user) quantized once, for good."""
    n = work.numel()
    if buffer is None:  # (zeros: the kernel writes codes and scales, not the padding)
        return torch.zeros(_q8.packed_len(n), dtype=torch.uint8, device=work.device), True
    if is_packed(buffer, work):
        if (
            buffer.device == work.device
            and buffer.is_contiguous()
            and buffer.storage_offset() % 4 == 0
            and not is_lazy(buffer)
        ):
            return buffer, False
        packed = torch.empty(_q8.packed_len(n), dtype=torch.uint8, device=work.device)
        packed.copy_(buffer)
    elif buffer.is_floating_point() and local(buffer).shape == work.shape:
        # (a DTensor param's state, from torch's _init_group or a checkpoint: its shard)
        packed = pack(local(buffer).detach().to(work.device), work, signed)
    else:
        raise RuntimeError(
            f"{type(optimizer).__name__}: state {key!r} of a parameter of shape "
            f"{tuple(work.shape)} is neither an 8-bit state of its {n} elements nor a "
            f"floating tensor of its shape (it has shape {tuple(buffer.shape)} and dtype "
            f"{buffer.dtype})"
        )
    state[key] = packed
    return packed, False


def _lay_out_master(p: Tensor, work: Tensor, state: dict[str, Any]) -> Tensor:
    """The param's float32 master copy laid out like ``work``: made from the param on
    its first step (or after a checkpoint without one), else the state's, re-laid out
    once if it is not (an odd one is replaced by the param's values, as a missing one
    is: the master is only ever more exact than its param)."""
    master = state.get(MASTER_STATE)
    if not fits_as_master(master, p):
        master = torch.empty_like(work, dtype=torch.float32).copy_(work)
    elif not same_layout(master, work) or is_lazy(master):
        master = torch.empty_like(work, dtype=torch.float32).copy_(master)
    state[MASTER_STATE] = master
    return master


def _lay_out_ema(optimizer: RustStepMixin, p: Tensor, work: Tensor) -> Tensor | None:
    """The param's moving average laid out like ``work`` for the kernel's pass, or None
    where it has none yet (the step driver copies the stepped param into it)."""
    state = optimizer.state.get(p)
    average = state.get(EMA_KEY) if state else None
    if average is None:
        return None
    if not isinstance(average, Tensor) or (average.dtype, average.shape) != (p.dtype, p.shape):
        described = (
            f"shape {tuple(average.shape)} and dtype {average.dtype}"
            if isinstance(average, Tensor)
            else repr(average)
        )
        raise RuntimeError(
            f"{type(optimizer).__name__}: state {EMA_KEY!r} of a parameter of shape "
            f"{tuple(p.shape)} and dtype {p.dtype} has {described}"
        )
    if average.device != p.device or not same_layout(average, work) or is_lazy(average):
        average = torch.empty_like(work).copy_(average)  # re-laid out once, for good
        state[EMA_KEY] = average
    return average


def _check_grad(optimizer: RustStepMixin, name: str, p: Tensor, grad: Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
        # torch's setter rules this out; `p.grad.data = ...` does not. (The exception's
        # type is the one torch's step raises for it.)
        error = optimizer._ferro_spec.grad_error(p, grad, optimizer.state.get(p, NO_STATE))
        raise error(
            f"{name}: a gradient of shape {tuple(grad.shape)}, dtype {grad.dtype} on "
            f"{grad.device} does not match its parameter (shape {tuple(p.shape)}, "
            f"dtype {p.dtype} on {p.device})"
        )


def _lay_out_grads(
    optimizer: RustStepMixin,
    gathered: Gathered,
    group: dict[str, Any],
    laid: _LaidOut,
    out: RustWork,
) -> list[Tensor]:
    name = type(optimizer).__name__
    grads: list[Tensor] = []
    for p, work, grad in zip(gathered.params, laid.works, gathered.grads, strict=True):
        _check_grad(optimizer, name, p, grad)
        if is_dtensor(grad):
            out.dtensor_grads.append(grad)
        grad = local(grad)
        # Aliasing is decided on the grad's own memory, before a lazy (negated,
        # conjugated) grad is resolved into a copy that would hide it.
        storage = storage_key(grad)
        if storage in laid.state_storages:
            raise RuntimeError(
                f"{name}: a gradient shares memory with the optimizer's own state "
                "(e.g. p.grad = opt.state[p][...]); give it a gradient of its own"
            )
        if storage in laid.written:
            # The gradient shares memory with a buffer the step writes: read
            # what torch's in-place sequence would have read.
            grad = optimizer._ferro_spec.aliased_grad(local(p), grad, group)
        grad = resolved(grad)
        grads.append(laid_out_like(grad, work))
    return grads


def _build_plans(
    optimizer: RustStepMixin,
    gathered: Gathered,
    group: dict[str, Any],
    laid: _LaidOut,
    grads: list[Tensor],
    out: RustWork,
) -> None:
    """One plan per kind (fresh, dtensor, averaged) of param."""
    step_key = optimizer._ferro_spec.step_key
    spec = optimizer._ferro_spec
    scalars = [gathered.steps] if step_key is not None else []
    scalars += [gathered.scalars[key] for key in spec.scalar_keys]
    # each param's stream of stochastic rounding: its index in the group
    position = {id(p): i for i, p in enumerate(group["params"])}
    for kind in sorted(set(laid.kinds)):
        index = [i for i, k in enumerate(laid.kinds) if k == kind]
        fresh, dtensor, averaged, mastered = kind
        states = [[s[i] for i in index] for s in laid.states]
        if averaged:
            states.append([cast("Tensor", laid.emas[i]) for i in index])
            out.ema_fused.extend(gathered.params[i] for i in index)
        if mastered:
            states.append([cast("Tensor", laid.masters[i]) for i in index])
        plan = _one_shot_plan(
            type(optimizer).__name__,
            [laid.works[i] for i in index],
            [grads[i] for i in index],
            states,
            [[s[i] for i in index] for s in scalars],
            [position[id(gathered.params[i])] for i in index],
            mastered,
            [QUANTIZED_STATES.get(key, False) for key in gathered.keys],
        )
        extras = (
            None
            if spec.plan_extras is None
            else spec.plan_extras(_as_torch(optimizer), [gathered.params[i] for i in index])
        )
        weight = ema_weight(group) if averaged else None
        out.plans.append((plan, fresh, extras, weight))
        if not dtensor:
            out.norm_plans.append(plan)


def _one_shot_plan(
    name: str,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    scalars: list[list[Tensor]],
    streams: list[int],
    master: bool,
    signed: list[bool],
) -> _core.GroupPlan:
    """A plan for one step of tensors already laid out for the kernel; ``scalars[k]``:
    every param's scalar state slot ``k`` (the step counter first); ``streams[i]``: the
    param's index in its group (its stream of stochastic rounding); ``signed[k]``: the
    map of state ``k`` where it is 8-bit."""
    try:
        return _core.GroupPlan.from_tensors(
            real(params),
            real(grads),
            [real(s) for s in states],
            scalars,
            streams,
            master,
            signed,
        )
    except ValueError as error:
        raise RuntimeError(f"{name}: {error}") from error


# -- the plan the next step re-checks ----------------------------------------------------


def scalar_keys(spec: OptimizerSpec) -> list[str]:
    """The kernel's per-tensor scalar state keys, the step counter first."""
    step = [spec.step_key] if spec.step_key is not None else []
    return step + list(spec.scalar_keys)


def cache_plan(
    optimizer: RustStepMixin, group: dict[str, Any], plans: dict[int, CachedPlan]
) -> None:
    """Builds the plan the next step re-checks instead of taking the slow path."""
    plans.pop(id(group), None)
    if group.get("differentiable", False) or _config.get_backend() == "torch":
        return
    params = group["params"]
    narrow = low_params(group) or _rounds_like_torch_in_rust(optimizer._ferro_spec, group)
    if not all(
        p.device.type == "cpu"
        and (p.dtype in RUST_DTYPES or (narrow and p.dtype in LOW_PARAM_DTYPES))
        and is_plain(p)
        and step_plannable(optimizer, p)
        and (p.is_contiguous() or not optimizer._ferro_spec.contiguous_only)
        for p in params
    ):
        return
    key = plan_key(optimizer, group)
    if key is None:
        return
    # (a group with master copies plans only when every param has one: the kernel's
    # plan lists each param's master after its states)
    master = bool(group.get(MASTER_KEY)) and all(p.dtype in LOW_PARAM_DTYPES for p in params)
    try:
        plan = _core.GroupPlan(
            params,
            [optimizer.state.get(p, NO_STATE) for p in params],
            [*key[0], MASTER_STATE] if master else list(key[0]),
            scalar_keys(optimizer._ferro_spec),
            master,
            [QUANTIZED_STATES.get(k, False) for k in key[0]],
        )
    except (ValueError, RuntimeError):
        return  # not plannable (odd layout, foreign state): the slow path stays correct
    plans[id(group)] = CachedPlan(group, params, key, plan)

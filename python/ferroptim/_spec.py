"""What an optimizer family tells the shared step machinery: one :class:`OptimizerSpec`.

An optimizer class is its torch constructor (a ``torch.optim.Optimizer`` subclass,
torch's own class where torch has one) plus :class:`~ferroptim._optimizer.RustStepMixin`
plus one spec, its ``_ferro_spec``. The spec is data: names, flags and small functions
of the param group. The machinery (``_step``, ``_prepare``) reads it; a family overrides
nothing.

The fields, in the order a step uses them::

    route       rust_unsupported, sparse_to_torch, step_key/reads_step
    check       numbers/more_numbers, usual, check_step_scalars, check_torch_path
    gather      gather (torch's ``_init_group``) or init_state (optimizers torch lacks)
    Rust        state_keys, kernel, aliased_grad
    torch       torch_step (torch's functional, or torch-op code of ours), has_fused

An optimizer torch lacks subclasses ``torch.optim.Optimizer`` directly, builds its
``defaults`` in ``__init__``, and gives ``init_state`` (how a param's state is created
on its first step) and a ``torch_step`` written with torch ops (what runs on other
devices, with ``differentiable=True`` or with the backend forced to ``"torch"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from ferroptim._hyper import check_number

if TYPE_CHECKING:
    import torch


__all__ = ["Gathered", "KernelCall", "OptimizerSpec", "TorchStep", "always", "never"]


@dataclass
class Gathered:
    """Tensors of a group's params that have a grad, as torch's ``_init_group`` lists them.

    ``states[k][i]`` is state buffer ``keys[k]`` of ``params[i]``; it is ``None``
    when torch creates that buffer during the step (SGD's momentum buffer).
    """

    keys: tuple[str, ...]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[list[Any]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    #: Per-tensor scalar state after the step counter (``spec.scalar_keys``), by key:
    #: ``scalars[key][i]`` is ``params[i]``'s 0-d tensor (NAdam's ``mu_product``).
    scalars: dict[str, list[Tensor]] = field(default_factory=dict)
    has_complex: bool = False
    has_sparse_grad: bool = False
    #: GradScaler's scale and inf flag, for torch's fused kernels.
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


#: A prepared Rust kernel call: ``kernel(plan, unscale, clip, fresh)`` steps ``plan``;
#: every gradient is multiplied by ``unscale`` then ``clip`` as it is read; ``fresh``:
#: the plan's lazily created buffers are new and must be written first. A family with
#: :attr:`OptimizerSpec.plan_extras` is called with a fifth argument, their result.
KernelCall = Callable[..., None]


class TorchStep(Protocol):
    """Steps ``gathered`` with torch ops: torch's functional (``foreach``/``fused`` select
    its implementation) or, for an optimizer torch lacks, torch-op code of ours."""

    def __call__(
        self,
        optimizer: torch.optim.Optimizer,
        gathered: Gathered,
        group: dict[str, Any],
        *,
        foreach: bool,
        fused: bool,
    ) -> None: ...


def never(group: dict[str, Any]) -> bool:
    """The default ``rust_unsupported`` (the step's fast path does not call it)."""
    return False


def always(group: dict[str, Any]) -> bool:
    """The default ``usual`` (the step's fast path does not call it)."""
    return True


def _no_step_scalar_check(group: dict[str, Any], gathered: Gathered) -> None:
    return None


def _no_torch_path_check(gathered: Gathered, group: dict[str, Any]) -> None:
    return None


def _runtime_error(param: Tensor, grad: Tensor, state: dict[str, Any]) -> type[Exception]:
    return RuntimeError


def _copy_of_grad(param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
    return grad.clone()


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer family, as the shared step machinery needs to know it."""

    #: ``state_keys(group)``: the state buffers the kernel reads and writes, in kernel
    #: order (e.g. Adam's ``exp_avg``, ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``).
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]]
    #: ``kernel(group)``: the group's Rust kernel with its hyperparameters converted (and
    #: checked) now, in the prepare phase, so that running it cannot fail on them.
    kernel: Callable[[dict[str, Any]], KernelCall]
    #: Steps params routed to torch (other devices and dtypes, sparse grads,
    #: ``differentiable=True``, the backend forced to ``"torch"``).
    torch_step: TorchStep
    #: ``gather(optimizer, group)``: torch's ``_init_group`` for ``group["params"]``
    #: (creates missing state, lists tensors). None: gather with :attr:`init_state`.
    gather: Callable[[torch.optim.Optimizer, dict[str, Any]], Gathered] | None = None
    #: ``init_state(param, group)``: a param's state on its first step (step counter
    #: included), for optimizers torch lacks (no ``_init_group`` to borrow).
    init_state: Callable[[Tensor, dict[str, Any]], dict[str, Any]] | None = None
    #: The state key whose absence makes :attr:`init_state` run (Schedule-Free's reference
    #: re-creates its state ``if 'z' not in state``); None: when the state is empty.
    init_key: str | None = None
    #: Name of the per-parameter step counter in the state, or None (SGD has none).
    step_key: str | None = "step"
    #: Name of a per-group step counter (a Python int in the param group, as the
    #: reference implementations of AdEMAMix and Adan keep it), or None. The kernel and
    #: :attr:`torch_step` read the count of steps before this one; the step driver
    #: increments it in every group once the step has run (not on a skipped step).
    group_step_key: str | None = None
    #: ``advance_group(group)``: the per-group state a step moves on besides
    #: :attr:`group_step_key` (Schedule-Free's ``k``, ``lr_max``, ``weight_sum``), updated
    #: by the step driver in every group once the step has run (not on a skipped step);
    #: the kernel and :attr:`torch_step` read the values from before this step.
    advance_group: Callable[[dict[str, Any]], None] | None = None
    #: Per-tensor scalar state the kernel reads and writes besides the step counter
    #: (0-d tensors, e.g. NAdam's ``mu_product``), in the kernel's slot order.
    scalar_keys: tuple[str, ...] = ()
    #: Whether torch's for-loop reads the step counter's value (``step_t.item()``);
    #: RMSprop's only increments it, so any shape of counter steps.
    reads_step: bool = True
    #: Whether torch's for-loop lists XLA among the devices a ``capturable=True`` step
    #: may run on (its error message names them; Adadelta's leaves XLA out).
    capturable_xla: bool = True
    #: Whether torch's functional refuses a step counter that is not a tensor ("API has
    #: changed"). ASGD's does not: its for-loop steps a Python number (``step_t += 1``
    #: rebinds a local, the state's counter stays as it was), so such params take
    #: torch's path.
    step_must_be_tensor: bool = True
    #: Whether torch's step keeps :attr:`scalar_keys` in whatever dtype they have (ASGD
    #: copies its new ``eta``/``mu`` into them: an int tensor truncates): a param whose
    #: scalar state is not float32/float64 then takes torch's path (otherwise the Rust
    #: path replaces it by a float tensor of the same value).
    scalar_dtype_kept: bool = False
    #: Whether torch has a fused implementation of this optimizer (chosen by default on
    #: devices torch fuses for).
    has_fused: bool = True
    #: Whether torch supports sparse gradients for this optimizer: they take its path
    #: (otherwise a sparse gradient raises torch's error).
    sparse_to_torch: bool = False
    #: Whether the kernel steps complex params as real views (element-wise on the real and
    #: imaginary parts, as torch's algorithms do); False: they take :attr:`torch_step`
    #: (Lion's ``sgn`` of a complex number is ``z / |z|``, not per part).
    complex_as_real: bool = True
    #: Numeric hyperparameters checked (torch's TypeError) before anything is written.
    numbers: tuple[str, ...] = ("lr",)
    #: ``more_numbers(group)``: (name, value) of numeric hyperparameters that are not
    #: group keys of their own (Adam's ``beta1`` and ``beta2``).
    more_numbers: Callable[[dict[str, Any]], Iterable[tuple[str, Any]]] | None = None
    #: ``rust_unsupported(group)``: the kernels cannot reproduce torch's arithmetic for
    #: these hyperparameters (Adam's tensor betas): the group takes torch's for-loop.
    rust_unsupported: Callable[[dict[str, Any]], bool] = never
    #: ``usual(group)``: the hyperparameters are in the range torch's constructor
    #: accepts, so the per-step scalars cannot raise and a cached plan may run.
    usual: Callable[[dict[str, Any]], bool] = always
    #: ``check_step_scalars(group, gathered)``: raises what torch's for-loop raises
    #: computing its per-step scalars for an unusual group (``beta1 = 1`` set
    #: mid-training: ZeroDivisionError).
    check_step_scalars: Callable[[dict[str, Any], Gathered], None] = _no_step_scalar_check
    #: ``check_torch_path(gathered, group)``: raises now what torch's functional would
    #: raise mid-step for the params routed to it (so that nothing is written first).
    check_torch_path: Callable[[Gathered, dict[str, Any]], None] = _no_torch_path_check
    #: ``aliased_grad(param, grad, group)``: the gradient values torch's for-loop reads
    #: when ``grad`` shares memory with a buffer the step writes (``p.grad = p.detach()``).
    #: torch's in-place updates of the param come after it has read the gradient, except
    #: where a family says otherwise (AdamW decays the param first).
    aliased_grad: Callable[[Tensor, Tensor, dict[str, Any]], Tensor] = _copy_of_grad
    #: Whether a param whose grad shares the param's own memory (``p.grad = p.detach()``)
    #: takes :attr:`torch_step`: for an update that reads the grad again after writing the
    #: param (Lion's momentum), which no single grad value (``aliased_grad``) reproduces.
    own_grad_alias_to_torch: bool = False
    #: ``grad_error(param, grad, state)``: the exception type torch's step raises for a
    #: gradient whose shape or dtype does not match its param (``p.grad.data = ...``
    #: skips torch's checks); most of torch's steps fail in an in-place op's
    #: RuntimeError, Rprop's in ``sign`` or boolean-mask indexing.
    grad_error: Callable[[Tensor, Tensor, dict[str, Any]], type[Exception]] = _runtime_error
    #: The tensor lists torch's capturable-device error names, where they are not
    #: "params, <scalar_keys>s and state_steps" (ASGD: "params, mus, etas, and state_steps").
    capturable_names: str | None = None
    #: Whether the kernel walks params in their logical (row-major) order, so a param
    #: laid out otherwise (transposed, channels-last) steps in a contiguous staged copy
    #: and only groups of contiguous params keep a cached plan (Adafactor's rows and
    #: columns).
    contiguous_only: bool = False
    #: Whether DTensor params step in Rust through their local shards (element-wise
    #: algorithms); False: they take :attr:`torch_step`, whose reductions span ranks.
    dtensor_in_rust: bool = True
    #: ``plan_extras(optimizer, params)``: what the kernel needs besides the plan for
    #: these params (in plan order), checked in the prepare phase and handed to the
    #: kernel as its fifth argument (Adafactor's row/column moments, whose shapes are
    #: not the param's). Raises torch's error for state the step cannot use.
    plan_extras: Callable[[torch.optim.Optimizer, list[Tensor]], Any] | None = None
    #: Whether :attr:`kernel` is an element-wise ``_core.Kernel`` step, which updates the
    #: params' moving average (``ema_decay``) in its own pass when handed ``ema=``; False:
    #: the average is updated with torch's lerp after the step (also wherever
    #: :attr:`plan_extras` is set).
    ema_in_kernel: bool = True
    #: Whether the family keeps its state buffers in ``state_dtype`` (bfloat16 for float32
    #: params, stochastically rounded, see :mod:`ferroptim._lowp`): the element-wise
    #: kernels, whose loops load and store each buffer in its own format.
    keeps_state_dtype: bool = True
    #: Whether the kernel steps bfloat16/float16 params (states in their dtype) in Rust
    #: as torch's for-loop does, rounding after every op (``Elementwise::ROUNDED`` in
    #: Rust); False: they take torch's path.
    rounds_like_torch: bool = False
    #: The message of torch's RuntimeError for a step counter that is not a tensor.
    step_type_message: str = (
        "API has changed, `state_steps` argument must contain a list of singleton tensors"
    )

    def __post_init__(self) -> None:
        if (self.gather is None) == (self.init_state is None):
            raise TypeError("an OptimizerSpec needs exactly one of gather and init_state")

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raises now what torch's step raises mid-step for the group's hyperparameters
        (for params torch's path steps: the Rust path converts them in :attr:`kernel`)."""
        for name in self.numbers:
            check_number(group[name], name)
        if self.more_numbers is not None:
            for name, value in self.more_numbers(group):
                check_number(value, name)

    def gather_group(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
        """The group's params that have a grad, their grads, states and step counters
        (missing state created first)."""
        if self.gather is not None:
            return self.gather(optimizer, group)
        return self._gather_own_state(optimizer, group)

    def _gather_own_state(
        self, optimizer: torch.optim.Optimizer, group: dict[str, Any]
    ) -> Gathered:
        assert self.init_state is not None
        keys = self.state_keys(group)
        gathered = Gathered(
            keys=keys, states=[[] for _ in keys], scalars={k: [] for k in self.scalar_keys}
        )
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            gathered.has_complex |= param.is_complex()
            gathered.has_sparse_grad |= grad.is_sparse
            state = optimizer.state[param]
            if not state or (self.init_key is not None and self.init_key not in state):
                state.update(self.init_state(param, group))
            gathered.params.append(param)
            gathered.grads.append(grad)
            for buffers, key in zip(gathered.states, keys, strict=True):
                buffers.append(state[key])
            if self.step_key is not None:
                gathered.steps.append(state[self.step_key])
            for key in self.scalar_keys:
                gathered.scalars[key].append(state[key])
        return gathered

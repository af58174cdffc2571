"""The optimizer registry every test file reads (torch's ``OptimizerInfo``/``optim_db``).

One :class:`Family` entry per optimizer (or per family variant, such as Adam with
decoupled weight decay) gives it, with no other test edit:

* **parity** (test_parity): every combination of its flag ``grid`` against torch's
  for-loop (``reference_kwargs``), params and every state buffer (``state_keys``), on
  the standard layouts, with a second group (``second_group``/``second_group_extra``);
  SIMD levels, thread counts and the torch path on its ``representative`` cases;
* **interop** (test_interop): constructor defaults and signature against torch's,
  state_dict interchange both ways, schedulers, extra groups (``variants``), groups
  changed mid-training (``live_changes``), a small training run (``interop_training``);
* **bad input** (test_bad_input, test_safety*): torch's errors, nothing written, for
  ``common`` kwargs and every ``state_tensors`` entry;
* **AMP** (test_amp), **compile** (test_compile), **distributed** (test_distributed:
  DDP, FSDP2, ZeRO) and **CUDA** (test_cuda): end-to-end runs with ``train_kwargs``
  (and, for AMP, its ``train_variants``), for every entry that is not a ``variant_of``
  another;
* **clipping** (test_clip, ``max_grad_norm``) and **sparse** gradients (test_sparse:
  ``sparse`` says whether torch steps them);
* **functional** (test_functional): with a :class:`Functional` record, its
  ``ferroptim.functional`` call against torch's class on NumPy arrays;
* **kernel counting** (``_kernels.kernel_calls``): ``kernel`` names its Rust entry point,
  so tests can assert that a step ran in Rust.

Adding an optimizer: its class and spec in ``python/ferroptim``, one entry in
:data:`FAMILIES` below (plus its ``functional`` record if it has a functional API).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _lion_reference import LionReference
from _pytorch_optimizer_reference import AdanReference, AdEMAMixReference
from _schedulefree_reference import (
    ScheduleFreeAdamWReference,
    ScheduleFreeSGDReference,
    TrainedScheduleFreeAdamW,
    TrainedScheduleFreeSGD,
)


def _import_ferroptim() -> Any:
    # Another engineer may be reinstalling the package while tests run: retry briefly.
    last: Exception | None = None
    for _ in range(30):
        try:
            return importlib.import_module("ferroptim")
        except ImportError as exc:  # pragma: no cover - only during a reinstall
            last = exc
            time.sleep(1.0)
    raise last  # type: ignore[misc]


ferroptim = _import_ferroptim()


def _no_first_step(hyper: dict[str, Any]) -> bool:
    return False


def _hyper_only(hyper: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    return hyper, {}, {}


@dataclass(frozen=True)
class Functional:
    """An optimizer's ``ferroptim.functional`` call (test_functional)."""

    #: Function name in ``ferroptim.functional``.
    fn: str
    #: ``states(hyper)``: functional state argument -> torch state key.
    states: Callable[[dict[str, Any]], dict[str, str]]
    #: Cases (test id -> hyperparameters), each merged over ``base`` and the family's
    #: ``fixed`` kwargs, compared with torch's for-loop on NumPy arrays.
    cases: dict[str, dict[str, Any]]
    base: dict[str, Any] = field(default_factory=dict)
    #: Whether the call takes ``step=``.
    has_step: bool = True
    #: ``first_step(hyper)``: pass ``first_step=True`` on the first call (SGD's momentum).
    first_step: Callable[[dict[str, Any]], bool] = _no_first_step
    #: ``split(hyper)``: (hyperparameters both sides take by the same names, initial value
    #: of each state array, constructor kwargs only torch takes).
    split: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, float], dict[str, Any]]] = (
        _hyper_only
    )
    #: Keywords of a one-call step with the fewest state arrays (plus their count from
    #: ``states``): the single-array vs list test.
    smoke: dict[str, Any] = field(default_factory=lambda: {"step": 1})
    #: Functional scalar-state argument -> torch state key: one 1-element float32 array
    #: per param, starting at 1 (NAdam's ``mu_products``).
    scalars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A ferroptim optimizer and the torch.optim class it must match."""

    name: str
    ferro: type
    torch: type
    #: Constructor kwargs that define this family (e.g. Adam's decoupled_weight_decay).
    fixed: dict[str, Any] = field(default_factory=dict)
    #: Flag grid swept by the parity tests: kwarg name -> values.
    grid: dict[str, Sequence[Any]] = field(default_factory=dict)
    #: ``state_keys(group)``: the state buffers every stepped param must have.
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]] = lambda group: ()
    #: Hyperparameter overrides for the second param group of the standard layout.
    second_group: dict[str, Any] = field(default_factory=dict)
    #: Kwargs that force torch's single-tensor (for-loop) reference implementation.
    reference_kwargs: dict[str, Any] = field(default_factory=lambda: {"foreach": False})
    #: ``valid(kwargs)``: whether a grid combination is one torch accepts (SGD's Nesterov
    #: needs momentum and zero dampening).
    valid: Callable[[dict[str, Any]], bool] = lambda kwargs: True
    #: ``second_group_extra(kwargs)``: more overrides for the standard layout's second
    #: group, depending on the case's flags (SGD's momentum, ...).
    second_group_extra: Callable[[dict[str, Any]], dict[str, Any]] = lambda kwargs: {}
    #: Flag combinations for the costlier sweeps (SIMD levels, threads, torch path);
    #: empty: every flag at its last grid value ("everything on").
    representative: tuple[dict[str, Any], ...] = ()
    #: Typical constructor kwargs for the interop / bad-input tests: every state buffer of
    #: the family exists (SGD needs a momentum for that).
    common: dict[str, Any] = field(default_factory=dict)
    #: Two group hyperparameter sets that change the algorithm (and which state exists),
    #: for the extra groups of the interop tests.
    variants: tuple[dict[str, Any], ...] = ()
    #: Every state tensor the family may create (for reassign / corrupt / swap tests).
    state_tensors: tuple[str, ...] = ()
    #: Per-tensor scalar state (0-d tensors in torch's scalar dtype, not the param's):
    #: the step counter and, for NAdam, ``mu_product``.
    scalar_state: tuple[str, ...] = ("step",)
    #: Whether ferroptim's ``max_grad_norm`` keyword applies. False where the reference
    #: takes a ``max_grad_norm`` of its own (Adan's global clipping: test_adan checks it).
    ferro_clipping: bool = True
    #: Whether the state has a ``step`` counter (SGD's has none).
    has_step: bool = True
    #: Whether CPU float32/float64 params step in Rust (False: ferroptim hands every step
    #: to torch's implementation; tests of what only the Rust path does skip the family).
    rust: bool = True
    #: Whether torch has a fused implementation (``fused=True`` is accepted).
    has_fused: bool = True
    #: Name of its Rust step entry point in ``ferroptim._core`` (see ``_kernels``).
    kernel: str = ""
    #: The entry this one is a variant of (same classes, other ``fixed`` kwargs): the
    #: end-to-end suites (AMP, compile, distributed, CUDA) skip variants.
    variant_of: str | None = None
    #: Whether torch steps sparse gradients for it (ferroptim hands them to torch).
    sparse: bool = False
    #: Configurations (id -> constructor kwargs) whose sparse gradients torch steps
    #: (test_sparse compares them on an embedding).
    sparse_cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Configurations whose sparse gradients torch refuses (its error, nothing written);
    #: empty: ``{"lr": 0.01, **common}`` where torch takes no sparse gradients.
    sparse_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Constructor kwargs of the end-to-end suites (AMP, compile, distributed, CUDA):
    #: every state buffer in play, non-default hyperparameters.
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    #: More named configurations for the AMP suite (id -> constructor kwargs).
    train_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Constructor kwargs of test_interop's small-model training run (None: not run).
    interop_training: dict[str, Any] | None = None
    #: (key, value) changes made to a live group between steps, each one a change torch's
    #: own optimizer honours without error (test_interop).
    live_changes: tuple[tuple[str, Any], ...] = ()
    #: Its ``ferroptim.functional`` call, if it has one.
    functional: Functional | None = None
    #: Whether test_parity sweeps every combination of ``grid`` (else ``representative``).
    full_grid: bool = False
    #: Constructor arguments torch rejects: ``pytest.param(kwargs, words of its error)``.
    bad_constructor: Sequence[Any] = ()
    #: Constructor kwargs of the bad-input tests: every state buffer and every per-step
    #: term in play.
    bad_input_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Numeric hyperparameters (a bad-input test sets each to something torch's step
    #: cannot compute with).
    numbers: tuple[str, ...] = ("lr",)
    #: Hyperparameters outside the usual range or of unusual types, stepped to torch's
    #: numbers: ``pytest.param(kwargs, id=...)`` (test_parity).
    unusual: Sequence[Any] = ()
    #: Flags of the mixed float32/float64 groups test (None: not run; one family per
    #: kernel runs it).
    mixed_dtype_kwargs: dict[str, Any] | None = None
    #: Kwargs of the test that mixes Rust-stepped (float32) and torch-routed (bf16/fp16)
    #: params in one group: an eps float16 represents (None: not run).
    mixed_routing_kwargs: dict[str, Any] | None = None
    #: Configurations (id -> flags) stepped with ``differentiable=True`` and compared with
    #: torch, gradient through the step included (combinations torch's own
    #: differentiable step cannot backprop through are left out).
    differentiable_cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Whether torch steps complex params (False: Adafactor's ``_init_group`` refuses them
    #: with its RuntimeError, which test_adafactor checks).
    complex_params: bool = True
    #: Whether each param's update reads reductions over that whole param (Adafactor's
    #: norms and row/column means): a tensor split into pieces is another problem, so the
    #: chunking test compares thread counts on the whole tensor instead.
    per_tensor_reductions: bool = False
    #: State only params of fewer than two dims keep (Adafactor's ``variance``; its
    #: matrices keep ``row_var`` and ``col_var``): tests that edit a matrix param's state
    #: leave these keys out.
    vector_only_state: tuple[str, ...] = ()
    #: Whether torch's own optimizer steps FSDP2's DTensor params (the FSDP2 suites run
    #: only those; ferroptim hands DTensors to torch's implementation where its kernel
    #: reads whole-tensor reductions).
    fsdp2: bool = True

    def make_ferro(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return self.ferro(params, **{**self.fixed, **kwargs})

    def make_torch(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return self.torch(params, **{**self.fixed, **self.reference_kwargs, **kwargs})


def _adam_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    keys = ("step", "exp_avg", "exp_avg_sq")
    return (*keys, "max_exp_avg_sq") if group["amsgrad"] else keys


def _sgd_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _rmsprop_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    keys: tuple[str, ...] = ("step", "square_avg")
    if group["momentum"] > 0:
        keys += ("momentum_buffer",)
    if group["centered"]:
        keys += ("grad_avg",)
    return keys


_ADAM_GRID: dict[str, Sequence[Any]] = {
    "amsgrad": (False, True),
    "maximize": (False, True),
    "weight_decay": (0.0, 0.05),
}
_ADAM_SECOND_GROUP = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}
_ADAM_VARIANTS = (
    {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.3, "amsgrad": True},
    {"lr": 1e-4, "maximize": True, "weight_decay": 0.0},
)
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


_ADAM_TRAINING = {"lr": 3e-3, "weight_decay": 0.05, "amsgrad": True}
_ADAM_LIVE_CHANGES = (
    ("lr", 0.05),
    ("betas", (0.5, 0.9)),
    ("eps", 1e-3),
    ("weight_decay", 0.1),
    ("maximize", True),
    ("decoupled_weight_decay", True),
    ("maximize", False),
    ("lr", torch.tensor(3e-3)),
)


def _adam_functional_states(hyper: dict[str, Any]) -> dict[str, str]:
    states = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq"}
    if hyper.get("amsgrad"):
        states["max_exp_avg_sqs"] = "max_exp_avg_sq"
    return states


def _adam_functional(fn: str, cases: dict[str, dict[str, Any]]) -> Functional:
    return Functional(fn, _adam_functional_states, cases, base={"lr": 3e-3})


def _adam(name: str, ferro: type, torch_cls: type, **extra: Any) -> Family:
    return Family(
        name,
        ferro,
        torch_cls,
        grid=_ADAM_GRID,
        state_keys=_adam_state_keys,
        second_group=_ADAM_SECOND_GROUP,
        variants=_ADAM_VARIANTS,
        state_tensors=_ADAM_STATE,
        kernel="adam_step",
        full_grid=True,
        bad_constructor=_ADAM_BAD,
        unusual=_ADAM_UNUSUAL,
        numbers=("lr", "eps", "weight_decay"),
        **extra,
    )


def _sgd_functional_states(hyper: dict[str, Any]) -> dict[str, str]:
    return {"momentum_buffers": "momentum_buffer"} if hyper.get("momentum") else {}


def _rmsprop_functional_states(hyper: dict[str, Any]) -> dict[str, str]:
    states = {"square_avgs": "square_avg"}
    if hyper.get("momentum"):
        states["momentum_buffers"] = "momentum_buffer"
    if hyper.get("centered"):
        states["grad_avgs"] = "grad_avg"
    return states


def _adagrad_functional_split(
    hyper: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    # The initial accumulator is the functional's initial state array, torch's kwarg.
    hyper = dict(hyper)
    initial = hyper.pop("initial_accumulator_value", 0.0)
    return hyper, {"state_sums": initial}, {"initial_accumulator_value": initial}


#: Constructor arguments torch rejects (kwargs, words of its error), per family: test_bad_input.
_ADAM_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"eps": -1e-8}, "epsilon", id="negative-eps"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"betas": (1.0, 0.999)}, "beta parameter at index 0", id="beta1-one"),
    pytest.param({"betas": (-0.1, 0.999)}, "beta parameter at index 0", id="beta1-negative"),
    pytest.param({"betas": (0.9, 1.0)}, "beta parameter at index 1", id="beta2-one"),
    pytest.param({"betas": (0.9, 1.5)}, "beta parameter at index 1", id="beta2-above-one"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True, "foreach": True}, "fused.*foreach", id="fused-and-foreach"),
    pytest.param(
        {"fused": True, "differentiable": True}, "differentiable", id="fused-differentiable"
    ),
]

_SGD_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"momentum": -0.9}, "momentum", id="negative-momentum"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"nesterov": True}, "Nesterov", id="nesterov-without-momentum"),
    pytest.param(
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        "Nesterov",
        id="nesterov-with-dampening",
    ),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True, "foreach": True}, "fused.*foreach", id="fused-and-foreach"),
    pytest.param(
        {"fused": True, "differentiable": True}, "differentiable", id="fused-differentiable"
    ),
]

_RMSPROP_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"eps": -1e-8}, "epsilon", id="negative-eps"),
    pytest.param({"momentum": -0.9}, "momentum", id="negative-momentum"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"alpha": -0.5}, "alpha", id="negative-alpha"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True}, "fused", id="fused"),  # torch has no fused RMSprop
]

_ADAGRAD_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"lr_decay": -0.1}, "lr_decay", id="negative-lr-decay"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param(
        {"initial_accumulator_value": -0.1},
        "initial_accumulator_value",
        id="negative-initial-accumulator-value",
    ),
    pytest.param({"eps": -1e-10}, "epsilon", id="negative-eps"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True, "foreach": True}, "fused.*foreach", id="fused-and-foreach"),
    pytest.param(
        {"fused": True, "differentiable": True}, "differentiable", id="fused-differentiable"
    ),
]


ADAMAX_FUNCTIONAL = Functional(
    "adamax_",
    lambda hyper: {"exp_avgs": "exp_avg", "exp_infs": "exp_inf"},
    {
        "adamax": {},
        "adamax-wd-maximize": {
            "weight_decay": 0.05,
            "maximize": True,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
        },
    },
    base={"lr": 3e-3},
)
NADAM_FUNCTIONAL = Functional(
    "nadam_",
    lambda hyper: {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq"},
    {
        "nadam": {},
        "nadam-wd-maximize": {"weight_decay": 0.05, "maximize": True, "momentum_decay": 0.02},
        "nadam-decoupled": {
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
        },
    },
    base={"lr": 3e-3},
    scalars={"mu_products": "mu_product"},
)
NADAM_DIFFERENTIABLE = {
    "NAdam-wd": {"weight_decay": 0.1},
    "NAdam-decoupled-maximize": {
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
        "maximize": True,
    },
}

RADAM_FUNCTIONAL = Functional(
    "radam_",
    lambda hyper: {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq"},
    {
        "radam": {},
        "radam-wd-maximize": {"weight_decay": 0.05, "maximize": True, "betas": (0.8, 0.9)},
        "radam-decoupled": {
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
        },
    },
    base={"lr": 3e-3},
)

ADADELTA_FUNCTIONAL = Functional(
    "adadelta_",
    lambda hyper: {"square_avgs": "square_avg", "acc_deltas": "acc_delta"},
    {
        "adadelta": {},
        "adadelta-wd-maximize": {"weight_decay": 0.05, "maximize": True, "rho": 0.95},
        "adadelta-lr-eps": {"lr": 0.5, "eps": 1e-4},
    },
    base={"lr": 1.0},
)
_ADADELTA_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"rho": -0.1}, "rho", id="negative-rho"),
    pytest.param({"rho": 1.5}, "rho", id="rho-above-one"),
    pytest.param({"eps": -1e-6}, "epsilon", id="negative-eps"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True}, "fused", id="fused"),  # torch has no fused Adadelta
]


def _rprop_functional_split(
    hyper: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    # torch creates `step_size` as `full_like(grad, lr)`: the functional's initial
    # step-size arrays, torch's `lr`.
    hyper = dict(hyper)
    lr = hyper.pop("lr")
    return hyper, {"step_size_arrays": lr}, {"lr": lr}


RPROP_FUNCTIONAL = Functional(
    "rprop_",
    lambda hyper: {"prevs": "prev", "step_size_arrays": "step_size"},
    {
        "rprop": {},
        "rprop-etas-maximize": {"etas": (0.3, 1.7), "maximize": True},
        "rprop-narrow-step-sizes": {"step_sizes": (1e-3, 2e-2), "lr": 5e-3},
    },
    base={"lr": 1e-2},
    split=_rprop_functional_split,
)
_RPROP_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"etas": (1.2, 1.5)}, "eta values", id="etaminus-above-one"),
    pytest.param({"etas": (0.0, 1.2)}, "eta values", id="etaminus-zero"),
    pytest.param({"etas": (0.5, 0.9)}, "eta values", id="etaplus-below-one"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True}, "fused", id="fused"),  # torch has no fused Rprop
]


def _asgd_functional_split(
    hyper: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    # torch's `eta` starts at lr: the functional's initial `etas`.
    return hyper, {"etas": hyper["lr"]}, {}


ASGD_FUNCTIONAL = Functional(
    "asgd_",
    lambda hyper: {"axs": "ax"},
    {
        "asgd": {},
        "asgd-averaging-wd-maximize": {
            "t0": 3.0,
            "lambd": 0.01,
            "weight_decay": 0.05,
            "maximize": True,
        },
        "asgd-alpha": {"alpha": 0.5, "lambd": 0.1, "t0": 1.0},
    },
    base={"lr": 1e-2},
    split=_asgd_functional_split,
    scalars={"etas": "eta", "mus": "mu"},
)
_ASGD_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"lambd": -1e-4}, "lambd", id="negative-lambd"),
    pytest.param({"alpha": -0.75}, "alpha", id="negative-alpha"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True}, "fused", id="fused"),  # torch has no fused ASGD
]

_ADAFACTOR_BAD = [
    pytest.param({"lr": -1e-3}, "Learning rate", id="negative-lr"),
    pytest.param({"beta2_decay": 0.5}, "beta2_decay", id="positive-beta2-decay"),
    pytest.param({"eps": (-1e-30, 1e-3)}, "epsilon1", id="negative-eps1"),
    pytest.param({"eps": (None, -1e-3)}, "epsilon2", id="negative-eps2"),
    pytest.param({"d": 0.5}, "Clipping threshold", id="d-below-one"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
]


def _adafactor_state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    # (row_var/col_var or variance depend on each param's shape, not on the group)
    return ("step",)


#: Adamax and NAdam (no fused or foreach-only arguments to combine).
_ADAMAX_BAD = [
    pytest.param({"lr": -1e-3}, "learning rate", id="negative-lr"),
    pytest.param({"eps": -1e-8}, "epsilon", id="negative-eps"),
    pytest.param({"weight_decay": -0.1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"betas": (-0.1, 0.999)}, "beta parameter at index 0", id="negative-beta1"),
    pytest.param({"betas": (1.0, 0.999)}, "beta parameter at index 0", id="beta1-one"),
    pytest.param({"betas": (0.9, 1.0)}, "beta parameter at index 1", id="beta2-one"),
    pytest.param({"lr": torch.tensor([1e-3, 1e-3])}, "1-element", id="two-element-tensor-lr"),
    pytest.param({"fused": True}, "fused", id="fused"),  # torch has no fused Adamax/NAdam
]
_NADAM_BAD = [
    *_ADAMAX_BAD,
    pytest.param({"momentum_decay": -4e-3}, "momentum_decay", id="negative-momentum-decay"),
]

#: Lion (its reference, lion_pytorch.Lion, asserts on its arguments: AssertionError).
LION_BAD = [
    pytest.param({"lr": -1e-4}, "learning rate", id="negative-lr"),
    pytest.param({"lr": 0.0}, "learning rate", id="lr-zero"),
    pytest.param({"betas": (-0.1, 0.99)}, "betas", id="beta1-negative"),
    pytest.param({"betas": (0.9, 1.5)}, "betas", id="beta2-above-one"),
]
LION_UNUSUAL = [
    pytest.param({"lr": torch.tensor(1e-2)}, id="tensor-lr"),
    pytest.param({"lr": torch.tensor(1e-2, dtype=torch.float64)}, id="f64-tensor-lr"),
    pytest.param({"betas": (0.0, 0.0)}, id="betas-zero"),
    pytest.param({"betas": (1.0, 1.0)}, id="betas-one"),
    pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
    pytest.param({"weight_decay": -0.1}, id="negative-weight-decay"),
    pytest.param({"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}, id="all"),
]
#: AdEMAMix: hyperparameters outside the usual range, or tensors.
ADEMAMIX_UNUSUAL = [
    pytest.param({"lr": torch.tensor(1e-2)}, id="tensor-lr"),
    pytest.param({"lr": torch.tensor(1e-2, dtype=torch.float64)}, id="f64-tensor-lr"),
    pytest.param({"betas": (0.0, 0.0, 0.0)}, id="betas-zero"),
    pytest.param({"betas": (0.9, 0.999, 1.0)}, id="beta3-one"),
    pytest.param({"alpha": 0.0, "t_alpha_beta3": 3.0}, id="alpha-zero"),
    pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
    pytest.param({"t_alpha_beta3": 0.5}, id="warmup-shorter-than-a-step"),
]

LION_FUNCTIONAL = Functional(
    "lion_",
    lambda hyper: {"exp_avgs": "exp_avg"},
    {
        "lion": {},
        "lion-wd-maximize": {"weight_decay": 0.1, "maximize": True, "betas": (0.8, 0.95)},
    },
    base={"lr": 1e-3},
    has_step=False,
    smoke={},
)


#: Hyperparameters outside the usual range or of unusual types (test_parity).
_TENSOR_LRS = [
    pytest.param({"lr": torch.tensor(1e-2)}, id="tensor-lr"),  # float32 tensor
    pytest.param({"lr": torch.tensor(1e-2, dtype=torch.float64)}, id="f64-tensor-lr"),
    pytest.param({"lr": torch.tensor([1e-2])}, id="1-element-tensor-lr"),
    pytest.param({"lr": 0.0}, id="lr-zero"),
]
_ADAM_UNUSUAL = [
    *_TENSOR_LRS,
    pytest.param({"betas": (0.0, 0.0)}, id="betas-zero"),
    pytest.param({"betas": (0.99, 0.9999), "eps": 1e-3}, id="slow-betas-big-eps"),
    pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
    pytest.param({"weight_decay": 0.1, "amsgrad": True, "maximize": True}, id="all"),
]
_SGD_UNUSUAL = [
    *_TENSOR_LRS,
    pytest.param({"lr": torch.tensor(1e-2), "momentum": 0.9}, id="tensor-lr-momentum"),
    pytest.param({"weight_decay": torch.tensor(0.05)}, id="tensor-weight-decay"),
    pytest.param({"momentum": 1.0, "dampening": 1.0}, id="momentum-one-dampening-one"),
    pytest.param({"momentum": 0.5, "dampening": 1.5}, id="dampening-above-one"),
    pytest.param({"momentum": 0.99, "nesterov": True, "lr": 1e-3}, id="nesterov-0.99"),
    pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
    pytest.param({"momentum": 0.9, "weight_decay": 1.0, "maximize": True}, id="all"),
]

_RMSPROP_UNUSUAL = [
    *_TENSOR_LRS,
    pytest.param({"lr": torch.tensor(1e-2), "momentum": 0.9}, id="tensor-lr-momentum"),
    pytest.param({"alpha": 0.0}, id="alpha-zero"),
    pytest.param({"alpha": 0.5, "centered": True, "eps": 1e-2}, id="alpha-half-centered"),
    pytest.param({"alpha": 1.0, "eps": 1e-3}, id="alpha-one"),
    pytest.param({"momentum": 0.99, "eps": 1e-3, "lr": 1e-4}, id="momentum-0.99"),
    pytest.param({"momentum": 1.0, "eps": 1e-3, "lr": 1e-4}, id="momentum-one"),
    pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
    pytest.param(
        {"momentum": 0.9, "centered": True, "weight_decay": 0.1, "maximize": True}, id="all"
    ),
]

_ADAGRAD_UNUSUAL = [
    *_TENSOR_LRS,
    pytest.param({"eps": 0.0, "initial_accumulator_value": 0.5}, id="eps-zero"),
    pytest.param({"eps": 1e-2}, id="big-eps"),
    pytest.param({"lr_decay": 10.0}, id="huge-lr-decay"),
    pytest.param({"initial_accumulator_value": 100.0}, id="big-initial-accumulator"),
    pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
    pytest.param(
        {
            "lr_decay": 0.1,
            "weight_decay": 0.1,
            "initial_accumulator_value": 0.1,
            "maximize": True,
        },
        id="all",
    ),
]


FAMILIES: dict[str, Family] = {
    "Adam": _adam(
        "Adam",
        ferroptim.Adam,
        torch.optim.Adam,
        bad_input_kwargs={"amsgrad": True},
        sparse_errors={"Adam": {"lr": 0.01}},
        mixed_routing_kwargs={"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01, "amsgrad": True},
        # torch's own differentiable Adam cannot backprop through amsgrad with L2 decay.
        differentiable_cases={
            "Adam-wd": {"weight_decay": 0.1},
            "Adam-amsgrad-maximize": {"amsgrad": True, "maximize": True},
        },
        train_kwargs={"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2},
        interop_training=_ADAM_TRAINING,
        live_changes=_ADAM_LIVE_CHANGES,
        functional=_adam_functional(
            "adam_",
            {
                "adam": {},
                "adam-amsgrad": {"amsgrad": True},
                "adam-maximize-wd": {"maximize": True, "weight_decay": 0.05},
                "adam-amsgrad-maximize-wd": {
                    "amsgrad": True,
                    "maximize": True,
                    "weight_decay": 0.05,
                    "betas": (0.8, 0.99),
                    "eps": 1e-6,
                },
            },
        ),
    ),
    "Adam-decoupled": _adam(
        "Adam-decoupled",
        ferroptim.Adam,
        torch.optim.Adam,
        fixed={"decoupled_weight_decay": True},
        variant_of="Adam",
        bad_input_kwargs={"amsgrad": True, "weight_decay": 0.1},
        functional=_adam_functional("adam_", {"adam-decoupled": {"weight_decay": 0.1}}),
    ),
    "AdamW": _adam(
        "AdamW",
        ferroptim.AdamW,
        torch.optim.AdamW,
        bad_input_kwargs={"amsgrad": True},
        sparse_errors={"AdamW-amsgrad": {"lr": 0.01, "amsgrad": True}},
        mixed_dtype_kwargs={"amsgrad": True},
        mixed_routing_kwargs={"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01, "amsgrad": True},
        differentiable_cases={"AdamW-wd-amsgrad": {"weight_decay": 0.1, "amsgrad": True}},
        train_kwargs={"lr": 1e-2, "weight_decay": 0.1},
        interop_training=_ADAM_TRAINING,
        functional=_adam_functional(
            "adamw_",
            {
                "adamw": {},
                "adamw-amsgrad-maximize": {"amsgrad": True, "maximize": True, "weight_decay": 0.1},
                "adamw-no-wd": {"weight_decay": 0.0},
            },
        ),
    ),
    "SGD": Family(
        "SGD",
        ferroptim.SGD,
        torch.optim.SGD,
        grid={
            "momentum": (0.0, 0.9),
            "dampening": (0.0, 0.1),
            "nesterov": (False, True),
            "weight_decay": (0.0, 0.05),
            "maximize": (False, True),
        },
        valid=lambda kw: not kw.get("nesterov") or (kw["momentum"] > 0 and kw["dampening"] == 0),
        state_keys=_sgd_state_keys,
        second_group={"lr": 3e-3},
        # A momentum of its own in the second group (and a dampening where allowed).
        second_group_extra=lambda kw: (
            {"momentum": 0.5, **({} if kw.get("nesterov") else {"dampening": 0.3})}
            if kw.get("momentum")
            else {}
        ),
        representative=(
            {
                "momentum": 0.9,
                "dampening": 0.0,
                "nesterov": True,
                "weight_decay": 0.05,
                "maximize": True,
            },
            {
                "momentum": 0.9,
                "dampening": 0.1,
                "nesterov": False,
                "weight_decay": 0.05,
                "maximize": True,
            },
            {
                "momentum": 0.0,
                "dampening": 0.0,
                "nesterov": False,
                "weight_decay": 0.05,
                "maximize": True,
            },
        ),
        common={"momentum": 0.9},
        variants=(
            {"lr": 0.05, "momentum": 0.5, "dampening": 0.2, "weight_decay": 0.3},
            {"lr": 1e-3, "maximize": True, "nesterov": True, "momentum": 0.8, "weight_decay": 0.0},
        ),
        state_tensors=("momentum_buffer",),
        has_step=False,
        kernel="sgd_step",
        sparse_cases={
            "SGD-plain": {"lr": 0.1},
            "SGD-momentum": {"lr": 0.1, "momentum": 0.9},
            "SGD-damp": {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "maximize": True},
            "SGD-nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        },
        bad_constructor=_SGD_BAD,
        unusual=_SGD_UNUSUAL,
        mixed_dtype_kwargs={"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        mixed_routing_kwargs={"lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        differentiable_cases={
            "SGD-momentum-wd": {"momentum": 0.9, "weight_decay": 0.1},
            "SGD-nesterov": {"momentum": 0.9, "nesterov": True, "maximize": True},
            "SGD-plain-wd": {"weight_decay": 0.1},
        },
        bad_input_kwargs={"momentum": 0.9, "weight_decay": 0.1},
        numbers=("lr", "momentum", "weight_decay"),
        sparse=True,
        train_kwargs={"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        interop_training={"lr": 3e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        live_changes=(
            ("lr", 0.05),
            ("momentum", 0.5),
            ("dampening", 0.3),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("dampening", 0.0),
            ("nesterov", True),
            ("maximize", False),
            ("momentum", 0.0),  # the buffers stay in the state, unused
            ("nesterov", False),
            ("momentum", 0.9),  # ... and are used again
            ("lr", torch.tensor(3e-3)),
        ),
        functional=Functional(
            "sgd_",
            _sgd_functional_states,
            {
                "sgd": {},
                "sgd-wd-maximize": {"weight_decay": 0.05, "maximize": True},
                "sgd-momentum": {"momentum": 0.9},
                "sgd-momentum-dampening-wd": {
                    "momentum": 0.9,
                    "dampening": 0.1,
                    "weight_decay": 0.05,
                },
                "sgd-nesterov-wd-maximize": {
                    "momentum": 0.8,
                    "nesterov": True,
                    "weight_decay": 0.05,
                    "maximize": True,
                },
            },
            base={"lr": 1e-2},
            has_step=False,
            first_step=lambda hyper: bool(hyper.get("momentum")),
            smoke={"momentum": 0.9, "first_step": True},
        ),
    ),
    "RMSprop": Family(
        "RMSprop",
        ferroptim.RMSprop,
        torch.optim.RMSprop,
        grid={
            "centered": (False, True),
            "momentum": (0.0, 0.9),
            "weight_decay": (0.0, 0.05),
            "maximize": (False, True),
        },
        state_keys=_rmsprop_state_keys,
        # A non-default alpha (and eps) in the second group of every parity case.
        second_group={"lr": 3e-3, "alpha": 0.9, "eps": 1e-6},
        second_group_extra=lambda kw: {"momentum": 0.5} if kw.get("momentum") else {},
        common={"momentum": 0.5, "centered": True},
        variants=(
            {"lr": 0.05, "alpha": 0.9, "eps": 1e-4, "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "momentum": 0.8, "weight_decay": 0.0},
        ),
        state_tensors=("step", "square_avg", "momentum_buffer", "grad_avg"),
        has_fused=False,
        kernel="rmsprop_step",
        sparse_errors={
            "RMSprop": {"lr": 0.01},
            "RMSprop-all": {"lr": 0.01, "momentum": 0.5, "centered": True},
        },
        bad_constructor=_RMSPROP_BAD,
        unusual=_RMSPROP_UNUSUAL,
        mixed_dtype_kwargs={"momentum": 0.5, "centered": True},
        mixed_routing_kwargs={"lr": 1e-3, "eps": 1e-3, "momentum": 0.5, "centered": True},
        # torch's own differentiable RMSprop cannot backprop through centered with weight
        # decay.
        differentiable_cases={
            "RMSprop-centered-momentum": {"momentum": 0.5, "centered": True},
            "RMSprop-momentum-wd": {"momentum": 0.5, "weight_decay": 0.1},
            "RMSprop-maximize": {"maximize": True},
        },
        bad_input_kwargs={"momentum": 0.5, "centered": True},
        numbers=("lr", "alpha", "eps", "momentum"),
        train_kwargs={"lr": 1e-2, "momentum": 0.5, "centered": True, "weight_decay": 1e-3},
        # Centered with momentum (train_kwargs): the buffer accumulates grad / avg where
        # avg = sqrt(E[g^2] - E[g]^2) cancels for elements with steady gradients, an
        # ill-conditioned value torch's own float32 for-loop gets only to ~4e-4 (vs
        # float64); the uncentered variant is held to the usual float32 tolerance.
        train_variants={"RMSprop-uncentered": {"lr": 1e-2, "momentum": 0.5, "weight_decay": 1e-3}},
        interop_training={"lr": 1e-3, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
        live_changes=(
            ("lr", 0.05),
            ("alpha", 0.9),
            ("eps", 1e-3),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("momentum", 0.9),
            ("centered", False),
            ("momentum", 0.0),  # the buffers stay in the state, unused
            ("maximize", False),
            ("centered", True),  # grad_avg kept from before is used again, as torch does
            ("momentum", 0.3),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=Functional(
            "rmsprop_",
            _rmsprop_functional_states,
            {
                "rmsprop": {},
                "rmsprop-centered": {"centered": True},
                "rmsprop-momentum": {"momentum": 0.9, "alpha": 0.9},
                "rmsprop-centered-momentum-wd-maximize": {
                    "centered": True,
                    "momentum": 0.5,
                    "weight_decay": 0.05,
                    "maximize": True,
                    "eps": 1e-6,
                },
            },
            base={"lr": 1e-3},
        ),
    ),
    "Adagrad": Family(
        "Adagrad",
        ferroptim.Adagrad,
        torch.optim.Adagrad,
        grid={
            "lr_decay": (0.0, 0.01),
            "weight_decay": (0.0, 0.05),
            "initial_accumulator_value": (0.0, 0.1),
            "maximize": (False, True),
        },
        state_keys=lambda group: ("step", "sum"),
        second_group={"lr": 3e-3, "eps": 1e-6},
        second_group_extra=lambda kw: {"lr_decay": 0.05} if kw.get("lr_decay") else {},
        common={"initial_accumulator_value": 0.1},
        variants=(
            {"lr": 0.05, "lr_decay": 0.1, "eps": 1e-4, "weight_decay": 0.3},
            {"lr": 1e-3, "maximize": True, "weight_decay": 0.0},
        ),
        state_tensors=("step", "sum"),
        kernel="adagrad_step",
        sparse_cases={
            "Adagrad-plain": {"lr": 0.1},
            "Adagrad-all": {
                "lr": 0.1,
                "lr_decay": 0.01,
                "initial_accumulator_value": 0.1,
                "eps": 1e-6,
            },
            "Adagrad-maximize": {"lr": 0.1, "maximize": True},
        },
        sparse_errors={"Adagrad-weight-decay": {"lr": 0.1, "weight_decay": 0.01}},
        bad_constructor=_ADAGRAD_BAD,
        unusual=_ADAGRAD_UNUSUAL,
        mixed_dtype_kwargs={"lr_decay": 0.01, "initial_accumulator_value": 0.1},
        mixed_routing_kwargs={
            "lr": 1e-3,
            "eps": 1e-3,
            "weight_decay": 0.01,
            "lr_decay": 0.01,
        },
        differentiable_cases={
            "Adagrad-all": {"lr_decay": 0.1, "weight_decay": 0.1, "maximize": True}
        },
        bad_input_kwargs={"lr_decay": 0.01, "initial_accumulator_value": 0.1},
        numbers=("lr", "lr_decay", "eps", "weight_decay"),
        sparse=True,
        train_kwargs={"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
        interop_training={"lr": 3e-2, "lr_decay": 0.01, "weight_decay": 0.01},
        live_changes=(
            ("lr", 0.05),
            ("lr_decay", 0.1),
            ("eps", 1e-3),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("initial_accumulator_value", 5.0),  # only read when state is created
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=Functional(
            "adagrad_",
            lambda hyper: {"state_sums": "sum"},
            {
                "adagrad": {},
                "adagrad-lr_decay": {"lr_decay": 0.01},
                "adagrad-lr_decay-wd-maximize-init": {
                    "initial_accumulator_value": 0.1,
                    "lr_decay": 0.05,
                    "weight_decay": 0.05,
                    "maximize": True,
                    "eps": 1e-6,
                },
            },
            base={"lr": 1e-2},
            split=_adagrad_functional_split,
        ),
    ),
    "Adamax": Family(
        "Adamax",
        ferroptim.Adamax,
        torch.optim.Adamax,
        grid={"weight_decay": (0.0, 0.05), "maximize": (False, True)},
        state_keys=lambda group: ("step", "exp_avg", "exp_inf"),
        second_group={"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
        variants=(
            {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "weight_decay": 0.0},
        ),
        state_tensors=("step", "exp_avg", "exp_inf"),
        has_fused=False,
        kernel="adamax_step",
        full_grid=True,
        bad_constructor=_ADAMAX_BAD,
        bad_input_kwargs={"weight_decay": 0.1},
        numbers=("lr", "eps", "weight_decay"),
        unusual=[
            *_TENSOR_LRS,
            pytest.param({"betas": (0.0, 0.0)}, id="betas-zero"),
            pytest.param({"betas": (0.99, 0.9999), "eps": 1e-3}, id="slow-betas-big-eps"),
            pytest.param({"eps": 0.0}, id="eps-zero"),
            pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
            pytest.param({"weight_decay": 0.1, "maximize": True}, id="all"),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.01},
        mixed_routing_kwargs={"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01},
        # (torch's own differentiable Adamax cannot backprop through its steps at all: its
        # in-place `exp_inf.mul_` overwrites what autograd saved.)
        train_kwargs={"lr": 1e-2, "weight_decay": 1e-2},
        interop_training={"lr": 3e-3, "weight_decay": 0.01},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9)),
            ("eps", 1e-3),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=ADAMAX_FUNCTIONAL,
    ),
    "NAdam": Family(
        "NAdam",
        ferroptim.NAdam,
        torch.optim.NAdam,
        grid={
            "weight_decay": (0.0, 0.05),
            "decoupled_weight_decay": (False, True),
            "maximize": (False, True),
        },
        # (decoupled decay without weight decay is plain NAdam)
        valid=lambda kw: not kw.get("decoupled_weight_decay") or kw["weight_decay"] != 0,
        state_keys=lambda group: ("step", "mu_product", "exp_avg", "exp_avg_sq"),
        # Its own momentum schedule in the second group of every parity case.
        second_group={"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "momentum_decay": 0.02},
        variants=(
            {
                "lr": 0.05,
                "betas": (0.5, 0.9),
                "eps": 1e-4,
                "weight_decay": 0.3,
                "momentum_decay": 0.01,
            },
            {"lr": 1e-4, "maximize": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        # (the per-tensor scalar mu_product last: tests that pick "a state buffer" take
        # the first non-step key)
        state_tensors=("step", "exp_avg", "exp_avg_sq", "mu_product"),
        scalar_state=("step", "mu_product"),
        has_fused=False,
        kernel="nadam_step",
        full_grid=True,
        bad_constructor=_NADAM_BAD,
        bad_input_kwargs={"weight_decay": 0.1, "decoupled_weight_decay": True},
        numbers=("lr", "eps", "weight_decay", "momentum_decay"),
        unusual=[
            *_TENSOR_LRS,
            pytest.param(
                {"lr": torch.tensor(1e-2), "weight_decay": 0.1, "decoupled_weight_decay": True},
                id="tensor-lr-decoupled",
            ),
            pytest.param({"betas": (0.0, 0.0)}, id="betas-zero"),
            pytest.param({"betas": (0.99, 0.9999), "eps": 1e-3}, id="slow-betas-big-eps"),
            pytest.param({"momentum_decay": 0.0}, id="momentum-decay-zero"),
            pytest.param({"momentum_decay": 0.5}, id="big-momentum-decay"),
            pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
            pytest.param(
                {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}, id="all"
            ),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.01, "decoupled_weight_decay": True},
        mixed_routing_kwargs={
            "lr": 1e-3,
            "eps": 1e-3,
            "weight_decay": 0.01,
            "decoupled_weight_decay": True,
        },
        differentiable_cases=NADAM_DIFFERENTIABLE,
        train_kwargs={"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
        interop_training={"lr": 3e-3, "weight_decay": 0.05, "decoupled_weight_decay": True},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9)),
            ("eps", 1e-3),
            ("momentum_decay", 0.02),  # mu_product keeps the product of the old schedule
            ("weight_decay", 0.1),
            ("maximize", True),
            ("decoupled_weight_decay", True),
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=NADAM_FUNCTIONAL,
    ),
    "Lion": Family(
        "Lion",
        ferroptim.Lion,
        # lion_pytorch.Lion (the reference) plus torch's `maximize`: see
        # _lion_reference.py; tests/test_lion.py checks against the real class itself.
        LionReference,
        grid={
            "weight_decay": (0.0, 0.1),
            "decoupled_weight_decay": (False, True),
            "maximize": (False, True),
        },
        # (decoupled decay without weight decay is plain Lion)
        valid=lambda kw: not kw.get("decoupled_weight_decay") or kw["weight_decay"] != 0,
        state_keys=lambda group: ("exp_avg",),
        second_group={"lr": 3e-3, "betas": (0.8, 0.9)},
        # The reference has one flavour (its for-loop); it takes no `foreach`.
        reference_kwargs={},
        variants=(
            {"lr": 0.05, "betas": (0.5, 0.9), "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "weight_decay": 0.0},
        ),
        state_tensors=("exp_avg",),
        scalar_state=(),
        has_step=False,
        has_fused=False,
        kernel="lion_step",
        # The reference's dense ops take sparse gradients; ferroptim hands them to its
        # torch-op code, which does the same.
        sparse=True,
        sparse_cases={
            "Lion-plain": {"lr": 0.1},
            "Lion-all": {
                "lr": 0.1,
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
                "maximize": True,
            },
        },
        full_grid=True,
        # (the reference asserts with no message; ferroptim raises the same AssertionError
        # with one, so the registry's same-message test does not apply: test_lion checks
        # LION_BAD's cases instead)
        bad_input_kwargs={"weight_decay": 0.1, "decoupled_weight_decay": True},
        numbers=("lr", "weight_decay"),
        unusual=LION_UNUSUAL,
        mixed_dtype_kwargs={"weight_decay": 0.1},
        mixed_routing_kwargs={"lr": 1e-3, "weight_decay": 0.1},
        # (no differentiable_cases: the reference's step, under no_grad and on p.data,
        # records nothing to compare with; test_lion checks differentiable=True itself)
        train_kwargs={"lr": 1e-3, "weight_decay": 0.1},
        interop_training={"lr": 1e-3, "weight_decay": 0.1},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9)),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("decoupled_weight_decay", True),
            ("init_lr", 0.5),
            ("maximize", False),
            ("betas", (0.9, 1.0)),
        ),
        functional=LION_FUNCTIONAL,
    ),
    "AdEMAMix": Family(
        "AdEMAMix",
        ferroptim.AdEMAMix,
        # pytorch_optimizer.AdEMAMix (the reference) with per-group `maximize` and
        # gradients left untouched: see _pytorch_optimizer_reference.py; test_ademamix.py
        # checks against the real class itself.
        AdEMAMixReference,
        grid={
            "weight_decay": (0.0, 0.1),
            "weight_decouple": (False, True),
            "fixed_decay": (False, True),
            "t_alpha_beta3": (None, 20.0),
            "maximize": (False, True),
        },
        # (decoupling or fixing a zero decay changes nothing)
        valid=lambda kw: (
            kw["weight_decay"] != 0 or not (kw.get("weight_decouple") or kw.get("fixed_decay"))
        ),
        state_keys=lambda group: ("exp_avg", "exp_avg_sq", "exp_avg_slow"),
        second_group={"lr": 3e-3, "betas": (0.8, 0.99, 0.999), "alpha": 2.0},
        # The reference's per-parameter loop (its default CPU flavour runs the same ops as
        # foreach, but fails differently on a corrupt state: test_ademamix compares with
        # the default flavour too).
        reference_kwargs={"foreach": False},
        variants=(
            {"lr": 0.05, "betas": (0.5, 0.9, 0.99), "weight_decay": 0.3, "t_alpha_beta3": 10.0},
            {"lr": 1e-4, "maximize": True, "weight_decouple": True, "weight_decay": 0.1},
        ),
        state_tensors=("exp_avg", "exp_avg_sq", "exp_avg_slow"),
        scalar_state=(),
        has_step=False,
        has_fused=False,
        kernel="ademamix_step",
        full_grid=True,
        bad_input_kwargs={"weight_decay": 0.1, "t_alpha_beta3": 10.0},
        numbers=("lr", "weight_decay", "alpha", "eps"),
        unusual=ADEMAMIX_UNUSUAL,
        mixed_dtype_kwargs={"weight_decay": 0.1, "t_alpha_beta3": 10.0},
        mixed_routing_kwargs={"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-3},
        train_kwargs={"lr": 1e-3, "weight_decay": 0.1, "t_alpha_beta3": 50.0},
        interop_training={"lr": 1e-3, "weight_decay": 0.1, "t_alpha_beta3": 50.0},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9, 0.99)),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("weight_decouple", True),
            ("alpha", 2.0),
            ("t_alpha_beta3", 7.0),
            ("maximize", False),
        ),
    ),
    "Adan": Family(
        "Adan",
        ferroptim.Adan,
        # pytorch_optimizer.Adan with per-group `maximize` and gradients left untouched:
        # see _pytorch_optimizer_reference.py; test_adan.py checks against the real class
        # (its `max_grad_norm` too).
        AdanReference,
        grid={
            "weight_decay": (0.0, 0.1),
            "weight_decouple": (False, True),
            "maximize": (False, True),
        },
        valid=lambda kw: kw["weight_decay"] != 0 or not kw.get("weight_decouple"),
        state_keys=lambda group: ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad"),
        second_group={"lr": 3e-3, "betas": (0.9, 0.9, 0.999)},
        reference_kwargs={"foreach": False},
        variants=(
            {"lr": 0.05, "betas": (0.5, 0.9, 0.99), "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "weight_decouple": True, "weight_decay": 0.1},
        ),
        state_tensors=("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad"),
        scalar_state=(),
        has_step=False,
        has_fused=False,
        kernel="adan_step",
        ferro_clipping=False,
        full_grid=True,
        bad_input_kwargs={"weight_decay": 0.1},
        numbers=("lr", "weight_decay", "eps"),
        unusual=[
            pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
            pytest.param({"betas": (0.0, 0.0, 0.0)}, id="betas-zero"),
            # (beta3 = 1 zeroes its bias correction: every update is nan, on both sides)
            pytest.param({"lr": torch.tensor(1e-2)}, id="tensor-lr"),
            pytest.param({"lr": torch.tensor(1e-2), "weight_decay": 0.1}, id="tensor-lr-decay"),
            pytest.param(
                {"lr": torch.tensor(1e-2), "weight_decay": 0.1, "weight_decouple": True},
                id="tensor-lr-decoupled",
            ),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.1},
        mixed_routing_kwargs={"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-3},
        train_kwargs={"lr": 1e-3, "weight_decay": 0.02, "weight_decouple": True},
        interop_training={"lr": 1e-3, "weight_decay": 0.02},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9, 0.99)),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("weight_decouple", True),
            ("maximize", False),
        ),
    ),
    "ScheduleFreeAdamW": Family(
        "ScheduleFreeAdamW",
        # ferroptim.ScheduleFreeAdamW and schedulefree.AdamWScheduleFree (with per-group
        # `maximize` and gradients left untouched), both in train mode from the start: see
        # _schedulefree_reference.py; test_schedulefree.py checks the real classes.
        TrainedScheduleFreeAdamW,
        ScheduleFreeAdamWReference,
        grid={
            "warmup_steps": (0, 10),
            "weight_decay": (0.0, 0.05),
            "r": (0.0, 0.5),
            "weight_lr_power": (2.0, 0.0),
            "maximize": (False, True),
        },
        state_keys=lambda group: ("z", "exp_avg_sq"),
        second_group={"lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-6},
        # (the reference's per-parameter loop: its foreach flavour runs the same ops)
        reference_kwargs={"foreach": False},
        variants=(
            {"lr": 0.05, "betas": (0.5, 0.9), "weight_decay": 0.3, "warmup_steps": 5},
            {"lr": 1e-4, "maximize": True, "r": 1.0, "weight_lr_power": 0.0},
        ),
        state_tensors=("z", "exp_avg_sq"),
        scalar_state=(),
        has_step=False,
        has_fused=False,
        kernel="schedulefree_adamw_step",
        bad_input_kwargs={"weight_decay": 0.05, "warmup_steps": 5},
        numbers=("lr", "eps", "weight_decay"),
        mixed_dtype_kwargs={"weight_decay": 0.05, "warmup_steps": 5},
        mixed_routing_kwargs={"lr": 1e-3, "weight_decay": 0.05, "eps": 1e-3},
        train_kwargs={"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 5},
        interop_training={"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 5},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9)),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("warmup_steps", 20),
            ("r", 1.0),
            ("maximize", False),
        ),
    ),
    "ScheduleFreeSGD": Family(
        "ScheduleFreeSGD",
        TrainedScheduleFreeSGD,
        ScheduleFreeSGDReference,
        grid={
            "warmup_steps": (0, 10),
            "weight_decay": (0.0, 0.05),
            "r": (0.0, 0.5),
            "weight_lr_power": (2.0, 0.0),
            "maximize": (False, True),
        },
        state_keys=lambda group: ("z",),
        second_group={"lr": 0.3, "momentum": 0.7},
        reference_kwargs={"foreach": False},
        variants=(
            {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.3, "warmup_steps": 5},
            {"lr": 1e-3, "maximize": True, "r": 1.0, "weight_lr_power": 0.0},
        ),
        state_tensors=("z",),
        scalar_state=(),
        has_step=False,
        has_fused=False,
        kernel="schedulefree_sgd_step",
        # (the reference's ops take sparse gradients: test_schedulefree compares them)
        sparse=True,
        bad_input_kwargs={"weight_decay": 0.05, "warmup_steps": 5},
        numbers=("lr", "momentum", "weight_decay"),
        mixed_dtype_kwargs={"weight_decay": 0.05, "warmup_steps": 5},
        mixed_routing_kwargs={"lr": 0.1, "weight_decay": 0.05},
        train_kwargs={"lr": 0.1, "weight_decay": 0.01, "warmup_steps": 5},
        interop_training={"lr": 0.1, "weight_decay": 0.01, "warmup_steps": 5},
        live_changes=(
            ("lr", 0.05),
            ("momentum", 0.5),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("warmup_steps", 20),
            ("r", 1.0),
            ("maximize", False),
        ),
    ),
    "RAdam": Family(
        "RAdam",
        ferroptim.RAdam,
        torch.optim.RAdam,
        grid={
            "weight_decay": (0.0, 0.05),
            "decoupled_weight_decay": (False, True),
            "maximize": (False, True),
        },
        # (decoupled decay without weight decay is plain RAdam)
        valid=lambda kw: not kw.get("decoupled_weight_decay") or kw["weight_decay"] != 0,
        state_keys=lambda group: ("step", "exp_avg", "exp_avg_sq"),
        # A beta2 whose rectification starts at step 3 (not 6) in the second group.
        second_group={"lr": 3e-3, "betas": (0.8, 0.9), "eps": 1e-6},
        variants=(
            {"lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-4, "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        state_tensors=("step", "exp_avg", "exp_avg_sq"),
        has_fused=False,
        kernel="radam_step",
        full_grid=True,
        bad_constructor=_ADAMAX_BAD,
        bad_input_kwargs={"weight_decay": 0.1, "decoupled_weight_decay": True},
        # (eps is read only on rectified steps: test_bad_input's RAdam eps test)
        numbers=("lr", "weight_decay"),
        unusual=[
            *_TENSOR_LRS,
            pytest.param(
                {"lr": torch.tensor(1e-2), "weight_decay": 0.1, "decoupled_weight_decay": True},
                id="tensor-lr-decoupled",
            ),
            pytest.param({"betas": (0.0, 0.0)}, id="betas-zero"),  # never rectified
            pytest.param({"betas": (0.99, 0.9999), "eps": 1e-3}, id="slow-betas-big-eps"),
            pytest.param({"betas": (0.5, 0.5), "eps": 0.0}, id="fast-betas-eps-zero"),
            pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
            pytest.param(
                {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}, id="all"
            ),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.01, "decoupled_weight_decay": True},
        mixed_routing_kwargs={
            "lr": 1e-3,
            "eps": 1e-3,
            "weight_decay": 0.01,
            "decoupled_weight_decay": True,
        },
        differentiable_cases={
            "RAdam-wd": {"weight_decay": 0.1},
            "RAdam-decoupled-maximize": {
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
                "maximize": True,
            },
        },
        train_kwargs={"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
        interop_training={"lr": 3e-3, "weight_decay": 0.05, "decoupled_weight_decay": True},
        live_changes=(
            ("lr", 0.05),
            ("betas", (0.5, 0.9)),
            ("eps", 1e-3),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("decoupled_weight_decay", True),
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=RADAM_FUNCTIONAL,
    ),
    "Adadelta": Family(
        "Adadelta",
        ferroptim.Adadelta,
        torch.optim.Adadelta,
        grid={"weight_decay": (0.0, 0.05), "maximize": (False, True)},
        state_keys=lambda group: ("step", "square_avg", "acc_delta"),
        second_group={"lr": 0.5, "rho": 0.95, "eps": 1e-5},
        variants=(
            {"lr": 0.3, "rho": 0.5, "eps": 1e-4, "weight_decay": 0.3},
            {"lr": 2.0, "maximize": True, "weight_decay": 0.0},
        ),
        state_tensors=("step", "square_avg", "acc_delta"),
        has_fused=False,
        kernel="adadelta_step",
        full_grid=True,
        bad_constructor=_ADADELTA_BAD,
        bad_input_kwargs={"weight_decay": 0.1},
        numbers=("lr", "rho", "eps", "weight_decay"),
        unusual=[
            *_TENSOR_LRS,
            pytest.param({"rho": 0.0}, id="rho-zero"),
            pytest.param({"rho": 1.0}, id="rho-one"),  # the averages never move
            pytest.param({"rho": 0.5, "eps": 1e-2}, id="fast-rho-big-eps"),
            pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
            pytest.param({"weight_decay": 0.1, "maximize": True, "rho": 0.95}, id="all"),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.01},
        mixed_routing_kwargs={"lr": 1.0, "eps": 1e-3, "weight_decay": 0.01},
        differentiable_cases={
            "Adadelta-wd-maximize": {"weight_decay": 0.1, "maximize": True},
        },
        train_kwargs={"lr": 1.0, "rho": 0.9, "weight_decay": 1e-3},
        interop_training={"lr": 1.0, "weight_decay": 0.01},
        live_changes=(
            ("lr", 0.5),
            ("rho", 0.5),
            ("eps", 1e-3),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("maximize", False),
            ("lr", torch.tensor(0.3)),
        ),
        functional=ADADELTA_FUNCTIONAL,
    ),
    "Rprop": Family(
        "Rprop",
        ferroptim.Rprop,
        torch.optim.Rprop,
        grid={
            "etas": ((0.5, 1.2), (0.3, 1.7)),
            "step_sizes": ((1e-6, 50), (1e-3, 2e-2)),
            "maximize": (False, True),
        },
        state_keys=lambda group: ("step", "prev", "step_size"),
        second_group={"lr": 3e-3, "etas": (0.4, 1.5), "step_sizes": (1e-4, 0.1)},
        variants=(
            {"lr": 0.05, "etas": (0.2, 2.0), "step_sizes": (1e-3, 0.2)},
            {"lr": 1e-4, "maximize": True},
        ),
        state_tensors=("step", "prev", "step_size"),
        has_fused=False,
        kernel="rprop_step",
        full_grid=True,
        bad_constructor=_RPROP_BAD,
        bad_input_kwargs={"etas": (0.4, 1.3), "step_sizes": (1e-5, 1.0)},
        # (`lr` is read only when a param's state is created: torch's step computes with
        # no other plain number of the group)
        numbers=(),
        unusual=[
            *_TENSOR_LRS,
            pytest.param({"step_sizes": (None, 0.05)}, id="no-lower-bound"),
            pytest.param({"step_sizes": (1e-3, None)}, id="no-upper-bound"),
            pytest.param({"step_sizes": (0.1, 0.01)}, id="bounds-crossed"),
            pytest.param({"etas": (torch.tensor(0.25), 1.5)}, id="tensor-eta"),
            pytest.param({"lr": 10.0, "step_sizes": (1e-6, 1e3)}, id="huge-lr"),
            pytest.param({"etas": (0.5, 1.2), "maximize": True}, id="all"),
        ],
        mixed_dtype_kwargs={"etas": (0.3, 1.7)},
        mixed_routing_kwargs={"lr": 1e-3, "step_sizes": (1e-3, 1.0)},
        train_kwargs={"lr": 1e-3, "etas": (0.4, 1.3), "step_sizes": (1e-5, 1e-2)},
        interop_training={"lr": 1e-3, "step_sizes": (1e-5, 1e-2)},
        live_changes=(
            ("etas", (0.3, 1.5)),
            ("step_sizes", (1e-4, 0.05)),
            ("maximize", True),
            ("lr", 0.5),  # unread: step sizes were created already
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=RPROP_FUNCTIONAL,
    ),
    "ASGD": Family(
        "ASGD",
        ferroptim.ASGD,
        torch.optim.ASGD,
        grid={
            # t0 = 3: averaging (mu < 1) from the fourth step; 1e6: ax copies the param
            "t0": (1e6, 3.0),
            "weight_decay": (0.0, 0.05),
            "maximize": (False, True),
        },
        state_keys=lambda group: ("step", "eta", "mu", "ax"),
        # Its own eta schedule in the second group of every parity case.
        second_group={"lr": 3e-3, "lambd": 0.05, "alpha": 0.5, "t0": 2.0},
        variants=(
            {"lr": 0.05, "lambd": 0.01, "alpha": 0.9, "t0": 1.0, "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "weight_decay": 0.0},
        ),
        # (the per-tensor scalars last: tests that pick "a state buffer" take the first
        # non-step key)
        state_tensors=("step", "ax", "eta", "mu"),
        scalar_state=("step", "eta", "mu"),
        has_fused=False,
        kernel="asgd_step",
        full_grid=True,
        bad_constructor=_ASGD_BAD,
        bad_input_kwargs={"weight_decay": 0.1, "t0": 1.0, "lambd": 0.01},
        numbers=("lr", "lambd", "alpha", "t0", "weight_decay"),
        unusual=[
            *_TENSOR_LRS,
            pytest.param(
                {"lr": torch.tensor(1e-2), "lambd": 0.3, "alpha": 0.6, "t0": 2.0},
                id="tensor-lr-fast-schedule",
            ),
            pytest.param({"lambd": 0.0, "t0": 0.0}, id="lambd-zero-t0-zero"),
            pytest.param({"alpha": 0.0}, id="alpha-zero"),
            pytest.param({"alpha": 3.0, "lambd": 0.5}, id="alpha-three"),
            pytest.param({"lr": 10.0, "lambd": 1.0, "t0": 1.0}, id="huge-lr"),
            pytest.param({"lambd": torch.tensor(0.01)}, id="tensor-lambd"),
            pytest.param({"weight_decay": 0.1, "maximize": True, "t0": 1.0}, id="all"),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.01, "t0": 2.0},
        mixed_routing_kwargs={"lr": 1e-3, "weight_decay": 0.01, "t0": 2.0},
        train_kwargs={"lr": 1e-2, "weight_decay": 1e-2, "t0": 2.0, "lambd": 1e-3},
        interop_training={"lr": 1e-2, "weight_decay": 0.01, "t0": 5.0},
        live_changes=(
            ("lr", 0.05),  # eta follows from the next step's end on
            ("lambd", 0.01),
            ("alpha", 0.5),
            ("t0", 2.0),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
        functional=ASGD_FUNCTIONAL,
    ),
    "Adafactor": Family(
        "Adafactor",
        ferroptim.Adafactor,
        torch.optim.Adafactor,
        grid={
            "weight_decay": (0.0, 0.05),
            "maximize": (False, True),
            "eps": ((None, 1e-3), (1e-15, 1e-2)),  # (eps1² must not underflow in float32)
        },
        state_keys=_adafactor_state_keys,
        second_group={"lr": 3e-3, "beta2_decay": -0.5, "d": 2.0},
        variants=(
            {"lr": 0.05, "beta2_decay": -0.6, "d": 1.5, "weight_decay": 0.3},
            {"lr": 1e-4, "maximize": True, "eps": (1e-15, 1e-2)},
        ),
        # (params of two or more dims keep row_var and col_var, vectors variance)
        state_tensors=("step", "row_var", "col_var", "variance"),
        complex_params=False,
        per_tensor_reductions=True,
        vector_only_state=("variance",),
        # torch 2.15's Adafactor fails on a sharded param ("Sharding propagation failed
        # for aten.pow_.Scalar" on its row norms); ferroptim routes DTensors to it alike.
        fsdp2=False,
        has_fused=False,
        kernel="adafactor_step",
        full_grid=True,
        bad_constructor=_ADAFACTOR_BAD,
        bad_input_kwargs={"weight_decay": 0.1, "d": 2.0},
        numbers=("lr", "beta2_decay", "d", "weight_decay"),
        unusual=[
            *_TENSOR_LRS,
            pytest.param({"beta2_decay": 0.0}, id="beta2-decay-zero"),  # w = 1: no memory
            pytest.param({"d": 1e6, "lr": 0.5}, id="no-clipping"),
            pytest.param({"eps": (0.0, 0.0)}, id="eps-zero"),
            pytest.param({"eps": (1.0, 1e-3)}, id="huge-eps1"),
            pytest.param({"lr": 10.0, "weight_decay": 0.01}, id="huge-lr"),
            pytest.param({"weight_decay": 0.1, "maximize": True, "d": 3.0}, id="all"),
        ],
        mixed_dtype_kwargs={"weight_decay": 0.01},
        mixed_routing_kwargs={"lr": 1e-3, "eps": (1e-3, 1e-3), "weight_decay": 0.01},
        train_kwargs={"lr": 1e-2, "weight_decay": 1e-2, "d": 2.0},
        interop_training={"lr": 1e-2, "weight_decay": 0.01},
        live_changes=(
            ("lr", 0.05),
            ("beta2_decay", -0.5),
            ("eps", (1e-15, 1e-2)),
            ("d", 2.0),
            ("weight_decay", 0.1),
            ("maximize", True),
            ("maximize", False),
            ("lr", torch.tensor(3e-3)),
        ),
    ),
}

ALL_FAMILIES = tuple(FAMILIES)

#: Optimizers of 2-D matrices only (torch.optim.Muon). Kept out of :data:`FAMILIES`: every
#: generic suite above builds its params from ``conftest``'s layouts (1-D, 3-D and 4-D
#: params among them, which torch's Muon refuses in its constructor), passes torch.optim's
#: common keywords (``foreach``, ``maximize``, ``capturable``, ``differentiable``, none of
#: which Muon takes) or ferroptim's in-step options (``max_grad_norm``, ``skip_nonfinite``:
#: Muon's step is not the element-wise engine's). tests/test_muon.py reads this entry and
#: covers, on 2-D params, what applies of each family of tests:
#:
#: * parity: ``grid`` x float32/float64, many steps bitwise against torch's (only)
#:   implementation, ragged/tall/wide/transposed shapes, missing grads, groups;
#: * interop: signature and defaults, state_dict both ways mid-training;
#: * bad input: torch's errors, nothing written;
#: * AMP (GradScaler unscales as for torch's Muon: no ``_step_supports_amp_scaling``),
#:   compile (the compiled model's step), CUDA (torch's implementation; skipped without a
#:   GPU). Distributed: the step is per-tensor and rank-local like torch's (DDP all-reduces
#:   gradients before it); not run separately.
#: * not applicable: sparse gradients (torch refuses them: the bad-input test checks the
#:   error), the functional API (Newton–Schulz needs torch's matmuls), clipping options.
MATRIX_FAMILIES: dict[str, Family] = {
    "Muon": Family(
        "Muon",
        ferroptim.Muon,
        torch.optim.Muon,
        grid={
            "nesterov": (False, True),
            "adjust_lr_fn": (None, "original", "match_rms_adamw", "spectral_unclamped"),
            "weight_decay": (0.0, 0.1),
        },
        state_keys=lambda group: ("momentum_buffer",),
        second_group={"lr": 0.03, "momentum": 0.5},
        # torch's Muon has one implementation (its for-loop) and takes no `foreach`.
        reference_kwargs={},
        state_tensors=("momentum_buffer",),
        scalar_state=(),
        has_step=False,
        has_fused=False,
        kernel="muon_step",
        numbers=("lr", "weight_decay", "momentum"),
        train_kwargs={"lr": 0.02, "weight_decay": 0.01},
        full_grid=True,
    ),
}


def runs_in_rust(name: str) -> bool:
    """Whether family ``name`` (or a variant named ``"<family>-<what>"``, as some test
    tables name them) steps CPU float params in Rust."""
    return FAMILIES[name if name in FAMILIES else name.split("-")[0]].rust


#: The optimizers themselves (no variants): what the end-to-end suites run.
OPTIMIZERS = tuple(name for name, f in FAMILIES.items() if f.variant_of is None)


def one_per_kernel(*prefer: str) -> tuple[str, ...]:
    """One family per Rust kernel, in registry order: the one named in ``prefer`` where
    given (``one_per_kernel("AdamW")``), else the first entry using that kernel."""
    chosen: dict[str, str] = {}
    for name, family in FAMILIES.items():
        if family.kernel not in chosen or name in prefer:
            chosen[family.kernel] = name
    return tuple(chosen.values())


#: Families that take ferroptim's ``max_grad_norm`` (clipping inside the step).
CLIPPING = tuple(name for name, f in FAMILIES.items() if f.ferro_clipping)


#: Families whose parity tests sweep every flag combination (the rest: representative
#: cases under the costlier sweeps).
FULL_GRID = tuple(name for name, f in FAMILIES.items() if f.full_grid)
#: One family per kernel, besides Adam's (the registry's first kernel).
NEW_FAMILIES = tuple(name for name in one_per_kernel() if FAMILIES[name].kernel != "adam_step")


def taking(keyword: str) -> tuple[str, ...]:
    """The optimizers (no variants) whose torch constructor takes ``keyword`` (``betas``,
    ``capturable``, ...): the tests of that keyword's behaviour run on them."""
    return tuple(
        name
        for name in OPTIMIZERS
        if keyword in inspect.signature(FAMILIES[name].torch.__init__).parameters
    )


def weight_decay(family: Family | str, value: float) -> dict[str, float]:
    """``{"weight_decay": value}`` where the family's torch constructor takes the keyword
    (Rprop's does not), else nothing: kwargs for tests that add some decay to any family."""
    family = FAMILIES[family] if isinstance(family, str) else family
    takes = "weight_decay" in inspect.signature(family.torch.__init__).parameters
    return {"weight_decay": value} if takes else {}


def train_cases(*, variants: bool = False) -> dict[str, tuple[Family, dict[str, Any]]]:
    """Id -> (family, constructor kwargs) for the end-to-end suites: every optimizer's
    ``train_kwargs`` (and, with ``variants``, its ``train_variants``)."""
    cases: dict[str, tuple[Family, dict[str, Any]]] = {}
    for name in OPTIMIZERS:
        family = FAMILIES[name]
        cases[name] = (family, family.train_kwargs)
        if variants:
            cases.update({k: (family, kw) for k, kw in family.train_variants.items()})
    return cases


@dataclass(frozen=True)
class FlagCase:
    family: Family
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        parts = [self.family.name]
        for key, value in self.kwargs.items():
            if isinstance(value, bool):
                if value:
                    parts.append(key)
            else:
                parts.append(f"{key}={value}")
        return "-".join(parts)


def flag_cases(families: Sequence[str] | None = None) -> list[FlagCase]:
    """Every combination of every family's flag grid."""
    cases = []
    for name in families or FAMILIES:
        family = FAMILIES[name]
        keys = list(family.grid)
        for values in itertools.product(*(family.grid[k] for k in keys)):
            kwargs = dict(zip(keys, values, strict=True))
            if family.valid(kwargs):
                cases.append(FlagCase(family, kwargs))
    return cases


def flag_params(families: Sequence[str] | None = None) -> list[Any]:
    """``flag_cases`` as ``pytest.param`` objects with readable ids."""
    return [pytest.param(c, id=c.id) for c in flag_cases(families)]


def some_flag_params(families: Sequence[str] | None = None) -> list[Any]:
    """A small, representative subset of the flag grid (for the costlier sweeps): every
    family's representative cases (by default every flag at its last grid value,
    "everything on"), and the first family with every flag at its first value ("plain")."""
    picked = []
    for index, name in enumerate(families or FAMILIES):
        family = FAMILIES[name]
        cases = [
            FlagCase(family, dict(kw))
            for kw in family.representative or ({k: v[-1] for k, v in family.grid.items()},)
        ]
        if index == 0 and families is None:
            cases.append(FlagCase(family, {k: v[0] for k, v in family.grid.items()}))
        for case in cases:
            assert family.valid(case.kwargs), case.id
            picked.append(pytest.param(case, id=case.id))
    return picked

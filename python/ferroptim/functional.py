"""Optimizer steps on NumPy arrays, without torch.

The same Rust kernels as the torch classes, called on any float32/float64
C-contiguous arrays (NumPy arrays, ``array.array``, writable memoryviews).
Each function updates ``params`` and the state arrays in place and returns
``None``; pass one array or a list of arrays (all tensors of a list are stepped
in one parallel call). Results equal the torch classes' for the same inputs.

16-bit arrays: float16 arrays, and bfloat16 passed as **uint16 arrays of its bits**
(the buffer protocol has no bfloat16 code: ``a.view(np.uint16)`` of an ``ml_dtypes``
bfloat16 array, or ``t.view(torch.int16).numpy().view(np.uint16)`` of a torch tensor,
which shares its memory), step with torch's for-loop semantics, every op rounded to
the 16-bit dtype, exactly as the classes step a bfloat16/float16 model. A param's
gradient and states are in its dtype (a uint16 array is always read as bfloat16);
per-tensor scalar arrays (``mu_products``, ``etas``, ``mus``) stay float32/float64.
Every call takes them (``lion_`` rounds as ``lion_pytorch`` does on 16-bit tensors).

Every argument is checked before anything is written: a read-only, non-contiguous
or wrongly typed array, mismatched lengths, or the same array passed twice raise
``TypeError``/``ValueError`` and leave every array as it was.

``step`` is the 1-based number of the step being taken (what torch's
``state["step"]`` holds after its increment): pass 1 on the first call, 2 on the
second, and so on. ::

    import numpy as np
    import ferroptim.functional as F

    w = np.zeros(1000, np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, 101):
        g = compute_grad(w)
        F.adamw_(w, g, m, v, step=t, lr=1e-3)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from ferroptim import _core

__all__ = [
    "adadelta_",
    "adagrad_",
    "adam_",
    "adamax_",
    "adamw_",
    "asgd_",
    "lion_",
    "nadam_",
    "radam_",
    "rmsprop_",
    "rprop_",
    "sgd_",
]

#: One array (anything with the buffer protocol) or a sequence of them.
Arrays = Any | Sequence[Any]


def _listed(arrays: Arrays) -> list[Any]:
    listed: list[Any] = list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]
    # A 0-d array exports no shape; step its one-element view (same memory).
    return [a.reshape(1) if getattr(a, "ndim", None) == 0 else a for a in listed]


def _plan(
    params: Arrays,
    grads: Arrays,
    states: list[tuple[str, Arrays]],
    step: float | None,
    scalars: list[tuple[str, Arrays]] = [],  # noqa: B006 (never mutated)
) -> _core.GroupPlan:
    """A checked one-shot plan over the arrays (the same engine the classes use);
    ``scalars``: per-tensor scalar state after the step counter, 1-element arrays."""
    return _core.GroupPlan.from_arrays(
        _listed(params),
        _listed(grads),
        [(name, _listed(a)) for name, a in states],
        step,
        [(name, _listed(a)) for name, a in scalars],
    )


def _step_number(step: int) -> float:
    try:
        number = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"step must be an int >= 1 (the number of this step), got {step!r}")
    return float(number)


def _check_betas(betas: tuple[float, float]) -> tuple[float, float]:
    beta1, beta2 = betas
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    return float(beta1), float(beta2)


def _check_nonnegative(**values: float) -> None:
    names = {"lr": "learning rate", "eps": "epsilon value"}
    for name, value in values.items():
        if not value >= 0.0:
            label = names.get(name, f"{name} value")
            raise ValueError(f"Invalid {label}: {value}")


def adam_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    max_exp_avg_sqs: Arrays | None = None,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    """One Adam step (``torch.optim.Adam``) on arrays, in place.

    ``amsgrad=True`` needs ``max_exp_avg_sqs`` (zeros before the first step).
    """
    _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
    beta1, beta2 = betas
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if amsgrad != (max_exp_avg_sqs is not None):
        raise ValueError("amsgrad=True needs max_exp_avg_sqs, and only then")
    states = [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if max_exp_avg_sqs is not None:
        states.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    plan = _plan(params, grads, states, _step_number(step))
    _core.Kernel(
        "adam",
        {
            "lr": float(lr),
            "betas": (float(beta1), float(beta2)),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "amsgrad": bool(amsgrad),
            "maximize": bool(maximize),
        },
    ).step(plan)


def adamw_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    max_exp_avg_sqs: Arrays | None = None,
    maximize: bool = False,
) -> None:
    """One AdamW step (``torch.optim.AdamW``: decoupled weight decay) on arrays, in place."""
    adam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        step=step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        max_exp_avg_sqs=max_exp_avg_sqs,
        maximize=maximize,
        decoupled_weight_decay=True,
    )


def sgd_(
    params: Arrays,
    grads: Arrays,
    momentum_buffers: Arrays | None = None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
) -> None:
    """One SGD step (``torch.optim.SGD``) on arrays, in place.

    With ``momentum != 0``, ``momentum_buffers`` are needed; on the first step pass
    ``first_step=True`` and they are filled from the gradients (torch's rule).
    """
    _check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    states: list[tuple[str, Arrays]] = []
    if momentum != 0:
        if momentum_buffers is None:
            raise ValueError(
                "momentum != 0 needs momentum_buffers (arrays like params; "
                "pass first_step=True on the first step)"
            )
        states.append(("momentum_buffers", momentum_buffers))
    plan = _plan(params, grads, states, None)
    _core.Kernel(
        "sgd",
        {
            "lr": float(lr),
            "momentum": float(momentum),
            "dampening": float(dampening),
            "weight_decay": float(weight_decay),
            "nesterov": bool(nesterov),
            "maximize": bool(maximize),
        },
    ).step(plan, fresh=bool(first_step))


def rmsprop_(
    params: Arrays,
    grads: Arrays,
    square_avgs: Arrays,
    *,
    step: int,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    momentum_buffers: Arrays | None = None,
    grad_avgs: Arrays | None = None,
    maximize: bool = False,
) -> None:
    """One RMSprop step (``torch.optim.RMSprop``) on arrays, in place.

    ``momentum > 0`` needs ``momentum_buffers``; ``centered=True`` needs ``grad_avgs``
    (zeros before the first step).
    """
    _check_nonnegative(lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha)
    if centered != (grad_avgs is not None):
        raise ValueError("centered=True needs grad_avgs, and only then")
    states: list[tuple[str, Arrays]] = [("square_avgs", square_avgs)]
    if momentum > 0:
        if momentum_buffers is None:
            raise ValueError("momentum > 0 needs momentum_buffers")
        states.append(("momentum_buffers", momentum_buffers))
    if grad_avgs is not None:
        states.append(("grad_avgs", grad_avgs))
    plan = _plan(params, grads, states, _step_number(step))
    _core.Kernel(
        "rmsprop",
        {
            "lr": float(lr),
            "alpha": float(alpha),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "momentum": float(momentum),
            "centered": bool(centered),
            "maximize": bool(maximize),
        },
    ).step(plan)


def adagrad_(
    params: Arrays,
    grads: Arrays,
    state_sums: Arrays,
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> None:
    """One Adagrad step (``torch.optim.Adagrad``) on arrays, in place.

    ``state_sums`` start at ``initial_accumulator_value`` (torch's default: zeros).
    """
    _check_nonnegative(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)
    plan = _plan(params, grads, [("state_sums", state_sums)], _step_number(step))
    _core.Kernel(
        "adagrad",
        {
            "lr": float(lr),
            "lr_decay": float(lr_decay),
            "weight_decay": float(weight_decay),
            "eps": float(eps),
            "maximize": bool(maximize),
        },
    ).step(plan)


def adamax_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_infs: Arrays,
    *,
    step: int,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """One Adamax step (``torch.optim.Adamax``) on arrays, in place.

    ``exp_avgs`` and ``exp_infs`` start at zeros.
    """
    _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
    beta1, beta2 = _check_betas(betas)
    plan = _plan(
        params, grads, [("exp_avgs", exp_avgs), ("exp_infs", exp_infs)], _step_number(step)
    )
    _core.Kernel(
        "adamax",
        {
            "lr": float(lr),
            "betas": (beta1, beta2),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "maximize": bool(maximize),
        },
    ).step(plan)


def nadam_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    mu_products: Arrays,
    *,
    step: int,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """One NAdam step (``torch.optim.NAdam``; NAdamW with ``decoupled_weight_decay``) on
    arrays, in place.

    ``exp_avgs`` and ``exp_avg_sqs`` start at zeros. ``mu_products`` holds one
    1-element array per param (torch's ``state["mu_product"]``: float32, or float64
    under a float64 default dtype, whatever the param's dtype), starting at 1 and
    updated in place: e.g. ``np.ones(1, np.float32)``.
    """
    _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay)
    beta1, beta2 = _check_betas(betas)
    plan = _plan(
        params,
        grads,
        [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)],
        _step_number(step),
        [("mu_products", mu_products)],
    )
    _core.Kernel(
        "nadam",
        {
            "lr": float(lr),
            "betas": (beta1, beta2),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "momentum_decay": float(momentum_decay),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "maximize": bool(maximize),
        },
    ).step(plan)


def lion_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    *,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    init_lr: float | None = None,
    maximize: bool = False,
) -> None:
    """One Lion step (``lion_pytorch.Lion``, ``ferroptim.Lion``) on arrays, in place.

    ``exp_avgs`` start at zeros; Lion keeps no step counter. With
    ``decoupled_weight_decay`` the decay is ``weight_decay / init_lr`` (the reference's
    rule; ``init_lr`` is the optimizer's initial learning rate, by default ``lr``).
    """
    if not lr > 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    beta1, beta2 = betas
    for index, beta in enumerate(betas):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    init = lr if init_lr is None else init_lr
    if not init > 0.0:
        raise ValueError(f"Invalid init_lr: {init_lr}")
    plan = _plan(params, grads, [("exp_avgs", exp_avgs)], None)
    _core.Kernel(
        "lion",
        {
            "lr": float(lr),
            "betas": (float(beta1), float(beta2)),
            "weight_decay": float(weight_decay),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "init_lr": float(init),
            "maximize": bool(maximize),
        },
    ).step(plan)


def radam_(
    params: Arrays,
    grads: Arrays,
    exp_avgs: Arrays,
    exp_avg_sqs: Arrays,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """One RAdam step (``torch.optim.RAdam``; RAdamW with ``decoupled_weight_decay``) on
    arrays, in place.

    ``exp_avgs`` and ``exp_avg_sqs`` start at zeros.
    """
    _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
    beta1, beta2 = _check_betas(betas)
    plan = _plan(
        params,
        grads,
        [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)],
        _step_number(step),
    )
    _core.Kernel(
        "radam",
        {
            "lr": float(lr),
            "betas": (beta1, beta2),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "decoupled_weight_decay": bool(decoupled_weight_decay),
            "maximize": bool(maximize),
        },
    ).step(plan)


def adadelta_(
    params: Arrays,
    grads: Arrays,
    square_avgs: Arrays,
    acc_deltas: Arrays,
    *,
    step: int,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """One Adadelta step (``torch.optim.Adadelta``) on arrays, in place.

    ``square_avgs`` and ``acc_deltas`` start at zeros.
    """
    _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"Invalid rho value: {rho}")
    plan = _plan(
        params,
        grads,
        [("square_avgs", square_avgs), ("acc_deltas", acc_deltas)],
        _step_number(step),
    )
    _core.Kernel(
        "adadelta",
        {
            "lr": float(lr),
            "rho": float(rho),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            "maximize": bool(maximize),
        },
    ).step(plan)


def rprop_(
    params: Arrays,
    grads: Arrays,
    prevs: Arrays,
    step_size_arrays: Arrays,
    *,
    step: int = 1,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50),
    maximize: bool = False,
) -> None:
    """One Rprop step (``torch.optim.Rprop``) on arrays, in place.

    ``prevs`` start at zeros and ``step_size_arrays`` (torch's ``state["step_size"]``)
    at the learning rate: ``np.full_like(w, lr)``. ``etas`` and ``step_sizes`` are the
    class's (``(etaminus, etaplus)``, ``(step_size_min, step_size_max)``). Rprop does not
    read the step number (``step`` only keeps torch's counter: any value >= 1 steps the
    same).
    """
    etaminus, etaplus = (float(e) for e in etas)
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"Invalid eta values: {etaminus}, {etaplus}")
    step_size_min, step_size_max = (float(s) for s in step_sizes)
    plan = _plan(
        params,
        grads,
        [("prevs", prevs), ("step_size_arrays", step_size_arrays)],
        _step_number(step),
    )
    _core.Kernel(
        "rprop",
        {
            "etas": (etaminus, etaplus),
            "step_sizes": (step_size_min, step_size_max),
            "maximize": bool(maximize),
        },
    ).step(plan)


def asgd_(
    params: Arrays,
    grads: Arrays,
    axs: Arrays,
    etas: Arrays,
    mus: Arrays,
    *,
    step: int,
    lr: float = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """One ASGD step (``torch.optim.ASGD``) on arrays, in place.

    ``axs`` start at zeros. ``etas`` and ``mus`` hold one 1-element array per param
    (torch's ``state["eta"]`` and ``state["mu"]``: float32, or float64 under a float64
    default dtype, whatever the param's dtype), starting at ``lr`` and 1
    (``np.full(1, lr, np.float32)``, ``np.ones(1, np.float32)``): the step reads them and
    writes the next step's values.
    """
    _check_nonnegative(lr=lr, lambd=lambd, alpha=alpha, weight_decay=weight_decay)
    plan = _plan(
        params,
        grads,
        [("axs", axs)],
        _step_number(step),
        [("etas", etas), ("mus", mus)],
    )
    _core.Kernel(
        "asgd",
        {
            "lr": float(lr),
            "lambd": float(lambd),
            "alpha": float(alpha),
            "t0": float(t0),
            "weight_decay": float(weight_decay),
            "maximize": bool(maximize),
        },
    ).step(plan)

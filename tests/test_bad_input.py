"""Bad input gets torch's error and loses nothing (DESIGN.md contract 5).

Every failing step is checked against a snapshot: no param and no state tensor may have
been written, in any group, before the error is raised."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from _kernels import intercept_steps
from conftest import (
    ALL_FAMILIES,
    CLIPPING,
    FAMILIES,
    OPTIMIZERS,
    assert_unchanged,
    error_of,
    ferroptim,
    one_per_kernel,
    snapshot,
    taking,
    tol,
    weight_decay,
)

FAMILY_IDS = list(ALL_FAMILIES)
#: One family per kernel (Adam-decoupled and AdamW share Adam's).
KERNEL_FAMILIES = one_per_kernel()


def assert_same_outcome(
    torch_error: BaseException | None,
    ferro_error: BaseException | None,
    before: dict[str, Any],
    opt: torch.optim.Optimizer,
    ps: list[torch.Tensor],
    tps: list[torch.Tensor],
    *,
    same_message: bool = False,
    only_torch_errors: bool = False,
) -> None:
    """torch raised: ferroptim raises the same kind of error (``same_message``: with
    torch's message) and wrote nothing (params, grads, state: byte for byte). Only
    ferroptim raised: a clear RuntimeError/ValueError, nothing written (refused with
    ``only_torch_errors``: where torch steps, ferroptim must too). Neither: the same
    parameters as torch."""
    if torch_error is not None:
        assert ferro_error is not None, (
            f"torch raises {type(torch_error).__name__}({torch_error}); ferroptim stepped"
        )
        assert isinstance(ferro_error, type(torch_error)), (
            f"torch raises {type(torch_error).__name__}, "
            f"ferroptim {type(ferro_error).__name__}: {ferro_error}"
        )
        if same_message:
            assert str(ferro_error) == str(torch_error)
        assert_unchanged(before, opt, ps)
    elif only_torch_errors:
        assert ferro_error is None, f"torch steps; ferroptim raises {ferro_error!r}"
        for a, b in zip(ps, tps, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), **tol(a.dtype))
    elif ferro_error is not None:
        assert isinstance(ferro_error, (RuntimeError, ValueError)), ferro_error
        assert_unchanged(before, opt, ps)
    else:
        for a, b in zip(ps, tps, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))


def params(seed: int = 0, shapes=((50,), (6, 4), (3,))) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def set_grads(ps, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# ----------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------

#: Constructor arguments torch rejects, per family (the registry's ``bad_constructor``).
BAD_HYPERPARAMETERS = {
    name: family.bad_constructor for name, family in FAMILIES.items() if family.bad_constructor
}


@pytest.mark.parametrize(
    ("family", "kwargs", "words"),
    [
        pytest.param(name, *case.values, id=f"{name}-{case.id}")
        for name, cases in BAD_HYPERPARAMETERS.items()
        for case in cases
    ],
)
def test_invalid_hyperparameters_raise_torchs_error(family, kwargs, words):
    family = FAMILIES[family]
    ps = params()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(Exception, match=words) as torch_error:
        family.torch(ps, **{**family.fixed, **kwargs})
    with pytest.raises(type(torch_error.value), match=words) as ferro_error:
        family.ferro(ps, **{**family.fixed, **kwargs})
    assert type(ferro_error.value) is type(torch_error.value)
    assert str(ferro_error.value) == str(torch_error.value)
    assert all(torch.equal(a, b) for a, b in zip(before, ps, strict=True))


@pytest.mark.parametrize(
    "bad", [0.0, -1.0, float("nan"), float("-inf")], ids=["zero", "negative", "nan", "-inf"]
)
@pytest.mark.parametrize("family", CLIPPING)
def test_invalid_max_grad_norm(family, bad):
    family = FAMILIES[family]
    with pytest.raises(ValueError, match="max_grad_norm"):
        family.make_ferro(params(), max_grad_norm=bad)
    # A valid one is kept as a float; +inf (never clips) is valid.
    assert family.make_ferro(params(), max_grad_norm=1).max_grad_norm == 1.0
    assert family.make_ferro(params(), max_grad_norm=float("inf")).max_grad_norm == float("inf")


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_empty_parameter_list(family):
    family = FAMILIES[family]
    with pytest.raises(ValueError, match="empty parameter list"):
        family.torch([], **family.fixed)
    with pytest.raises(ValueError, match="empty parameter list"):
        family.ferro([], **family.fixed)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_duplicate_params_across_groups(family):
    family = FAMILIES[family]
    a, b = params()[:2]
    with pytest.raises(ValueError, match="more than one parameter group"):
        family.ferro([{"params": [a, b]}, {"params": [b]}], **family.fixed)
    opt = family.ferro([{"params": [a]}], **family.fixed)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_duplicate_params_within_a_group(family):
    """torch warns and steps the param twice; ferroptim must do the same, or refuse with
    an error before writing anything."""
    family = FAMILIES[family]

    def run(factory):
        ps = params()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = factory([ps[0], ps[1], ps[0]], lr=0.1)
        set_grads(ps, 1)
        before = snapshot(opt, ps)
        error = error_of(opt.step)
        return ps, opt, before, error

    tps, topt, _, terror = run(family.make_torch)
    assert terror is None
    fps, fopt, before, ferror = run(family.make_ferro)
    if ferror is not None:
        assert isinstance(ferror, (RuntimeError, ValueError))
        assert_unchanged(before, fopt, fps)
    else:
        for a, b in zip(fps, tps, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))
        assert float(fopt.state[fps[0]]["step"]) == float(topt.state[tps[0]]["step"])


# ----------------------------------------------------------------------------------------
# Sparse, integer and complex params
# ----------------------------------------------------------------------------------------


#: Per family: kwargs with every state buffer in play.
#: Constructor kwargs with every state buffer and per-step term in play (the registry's
#: ``bad_input_kwargs``).
FULL_KWARGS = {name: family.bad_input_kwargs for name, family in FAMILIES.items()}


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["first-step", "after-warmup"])
@pytest.mark.parametrize("family", [n for n, f in FAMILIES.items() if not f.sparse])
def test_sparse_grad_in_second_group(family, warm_steps):
    """Optimizers without sparse support raise torch's error before writing anything
    (torch itself has stepped the first group by then)."""
    kwargs = FULL_KWARGS[family]
    family = FAMILIES[family]

    def make(factory):
        ps = params(shapes=((50,), (6, 4), (3,), (7, 2), (5,)))
        opt = factory([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.1, **kwargs)
        return ps, opt

    fps, fopt = make(family.make_ferro)
    tps, topt = make(family.make_torch)
    for step in range(warm_steps):
        for ps, opt in ((fps, fopt), (tps, topt)):
            set_grads(ps, step)
            opt.step()
    set_grads(fps, 100)
    fps[3].grad = fps[3].grad.to_sparse()
    before = snapshot(fopt, fps)
    # (case-insensitive: Schedule-Free AdamW's reference fails in torch's dispatcher, whose
    # message names the "SparseCPU" backend)
    with pytest.raises(Exception, match=r"(?i)sparse") as ferro_error:
        fopt.step()
    assert_unchanged(before, fopt, fps)
    # torch raises the same error (on a throwaway copy: torch itself has stepped the
    # first group by the time it raises).
    xps, xopt = make(family.make_torch)
    set_grads(xps, 100)
    xps[3].grad = xps[3].grad.to_sparse()
    with pytest.raises(Exception, match=r"(?i)sparse") as torch_error:
        xopt.step()
    assert type(ferro_error.value) is type(torch_error.value)  # (RuntimeError for torch's)
    assert str(ferro_error.value) == str(torch_error.value)
    # Nothing was lost: fix the grad and carry on, as torch does without the failed step.
    for ps, opt in ((fps, fopt), (tps, topt)):
        set_grads(ps, 100)
        opt.step()
        set_grads(ps, 101)
        opt.step()
    for a, b in zip(fps, tps, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))
    for a, b in zip(fps, tps, strict=True):
        if family.has_step:
            assert float(fopt.state[a]["step"]) == float(topt.state[b]["step"])


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_integer_param_with_a_grad_raises(family, int_dtype):
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    ps = params()
    bad = torch.zeros(4, dtype=int_dtype)
    opt = family.make_ferro([{"params": ps}, {"params": [bad]}], **kwargs)
    set_grads(ps, 0)
    opt.step()
    set_grads(ps, 1)
    bad.grad = torch.ones(4, dtype=int_dtype)
    before = snapshot(opt, [*ps, bad])
    with pytest.raises(RuntimeError, match=str(int_dtype).split(".")[-1]):
        opt.step()
    assert_unchanged(before, opt, [*ps, bad])
    # torch refuses too (its kernels have no integer implementation; Adafactor's
    # `torch.finfo` of the dtype, for `eps1=None`, raises TypeError first).
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        t = torch.zeros(4, dtype=int_dtype)
        t.grad = torch.ones(4, dtype=int_dtype)
        family.make_torch([t], **kwargs).step()


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_integer_param_without_grad_is_ignored(family):
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    ps = params()
    counter = torch.zeros(4, dtype=torch.int64)
    opt = family.make_ferro([*ps, counter], **kwargs)
    ref_ps = params()
    ref = family.make_torch([*ref_ps, torch.zeros(4, dtype=torch.int64)], **kwargs)
    for step in range(5):
        set_grads(ps, step)
        set_grads(ref_ps, step)
        opt.step()
        ref.step()
    assert not counter.count_nonzero()
    for a, b in zip(ps, ref_ps, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_complex_params_step_correctly(family, dtype):
    kwargs = {"lr": 0.05, **weight_decay(family, 0.1), **FULL_KWARGS[family]}
    family = FAMILIES[family]

    def run(factory):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(17, 3, generator=gen, dtype=dtype))
        q = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=dtype.to_real()))
        opt = factory([p, q], **kwargs)
        for _ in range(20):
            p.grad = torch.randn(17, 3, generator=gen, dtype=dtype)
            q.grad = torch.randn(5, generator=gen, dtype=dtype.to_real())
            opt.step()
        return p, q, opt

    if not family.complex_params:  # torch's error, before anything is written
        with pytest.raises(RuntimeError, match="does not support complex"):
            run(family.make_torch)
        with pytest.raises(RuntimeError, match="does not support complex"):
            run(family.make_ferro)
        return
    fp, fq, fopt = run(family.make_ferro)
    tp, tq, topt = run(family.make_torch)
    for a, b in ((fp, tp), (fq, tq)):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(b.dtype))
        assert list(fopt.state[a]) == list(topt.state[b])
        assert topt.state[b]
        for key, value in topt.state[b].items():
            if key in family.scalar_state:
                assert float(fopt.state[a][key]) == float(value)
                assert fopt.state[a][key].dtype == value.dtype
            else:
                assert fopt.state[a][key].dtype == b.dtype
                torch.testing.assert_close(fopt.state[a][key], value, **tol(b.dtype))


# ----------------------------------------------------------------------------------------
# load_state_dict mismatches
# ----------------------------------------------------------------------------------------


def _trained(family, groups_of):
    ps = params()
    opt = family.make_ferro(groups_of(ps), lr=0.1, **FULL_KWARGS[family.name])
    set_grads(ps, 0)
    opt.step()
    return ps, opt


LOAD_MISMATCHES = [
    pytest.param(
        lambda ps: [{"params": ps[:1]}, {"params": ps[1:]}],
        "number of parameter groups",
        id="wrong-number-of-groups",
    ),
    pytest.param(lambda ps: [{"params": ps[:2]}], "size", id="wrong-number-of-params"),
]


@pytest.mark.parametrize(("other_groups", "words"), LOAD_MISMATCHES)
@pytest.mark.parametrize("family", OPTIMIZERS)
def test_load_state_dict_mismatch(family, other_groups, words):
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    ps, opt = _trained(family, lambda ps: ps)
    _, other = _trained(family, other_groups)
    topt = family.make_torch(params(), **kwargs)
    with pytest.raises(ValueError, match=words):
        topt.load_state_dict(other.state_dict())
    before = snapshot(opt, ps)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, opt, ps)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == (
        groups_before
    )
    # It keeps stepping correctly.
    ref_ps = params()
    ref = family.make_torch(ref_ps, **kwargs)
    set_grads(ref_ps, 0)
    ref.step()
    for step in (1, 2):
        set_grads(ps, step)
        set_grads(ref_ps, step)
        opt.step()
        ref.step()
    for a, b in zip(ps, ref_ps, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))


def _corruptions(family: str) -> list:
    # (the corruptions hit a matrix param's state)
    vector_only = FAMILIES[family].vector_only_state
    keys = [k for k in FAMILIES[family].state_tensors if k != "step" and k not in vector_only]
    cases = []
    for key in keys:
        cases += [
            pytest.param(
                family,
                lambda s, k=key: s.__setitem__(k, torch.zeros(5)),
                id=f"{family}-{key}-shape",
            ),
            pytest.param(
                family,
                lambda s, k=key: s.__setitem__(k, torch.zeros(4, 6)),
                id=f"{family}-{key}-transposed-shape",
            ),
            pytest.param(
                family,
                lambda s, k=key: s.__setitem__(k, s[k].double()),
                id=f"{family}-{key}-dtype",
            ),
            pytest.param(family, lambda s, k=key: s.pop(k), id=f"{family}-{key}-missing"),
        ]
    return cases


@pytest.mark.parametrize(
    ("family", "corrupt"), [c for f in KERNEL_FAMILIES for c in _corruptions(f)]
)
def test_corrupt_state_raises_and_writes_nothing(family, corrupt):
    """A state buffer of the wrong shape / dtype, or missing: torch's error (nothing
    written), or — where torch copes (SGD recreates a missing momentum buffer, steps
    with a float64 one) — torch's result or a clear error that writes nothing."""
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    if family.name == "Adam":
        kwargs["amsgrad"] = True

    def make():
        ps = params()
        return ps, family.make_ferro([{"params": ps[:1]}, {"params": ps[1:]}], **kwargs)

    ps, opt = make()
    tps = params()
    topt = family.make_torch([{"params": tps[:1]}, {"params": tps[1:]}], **kwargs)
    for step in range(3):
        set_grads(ps, step)
        set_grads(tps, step)
        opt.step()
        topt.step()
    corrupt(opt.state[ps[1]])
    corrupt(topt.state[tps[1]])
    set_grads(ps, 9)
    set_grads(tps, 9)
    torch_error = error_of(topt.step)
    before = snapshot(opt, ps)
    ferro_error = error_of(opt.step)
    assert_same_outcome(torch_error, ferro_error, before, opt, ps, tps)


# ----------------------------------------------------------------------------------------
# Grads that bypass torch's checks
# ----------------------------------------------------------------------------------------

BAD_GRADS = [
    pytest.param(lambda p: torch.zeros(3), id="fewer-elements"),
    pytest.param(lambda p: torch.ones(p.numel() + 5), id="more-elements"),
    pytest.param(lambda p: torch.ones(p.shape[1], p.shape[0]), id="same-numel-transposed-shape"),
    pytest.param(lambda p: torch.ones(p.numel()), id="same-numel-flat"),
    pytest.param(lambda p: torch.ones(*p.shape, 1), id="same-numel-extra-dim"),
    pytest.param(lambda p: torch.ones(p.shape[1]), id="broadcastable-row"),
    pytest.param(lambda p: torch.ones(p.shape, dtype=torch.float64), id="float64"),
    pytest.param(lambda p: torch.ones(p.shape, dtype=torch.float16), id="float16"),
    pytest.param(lambda p: torch.ones(p.shape, dtype=torch.int32), id="int32"),
    pytest.param(lambda p: torch.ones(p.shape, dtype=torch.complex64), id="complex64"),
]


@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "cached-plan"])
@pytest.mark.parametrize("bad_grad", BAD_GRADS)
@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_grad_set_through_data_bypass(family, bad_grad, warm_steps):
    """``p.grad.data = ...`` skips torch's shape/dtype checks. ferroptim must raise torch's
    error (torch raises) or give torch's result, never corrupt memory or step silently."""
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}

    def run(factory):
        ps = params()
        opt = factory([{"params": ps[:1]}, {"params": ps[1:]}], **kwargs)
        for step in range(warm_steps):
            set_grads(ps, step)
            opt.step()
        set_grads(ps, 50)
        ps[1].grad.data = bad_grad(ps[1])  # the (6, 4) param, after a good group
        before = snapshot(opt, ps)
        return ps, opt, before, error_of(opt.step)

    tps, _, _, terror = run(family.make_torch)
    fps, fopt, before, ferror = run(family.make_ferro)
    assert_same_outcome(terror, ferror, before, fopt, fps, tps)


ALIASING_FLAGS = {
    "Adam": [{}, {"weight_decay": 0.1}, {"maximize": True, "amsgrad": True}],
    "SGD": [
        {},
        {"weight_decay": 0.1},
        {"momentum": 0.9, "dampening": 0.2},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        {"momentum": 0.9, "maximize": True},
    ],
    "RMSprop": [{}, {"weight_decay": 0.1}, {"momentum": 0.5, "centered": True, "maximize": True}],
    "Adagrad": [{}, {"weight_decay": 0.1}, {"lr_decay": 0.1, "maximize": True}],
    "Adamax": [{}, {"weight_decay": 0.1}, {"maximize": True, "weight_decay": 0.1}],
    "NAdam": [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    # (a grad that is its param takes Lion's torch-op code: see the spec's
    # own_grad_alias_to_torch)
    "Lion": [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    "AdEMAMix": [
        {},
        {"weight_decay": 0.1, "t_alpha_beta3": 5.0},
        {"weight_decay": 0.1, "weight_decouple": True, "maximize": True},
    ],
    "Adan": [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "weight_decouple": True, "maximize": True},
    ],
    "ScheduleFreeAdamW": [
        {},
        {"weight_decay": 0.1, "warmup_steps": 5},
        {"weight_decay": 0.1, "r": 0.5, "maximize": True},
    ],
    "ScheduleFreeSGD": [
        {},
        {"weight_decay": 0.1, "warmup_steps": 5},
        {"weight_decay": 0.1, "r": 0.5, "maximize": True},
    ],
    "RAdam": [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    "Adadelta": [{}, {"weight_decay": 0.1}, {"maximize": True, "weight_decay": 0.1}],
    "Rprop": [{}, {"maximize": True}, {"etas": (0.3, 1.7), "step_sizes": (1e-3, 0.05)}],
    "ASGD": [{}, {"weight_decay": 0.1, "t0": 1.0}, {"maximize": True, "weight_decay": 0.1}],
    "Adafactor": [{}, {"weight_decay": 0.1}, {"maximize": True, "weight_decay": 0.1}],
}

#: The ALIASING_FLAGS entry of each family (Adam's variants share Adam's).
_ALIASING_OF = {"Adam-decoupled": "Adam", "AdamW": "Adam"}


@pytest.mark.parametrize(
    ("family", "flags"),
    [
        pytest.param(family, flags, id=f"{family}-{'-'.join(flags) or 'plain'}")
        for family in FAMILY_IDS
        for flags in ALIASING_FLAGS[_ALIASING_OF.get(family, family)]
    ],
)
def test_grad_aliasing_its_own_param(family, flags):
    family = FAMILIES[family]

    def run(factory):
        ps = params()
        opt = factory(ps, lr=0.05, **flags)
        for step in range(6):
            set_grads(ps, step)
            ps[1].grad = ps[1].detach()  # the grad IS the param's memory
            if step % 2:
                ps[0].grad = ps[0].detach()[:]  # a view of it
            opt.step()
        return ps, opt

    fps, fopt = run(family.make_ferro)
    tps, topt = run(family.make_torch)
    for a, b in zip(fps, tps, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))
        for key in topt.state[b]:
            torch.testing.assert_close(fopt.state[a][key], topt.state[b][key], **tol(torch.float32))


#: Per family: (kwargs, the state buffer the grad is made to alias).
STATE_ALIASES = [
    pytest.param("Adam", {"amsgrad": True}, "exp_avg_sq", id="Adam-exp_avg_sq"),
    pytest.param("SGD", {"momentum": 0.9}, "momentum_buffer", id="SGD-momentum_buffer"),
    pytest.param("RMSprop", {}, "square_avg", id="RMSprop-square_avg"),
    pytest.param("RMSprop", {"momentum": 0.5, "centered": True}, "grad_avg", id="RMSprop-grad_avg"),
    pytest.param("RMSprop", {"momentum": 0.5}, "momentum_buffer", id="RMSprop-momentum_buffer"),
    pytest.param("Adagrad", {}, "sum", id="Adagrad-sum"),
    pytest.param("Adamax", {}, "exp_inf", id="Adamax-exp_inf"),
    pytest.param("NAdam", {}, "exp_avg_sq", id="NAdam-exp_avg_sq"),
    pytest.param("Lion", {}, "exp_avg", id="Lion-exp_avg"),
    pytest.param("AdEMAMix", {}, "exp_avg_slow", id="AdEMAMix-exp_avg_slow"),
    pytest.param("Adan", {}, "exp_avg_diff", id="Adan-exp_avg_diff"),
    pytest.param("ScheduleFreeAdamW", {}, "z", id="ScheduleFreeAdamW-z"),
    pytest.param("ScheduleFreeAdamW", {}, "exp_avg_sq", id="ScheduleFreeAdamW-exp_avg_sq"),
    pytest.param("ScheduleFreeSGD", {}, "z", id="ScheduleFreeSGD-z"),
    pytest.param("RAdam", {}, "exp_avg_sq", id="RAdam-exp_avg_sq"),
    pytest.param("Adadelta", {}, "square_avg", id="Adadelta-square_avg"),
    pytest.param("Adadelta", {}, "acc_delta", id="Adadelta-acc_delta"),
]


@pytest.mark.parametrize(("family", "kwargs", "key"), STATE_ALIASES)
def test_grad_aliasing_a_state_buffer(family, kwargs, key):
    """``p.grad = state[key]``: torch's in-place sequence would read the gradient after
    earlier ops of the same step updated that buffer. ferroptim refuses it with a clear
    error, before anything is written (a gradient aliasing its own param is stepped
    like torch: see ``test_grad_aliasing_its_own_param``)."""
    family = FAMILIES[family]
    ps = params()
    opt = family.make_ferro(ps, lr=0.05, **kwargs)
    for step in range(2):
        set_grads(ps, step)
        opt.step()
    set_grads(ps, 2)
    ps[1].grad = opt.state[ps[1]][key]
    before = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="shares memory with the optimizer's own state"):
        opt.step()
    assert_unchanged(before, opt, ps)


# ----------------------------------------------------------------------------------------
# Rust panics
# ----------------------------------------------------------------------------------------


def test_rust_panic_becomes_runtime_error():
    with pytest.raises(RuntimeError, match="panic"):
        ferroptim._core._panic_for_tests()
    # ... and the process (and the pool) keep working afterwards.
    ferroptim.set_num_threads(2)
    p = torch.nn.Parameter(torch.ones(100_000))
    q = torch.nn.Parameter(torch.ones(100_000))
    opt = ferroptim.Adam([p], lr=0.1)
    ref = torch.optim.Adam([q], lr=0.1, foreach=False)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="panic"):
            ferroptim._core._panic_for_tests()
        p.grad = torch.ones(100_000)
        q.grad = torch.ones(100_000)
        opt.step()
        ref.step()
    assert torch.equal(p.detach(), q.detach())


# ----------------------------------------------------------------------------------------
# Errors raised while running, raised before anything is written (contract 5)
# ----------------------------------------------------------------------------------------


def _two_group_outcome(
    family,
    kwargs: dict[str, Any],
    mutate,
    *,
    warm_steps: int,
    shapes=((50,), (6, 4), (3,), (7, 2)),
    same_message: bool = False,
    only_torch_errors: bool = False,
) -> None:
    """Two groups, ``warm_steps`` good steps (so a plan is cached), then ``mutate(ps, opt)``
    on both ferroptim and torch's for-loop, one more step on each: the same outcome."""

    def run(factory):
        ps = params(shapes=shapes)
        opt = factory([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], **kwargs)
        for step in range(warm_steps):
            set_grads(ps, step)
            opt.step()
        set_grads(ps, 50)
        mutate(ps, opt)
        before = snapshot(opt, ps)
        return ps, opt, before, error_of(opt.step)

    tps, _, _, terror = run(family.make_torch)
    fps, fopt, before, ferror = run(family.make_ferro)
    assert_same_outcome(
        terror,
        ferror,
        before,
        fopt,
        fps,
        tps,
        same_message=same_message,
        only_torch_errors=only_torch_errors,
    )
    return terror


def _set_in_group(key: str, value: Any):
    def mutate(ps, opt):
        opt.param_groups[1][key] = value

    return mutate


#: Numeric hyperparameters per family, set to something torch's step cannot compute with
#: (the registry's ``numbers``).
NUMBERS = {name: family.numbers for name, family in FAMILIES.items()}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "cached-plan"])
@pytest.mark.parametrize("bad", [None, "0.1", [0.1]], ids=["None", "str", "list"])
@pytest.mark.parametrize(
    ("family", "key"),
    [pytest.param(f, k, id=f"{f}-{k}") for f in KERNEL_FAMILIES for k in NUMBERS[f]],
)
def test_unconvertible_hyperparameter_in_a_later_group(family, key, bad, warm_steps, backend):
    """A hyperparameter torch's step cannot compute with, in the second group: torch's
    TypeError, raised before the first group is stepped (torch itself steps it first).
    Where torch's step does not read it (SGD's first momentum step only clones the
    grad), ferroptim steps too, to torch's numbers."""
    ferroptim.set_backend(backend)
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    torch_error = _two_group_outcome(
        family, kwargs, _set_in_group(key, bad), warm_steps=warm_steps, only_torch_errors=True
    )
    unread = family.name == "SGD" and key == "momentum" and not warm_steps
    assert torch_error is None if unread else isinstance(torch_error, TypeError), torch_error


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("warm_steps", [0, 2, 5], ids=["first-step", "cached-plan", "rectified"])
@pytest.mark.parametrize("bad", [None, "0.1", [0.1]], ids=["None", "str", "list"])
def test_radam_eps_is_read_only_on_rectified_steps(bad, warm_steps, backend):
    """torch's RAdam reads eps only once ``rho_t > 5`` (its sixth step with beta2 =
    0.999): before that it steps with an eps it cannot compute with, and ferroptim steps
    to the same numbers; from then on torch's TypeError, raised before anything is
    written."""
    ferroptim.set_backend(backend)
    family = FAMILIES["RAdam"]
    kwargs = {"lr": 0.1, **FULL_KWARGS["RAdam"]}
    torch_error = _two_group_outcome(
        family, kwargs, _set_in_group("eps", bad), warm_steps=warm_steps, only_torch_errors=True
    )
    rectified = warm_steps + 1 > 5
    assert isinstance(torch_error, TypeError) if rectified else torch_error is None, torch_error


FLAGS = {
    "Adam": ("maximize", "amsgrad"),
    "Adam-decoupled": ("maximize", "decoupled_weight_decay"),
    "AdamW": ("maximize", "amsgrad"),
    "SGD": ("maximize", "nesterov"),
    "RMSprop": ("maximize", "centered"),
    "Adagrad": ("maximize",),
    "Adamax": ("maximize",),
    "NAdam": ("maximize", "decoupled_weight_decay"),
    "Lion": ("maximize", "decoupled_weight_decay"),
    "AdEMAMix": ("maximize", "weight_decouple"),
    "Adan": ("maximize", "weight_decouple"),
    "ScheduleFreeAdamW": ("maximize",),
    "ScheduleFreeSGD": ("maximize",),
    "RAdam": ("maximize", "decoupled_weight_decay"),
    "Adadelta": ("maximize",),
    "Rprop": ("maximize",),
    "ASGD": ("maximize",),
    "Adafactor": ("maximize",),
}


@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "cached-plan"])
@pytest.mark.parametrize(
    "value",
    [1, 0, "yes", "", None, torch.tensor(True)],
    ids=["1", "0", "str", "empty", "None", "tensor"],
)
@pytest.mark.parametrize(
    ("family", "key"), [pytest.param(f, k, id=f"{f}-{k}") for f in FAMILY_IDS for k in FLAGS[f]]
)
def test_flags_are_read_with_torchs_truthiness(family, key, value, warm_steps):
    """torch reads a flag as ``if maximize:``: ``maximize=1`` steps like ``True``. So does
    ferroptim, in every group, to torch's numbers."""
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    if key == "nesterov":
        kwargs["dampening"] = 0.0
    torch_error = _two_group_outcome(
        family, kwargs, _set_in_group(key, value), warm_steps=warm_steps, only_torch_errors=True
    )
    assert torch_error is None


SGD_SPARSE_CASES = [
    # (group-2 hyperparameters, warm-up grads sparse?, failing step's grad sparse?)
    pytest.param({"momentum": 0.9, "nesterov": True}, False, True, id="nesterov-dense-then-sparse"),
    pytest.param({"momentum": 0.9, "nesterov": True}, True, False, id="nesterov-sparse-then-dense"),
    pytest.param({"momentum": 0.9}, True, False, id="momentum-sparse-then-dense"),
    pytest.param({"weight_decay": 0.1}, False, True, id="weight-decay-sparse"),
    pytest.param({"momentum": 0.9, "nesterov": True}, True, True, id="nesterov-sparse-sparse"),
    pytest.param({"momentum": 0.9}, False, True, id="momentum-dense-then-sparse"),
]


@pytest.mark.parametrize(("hyper", "warm_sparse", "sparse"), SGD_SPARSE_CASES)
def test_sgd_sparse_grad_errors_raised_before_any_write(hyper, warm_sparse, sparse):
    """SGD's torch path (sparse grads) adds a sparse grad to dense tensors: torch raises
    "add(sparse, dense)" mid-step, after the Rust-routed params were stepped. ferroptim
    raises it first; where torch steps, ferroptim steps to the same numbers."""
    family = FAMILIES["SGD"]

    def sparsify(ps, opt, make_sparse):
        opt.param_groups[1].update(hyper)
        if make_sparse:
            ps[3].grad = ps[3].grad.to_sparse()

    def run(factory):
        ps = params(shapes=((50,), (6, 4), (3,), (7, 2)))
        opt = factory([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.1)
        set_grads(ps, 0)
        sparsify(ps, opt, warm_sparse)
        opt.step()
        set_grads(ps, 1)
        sparsify(ps, opt, sparse)
        before = snapshot(opt, ps)
        return ps, opt, before, error_of(opt.step)

    tps, _, _, terror = run(family.make_torch)
    fps, fopt, before, ferror = run(family.make_ferro)
    assert_same_outcome(
        terror, ferror, before, fopt, fps, tps, same_message=True, only_torch_errors=True
    )


STEP_VALUES = [
    pytest.param(lambda: 5, id="python-int"),
    pytest.param(lambda: 5.0, id="python-float"),
    pytest.param(lambda: torch.tensor([1.0, 2.0]), id="two-element-tensor"),
    pytest.param(lambda: torch.tensor([]), id="empty-tensor"),
    pytest.param(lambda: torch.tensor([[3.0]]), id="1x1-tensor"),
    pytest.param(lambda: torch.tensor(3, dtype=torch.int64), id="int64-tensor"),
]


@pytest.mark.parametrize("warm_steps", [1, 3])
@pytest.mark.parametrize("value", STEP_VALUES)
@pytest.mark.parametrize("family", [n for n in one_per_kernel() if FAMILIES[n].has_step])
def test_step_counter_of_another_kind(family, value, warm_steps):
    """``state["step"]`` replaced by a Python number or a tensor of another shape: torch's
    exception (type and message) before anything is written, or torch's step where torch
    steps (RMSprop only increments the counter, whatever its shape)."""
    family = FAMILIES[family]

    def mutate(ps, opt):
        for p in ps[2:]:
            opt.state[p]["step"] = value()

    _two_group_outcome(
        family,
        {"lr": 0.1, **FULL_KWARGS[family.name]},
        mutate,
        warm_steps=warm_steps,
        same_message=True,
        only_torch_errors=True,
    )


BETAS_MID_TRAINING = [
    pytest.param((1.5, 0.999), 1, id="beta1-above-one"),
    pytest.param((1.0, 0.999), 1, id="beta1-one"),
    pytest.param((0.9, 1.0), 1, id="beta2-one"),
    pytest.param((0.9, 1.5), 1, id="beta2-above-one"),
    pytest.param((-1.0, 0.9), 1, id="beta1-minus-one-even-step"),
    pytest.param((-1.0, 0.9), 2, id="beta1-minus-one-odd-step"),
    pytest.param((-0.5, 0.9), 1, id="beta1-negative"),
    pytest.param((1.5, 0.9), 2000, id="beta1-overflow"),
    pytest.param(None, 1, id="None"),
    pytest.param((0.9, 0.99, 0.9), 1, id="three-betas"),
    pytest.param((0.9, "0.99"), 1, id="str-beta"),
]


@pytest.mark.parametrize(("betas", "warm_steps"), BETAS_MID_TRAINING)
@pytest.mark.parametrize("family", taking("betas"))
def test_betas_set_outside_the_valid_range_mid_training(family, betas, warm_steps):
    """torch validates betas only in its constructor. Set afterwards, its for-loop steps
    with them or fails computing its Python scalars (``lr / (1 - 1.0 ** step)``): the
    same result, or the same exception (type and message) before anything is written."""
    family = FAMILIES[family]

    def mutate(ps, opt):
        opt.param_groups[1]["betas"] = betas
        if warm_steps >= 1000:  # jump the step counters instead of stepping that long
            for p in ps:
                if "step" in opt.state.get(p, {}):
                    opt.state[p]["step"].fill_(warm_steps)

    _two_group_outcome(
        family,
        {"lr": 0.1, **({"amsgrad": True} if "amsgrad" in family.grid else {})},
        mutate,
        warm_steps=min(warm_steps, 1),
        same_message=not isinstance(betas, tuple) or "0.99" not in betas,
        only_torch_errors=True,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("betas", "warm_steps"),
    [
        pytest.param((0.9, 1.5), 4, id="beta2-above-one"),
        pytest.param((0.9, 2.0), 3, id="beta2-two"),
        pytest.param((0.9, -3.0), 2, id="beta2-negative"),
        pytest.param((0.9, -1.0), 1, id="beta2-minus-one"),
    ],
)
def test_radam_complex_rectification_raises_torchs_error(betas, warm_steps, dtype):
    """With beta2 set outside [0, 1) mid-training, torch's RAdam can find ``rho_t > 5``
    with a negative value under its ``** 0.5``: a complex rectification its
    ``param.add_`` refuses to cast (or a division by zero). The same exception and
    message, before anything is written."""
    family = FAMILIES["RAdam"]

    def mutate(ps, opt):
        for p in ps:
            p.data = p.data.to(dtype)
            p.grad = p.grad.to(dtype)
        opt.param_groups[1]["betas"] = betas
        for p in ps:
            if "step" in opt.state.get(p, {}):
                opt.state[p]["step"].fill_(warm_steps)
                for key in ("exp_avg", "exp_avg_sq"):
                    opt.state[p][key] = opt.state[p][key].to(dtype)

    torch_error = _two_group_outcome(
        family, {"lr": 0.1}, mutate, warm_steps=1, same_message=True, only_torch_errors=True
    )
    assert isinstance(torch_error, (RuntimeError, ZeroDivisionError)), torch_error


@pytest.mark.parametrize("when", ["constructor", "mid-training"])
@pytest.mark.parametrize("family", taking("capturable"))
def test_capturable_with_cpu_params_raises_torchs_error(family, when):
    """``capturable=True`` needs params on a device CUDA graphs capture: torch's for-loop
    raises an AssertionError on CPU params; so does ferroptim, before writing."""
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}
    if when == "constructor":
        kwargs["capturable"] = True
        mutate = lambda ps, opt: None  # noqa: E731
    else:
        mutate = _set_in_group("capturable", True)
    error = _two_group_outcome(
        family, kwargs, mutate, warm_steps=0 if when == "constructor" else 2, same_message=True
    )
    assert isinstance(error, AssertionError)


class _AsSubclass(torch.Tensor):
    """A plain Python subclass (``as_subclass``): same storage, its own type."""


class _Wrapper(torch.Tensor):
    """A wrapper subclass: no storage of its own, every op unwraps ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> _Wrapper:
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, dtype=elem.dtype, requires_grad=elem.requires_grad
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.elem if isinstance(x, _Wrapper) else x

        def wrap(x):
            return _Wrapper(x) if isinstance(x, torch.Tensor) else x

        out = func(
            *torch.utils._pytree.tree_map(unwrap, args),
            **torch.utils._pytree.tree_map(unwrap, kwargs or {}),
        )
        return torch.utils._pytree.tree_map(wrap, out)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return (t.elem if isinstance(t, _Wrapper) else t.detach()).as_subclass(torch.Tensor)


SUBCLASSES = [
    pytest.param(lambda t: t.as_subclass(_AsSubclass).requires_grad_(), id="as_subclass"),
    pytest.param(lambda t: _Wrapper(t).requires_grad_(), id="wrapper-subclass"),
]


@pytest.mark.parametrize("make", SUBCLASSES)
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_tensor_subclass_params_step_like_torch(family, make):
    """Tensor subclasses torch steps (a wrapper subclass has no storage of its own to
    plan): ferroptim hands them to torch's for-loop, next to plain params in Rust, and
    gives torch's numbers."""
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **FULL_KWARGS[family.name]}

    def run(factory):
        plain = params(shapes=((50,), (6, 4)))
        gen = torch.Generator().manual_seed(3)
        sub = [make(torch.randn(7, generator=gen)), make(torch.randn(3, 2, generator=gen))]
        opt = factory([{"params": [plain[0], sub[0]]}, {"params": [plain[1], sub[1]]}], **kwargs)
        for step in range(4):
            set_grads(plain, step)
            for t in sub:
                g = torch.randn(t.shape, generator=gen)
                t.grad = make(g).detach() if isinstance(t, _Wrapper) else g
            opt.step()
        return plain, sub, opt

    fplain, fsub, _ = run(family.make_ferro)
    tplain, tsub, _ = run(family.make_torch)
    for a, b in zip(fsub, tsub, strict=True):
        assert type(a) is type(b)
        assert torch.equal(_plain(a), _plain(b)), "a subclass param did not step like torch"
    for a, b in zip(fplain, tplain, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))


# ----------------------------------------------------------------------------------------
# A kernel call that fails leaves no uninitialised state behind
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm_steps", [0, 1], ids=["first-step", "new-param-later"])
def test_failed_sgd_step_stores_no_uninitialised_momentum(monkeypatch, warm_steps):
    """SGD's first step makes its momentum buffers (``torch.empty_like``) for the kernel to
    fill. If the kernel call fails, none may reach the state (torch stores nothing on a
    failed step): the next step must start them from the gradient, as torch does."""
    family = FAMILIES["SGD"]
    kwargs = {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}

    def setup(factory):
        ps = params(shapes=((50,), (6, 4), (3,)))
        opt = factory(ps, **kwargs)
        for step in range(warm_steps):
            set_grads(ps, step)
            ps[2].grad = None  # this param gets its first grad (and buffer) later
            opt.step()
        return ps, opt

    fps, fopt = setup(family.make_ferro)
    tps, topt = setup(family.make_torch)
    calls = []

    def fail_once(kernel: Any, plan: Any, *args: Any, **kw: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected kernel failure")
        kernel.step(plan, *args, **kw)

    with intercept_steps(fail_once):
        set_grads(fps, 10)
        before = snapshot(fopt, fps)
        with pytest.raises(RuntimeError, match="injected"):
            fopt.step()
        assert_unchanged(before, fopt, fps)
        for p in fps[2:] if warm_steps else fps:
            assert "momentum_buffer" not in fopt.state.get(p, {}), "a buffer the kernel never wrote"
        # The failed step never happened, for torch as for ferroptim: carry on.
        for step in (10, 11, 12):
            set_grads(fps, step)
            set_grads(tps, step)
            fopt.step()
            topt.step()
    assert len(calls) >= 4
    for a, b in zip(fps, tps, strict=True):
        assert a.abs().max() < 10, "the step used an uninitialised momentum buffer"
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))
        torch.testing.assert_close(
            fopt.state[a]["momentum_buffer"], topt.state[b]["momentum_buffer"], **tol(torch.float32)
        )


@pytest.mark.parametrize(
    ("lr_decay", "warm_steps"),
    [(-1.0, 1), (-0.5, 2), (-0.5, 1), (torch.tensor(-1.0), 1)],
    ids=["zero-at-step-2", "zero-at-step-3", "negative-nonzero", "tensor-zero"],
)
def test_adagrad_lr_decay_set_negative_mid_training(lr_decay, warm_steps):
    """torch validates lr_decay only in its constructor; set negative afterwards, its
    ``lr / (1 + (step - 1) * lr_decay)`` can divide by zero (ZeroDivisionError, before
    anything is written), or steps (a tensor lr_decay divides to inf)."""
    _two_group_outcome(
        FAMILIES["Adagrad"],
        {"lr": 0.1},
        _set_in_group("lr_decay", lr_decay),
        warm_steps=warm_steps,
        same_message=True,
        only_torch_errors=True,
    )


ASGD_MID_TRAINING = [
    pytest.param({"alpha": 1e4, "lambd": 1.0}, id="eta-overflows"),
    pytest.param({"alpha": 3.0, "lambd": 0.5}, id="alpha-above-one"),
    pytest.param({"lambd": -1.0}, id="negative-lambd"),
    pytest.param({"lambd": -100.0}, id="negative-base"),  # a complex eta, its real part
    pytest.param({"lr": -0.1}, id="negative-lr"),
    pytest.param({"t0": float("nan")}, id="nan-t0"),
    pytest.param({"lambd": torch.tensor(0.01)}, id="tensor-lambd"),
]


@pytest.mark.parametrize("warm_steps", [1, 3])
@pytest.mark.parametrize("changes", ASGD_MID_TRAINING)
def test_asgd_schedule_set_outside_the_valid_range_mid_training(changes, warm_steps):
    """torch validates lr, lambd and alpha only in its constructor; its for-loop computes
    ``eta = lr / ((1 + lambd * lr * step) ** alpha)`` in Python floats (an OverflowError
    for a huge alpha, a complex number torch copies into ``eta`` for a negative base):
    the same numbers, or the same exception before anything is written."""
    family = FAMILIES["ASGD"]

    def mutate(ps, opt):
        opt.param_groups[1].update(changes)

    _two_group_outcome(
        family,
        {"lr": 0.1, **FULL_KWARGS["ASGD"]},
        mutate,
        warm_steps=warm_steps,
        same_message=True,
        only_torch_errors=True,
    )

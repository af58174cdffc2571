"""Drop-in behaviour (DESIGN.md contract 1): groups, closures, hooks, schedulers,
state_dict format, checkpoints both ways, serialisation, and the Rust side's cached
pointers honouring every way a user can swap tensors under the optimizer."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    ALL_FAMILIES,
    CLIPPING,
    FAMILIES,
    OPTIMIZERS,
    assert_unchanged,
    ferroptim,
    iter_tensors,
    one_per_kernel,
    snapshot,
    structure,
    tol,
    weight_decay,
)
from torch.optim import lr_scheduler
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

F32 = tol(torch.float32)


# ----------------------------------------------------------------------------------------
# Helpers: a ferroptim optimizer and torch's reference, driven in lockstep
# ----------------------------------------------------------------------------------------


SHAPES = ((300,), (17, 9), (5,), (4, 3, 2))


def make_params(
    seed: int = 0, dtype: torch.dtype = torch.float32, shapes: tuple[tuple[int, ...], ...] = SHAPES
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in shapes]


class Twin:
    """The same parameters and the same operations on a ferroptim optimizer (``f``) and on
    torch's for-loop reference (``t``)."""

    def __init__(
        self,
        family: str = "AdamW",
        groups: Callable[[list[torch.nn.Parameter]], Any] | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        shapes: tuple[tuple[int, ...], ...] = SHAPES,
        max_grad_norm: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.family = FAMILIES[family]
        self.fp = make_params(seed, dtype, shapes)
        self.tp = make_params(seed, dtype, shapes)
        groups = groups or (lambda ps: ps)
        kwargs = {**self.family.common, **kwargs}
        # ``max_grad_norm`` is ferroptim's: torch's side clips with clip_grad_norm_.
        self.max_grad_norm = max_grad_norm
        extra = {} if max_grad_norm is None else {"max_grad_norm": max_grad_norm}
        self.f = self.family.make_ferro(groups(self.fp), **kwargs, **extra)
        self.t = self.family.make_torch(groups(self.tp), **kwargs)
        self.gen = torch.Generator().manual_seed(seed + 100)

    def grads(self, skip: tuple[int, ...] = ()) -> None:
        for i, (a, b) in enumerate(zip(self.fp, self.tp, strict=True)):
            if i in skip:
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=self.gen, dtype=a.dtype)
            a.grad, b.grad = g.clone(), g.clone()

    def step(self, n: int = 1, skip: tuple[int, ...] = ()) -> None:
        for _ in range(n):
            self.grads(skip)
            self.f.step()
            if self.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.tp, self.max_grad_norm)
                torch.testing.assert_close(self.f.last_grad_norm, norm, rtol=1e-5, atol=0)
            self.t.step()

    def both(self, fn: Callable[[torch.optim.Optimizer, list[torch.nn.Parameter]], Any]) -> None:
        fn(self.f, self.fp)
        fn(self.t, self.tp)

    def check(self, **tolerance: float) -> None:
        tolerance = tolerance or tol(self.fp[0].dtype)
        for i, (a, b) in enumerate(zip(self.fp, self.tp, strict=True)):
            torch.testing.assert_close(
                a.detach(), b.detach(), **tolerance, msg=lambda m, i=i: f"param {i}: {m}"
            )
            sa, sb = self.f.state.get(a, {}), self.t.state.get(b, {})
            assert set(sa) == set(sb), f"param {i}: state keys {set(sa)} != {set(sb)}"
            for key, vb in sb.items():
                va = sa[key]
                if key == "step":
                    assert float(va) == float(vb), f"param {i}: step"
                else:
                    torch.testing.assert_close(
                        va, vb, **tolerance, msg=lambda m, i=i, k=key: f"param {i} {k}: {m}"
                    )


def hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group hyperparameters, minus ``foreach`` (the reference forces its for-loop) and
    live ``params`` (state dicts' param indices are kept)."""
    assert all("foreach" in g for g in groups)
    return [
        {
            k: v
            for k, v in g.items()
            if k != "foreach" and not (k == "params" and v and isinstance(v[0], torch.Tensor))
        }
        for g in groups
    ]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        # Smooth activations: a ReLU sitting within 1e-8 of its kink could flip on a
        # last-bit difference and turn rounding noise into a visibly different trajectory.
        torch.nn.Linear(8, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 4),
    )


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(n)
    ]


# ----------------------------------------------------------------------------------------
# Groups, zero_grad, closures, hooks, isinstance
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_param_groups_with_their_own_hyperparameters(family):
    variants = FAMILIES[family].variants

    def groups(ps):
        return [
            {"params": ps[:2]},
            {"params": [ps[2]], **variants[0]},
            {"params": [ps[3]], **variants[1]},
        ]

    twin = Twin(family, groups, lr=1e-2, **weight_decay(family, 0.02))
    assert hyper(twin.f.param_groups) == hyper(twin.t.param_groups)
    twin.step(100)
    twin.check()
    if "max_exp_avg_sq" in FAMILIES[family].state_tensors:  # amsgrad in variants[0]
        assert "max_exp_avg_sq" in twin.f.state[twin.fp[2]]
        assert "max_exp_avg_sq" not in twin.f.state[twin.fp[0]]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_add_param_group_mid_training(family):
    variants = FAMILIES[family].variants
    twin = Twin(family, lambda ps: ps[:2], lr=1e-2)
    twin.step(20, skip=(2, 3))
    twin.both(lambda opt, ps: opt.add_param_group({"params": [ps[2]], **variants[0]}))
    twin.step(20, skip=(3,))
    twin.both(lambda opt, ps: opt.add_param_group({"params": ps[3:], **variants[1]}))
    twin.step(20)
    twin.check()
    assert len(twin.f.param_groups) == 3
    assert hyper(twin.f.param_groups) == hyper(twin.t.param_groups)


#: Per family: (key, value) changes made to a live group between steps (the registry's
#: ``live_changes``), each one a change torch's own optimizer honours without error.
HYPERPARAMETER_CHANGES = {
    name: family.live_changes for name, family in FAMILIES.items() if family.live_changes
}


@pytest.mark.parametrize("family", list(HYPERPARAMETER_CHANGES))
def test_hyperparameter_changes_mid_training_are_honoured(family):
    twin = Twin(family, lr=1e-2)
    twin.step(5)
    for key, value in HYPERPARAMETER_CHANGES[family]:

        def change(opt, _ps, key=key, value=value):
            opt.param_groups[0][key] = value

        twin.both(change)
        twin.step(5)
    twin.check()


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_grad(family, set_to_none):
    twin = Twin(family, lr=1e-2)
    twin.step(3)
    twin.f.zero_grad(set_to_none=set_to_none)
    twin.t.zero_grad(set_to_none=set_to_none)
    for p in twin.fp:
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.count_nonzero()
    twin.f.step()  # no grads / zero grads: torch's semantics (skip / decay) either way
    twin.t.step()
    twin.check()
    twin.step(3)
    twin.check()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_grad_default_sets_to_none(family):
    twin = Twin(family)
    twin.step(1)
    twin.f.zero_grad()
    assert all(p.grad is None for p in twin.fp)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_closure_returns_the_loss_and_runs_with_grad_enabled(family):
    family = FAMILIES[family]
    model = mlp()
    opt = family.make_ferro(model.parameters(), lr=1e-2, **family.common)
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(mlp()(x), y).item())
    assert opt.step() is None


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_closure_training_matches_torch(family):
    family = FAMILIES[family]
    losses = {}
    for name, factory in (("ferro", family.make_ferro), ("torch", family.make_torch)):
        model = mlp()
        opt = factory(model.parameters(), **{"lr": 1e-2, **family.common, **family.variants[0]})
        out = []
        for x, y in batches(30):

            def closure(x=x, y=y, model=model, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            out.append(opt.step(closure).item())
        losses[name] = out
    assert losses["ferro"] == pytest.approx(losses["torch"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_step_hooks_fire(family):
    family = FAMILIES[family]
    params = make_params()
    opt = family.make_ferro(params, lr=1e-2, **family.common)
    events = []

    def pre(o, args, kwargs):
        assert o is opt
        events.append(("pre", params[0].detach().clone()))

    def post(o, args, kwargs):
        assert o is opt
        events.append(("post", params[0].detach().clone()))

    h1 = opt.register_step_pre_hook(pre)
    h2 = opt.register_step_post_hook(post)
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: events.append(("global-pre", None)))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: events.append(("global-post", None)))
    try:
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    finally:
        g1.remove()
        g2.remove()
    assert [e[0] for e in events] == ["global-pre", "pre", "post", "global-post"]
    before, after = events[1][1], events[2][1]
    assert not torch.equal(before, after), "the post hook must see the stepped params"
    h1.remove()
    h2.remove()
    events.clear()
    opt.step()
    assert events == []


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_state_dict_and_load_state_dict_hooks_fire(family):
    family = FAMILIES[family]
    params = make_params()
    opt = family.make_ferro(params, lr=1e-2, **family.common)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    events = []

    opt.register_state_dict_pre_hook(lambda o: events.append("sd-pre"))

    def sd_post(o, sd):
        events.append("sd-post")
        sd["extra"] = 42
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        events.append("load-pre")
        sd = dict(sd)
        sd.pop("extra")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: events.append("load-post"))
    sd = opt.state_dict()
    assert sd["extra"] == 42
    opt.load_state_dict(sd)
    assert events == ["sd-pre", "sd-post", "load-pre", "load-post"]
    opt.step()  # still steps after the hooked load


def test_isinstance():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for ferro_cls, torch_cls in (
        (ferroptim.Adam, torch.optim.Adam),
        (ferroptim.AdamW, torch.optim.AdamW),
        (ferroptim.SGD, torch.optim.SGD),
        (ferroptim.RMSprop, torch.optim.RMSprop),
        (ferroptim.Adagrad, torch.optim.Adagrad),
    ):
        opt = ferro_cls(p)
        assert isinstance(opt, torch.optim.Optimizer)
        assert isinstance(opt, torch_cls)
        assert issubclass(ferro_cls, torch_cls)


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_constructor_defaults_match_torch(family):
    family = FAMILIES[family]
    f = family.ferro([torch.nn.Parameter(torch.zeros(3))])
    t = family.torch([torch.nn.Parameter(torch.zeros(3))])
    assert f.defaults == t.defaults
    assert {k: v for k, v in f.param_groups[0].items() if k != "params"} == {
        k: v for k, v in t.param_groups[0].items() if k != "params"
    }
    assert f.max_grad_norm is None
    assert f.last_grad_norm is None


@pytest.mark.parametrize("family", OPTIMIZERS)
def test_constructor_signature_is_torchs_plus_keywords(family):
    """torch's parameters, in torch's order, with torch's kinds and defaults; ferroptim's
    own options (``max_grad_norm``, ...) only as extra keyword-only parameters."""
    family = FAMILIES[family]
    ours = inspect.signature(family.ferro.__init__).parameters
    theirs = inspect.signature(family.torch.__init__).parameters
    # (a reference taking `**kwargs`, as pytorch-optimizer's do: ours takes them too, last)
    var_keyword = [n for n, p in theirs.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    named = [n for n in theirs if n not in var_keyword]
    assert list(ours)[: len(named)] == named
    assert [n for n, p in ours.items() if p.kind is inspect.Parameter.VAR_KEYWORD] == var_keyword
    for name, param in theirs.items():
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, name
    extra = [p for name, p in ours.items() if name not in theirs]
    # (Adan's reference takes a `max_grad_norm` of its own: it is the reference's there)
    assert ("max_grad_norm" in [p.name for p in extra]) == family.ferro_clipping
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra), extra
    assert ours["max_grad_norm"].default is None or not family.ferro_clipping
    # Positional calls exactly as torch's.
    positional = [
        p.default
        for p in list(theirs.values())[2:]
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    x = [torch.nn.Parameter(torch.zeros(3))]
    assert family.ferro(x, *positional).defaults == family.torch(x, *positional).defaults


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_named_parameters(family):
    family = FAMILIES[family]
    model_f, model_t = mlp(), mlp()
    opt_f = family.make_ferro(model_f.named_parameters(), lr=1e-2, **family.common)
    opt_t = family.make_torch(model_t.named_parameters(), lr=1e-2, **family.common)
    for x, y in batches(10):
        for model, opt in ((model_f, opt_f), (model_t, opt_t)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    sd_f, sd_t = opt_f.state_dict(), opt_t.state_dict()
    assert hyper(sd_f["param_groups"]) == hyper(sd_t["param_groups"])
    assert sd_f["param_groups"][0]["param_names"] == [n for n, _ in model_f.named_parameters()]
    for a, b in zip(model_f.parameters(), model_t.parameters(), strict=True):
        torch.testing.assert_close(a, b, **F32)


#: Per family: kwargs of the small-model training runs (the registry's
#: ``interop_training``: every state buffer in play).
TRAINING_KWARGS = {
    name: family.interop_training
    for name, family in FAMILIES.items()
    if family.interop_training is not None
}


@pytest.mark.parametrize("family", list(TRAINING_KWARGS))
def test_mlp_training_matches_torch(family):
    kwargs = TRAINING_KWARGS[family]
    family = FAMILIES[family]
    results = {}
    for name, factory in (("ferro", family.make_ferro), ("torch", family.make_torch)):
        model = mlp()
        opt = factory(model.parameters(), **kwargs)
        losses = []
        for x, y in batches(150):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[name] = (losses, [p.detach() for p in model.parameters()])
    (lf, pf), (lt, pt) = results["ferro"], results["torch"]
    assert lf == pytest.approx(lt, rel=1e-5, abs=1e-6)
    assert lf[-1] < lf[0], "training should make progress"
    for a, b in zip(pf, pt, strict=True):
        torch.testing.assert_close(a, b, **F32)


@pytest.mark.parametrize("family", list(TRAINING_KWARGS))
def test_grad_scaler_matches_torch(family):
    kwargs = TRAINING_KWARGS[family]
    family = FAMILIES[family]
    results = {}
    for name, factory in (("ferro", family.make_ferro), ("torch", family.make_torch)):
        model = mlp()
        opt = factory(model.parameters(), **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
        for i, (x, y) in enumerate(batches(30)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if i == 7:  # an overflow: the scaler must skip this step
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        results[name] = ([p.detach() for p in model.parameters()], scaler.get_scale(), opt)
    (pf, sf, of), (pt, st, ot) = results["ferro"], results["torch"]
    assert sf == st
    for a, b in zip(pf, pt, strict=True):
        torch.testing.assert_close(a, b, **F32)
    if family.has_step:
        steps = {float(s["step"]) for s in of.state.values()}
        assert steps == {float(s["step"]) for s in ot.state.values()} == {29.0}


# ----------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------


def _seq(opt):
    return lr_scheduler.SequentialLR(
        opt,
        [
            lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
            lr_scheduler.ExponentialLR(opt, gamma=0.95),
        ],
        milestones=[5],
    )


def _chained(opt):
    return lr_scheduler.ChainedScheduler(
        [
            lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=10),
            lr_scheduler.ExponentialLR(opt, gamma=0.97),
        ]
    )


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[5, 15, 30], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.95),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=8, T_mult=2, eta_min=1e-5
    ),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(
        o, base_lr=1e-3, max_lr=5e-2, step_size_up=6, cycle_momentum=False
    ),
    "CyclicLR-momentum": lambda o: lr_scheduler.CyclicLR(
        o,
        base_lr=1e-3,
        max_lr=5e-2,
        step_size_up=6,
        mode="triangular2",
        cycle_momentum=True,
        base_momentum=0.8,
        max_momentum=0.95,
    ),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=60),
    "OneCycleLR-linear": lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=[5e-2, 1e-2], total_steps=60, anneal_strategy="linear", three_phase=True
    ),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=20),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.3, total_iters=15),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=40, power=2.0),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.97),
    "SequentialLR": _seq,
    "ChainedScheduler": _chained,
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2),
}


#: Schedulers that cycle ``momentum`` / ``betas`` (optimizers without either refuse them).
CYCLING = ("CyclicLR-momentum", "OneCycleLR", "OneCycleLR-linear")


def _momentum_of(group: dict[str, Any]) -> Any:
    if "betas" in group:
        return tuple(group["betas"])
    return group.get("momentum")


@pytest.mark.parametrize("family", OPTIMIZERS)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_scheduler_trajectory_matches_torch(name, family):
    family = FAMILIES[family]
    if name in CYCLING and not _has_momentum(family):
        # Adagrad: no momentum to cycle. torch's scheduler refuses the optimizer; it must
        # refuse ferroptim's with the same error.
        with pytest.raises(ValueError) as torch_error:
            SCHEDULERS[name](family.make_torch(mlp().parameters(), lr=1e-2))
        with pytest.raises(ValueError) as ferro_error:
            SCHEDULERS[name](family.make_ferro(mlp().parameters(), lr=1e-2))
        assert str(ferro_error.value) == str(torch_error.value)
        return
    # Gradients drawn independently of the params (no loss feeding back into them): the
    # scheduler drives the hyperparameters, and every step must match torch's.
    twin = Twin(
        family.name, lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 5e-3}], lr=1e-2
    )
    scheds = {side: SCHEDULERS[name](opt) for side, opt in (("ferro", twin.f), ("torch", twin.t))}
    trajectory = {"ferro": [], "torch": []}
    for _ in range(60):
        twin.step()
        for side, opt in (("ferro", twin.f), ("torch", twin.t)):
            sched = scheds[side]
            if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
                sched.step(10.0)  # never improves: the lr must drop
            else:
                sched.step()
            trajectory[side].append([(g["lr"], _momentum_of(g)) for g in opt.param_groups])
    tf, tt = trajectory["ferro"], trajectory["torch"]
    assert tf == tt
    assert len({t[0][0] for t in tf}) > 1, "the scheduler should have changed the lr"
    if name in CYCLING:
        assert len({t[0][1] for t in tf}) > 1, "the scheduler should have cycled the momentum"
    twin.check()
    sf, st = scheds["ferro"].state_dict(), scheds["torch"].state_dict()
    assert sf.keys() == st.keys()
    assert sf.get("_last_lr") == st.get("_last_lr")


def _has_momentum(family) -> bool:
    defaults = family.torch([torch.nn.Parameter(torch.zeros(1))], **family.fixed).defaults
    return "momentum" in defaults or "betas" in defaults


# ----------------------------------------------------------------------------------------
# state_dict format, checkpoints, serialisation
# ----------------------------------------------------------------------------------------


def _groups(family: str) -> Callable[[list[torch.nn.Parameter]], Any]:
    variant = {"lr": 3e-3, **FAMILIES[family].variants[0]}
    return lambda ps: [{"params": ps[:2]}, {"params": ps[2:], **variant}]


def _trained_twin(family: str = "AdamW", **kwargs: Any) -> Twin:
    twin = Twin(family, _groups(family), lr=1e-2, **kwargs)
    twin.step(1, skip=(1, 2, 3))
    twin.step(9, skip=(3,))  # param 3 never gets a grad: no state (Adagrad: pristine state)
    return twin


@pytest.mark.parametrize("family", CLIPPING)
def test_state_dict_has_torchs_exact_format(family):
    twin = _trained_twin(family)
    sf, st = twin.f.state_dict(), twin.t.state_dict()
    assert set(sf) == set(st) == {"state", "param_groups"}
    assert hyper(sf["param_groups"]) == hyper(st["param_groups"])
    assert structure({**sf, "param_groups": hyper(sf["param_groups"])}) == structure(
        {**st, "param_groups": hyper(st["param_groups"])}
    )
    expected = [0, 1, 2, 3] if family == "Adagrad" else [0, 1, 2]
    assert sorted(sf["state"]) == sorted(st["state"]) == expected
    for index, state in sf["state"].items():
        assert list(state) == list(st["state"][index]), "same keys, same order"
        if FAMILIES[family].has_step:
            step = state["step"]
            assert isinstance(step, torch.Tensor) and step.dim() == 0
            assert step.dtype == st["state"][index]["step"].dtype and step.is_floating_point()
        else:
            assert "step" not in state
        for key, value in state.items():
            if key != "step":
                assert value.is_contiguous() == st["state"][index][key].is_contiguous()
                assert value.dtype == st["state"][index][key].dtype
                torch.testing.assert_close(value, st["state"][index][key], **F32)
    if FAMILIES[family].has_step:
        assert float(sf["state"][0]["step"]) == 10.0
        assert float(sf["state"][1]["step"]) == 9.0
    assert "max_grad_norm" not in sf
    assert all("max_grad_norm" not in g for g in sf["param_groups"])


def test_sgd_without_momentum_keeps_no_state():
    """torch's SGD with momentum=0 keeps an empty state; so must ferroptim's."""
    twin = Twin("SGD", lr=1e-2, momentum=0.0, weight_decay=0.1)
    twin.step(5)
    twin.check()
    assert len(twin.t.state) == 0
    assert len(twin.f.state) == 0
    assert twin.f.state_dict()["state"] == twin.t.state_dict()["state"] == {}


def test_sgd_momentum_buffer_starts_as_the_first_grad():
    """torch's SGD creates ``momentum_buffer`` on a param's first step as a clone of the
    (decayed) gradient — not zeros, not shared with the grad."""
    for maximize in (False, True):
        twin = Twin("SGD", lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1, maximize=maximize)
        twin.grads(skip=(1,))
        twin.f.step()
        twin.t.step()
        twin.check()
        assert twin.fp[1] not in twin.f.state or not twin.f.state[twin.fp[1]]
        for p, q in zip(twin.fp, twin.tp, strict=True):
            if p.grad is None:
                continue
            buf = twin.f.state[p]["momentum_buffer"]
            assert torch.equal(buf, twin.t.state[q]["momentum_buffer"])
            assert buf.data_ptr() != p.grad.data_ptr()
        twin.step(5)
        twin.check()


@pytest.mark.parametrize(
    ("dtype", "fused"),
    [
        (torch.float32, None),
        (torch.float64, None),
        (torch.complex64, None),
        (torch.float32, True),  # torch's fused Adagrad: a float32 step on the param's device
        (torch.float64, True),
    ],
)
def test_adagrad_state_is_created_at_construction(dtype, fused):
    """torch's Adagrad makes ``step`` and ``sum`` (filled with initial_accumulator_value,
    ``v + vj`` for complex params) for every param in its constructor."""

    def make(cls):
        gen = torch.Generator().manual_seed(0)
        ps = [
            torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in ((7,), (3, 4))
        ]
        return cls(ps, initial_accumulator_value=0.25, fused=fused)

    f, t = make(ferroptim.Adagrad), make(torch.optim.Adagrad)
    sf, st = f.state_dict(), t.state_dict()
    assert structure(sf) == structure(st)
    for index in st["state"]:
        for key, value in st["state"][index].items():
            assert torch.equal(sf["state"][index][key], value), key


@pytest.mark.parametrize("family", OPTIMIZERS)
@pytest.mark.parametrize("direction", ["torch-to-ferro", "ferro-to-torch"])
def test_checkpoint_interchange(direction, family):
    """A checkpoint from one implementation loads into the other and training continues to
    the same numbers as continuing with the original."""
    groups = _groups(family)
    family = FAMILIES[family]
    kwargs = {"lr": 1e-2, **weight_decay(family, 0.03), **family.common}

    first, second = (
        (family.make_torch, family.make_ferro)
        if direction == "torch-to-ferro"
        else (family.make_ferro, family.make_torch)
    )
    params = make_params()
    opt = first(groups(params), **kwargs)
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(40)]

    def train(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    train(opt, params, grads[:20])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    # Hyperparameters overwritten by the load.
    opt2 = second(groups(resumed), **{**kwargs, "lr": 0.5, **weight_decay(family, 0.5)})
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-2
    train(opt2, resumed, grads[20:])
    train(opt, params, grads[20:])
    for a, b in zip(resumed, params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **F32)
    for i in range(len(params)):
        assert list(opt2.state[resumed[i]]) == list(opt.state[params[i]])
        for key, value in opt.state[params[i]].items():
            torch.testing.assert_close(opt2.state[resumed[i]][key], value, **F32)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_save_load_weights_only_round_trip(family):
    twin = _trained_twin(family)
    buffer = io.BytesIO()
    torch.save(twin.f.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert structure(loaded) == structure(twin.f.state_dict())
    for (path, a), (_, b) in zip(_tensors(loaded), _tensors(twin.f.state_dict()), strict=True):
        assert torch.equal(a, b), path
    # Continue from the loaded state on a fresh optimizer and on the original: same numbers.
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in twin.fp]
    opt = FAMILIES[family].make_ferro(_groups(family)(fresh), lr=1e-2, **FAMILIES[family].common)
    opt.load_state_dict(loaded)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        for p, q in zip(fresh, twin.fp, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.f.step()
    for p, q in zip(fresh, twin.fp, strict=True):
        assert torch.equal(p, q)


def _tensors(obj):
    return list(iter_tensors(obj))


@pytest.mark.parametrize("family", CLIPPING)
def test_deepcopy(family):
    twin = _trained_twin(family, max_grad_norm=2.5)
    originals = [p.detach().clone() for p in twin.fp]
    params_copy, opt_copy = copy.deepcopy((twin.fp, twin.f))
    assert type(opt_copy) is type(twin.f)
    assert opt_copy.max_grad_norm == 2.5
    assert all(a is not b for a, b in zip(params_copy, twin.fp, strict=True))
    assert opt_copy.param_groups[0]["params"][0] is params_copy[0]
    # Step only the copy: the original's tensors must not move.
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in twin.fp] for _ in range(10)]
    for gs in grads:
        for p, g in zip(params_copy, gs, strict=True):
            p.grad = g.clone()
        opt_copy.step()
    for p, o in zip(twin.fp, originals, strict=True):
        assert torch.equal(p.detach(), o)
    # The original, stepped the same way, reaches the same numbers (and matches torch
    # stepping with torch's clip_grad_norm_).
    for gs in grads:
        for p, q, g in zip(twin.fp, twin.tp, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        twin.f.step()
        norm = torch.nn.utils.clip_grad_norm_(twin.tp, 2.5)
        torch.testing.assert_close(twin.f.last_grad_norm, norm, rtol=1e-5, atol=0)
        twin.t.step()
    for a, b in zip(params_copy, twin.fp, strict=True):
        assert torch.equal(a.detach(), b.detach())
    twin.check()


@pytest.mark.parametrize("family", CLIPPING)
def test_pickle(family):
    twin = _trained_twin(family, max_grad_norm=0.75)
    params2, opt2 = pickle.loads(pickle.dumps((twin.fp, twin.f)))
    assert type(opt2) is type(twin.f)
    assert opt2.max_grad_norm == 0.75
    assert opt2.state_dict()["param_groups"] == twin.f.state_dict()["param_groups"]
    assert "max_grad_norm" not in opt2.state_dict()
    gen = torch.Generator().manual_seed(9)
    for _ in range(10):
        for p, q in zip(params2, twin.fp, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt2.step()
        twin.f.step()
        assert torch.equal(opt2.last_grad_norm, twin.f.last_grad_norm)
    for a, b in zip(params2, twin.fp, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_max_grad_norm_is_not_in_the_state_dict_and_survives_loading():
    """``max_grad_norm`` is a setting of the optimizer object, not of its checkpoint: a
    state_dict loads into torch.optim unchanged, and loading one keeps the setting."""
    twin = _trained_twin("AdamW", max_grad_norm=1.5)
    sd = twin.f.state_dict()
    assert "max_grad_norm" not in sd and all("max_grad_norm" not in g for g in sd["param_groups"])
    twin.t.load_state_dict(copy.deepcopy(sd))
    other = ferroptim.AdamW(_groups("AdamW")(make_params()), max_grad_norm=0.5)
    other.load_state_dict(copy.deepcopy(sd))
    assert other.max_grad_norm == 0.5


# ----------------------------------------------------------------------------------------
# The Rust side caches pointers: every way of swapping tensors must be honoured
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_load_state_dict_mid_training(family):
    twin = Twin(family, **{"lr": 1e-2, **FAMILIES[family].variants[0]})
    twin.step(5)
    saved_f, saved_t = copy.deepcopy(twin.f.state_dict()), copy.deepcopy(twin.t.state_dict())
    twin.step(5)
    twin.f.load_state_dict(saved_f)  # back to the step-5 states, keep the step-10 params
    twin.t.load_state_dict(saved_t)
    twin.step(5)
    twin.check()
    if FAMILIES[family].has_step:
        assert float(twin.f.state[twin.fp[0]]["step"]) == 10.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_load_state_dict_from_another_optimizer_mid_training(family):
    twin = Twin(family, lr=1e-2)
    other = Twin(family, seed=4, lr=5e-2, **weight_decay(family, 0.1))
    other.step(7)
    twin.step(3)
    # load_state_dict keeps (does not copy) state tensors of the right dtype and device:
    # give each optimizer its own copy.
    twin.f.load_state_dict(copy.deepcopy(other.t.state_dict()))
    twin.t.load_state_dict(copy.deepcopy(other.t.state_dict()))
    twin.step(5)
    twin.check()


STATE_KEYS = [
    pytest.param(family, key, id=f"{family}-{key}")
    for family in one_per_kernel()
    for key in FAMILIES[family].state_tensors
    if key not in FAMILIES[family].vector_only_state  # (edited on a matrix param)
]


def _twin_with_every_state(family: str) -> Twin:
    extra = {"amsgrad": True} if "amsgrad" in FAMILIES[family].grid else {}
    return Twin(family, lr=1e-2, **extra)


#: State buffers of second moments: they must stay above the square of the first.
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta")


def _edited(key: str, value: torch.Tensor) -> torch.Tensor:
    """A new tensor for state ``key``, different from ``value`` but still valid (no
    negative variances)."""
    if key == "step":
        return torch.tensor(100.0)
    if key in SECOND_MOMENTS:
        return value * 2.0 + 0.25
    return value * 0.5 - 0.01


@pytest.mark.parametrize(("family", "key"), STATE_KEYS)
def test_reassigning_a_state_tensor(family, key):
    twin = _twin_with_every_state(family)
    twin.step(3)

    def reassign(opt, ps):
        state = opt.state[ps[1]]
        state[key] = _edited(key, state[key])

    twin.both(reassign)
    twin.step(3)
    twin.check()


@pytest.mark.parametrize(("family", "key"), STATE_KEYS)
def test_swapping_a_state_tensors_data(family, key):
    """``state[key].data = ...`` keeps the tensor object but moves its memory."""
    twin = _twin_with_every_state(family)
    twin.step(3)
    keep_alive = []  # the old storage stays allocated: a stale pointer is visible, not fatal

    def swap(opt, ps):
        state = opt.state[ps[1]]
        keep_alive.append(state[key].data)
        state[key].data = _edited(key, state[key])

    twin.both(swap)
    stale = [t.clone() for t in keep_alive]
    twin.step(3)
    twin.check()
    assert torch.equal(keep_alive[0], stale[0]), "the step wrote to the old, swapped-out memory"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_clearing_state_of_a_param(family):
    twin = Twin(family, lr=1e-2)
    twin.step(3)
    twin.both(lambda opt, ps: opt.state.pop(ps[0]))
    twin.step(3)
    twin.check()
    twin.both(lambda opt, ps: opt.state.clear())
    twin.step(3)
    twin.check()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_in_place_state_edit(family):
    twin = Twin(family, lr=1e-2)
    twin.step(3)

    def edit(opt, ps):
        # (the first state buffer this param has: Adafactor's depend on its shape)
        state = opt.state[ps[0]]
        key = next(k for k in FAMILIES[family].state_tensors if k != "step" and k in state)
        state[key].mul_(2.0).add_(0.5)

    twin.both(edit)
    twin.step(3)
    twin.check()


@pytest.mark.parametrize("how", ["new-tensor", "new-dtype-f64", "transposed-view", "reshaped-view"])
@pytest.mark.parametrize("family", one_per_kernel())
def test_param_data_replaced(family, how):
    """``p.data = ...``: fresh memory, or the same memory seen through a new layout."""
    # A square param, so a transposed view keeps the shape (and the state still fits).
    twin = Twin(family, shapes=((300,), (6, 6), (5,)), lr=1e-2)
    twin.step(3)

    def replace(opt, ps):
        p = ps[1]
        if how == "new-tensor":
            p.data = torch.linspace(-1, 1, 36).reshape(6, 6)
        elif how == "new-dtype-f64":
            p.data = p.data.double()
            for key, value in opt.state[p].items():
                if key != "step":
                    opt.state[p][key] = value.double()
        elif how == "transposed-view":
            p.data = p.data.t()  # same storage, same data_ptr, different strides
        else:
            p.data = p.data.view(36).view(6, 6)  # same memory, same layout

    twin.both(replace)
    twin.step(3)
    twin.check(**F32)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_replacing_group_params(family):
    twin = Twin(family, lr=1e-2)
    twin.step(3)
    twin.both(lambda opt, ps: opt.param_groups[0].__setitem__("params", [ps[3], ps[0], ps[2]]))
    twin.step(3)
    twin.check()
    twin.both(lambda opt, ps: opt.param_groups[0].__setitem__("params", list(ps)))
    twin.step(3)
    twin.check()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_mutating_group_params_in_place(family):
    twin = Twin(family, lr=1e-2)
    twin.step(3)
    twin.both(lambda opt, ps: opt.param_groups[0]["params"].reverse())
    twin.step(2)
    twin.both(lambda opt, ps: opt.param_groups[0]["params"].pop())
    twin.step(2)
    twin.both(lambda opt, ps: opt.param_groups[0]["params"].__setitem__(0, ps[3]))
    twin.step(2)
    twin.check()


def test_toggling_amsgrad_off():
    twin = Twin("Adam", lr=1e-2, amsgrad=True)
    twin.step(4)
    twin.both(lambda opt, ps: opt.param_groups[0].__setitem__("amsgrad", False))
    twin.step(4)
    twin.check()
    twin.both(lambda opt, ps: opt.param_groups[0].__setitem__("amsgrad", True))
    twin.step(4)  # the max buffers kept from before are used again, as torch does
    twin.check()


TOGGLES_THAT_RAISE = [
    pytest.param("Adam", {}, "amsgrad", True, "max_exp_avg_sq", id="Adam-amsgrad-on"),
    pytest.param(
        "RMSprop", {"centered": False}, "centered", True, "grad_avg", id="RMSprop-centered-on"
    ),
    pytest.param(
        "RMSprop", {"momentum": 0.0}, "momentum", 0.5, "momentum_buffer", id="RMSprop-momentum-on"
    ),
]


@pytest.mark.parametrize(("family", "kwargs", "key", "value", "missing"), TOGGLES_THAT_RAISE)
def test_toggling_a_state_buffer_on_raises_like_torch_and_writes_nothing(
    family, kwargs, key, value, missing
):
    """Switching on a flag whose state buffer was never created: torch raises KeyError
    (its state was created without it); ferroptim must too, writing nothing."""
    twin = Twin(family, lr=1e-2, **kwargs)
    twin.step(3)
    twin.both(lambda opt, ps: opt.param_groups[0].__setitem__(key, value))
    twin.grads()
    before = snapshot(twin.f, twin.fp)
    with pytest.raises(KeyError) as torch_error:
        twin.t.step()
    with pytest.raises(type(torch_error.value), match=missing):
        twin.f.step()
    assert_unchanged(before, twin.f, twin.fp)


def test_toggling_sgd_momentum_on_creates_the_buffer_like_torch():
    """SGD creates its momentum buffer whenever it is missing: switching momentum on
    mid-training starts the buffers from that step's gradient, as torch does."""
    twin = Twin("SGD", lr=1e-2, momentum=0.0)
    twin.step(3)
    assert all("momentum_buffer" not in s for s in twin.f.state.values())
    twin.both(lambda opt, ps: opt.param_groups[0].__setitem__("momentum", 0.9))
    twin.step(3, skip=(2,))
    twin.check()
    assert "momentum_buffer" not in twin.f.state.get(twin.fp[2], {})
    twin.step(3)
    twin.check()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_grads_toggling_between_none_and_layouts(family):
    twin = Twin(family, lr=1e-2)
    for step in range(12):
        twin.grads(skip=(step % 4,))
        if step % 3 == 0:  # alternate contiguous and transposed grads on the 2-d param
            for ps in (twin.fp, twin.tp):
                if ps[1].grad is not None:
                    ps[1].grad = ps[1].grad.t().contiguous().t()
        twin.f.step()
        twin.t.step()
    twin.check()


# ----------------------------------------------------------------------------------------
# Autograd: the step is an in-place write, as torch.optim's
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    ["contiguous", "non-contiguous", "complex"],
)
@pytest.mark.parametrize("family", OPTIMIZERS)
def test_step_bumps_the_autograd_version_counter(family, layout):
    """A graph that saved a param before ``step()`` must refuse to backprop through it
    afterwards, with torch's "modified by an inplace operation" error, as with
    torch.optim: the Rust step bumps every written param's version counter. Checked on
    the first step (slow path) and on later steps (cached plan)."""
    family = FAMILIES[family]

    def make_param():
        gen = torch.Generator().manual_seed(0)
        if layout == "complex":
            return torch.nn.Parameter(torch.randn(5, 7, generator=gen, dtype=torch.complex64))
        if layout == "non-contiguous":
            return torch.nn.Parameter(torch.randn(5, 14, generator=gen)[:, ::2])
        return torch.nn.Parameter(torch.randn(5, 7, generator=gen))

    for factory in (family.make_torch, family.make_ferro):
        p = make_param()
        opt = factory([p], lr=1e-2, **family.common)
        if p.is_complex() and not family.complex_params:  # torch's error, nothing written
            p.grad = torch.ones_like(p)
            version = p._version
            with pytest.raises(RuntimeError, match="does not support complex"):
                opt.step()
            assert p._version == version
            continue
        for _ in range(3):
            p.grad = torch.ones_like(p)
            loss = (p * p).abs().sum()  # saves p for backward
            version = p._version
            opt.step()
            assert p._version > version, f"{factory}: the step did not bump the version"
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()

"""The fused weight EMA (``ema_decay=``): exactly what ``AveragedModel`` with
``get_ema_multi_avg_fn(decay)`` keeps when updated after every step, for every optimizer,
on the Rust path (the average updated inside the kernel's pass) and on torch's path;
``ema_weights()``; checkpoints; bad input; a cached plan whose average changes."""

from __future__ import annotations

import copy
from typing import Any

import ferroptim
import pytest
import torch
from _kernels import kernel_calls
from optim_db import FAMILIES, OPTIMIZERS
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

DECAY = 0.9
#: Every optimizer that steps dense gradients (SparseAdam's are sparse: see its test).
DENSE = tuple(name for name in OPTIMIZERS if not FAMILIES[name].ferro.__name__ == "SparseAdam")


class Params(nn.Module):
    """Params wider than any SIMD width with ragged tails, one of them transposed (a
    dense param that is not contiguous: the kernel steps a staged copy)."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.matrix = nn.Parameter(torch.randn(37, 129, generator=g, dtype=dtype))
        self.vector = nn.Parameter(torch.randn(4099, generator=g, dtype=dtype))
        self.small = nn.Parameter(torch.randn(3, generator=g, dtype=dtype))
        self.transposed = nn.Parameter(torch.randn(70, 33, generator=g, dtype=dtype).t())


def _set_grads(model: nn.Module, step: int, *, skip: str | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for name, p in model.named_parameters():
        p.grad = None if name == skip else torch.randn(p.shape, generator=g, dtype=p.dtype)


def _train(
    name: str, dtype: torch.dtype, steps: int, **extra: Any
) -> tuple[nn.Module, torch.optim.Optimizer, AveragedModel]:
    """``steps`` steps of family ``name`` with ``ema_decay`` and, beside it, AveragedModel
    updated after each (one param's gradient missing every third step)."""
    family = FAMILIES[name]
    model = Params(dtype)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    opt = family.ferro(model.parameters(), **{**family.train_kwargs, "ema_decay": DECAY, **extra})
    for step in range(steps):
        _set_grads(model, step, skip="vector" if step % 3 == 2 else None)
        opt.step()
        averaged.update_parameters(model)
    return model, opt, averaged


def _assert_averages(model: nn.Module, opt: torch.optim.Optimizer, averaged: AveragedModel) -> None:
    for (name, p), want in zip(model.named_parameters(), averaged.module.parameters(), strict=True):
        got = opt.state[p]["ema"]
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", DENSE)
def test_matches_averaged_model(name: str, dtype: torch.dtype) -> None:
    model, opt, averaged = _train(name, dtype, 40)
    _assert_averages(model, opt, averaged)


#: The element-wise optimizers, whose kernel updates the average in its pass (Adafactor's
#: three passes take torch's lerp after the step).
FUSED = tuple(
    n
    for n in DENSE
    if FAMILIES[n].rust
    and FAMILIES[n].ferro._ferro_spec.plan_extras is None
    and FAMILIES[n].ferro._ferro_spec.ema_in_kernel
)


@pytest.mark.parametrize("name", FUSED)
def test_average_is_updated_in_the_kernels_pass(name: str) -> None:
    """After the first step (which copies), each step's one kernel call per group
    updates the average: torch's lerp is not called."""
    family = FAMILIES[name]
    model = Params(torch.float32)
    model.transposed = nn.Parameter(model.transposed.detach().t().contiguous())
    opt = family.ferro(model.parameters(), **{**family.train_kwargs, "ema_decay": DECAY})
    _set_grads(model, 0)
    opt.step()
    calls = []
    original = torch._foreach_lerp_
    torch._foreach_lerp_ = lambda *a, **k: calls.append(a) or original(*a, **k)  # type: ignore[assignment]
    try:
        with kernel_calls() as counts:
            for step in range(1, 4):
                _set_grads(model, step)
                opt.step()
    finally:
        torch._foreach_lerp_ = original  # type: ignore[assignment]
    assert calls == []
    assert sum(counts.values()) == 3


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adan", "Adafactor"])
def test_torch_path_matches_too(name: str) -> None:
    ferroptim.set_backend("torch")
    try:
        model, opt, averaged = _train(name, torch.float32, 12)
    finally:
        ferroptim.set_backend("auto")
    _assert_averages(model, opt, averaged)


def test_threads_and_simd_levels_give_the_same_bits() -> None:
    results = []
    for threads in (1, 2):
        for level in ferroptim.supported_simd_levels():
            ferroptim.set_num_threads(threads)
            ferroptim.set_simd_level(level)
            model, opt, _ = _train("AdamW", torch.float32, 5)
            results.append([opt.state[p]["ema"].clone() for p in model.parameters()])
    ferroptim.set_simd_level(None)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_groups_with_and_without_an_average() -> None:
    model = Params(torch.float32)
    opt = ferroptim.AdamW([model.matrix, model.small], lr=1e-2)
    opt.add_param_group({"params": [model.vector], "ema_decay": 0.5})
    want: torch.Tensor | None = None
    for step in range(6):
        _set_grads(model, step)
        opt.step()
        now = model.vector.detach()
        want = now.clone() if want is None else torch.lerp(want, now, 1 - 0.5)
    assert "ema" not in opt.state[model.matrix]
    assert "ema_decay" not in opt.param_groups[0]  # the groups' keys stay torch's
    assert torch.equal(opt.state[model.vector]["ema"], want)


def test_ema_weights_swaps_and_restores() -> None:
    model, opt, averaged = _train("AdamW", torch.float32, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    averages = {n: opt.state[p]["ema"].clone() for n, p in model.named_parameters()}
    with opt.ema_weights():
        for (n, p), want in zip(
            model.named_parameters(), averaged.module.parameters(), strict=True
        ):
            assert torch.equal(p, want), n
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(opt.state[p]["ema"], averages[n])
    with pytest.raises(KeyError), opt.ema_weights():
        raise KeyError("evaluation failed")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    # the cached fast path stays valid (nothing was re-pointed): training goes on exactly
    _set_grads(model, 10)
    opt.step()
    averaged.update_parameters(model)
    _assert_averages(model, opt, averaged)


def test_checkpoint_round_trip_and_torch_loading() -> None:
    model, opt, averaged = _train("AdamW", torch.float32, 6)
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    resumed = ferroptim.AdamW(clone.parameters(), lr=1e-2, ema_decay=DECAY)
    resumed.load_state_dict(saved)
    for step in range(6, 10):
        _set_grads(model, step)
        _set_grads(clone, step)
        opt.step()
        resumed.step()
        averaged.update_parameters(model)
    _assert_averages(model, opt, averaged)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(opt.state[p]["ema"], resumed.state[q]["ema"])
    # torch's AdamW loads the checkpoint (it keeps the extra state) and steps
    theirs = torch.optim.AdamW(copy.deepcopy(model).parameters())
    theirs.load_state_dict(saved)
    # a torch checkpoint (no ema_decay in its groups) keeps the constructor's decay
    plain = torch.optim.AdamW(copy.deepcopy(model).parameters())
    loader = ferroptim.AdamW(copy.deepcopy(model).parameters(), ema_decay=0.5)
    loader.load_state_dict(plain.state_dict())
    assert all(group["ema_decay"] == 0.5 for group in loader.param_groups)


@pytest.mark.parametrize(
    ("value", "error"), [(1.5, ValueError), (-0.1, ValueError), ("0.9", TypeError)]
)
def test_bad_decay_is_refused(value: Any, error: type[Exception]) -> None:
    model = Params(torch.float32)
    with pytest.raises(error):
        ferroptim.AdamW(model.parameters(), ema_decay=value)
    opt = ferroptim.AdamW(model.parameters(), ema_decay=DECAY)
    for step in range(2):
        _set_grads(model, step)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["ema_decay"] = value
    _set_grads(model, 2)
    with pytest.raises(error):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # nothing written


def test_replaced_or_aliased_average() -> None:
    """A cached plan sees an average replaced mid-training (the new tensor is updated,
    the old one left alone); an average sharing the param's memory is refused before
    anything is written."""
    model, opt, averaged = _train("AdamW", torch.float32, 4)
    old = opt.state[model.vector]["ema"]
    opt.state[model.vector]["ema"] = old.clone()
    kept = old.clone()
    _set_grads(model, 4)
    opt.step()
    averaged.update_parameters(model)
    assert torch.equal(old, kept)
    _assert_averages(model, opt, averaged)
    opt.state[model.vector]["ema"] = model.vector.detach()
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, 5)
    with pytest.raises(RuntimeError, match="share memory"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


class Matrices(nn.Module):
    """2-D params only (Muon's), wider than any SIMD width with ragged tails."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first = nn.Parameter(torch.randn(37, 129, generator=g))
        self.second = nn.Parameter(torch.randn(65, 33, generator=g))


@pytest.mark.parametrize("name", ["LARS", "LAMB", "Muon", "LBFGS"])
def test_optimizers_with_their_own_step(name: str) -> None:
    """The optimizers whose step is not one element-wise pass (or, LARS and LAMB, is not
    in the shared registry) update the average with torch's lerp after the step: the
    same values as AveragedModel."""
    # (torch's LBFGS views each gradient flat: no transposed param for it)
    model: nn.Module = Params(torch.float32) if name in ("LARS", "LAMB") else Matrices()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    kwargs: dict[str, Any] = {
        "LARS": {"lr": 0.1, "weight_decay": 1e-4},
        "LAMB": {"lr": 1e-2, "weight_decay": 1e-2},
        "Muon": {"lr": 0.02},
        "LBFGS": {"lr": 0.1, "max_iter": 3},
    }[name]
    opt = getattr(ferroptim, name)(model.parameters(), ema_decay=DECAY, **kwargs)
    target = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) for p in model.parameters()
    ]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(model.parameters(), target, strict=True))
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    for _ in range(8):
        opt.step(closure)
        averaged.update_parameters(model)
    _assert_averages(model, opt, averaged)


@pytest.mark.parametrize("change", ["resized", "re-pointed", "strided"])
def test_average_changed_behind_the_plans_back(change: str) -> None:
    """An average resized or re-pointed in place (same tensor object) is seen by the cached
    plan: refused before anything is written where it no longer fits its param, stepped
    where it does (a strided view is re-laid out once)."""
    model, opt, averaged = _train("AdamW", torch.float32, 3)
    average = opt.state[model.vector]["ema"]
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, 3)
    if change == "resized":
        average.resize_(10)
    elif change == "re-pointed":
        average.data = torch.zeros(5)
    else:
        wide = torch.zeros(2 * average.numel())
        wide[::2] = average
        average.set_(wide.untyped_storage(), 0, average.shape, (2,))
        opt.step()
        averaged.update_parameters(model)
        _assert_averages(model, opt, averaged)
        return
    with pytest.raises(RuntimeError, match="'ema'"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)

"""ferroptim.tune: the learning-rate range test and the gradient noise scale.

* Exact restore: after a normal run, an early stop on divergence, an exception and a
  KeyboardInterrupt raised mid-search, the model's parameters, buffers (BatchNorm running
  statistics), gradients and train/eval flags, the optimizer's state_dict (step counters
  included), a GradScaler and the RNG states are bitwise what they were — with
  ferroptim.AdamW and with torch.optim.SGD with momentum.
* The suggestion on a quadratic whose loss curve is known in closed form, and the same
  suggestion (and the same recorded curve) as torch_lr_finder.LRFinder.
* The noise scale on linear regression with Gaussian inputs and label noise, where
  B_simple = tr(Σ)/|G|^2 is known analytically.
* Importing ferroptim loads neither ferroptim.tune nor matplotlib nor tqdm; progress=False
  prints nothing.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import ferroptim.tune as tune
import numpy as np
import pytest
import torch
from conftest import FAMILIES, ferroptim
from torch import Tensor, nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # BatchNorm: running statistics and num_batches_tracked buffers; Dropout: RNG draws.
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)
    )


def make_batches(n: int = 6, size: int = 32, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 8, generator=gen), torch.randint(0, 3, (size,), generator=gen))
        for _ in range(n)
    ]


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    # In-step clipping and skipping: last_grad_norm and skipped_steps must come back too.
    "ferroptim.AdamW": lambda m: ferroptim.AdamW(
        m.parameters(), lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0, skip_nonfinite=True
    ),
    # Two param groups with different lrs: their ratio must survive the sweep.
    "torch.SGD-momentum": lambda m: torch.optim.SGD(
        [
            {"params": list(m[0].parameters()) + list(m[1].parameters())},
            {"params": m[4].parameters(), "lr": 3e-3},
        ],
        lr=1e-3,
        momentum=0.9,
    ),
}


def warm_up(model, opt, batches, scaler=None, steps: int = 3) -> None:
    """A few real steps first, so step counters, moments, momentum buffers, running
    statistics and the scaler's growth tracker hold non-trivial values to restore."""
    for batch in batches[:steps]:
        opt.zero_grad()
        loss = cross_entropy(model, batch)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    # Leave gradients behind too (lr_find must hand them back as they were).
    cross_entropy(model, batches[0]).backward()


def capture(model: nn.Module, opt, scaler) -> dict[str, Any]:
    """Everything lr_find promises to restore, copied."""
    return copy.deepcopy(
        {
            "tensors": {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()},
            "grads": [None if p.grad is None else p.grad.detach() for p in model.parameters()],
            "training": [m.training for m in model.modules()],
            "optimizer": opt.state_dict(),
            "last_grad_norm": getattr(opt, "last_grad_norm", None),
            "scaler": None if scaler is None else scaler.state_dict(),
            "scaler_lazy": None if scaler is None else scaler._scale is None,
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }
    )


def assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    """Recursive equality; tensors compared bit for bit (dtype, shape, bytes)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(
            a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)
        ), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


class Spy:
    """A loss_fn that records what the search did, draws from every global RNG (as data
    augmentation would), and raises ``exc`` at call ``raise_at``."""

    def __init__(self, model: nn.Module, opt, raise_at: int = -1, exc: type = RuntimeError):
        self.model, self.opt = model, opt
        self.raise_at, self.exc = raise_at, exc
        self.calls = 0
        self.group_lrs: list[list[float]] = []
        self.first_weight = model[0].weight.detach().clone()
        self.moved = False

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        if self.calls == self.raise_at:
            raise self.exc("raised mid-search")
        self.calls += 1
        self.group_lrs.append([float(g["lr"]) for g in self.opt.param_groups])
        self.moved |= not torch.equal(model[0].weight, self.first_weight)
        random.random()
        np.random.rand()
        return cross_entropy(model, batch)


# ----------------------------------------------------------------------------------------
# Bitwise restore
# ----------------------------------------------------------------------------------------

SCENARIOS = {
    # end_lr small enough not to diverge over 20 steps
    "normal": {"end_lr": 1e-2, "num_iters": 20},
    # a sweep that blows up: the search stops early
    "diverge": {"end_lr": 1e4, "num_iters": 60},
    "raise": {"end_lr": 1.0, "num_iters": 20, "raise_at": 7},
    "interrupt": {"end_lr": 1.0, "num_iters": 20, "raise_at": 7, "exc": KeyboardInterrupt},
}


@pytest.mark.parametrize("use_scaler", [False, True], ids=["no-scaler", "GradScaler"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_lr_find_restores_everything_bitwise(opt_name, scenario, use_scaler):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
    batches = make_batches()
    warm_up(model, opt, batches, scaler)
    model.eval()  # lr_find trains in train mode, then hands eval mode back
    np.random.seed(5)
    before = capture(model, opt, scaler)
    params_before = [id(p) for p in model.parameters()]

    config = dict(SCENARIOS[scenario])
    spy = Spy(model, opt, config.pop("raise_at", -1), config.pop("exc", RuntimeError))
    kwargs = {"start_lr": 1e-5, "scaler": scaler, "progress": False, **config}
    if spy.raise_at >= 0:
        with pytest.raises(spy.exc, match="raised mid-search"):
            tune.lr_find(model, opt, batches, spy, **kwargs)
        assert spy.calls == spy.raise_at
    else:
        result = tune.lr_find(model, opt, batches, spy, **kwargs)
        assert result.diverged == (scenario == "diverge")
        assert len(result.lrs) == spy.calls
        assert (len(result.lrs) < config["num_iters"]) == (scenario == "diverge")
    assert spy.moved  # the search really trained the model

    assert_bitwise(capture(model, opt, scaler), before)
    assert [id(p) for p in model.parameters()] == params_before
    # The optimizer still steps the model's own parameter objects.
    opt_params = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(opt_params) == sorted(params_before)


def test_params_outside_the_model_are_restored_too():
    """An optimizer may step tensors the model does not own (a learned temperature)."""
    model = make_model()
    temperature = nn.Parameter(torch.tensor(1.5))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1, momentum=0.9)

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]) / temperature, batch[1])

    before = temperature.detach().clone()
    seen = []

    def spy(model, batch):
        seen.append(temperature.item())
        return loss_fn(model, batch)

    tune.lr_find(model, opt, make_batches(), spy, num_iters=20, end_lr=1.0, progress=False)
    assert len(set(seen)) > 1  # the search moved it
    assert temperature.grad is None
    assert_bitwise(temperature.detach(), before)


def test_a_nan_loss_stops_the_search_and_skipped_steps_come_back():
    model = make_model()
    opt = OPTIMIZERS["ferroptim.AdamW"](model)  # skip_nonfinite=True
    batches = make_batches()
    warm_up(model, opt, batches)
    before = capture(model, opt, None)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = cross_entropy(model, batch)
        return loss * math.nan if len(calls) == 5 else loss

    step, skipped = opt.step, []

    def recording_step():
        step()
        skipped.append(opt.skipped_steps)

    opt.step = recording_step  # an instance attribute in front of the method
    result = tune.lr_find(model, opt, batches, loss_fn, progress=False)
    del opt.step
    assert skipped == [0, 0, 0, 0, 1]  # the step on nan gradients was skipped...
    assert opt.skipped_steps == 0  # ...and the count restored
    assert result.diverged and len(result.lrs) == 5 and math.isnan(result.raw_losses[-1])
    assert result.suggestion is None  # too few finite points
    assert_bitwise(capture(model, opt, None), before)


@pytest.mark.parametrize("impl", ["ferroptim", "torch"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_restored_after_divergence(family, impl):
    """Every optimizer family of the test registry, ferroptim's and torch's class, with
    every state buffer in use (the family's ``common`` kwargs)."""
    fam = FAMILIES[family]
    make = fam.make_ferro if impl == "ferroptim" else fam.make_torch
    model = make_model()
    opt = make(model.parameters(), **{"lr": 1e-3, **fam.common})
    batches = make_batches()
    warm_up(model, opt, batches)
    before = capture(model, opt, None)
    result = tune.lr_find(model, opt, batches, cross_entropy, end_lr=1e4, progress=False)
    # Rprop reads lr only when it creates a param's state (its step sizes start at lr):
    # sweeping a warmed-up Rprop's lr changes nothing, so it cannot diverge.
    # Adafactor's lr only caps its relative step size (rho = min(lr, 1 / sqrt(step))) and
    # each update is clipped by its RMS: no lr makes it diverge.
    assert result.diverged == (family not in LR_READ_ONLY_AT_INIT | LR_CAPPED)
    assert_bitwise(capture(model, opt, None), before)


#: Families whose step never reads the group's lr once a param has state.
LR_READ_ONLY_AT_INIT = {"Rprop"}
#: Families whose step size an lr sweep cannot blow up (see above).
LR_CAPPED = {"Adafactor"}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_lr_find_twice_gives_the_same_curve(opt_name):
    """An exact restore makes the search repeatable: a second run from the restored state
    (same weights, optimizer state and RNG, so the same dropout masks) records the same
    losses bit for bit, and training afterwards matches a twin that never searched."""
    model = make_model()
    opt = OPTIMIZERS[opt_name](model)
    batches = make_batches()
    warm_up(model, opt, batches)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[opt_name](twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    torch.manual_seed(11)
    first = tune.lr_find(model, opt, batches, cross_entropy, num_iters=30, progress=False)
    second = tune.lr_find(model, opt, batches, cross_entropy, num_iters=30, progress=False)
    assert first.raw_losses == second.raw_losses
    assert first.lrs == second.lrs

    warm_up(model, opt, batches[3:], steps=3)
    torch.manual_seed(11)
    warm_up(twin, twin_opt, batches[3:], steps=3)
    assert_bitwise(model.state_dict(), twin.state_dict())
    assert_bitwise(opt.state_dict(), twin_opt.state_dict())


def test_param_groups_keep_their_ratio_and_the_sweep_is_the_schedule():
    model = make_model()
    opt = OPTIMIZERS["torch.SGD-momentum"](model)  # lrs 1e-3 and 3e-3
    spy = Spy(model, opt)
    result = tune.lr_find(
        model, opt, make_batches(), spy, start_lr=1e-4, end_lr=1e-1, num_iters=25, progress=False
    )
    q = (1e-1 / 1e-4) ** (1 / 24)
    assert len(result.lrs) == 25
    for i, (lr, (g0, g1)) in enumerate(zip(result.lrs, spy.group_lrs, strict=True)):
        assert lr == pytest.approx(1e-4 * q**i, rel=1e-12)
        assert g0 == lr
        assert g1 == pytest.approx(3 * lr, rel=1e-12)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 3e-3]  # restored


def test_linear_mode_sweeps_linearly():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = tune.lr_find(
        model,
        opt,
        make_batches(),
        cross_entropy,
        start_lr=1e-3,
        end_lr=1e-2,
        num_iters=10,
        mode="linear",
        progress=False,
    )
    expected = np.linspace(1e-3, 1e-2, 10)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-14)
    assert result.mode == "linear"


def test_short_data_is_cycled_lists_and_one_shot_generators():
    batches = make_batches(n=3)
    for data_kind in ("list", "generator"):
        seen: list[int] = []

        def loss_fn(model, batch, seen=seen):
            seen.append(next(i for i, b in enumerate(batches) if b[0] is batch[0]))
            return cross_entropy(model, batch)

        data = batches if data_kind == "list" else (b for b in batches)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tune.lr_find(model, opt, data, loss_fn, end_lr=1e-3, num_iters=8, progress=False)
        assert seen == [0, 1, 2, 0, 1, 2, 0, 1], data_kind


def test_dataloader_reshuffles_and_its_draws_are_undone():
    """A shuffling DataLoader draws its order from torch's global RNG each epoch: lr_find
    cycles it (a new epoch when it runs out) and the RNG restore undoes those draws, so
    the next epoch after lr_find is the one the user would have had without it."""
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    torch.manual_seed(3)
    expected = [y.tolist() for _, y in loader]
    model = make_model()
    torch.manual_seed(3)  # make_model seeds torch: start from the same state as above
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = tune.lr_find(model, opt, loader, cross_entropy, num_iters=10, progress=False)
    assert len(result.lrs) == 10  # 4 batches per epoch: cycled
    assert [y.tolist() for _, y in loader] == expected


def test_bad_arguments():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        ({"mode": "cosine"}, "mode"),
        ({"start_lr": 1.0, "end_lr": 0.1}, "start_lr"),
        ({"start_lr": 0.0}, "start_lr"),
        ({"num_iters": 1}, "num_iters"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"diverge_threshold": 1.0}, "diverge_threshold"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            tune.lr_find(model, opt, make_batches(), cross_entropy, progress=False, **kwargs)
    with pytest.raises(ValueError, match="no batches"):
        tune.lr_find(model, opt, [], cross_entropy, progress=False)


# ----------------------------------------------------------------------------------------
# Suggestions
# ----------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """L(w) = h/2 |w|^2: gradient descent multiplies w by (1 - lr h) each step, so the loss
    falls for lr < 2/h (fastest per step at lr = 1/h) and grows beyond 2/h."""

    def __init__(self, h: float, dim: int = 4) -> None:
        super().__init__()
        self.h = h
        self.w = nn.Parameter(torch.ones(dim, dtype=torch.float64))

    def forward(self) -> Tensor:
        return 0.5 * self.h * (self.w**2).sum()


def analytic_curve(h: float, dim: int, lrs: list[float], smoothing: float) -> list[float]:
    """The range test's smoothed loss on the quadratic, in closed form: the loss recorded at
    step i is L_0 prod_{j<i} (1 - lr_j h)^2, smoothed as lr_find smooths it."""
    raw, loss = [], 0.5 * h * dim
    for lr in lrs:
        raw.append(loss)
        loss *= (1 - lr * h) ** 2
    smoothed = [raw[0]]
    for x in raw[1:]:
        smoothed.append(smoothing * x + (1 - smoothing) * smoothed[-1])
    return smoothed


@pytest.mark.parametrize("h", [0.5, 4.0, 50.0])
def test_suggestion_on_a_quadratic_matches_the_analytic_curve(h):
    num_iters, ratio = 100, 1e6
    model = Quadratic(h)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = tune.lr_find(
        model,
        opt,
        [None],
        lambda m, _: m(),
        start_lr=1e-4 / h,
        end_lr=1e-4 / h * ratio,
        num_iters=num_iters,
        progress=False,
    )
    # The recorded curve is the closed form's. (Compared up to lr = 1/(2h): nearer 1/h,
    # w - lr·h·w cancels and the float64 trajectory leaves the exact product.)
    curve = analytic_curve(h, 4, result.lrs, smoothing=0.05)
    exact = sum(lr < 0.5 / h for lr in result.lrs)
    assert exact > 50
    np.testing.assert_allclose(result.losses[:exact], curve[:exact], rtol=1e-9)

    # Divergence: the loss cannot grow while lr < 2/h; the search stops past 2/h.
    assert result.diverged
    assert result.lrs[-1] > 2 / h
    stable = [x for lr, x in zip(result.lrs, result.raw_losses, strict=True) if lr < 2 / h]
    assert all(b <= a for a, b in itertools.pairwise(stable))

    # The steepest point of the analytic curve, and an analytic band for it: the raw
    # loss's per-step drop 2 lr h L(lr), with L(lr) ~ exp(-2 h lr / (q - 1)) on a sweep of
    # ratio q per step, peaks at lr = (q - 1) / (2h); smoothing only delays the peak, and
    # the peak comes before the loss has collapsed (lr < 1/h), far inside lr < 2/h.
    steepest = tune._lr_find._steepest(curve[10:-5])
    assert result.suggestion == result.lrs[10 + steepest]
    q = ratio ** (1 / (num_iters - 1))
    assert (q - 1) / (2 * h) <= result.suggestion <= 1 / h
    valley = result.suggestions["valley"]
    assert (q - 1) / (4 * h) <= valley <= 1 / h
    # Scale invariance: the suggestion is a fixed multiple of 1/h.
    assert result.suggestion * h == pytest.approx(0.16297508346206444, rel=1e-9)


def test_a_negative_loss_is_not_mistaken_for_divergence():
    model = Quadratic(4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"start_lr": 1e-5, "end_lr": 100.0, "num_iters": 100, "progress": False}
    shifted = tune.lr_find(model, opt, [None], lambda m, _: m() - 10.0, **kwargs)
    plain = tune.lr_find(model, opt, [None], lambda m, _: m(), **kwargs)
    # The loss runs from -2 down to -10 and only blows up past lr = 2/h.
    assert shifted.diverged and shifted.lrs[-1] > 0.5
    assert shifted.suggestion == plain.suggestion


def test_valley_is_fastais_rule():
    # Flat, then falling over indices 2..12, then rising: the longest decreasing
    # subsequence is 5.0 and the 11 falling points, 12 long, ending at index 12. fastai
    # counts its start as max_end - length = 0, its sections as length/3 = 4, and suggests
    # index 0 + 4 + 2.
    losses = [5.0, 5.0] + [4.0 - 0.3 * i for i in range(11)] + [2.0, 3.0, 9.0]
    assert tune._lr_find._valley(losses) == 6
    # A bump inside the descent does not break the valley (a subsequence, not a run):
    # 5, 4.0, 3.7, [bump], 3.1, ..., 1.0 is 11 long, ending at index 12: 1 + 3 + 1.
    losses[5] = 4.5
    assert tune._lr_find._valley(losses) == 5


def test_suggestion_needs_enough_points():
    result = tune.LRFindResult(
        lrs=[1e-3] * 12,
        losses=[1.0] * 12,
        raw_losses=[1.0] * 12,
        diverged=True,
        mode="exp",
        num_iters=100,
        start_lr=1e-7,
        end_lr=10.0,
    )
    assert result.suggestion is None
    assert "suggestion (steepest): none" in str(result)


@pytest.mark.parametrize("opt_name", ["torch.SGD", "ferroptim.AdamW"])
def test_same_suggestion_as_torch_lr_finder(opt_name, monkeypatch):
    import matplotlib
    import torch_lr_finder  # in the test extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    make_opt = {
        "torch.SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "ferroptim.AdamW": lambda m: ferroptim.AdamW(m.parameters(), lr=1e-3),
    }[opt_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    y = (x[:, :3].argmax(dim=1) + (torch.rand(512, generator=gen) < 0.1)) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    theirs_model = make_model()
    ours_model = copy.deepcopy(theirs_model)
    theirs_opt, ours_opt = make_opt(theirs_model), make_opt(ours_model)
    settings = {"start_lr": 1e-6, "end_lr": 10.0}

    torch.manual_seed(7)
    finder = torch_lr_finder.LRFinder(theirs_model, theirs_opt, nn.CrossEntropyLoss())
    finder.range_test(loader, num_iter=100, step_mode="exp", smooth_f=0.05, **settings)
    fig, ax = plt.subplots()
    _, their_lr = finder.plot(ax=ax, skip_start=10, skip_end=5, suggest_lr=True)
    plt.close(fig)

    torch.manual_seed(7)
    result = tune.lr_find(
        ours_model, ours_opt, loader, cross_entropy, num_iters=100, progress=False, **settings
    )
    # The same sweep, the same losses (the same arithmetic), the same early stop.
    assert result.lrs == finder.history["lr"]
    assert result.losses == finder.history["loss"]
    assert result.diverged == (len(result.lrs) < 100)
    assert result.suggestion == their_lr


# ----------------------------------------------------------------------------------------
# Plot and text
# ----------------------------------------------------------------------------------------


def sample_result() -> tune.LRFindResult:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return tune.lr_find(model, opt, make_batches(), cross_entropy, progress=False)


def test_plot_writes_a_png_and_returns_axes(tmp_path):
    import matplotlib  # in the test extra (through the plot extra)

    matplotlib.use("Agg")
    result = sample_result()
    path = tmp_path / "lr.png"
    assert result.plot(path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ax = result.plot()
    (line,) = ax.get_lines()
    assert len(line.get_xdata()) == len(result.lrs) - 5
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("steepest") for label in labels)
    assert any(label.startswith("valley") for label in labels)


def test_str_is_a_compact_table():
    result = sample_result()
    text = str(result)
    lines = text.splitlines()
    assert len(lines) <= 16
    assert lines[0].startswith("lr_find: exp sweep 1.0e-07 -> 1.0e+01")
    assert f"suggestion (steepest): {result.suggestion:.3e}" in text
    assert f"{result.lrs[-1]:.3e}" in text


# ----------------------------------------------------------------------------------------
# Noise scale
# ----------------------------------------------------------------------------------------


def regression_batches(
    dim: int, sigma: float, batch: int, w_true: Tensor, seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
        yield x, x @ w_true + sigma * torch.randn(batch, generator=gen, dtype=torch.float64)


def half_mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return 0.5 * ((model(batch[0]).squeeze(1) - batch[1]) ** 2).mean()


def test_noise_scale_on_linear_regression_is_within_20_percent_of_the_truth():
    """y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, σ²), loss ½(x·w - y)², Δ = w - w*. The
    per-example gradient x(x·Δ - ε) has mean G = Δ and (Gaussian fourth moments)
    covariance Σ = (|Δ|² + σ²) I + ΔΔᵀ, so B_simple = tr(Σ)/|G|² = (d(|Δ|² + σ²) + |Δ|²)/|Δ|²."""
    dim, sigma = 16, 1.0
    gen = torch.Generator().manual_seed(1)
    w_true = torch.randn(dim, generator=gen, dtype=torch.float64)
    delta = torch.randn(dim, generator=gen, dtype=torch.float64)
    delta /= delta.norm()  # |Δ| = 1
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_true + delta)
    d2 = float(delta @ delta)
    truth = (dim * (d2 + sigma**2) + d2) / d2  # 33

    result = tune.noise_scale(
        model,
        regression_batches(dim, sigma, 8, w_true),
        half_mse,
        batches_per_step=8,
        num_steps=200,
        ema=0.99,
        progress=False,
    )
    assert (result.small_batch, result.big_batch) == (8, 64)
    assert result.b_simple == pytest.approx(truth, rel=0.2)
    assert result.critical_batch_size == result.b_simple
    assert result.grad_sq == pytest.approx(d2, rel=0.2)
    assert result.trace_cov == pytest.approx(dim * (d2 + sigma**2) + d2, rel=0.2)
    assert len(result.b_simple_series) == len(result.small_sq) == len(result.big_sq) == 200
    # A batch of B_crit costs twice the minimum steps and twice the minimum examples.
    assert result.steps_factor(result.b_simple) == pytest.approx(2.0)
    assert result.examples_factor(result.b_simple) == pytest.approx(2.0)
    assert "B_simple" in str(result)
    # Measured at fixed weights (no optimizer): the model is untouched.
    assert torch.equal(model.weight.detach()[0], w_true + delta)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_noise_scale_with_an_optimizer_restores_everything(opt_name):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model)
    batches = make_batches()
    warm_up(model, opt, batches)
    before = capture(model, opt, None)
    result = tune.noise_scale(
        model,
        batches,
        cross_entropy,
        optimizer=opt,
        batches_per_step=3,
        num_steps=4,
        progress=False,
    )
    assert result.small_batch == 32 and result.big_batch == 96
    assert math.isfinite(result.b_simple)
    assert_bitwise(capture(model, opt, None), before)


def test_noise_scale_says_when_noise_swamps_the_signal():
    # A negative |G|^2 estimate (noise far above the big batch): no finite critical batch.
    result = tune.NoiseScaleResult(
        b_simple=-50.0,
        grad_sq=-0.1,
        trace_cov=5.0,
        small_batch=8,
        big_batch=64,
        small_sq=[1.0],
        big_sq=[1.0],
        b_simple_series=[-50.0],
    )
    assert result.critical_batch_size == math.inf
    assert "noise dominates" in str(result)


def test_noise_scale_skips_batches_of_another_size():
    model = make_model()
    batches = make_batches(n=4, size=32) + make_batches(n=1, size=7)  # a last partial batch
    seen: list[int] = []

    def loss_fn(model, batch):
        seen.append(len(batch[1]))
        return cross_entropy(model, batch)

    tune.noise_scale(model, batches, loss_fn, batches_per_step=4, num_steps=3, progress=False)
    assert set(seen) == {32}
    with pytest.raises(ValueError, match="not batch_size=16"):
        tune.noise_scale(model, batches, cross_entropy, batch_size=16, progress=False)


# ----------------------------------------------------------------------------------------
# Import cost and progress output
# ----------------------------------------------------------------------------------------


def test_import_ferroptim_loads_no_tuning_modules():
    # torch itself imports tqdm when it is installed (torch.hub), so the check is on what
    # `import ferroptim` adds to what `import torch` loaded, plus matplotlib outright.
    code = textwrap.dedent(
        """
        import sys
        import torch
        before = set(sys.modules)
        import ferroptim

        def loaded(names):
            heavy = ("matplotlib", "tqdm", "torch_lr_finder")
            return sorted(
                m for m in names if m.split(".")[0] in heavy or m.startswith("ferroptim.tune")
            )

        print(loaded(set(sys.modules) - before), "matplotlib" in sys.modules)
        ferroptim.tune.lr_find  # the lazy attribute works after a plain `import ferroptim`
        added = loaded(set(sys.modules) - before)
        print([m for m in added if not m.startswith("ferroptim.tune")], "ferroptim.tune" in added)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[] False", "[] True"]


def test_progress_false_prints_nothing(capsys):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = tune.lr_find(
        model, opt, make_batches(), cross_entropy, end_lr=1e4, num_iters=60, progress=False
    )
    assert result.diverged  # the early-stop path prints nothing either
    tune.noise_scale(model, make_batches(), cross_entropy, num_steps=2, progress=False)
    assert capsys.readouterr() == ("", "")


def test_progress_without_tqdm_is_one_line_on_stderr(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm...` fail
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tune.lr_find(model, opt, make_batches(), cross_entropy, end_lr=1e4, num_iters=60)
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("lr_find: ") and "stopped early" in line


def test_progress_with_tqdm_writes_a_bar(capsys):
    import tqdm  # noqa: F401  (in the test extra)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tune.lr_find(model, opt, make_batches(), cross_entropy, num_iters=10, end_lr=1e-2)
    out, err = capsys.readouterr()
    assert out == ""
    assert "lr_find" in err and "10/10" in err


# ----------------------------------------------------------------------------------------
# CUDA (runs where a GPU exists)
# ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_lr_find_on_cuda_restores_everything_bitwise(opt_name):
    model = make_model().cuda()
    opt = OPTIMIZERS[opt_name](model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches()]
    warm_up(model, opt, batches, scaler)
    before = capture(model, opt, scaler)
    assert before["cuda_rng"] is not None

    def loss_fn(model, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return cross_entropy(model, batch)

    result = tune.lr_find(
        model, opt, batches, loss_fn, end_lr=1e4, num_iters=60, scaler=scaler, progress=False
    )
    assert result.diverged
    assert result.suggestion is not None
    assert_bitwise(capture(model, opt, scaler), before)
    ns = tune.noise_scale(
        model, batches, cross_entropy, batches_per_step=3, num_steps=3, progress=False
    )
    assert math.isfinite(ns.b_simple)
    assert_bitwise(capture(model, opt, scaler), before)


CUDA_LAZY_INIT = """
import sys, torch, ferroptim.tune as tune
torch.manual_seed(0)  # queued for CUDA, which is not initialised yet
if sys.argv[1] == "search":
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(model, batch):
        noise = torch.randn(4, device="cuda").cpu()  # CUDA starts inside the search
        return (model(batch + noise) ** 2).mean()

    tune.lr_find(model, opt, [torch.ones(2, 4)], loss_fn, num_iters=5, progress=False)
    assert torch.cuda.is_initialized()
print(torch.randn(4, device="cuda").tolist())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_first_initialised_during_the_search_is_restored():
    def run(arg):
        cmd = [sys.executable, "-c", CUDA_LAZY_INIT, arg]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    assert run("search") == run("plain")

"""The learning-rate range test (Smith 2017; fastai's ``lr_find``), with an exact restore.

The sweep raises the learning rate from ``start_lr`` to ``end_lr`` over ``num_iters``
training steps, exponentially or linearly, and records the training loss of each step's
batch (computed before that step's update, under the learning rate the update then uses,
as torch-lr-finder and fastai record it). The loss is smoothed with an exponential moving
average and the search stops early once the smoothed loss exceeds ``diverge_threshold``
times the best one seen, or turns non-finite.

Everything the search changes is restored bit for bit afterwards (see ``_snapshot``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ferroptim.tune._progress import Progress
from ferroptim.tune._snapshot import Snapshot

LossFn = Callable[[nn.Module, Any], Tensor]
Mode = Literal["exp", "linear"]


@dataclass(frozen=True)
class LRFindResult:
    """The outcome of :func:`lr_find`.

    ``lrs[i]`` is the learning rate of the first param group at step ``i`` (the others kept
    their ratio to it), ``losses[i]`` the smoothed training loss recorded at that step,
    ``raw_losses[i]`` the loss before smoothing. ``diverged`` says whether the search
    stopped early.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    diverged: bool
    mode: str
    num_iters: int
    start_lr: float
    end_lr: float

    @property
    def suggestion(self) -> float | None:
        """The learning rate where the smoothed loss falls fastest (torch-lr-finder's
        "steepest gradient": the minimum of ``numpy.gradient`` of the losses, ignoring the
        first 10 and last 5 points). ``None`` when the search recorded too few points."""
        return self.suggest("steepest")

    @property
    def suggestions(self) -> dict[str, float | None]:
        """``{"steepest": ..., "valley": ...}``; ``"valley"`` is fastai's rule (see
        :meth:`suggest`)."""
        return {"steepest": self.suggest("steepest"), "valley": self.suggest("valley")}

    def suggest(
        self,
        method: Literal["steepest", "valley"] = "steepest",
        skip_start: int | None = None,
        skip_end: int = 5,
    ) -> float | None:
        """A learning rate by one of two rules, on the smoothed losses with the first
        ``skip_start`` and last ``skip_end`` points left out (the start is flat noise and the
        end is the blow-up).

        * ``"steepest"``: the point of most negative slope, ``argmin(numpy.gradient(loss))``
          (torch-lr-finder; ``skip_start`` defaults to 10).
        * ``"valley"``: fastai's default since 2.4. Find the longest stretch over which the
          loss keeps falling (the longest decreasing subsequence), and take the point
          halfway between its first and second third (``skip_start`` defaults to
          ``num_iters // 10``, as fastai's).
        """
        if method not in ("steepest", "valley"):
            raise ValueError(f"method must be 'steepest' or 'valley', got {method!r}")
        if skip_start is None:
            skip_start = 10 if method == "steepest" else self.num_iters // 10
        if skip_start < 0 or skip_end < 0:
            raise ValueError("skip_start and skip_end must be non-negative")
        lrs, losses = _trimmed(self.lrs, self.losses, skip_start, skip_end)
        if len(losses) < 2:
            return None
        if method == "steepest":
            return lrs[_steepest(losses)]
        return lrs[_valley(losses)]

    def plot(self, path: str | Path | None = None, *, ax: Any = None, skip_end: int = 5) -> Any:
        """Plot the smoothed loss against the learning rate (log scale for an exponential
        sweep), marking both suggestions. Needs matplotlib (``pip install
        'ferroptim[plot]'``), imported here, not when ferroptim is.

        With ``path`` the figure is written there (PNG, or any format matplotlib infers
        from the suffix) and ``path`` is returned; without it, the axes are returned. The
        curve goes into ``ax`` when given, else into a new figure (a pyplot one when the
        axes are returned, so it shows in a notebook).
        """
        if ax is None and path is not None:
            # A file needs no pyplot: a bare Figure touches no backend or global state.
            figure = _figure_class()(figsize=(6.4, 4.0))
            ax = figure.subplots()
        elif ax is None:
            _, ax = _pyplot().subplots(figsize=(6.4, 4.0))
        _draw(ax, self, skip_end)
        if path is None:
            return ax
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
        return path

    def __str__(self) -> str:
        return _table(self)


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[Any],
    loss_fn: LossFn,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iters: int = 100,
    mode: Mode = "exp",
    smoothing: float = 0.05,
    diverge_threshold: float = 5.0,
    scaler: Any = None,
    progress: bool = True,
) -> LRFindResult:
    """Run the learning-rate range test and restore everything it touched.

    Each step runs ``optimizer.zero_grad()``, ``loss = loss_fn(model, batch)`` on the next
    batch of ``data`` (any iterable: a DataLoader, a list, a generator; re-iterated, or
    replayed for a one-shot iterator, when it runs out before ``num_iters``),
    ``loss.backward()`` and ``optimizer.step()`` — or, with a ``scaler``
    (``torch.amp.GradScaler``), ``scaler.scale(loss).backward()``, ``scaler.step`` and
    ``scaler.update``. Put autocast, moving the batch to the model's device and the
    forward pass in ``loss_fn``; the model is in train mode during the search.

    Args:
        model: the model whose parameters ``optimizer`` steps.
        optimizer: any ``torch.optim.Optimizer`` (torch's or ferroptim's, any param groups).
        data: batches, passed to ``loss_fn`` as they come.
        loss_fn: ``(model, batch) -> scalar loss tensor``.
        start_lr, end_lr: the sweep's first and last learning rate, for the first param
            group; every other group keeps its lr's ratio to the first group's.
        num_iters: the number of steps (at least 2).
        mode: ``"exp"`` (geometric steps, the usual choice) or ``"linear"``.
        smoothing: weight of the newest loss in the moving average (torch-lr-finder's
            ``smooth_f``; 0 disables smoothing).
        diverge_threshold: stop once the smoothed loss exceeds this multiple of the best
            (a negative best: once it exceeds it by ``diverge_threshold - 1`` times its size).
        scaler: a GradScaler to step through (restored afterwards like everything else).
        progress: a progress bar (tqdm if installed, else a line on stderr); False for none.

    Returns:
        An :class:`LRFindResult`: ``lrs``, ``losses``, ``suggestion``, ``suggestions``,
        ``plot()``, and a text table from ``str()``.

    Afterwards the model's parameters, buffers, gradients and train/eval flags, the
    optimizer's state_dict (step counters included), the scaler, and the random number
    generators (Python's, NumPy's global one if NumPy is imported, torch's CPU and CUDA
    ones) are bitwise what they were, also when ``loss_fn`` raises or the search is
    interrupted. Not restored: the position of a one-shot iterator ``data``, and private
    generators (``torch.Generator`` objects, ``numpy.random.Generator``) the data or
    ``loss_fn`` own. The snapshot is a copy of the parameters, buffers, gradients and
    optimizer state on their own device, so the search needs that much free memory.
    """
    _check_args(start_lr, end_lr, num_iters, mode, smoothing, diverge_threshold)
    ratios = _group_ratios(optimizer)
    lrs = _schedule(start_lr, end_lr, num_iters, mode)
    snapshot = Snapshot.take(model, optimizer, scaler)
    batches = _batches(data)
    try:
        raw, smoothed, diverged = _sweep(
            _Sweep(model, optimizer, loss_fn, scaler, ratios, smoothing, diverge_threshold),
            batches,
            lrs,
            Progress(num_iters, "lr_find", progress),
        )
    finally:
        batches.close()  # lets a DataLoader's iterator (and its workers) go now
        snapshot.restore()
    return LRFindResult(
        lrs=lrs[: len(raw)],
        losses=smoothed,
        raw_losses=raw,
        diverged=diverged,
        mode=mode,
        num_iters=num_iters,
        start_lr=start_lr,
        end_lr=end_lr,
    )


@dataclass
class _Sweep:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    scaler: Any
    ratios: list[float]
    smoothing: float
    diverge_threshold: float

    def set_lr(self, lr: float) -> None:
        for group, ratio in zip(self.optimizer.param_groups, self.ratios, strict=True):
            value = lr * ratio
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(value)  # a tensor lr (fused/capturable) stays a tensor
            else:
                group["lr"] = value

    def train_step(self, batch: Any) -> float:
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model, batch)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(loss.detach())


def _sweep(
    sweep: _Sweep, batches: Iterator[Any], lrs: list[float], progress: Progress
) -> tuple[list[float], list[float], bool]:
    sweep.model.train()
    raw: list[float] = []
    smoothed: list[float] = []
    best = math.inf
    note = ""
    try:
        for lr in lrs:
            sweep.set_lr(lr)
            loss = sweep.train_step(next(batches))
            # The moving average starts at the first loss (torch-lr-finder's convention).
            average = loss if not smoothed else _ema(sweep.smoothing, loss, smoothed[-1])
            raw.append(loss)
            smoothed.append(average)
            best = min(best, average)
            progress.update(lr=lr, loss=average)
            if not math.isfinite(average) or average > _limit(sweep.diverge_threshold, best):
                note = "stopped early: the loss diverged"
                return raw, smoothed, True
        return raw, smoothed, False
    finally:
        progress.close(note)


def _limit(threshold: float, best: float) -> float:
    """The loss past which the search stops: ``threshold`` times the best (torch-lr-finder's
    rule); for a negative best (a log-likelihood, say), as far above it as
    ``threshold * |best|`` is above ``|best|``."""
    return threshold * best if best >= 0 else best + (threshold - 1) * -best


def _ema(smoothing: float, loss: float, previous: float) -> float:
    return smoothing * loss + (1 - smoothing) * previous


def _check_args(
    start_lr: float,
    end_lr: float,
    num_iters: int,
    mode: str,
    smoothing: float,
    diverge_threshold: float,
) -> None:
    if mode not in ("exp", "linear"):
        raise ValueError(f"mode must be 'exp' or 'linear', got {mode!r}")
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_iters < 2:
        raise ValueError(f"num_iters must be at least 2, got {num_iters}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not diverge_threshold > 1:
        raise ValueError(f"diverge_threshold must be > 1, got {diverge_threshold}")


def _group_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if lrs[0] <= 0 and len(lrs) > 1:
        raise ValueError(
            "lr_find keeps the param groups' learning rates in their current ratio to the "
            f"first group's, which needs a positive lr in the first group (got {lrs[0]})"
        )
    return [1.0] + [lr / lrs[0] for lr in lrs[1:]]


def _schedule(start_lr: float, end_lr: float, num_iters: int, mode: Mode) -> list[float]:
    # The same expressions as torch-lr-finder's schedulers, so the two sweeps agree bitwise.
    last = num_iters - 1
    if mode == "exp":
        return [start_lr * (end_lr / start_lr) ** (i / last) for i in range(num_iters)]
    return [start_lr + (i / last) * (end_lr - start_lr) for i in range(num_iters)]


def _batches(data: Iterable[Any]) -> Generator[Any, None, None]:
    """Batches without end: a re-iterable (list, DataLoader) is iterated again (a shuffling
    DataLoader reshuffles); a one-shot iterator's batches are kept and replayed."""
    iterator = iter(data)
    one_shot = iterator is data
    seen: list[Any] = []
    while True:
        count = 0
        for batch in iterator:
            count += 1
            if one_shot:
                seen.append(batch)
            yield batch
        if count == 0:
            raise ValueError("lr_find: the data iterable yielded no batches")
        if one_shot:
            yield from _replay(seen)
        iterator = iter(data)


def _replay(seen: list[Any]) -> Iterator[Any]:
    while True:
        yield from seen


def _trimmed(
    lrs: list[float], losses: list[float], skip_start: int, skip_end: int
) -> tuple[list[float], list[float]]:
    # A non-finite loss ends the usable part of the curve (fastai drops from the first nan).
    finite = next((i for i, x in enumerate(losses) if not math.isfinite(x)), len(losses))
    stop = len(losses) - skip_end if skip_end else len(losses)
    stop = min(stop, finite)
    return lrs[skip_start:stop], losses[skip_start:stop]


def _steepest(losses: list[float]) -> int:
    """``numpy.gradient(losses).argmin()`` (unit spacing, first-order edges), in floats."""
    n = len(losses)
    slope = [losses[1] - losses[0]]
    slope += [(losses[i + 1] - losses[i - 1]) / 2.0 for i in range(1, n - 1)]
    slope.append(losses[-1] - losses[-2])
    return min(range(n), key=slope.__getitem__)  # the first minimum, as argmin


def _valley(losses: list[float]) -> int:
    """fastai's ``valley``: the longest decreasing run (O(n^2), n is ~100), then the point
    ``max_start + int(s) + int(s / 2)`` with ``s`` a third of its length."""
    n = len(losses)
    longest = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[max_end] < longest[i]:
                max_end = i
                max_start = max_end - longest[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_NO_MATPLOTLIB) from exc
    return plt


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_NO_MATPLOTLIB) from exc
    return Figure


_NO_MATPLOTLIB = "LRFindResult.plot needs matplotlib: pip install 'ferroptim[plot]'"


def _draw(ax: Any, result: LRFindResult, skip_end: int) -> None:
    lrs, losses = _trimmed(result.lrs, result.losses, 0, skip_end)
    ax.plot(lrs, losses, color="C0", label="smoothed loss")
    for (name, lr), color in zip(result.suggestions.items(), ("C3", "C2"), strict=True):
        if lr is not None:
            y = losses[lrs.index(lr)]
            ax.scatter([lr], [y], s=60, color=color, zorder=3, label=f"{name}: {lr:.2e}")
    if result.mode == "exp":
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("lr_find" + (" (stopped early: diverged)" if result.diverged else ""))
    ax.legend()


def _table(result: LRFindResult, rows: int = 12) -> str:
    n = len(result.lrs)
    stop = f", stopped early at step {n} (diverged)" if result.diverged else ""
    lines = [
        f"lr_find: {result.mode} sweep {result.start_lr:.1e} -> {result.end_lr:.1e}, "
        f"{n}/{result.num_iters} steps{stop}",
        f"{'step':>6}  {'lr':>10}  {'loss':>10}  {'smoothed':>10}",
    ]
    picks = sorted({round(k * (n - 1) / max(rows - 1, 1)) for k in range(rows)}) if n else []
    for i in picks:
        lines.append(
            f"{i:>6}  {result.lrs[i]:>10.3e}  {result.raw_losses[i]:>10.4g}  "
            f"{result.losses[i]:>10.4g}"
        )
    for name, lr in result.suggestions.items():
        lines.append(f"suggestion ({name}): " + ("none" if lr is None else f"{lr:.3e}"))
    return "\n".join(lines)

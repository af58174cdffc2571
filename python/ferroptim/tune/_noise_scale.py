"""The gradient noise scale B_simple (McCandlish, Kaplan, Amodei et al., 2018, "An Empirical
Model of Large-Batch Training", arXiv:1812.06162, appendix A.1).

With G the true (full-data) gradient and Σ the per-example gradient covariance, a batch of
B examples gives a gradient whose squared norm has expectation ``|G|^2 + tr(Σ)/B``. Two
batch sizes B_small < B_big therefore give unbiased estimates of both terms:

    |G|^2  ≈ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Σ)  ≈ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

and B_simple = tr(Σ) / |G|^2. Each estimate is noisy (the |G|^2 one can even come out
negative), so, as in the paper, both are averaged with an exponential moving average over
steps before the ratio is taken.

Here a "small" batch is one batch of ``data`` and a "big" batch is ``batches_per_step``
consecutive ones: their mean gradient is the big batch's gradient when ``loss_fn``
averages over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ferroptim.tune._lr_find import LossFn, _batches
from ferroptim.tune._progress import Progress
from ferroptim.tune._snapshot import Snapshot


@dataclass(frozen=True)
class NoiseScaleResult:
    """The outcome of :func:`noise_scale`.

    ``b_simple`` is the estimate of tr(Σ)/|G|^2 in examples, from the moving averages
    ``grad_sq`` (|G|^2) and ``trace_cov`` (tr(Σ)) after the last step;
    ``critical_batch_size`` is the batch size it suggests (B_crit ≈ B_simple).
    ``small_sq`` / ``big_sq`` hold the measured squared gradient norms of each step (the
    mean over its small batches, and its big batch) and ``b_simple_series`` the running
    estimate after each step: if it is still drifting at the end, measure longer.
    """

    b_simple: float
    grad_sq: float
    trace_cov: float
    small_batch: int
    big_batch: int
    small_sq: list[float]
    big_sq: list[float]
    b_simple_series: list[float]

    @property
    def critical_batch_size(self) -> float:
        """B_crit ≈ B_simple: the batch size past which a bigger batch buys clearly less
        than proportionally fewer steps. ``inf`` when the |G|^2 estimate came out ≤ 0: the
        noise swamped the signal, and B_simple is far above the big batch measured."""
        return self.b_simple if self.grad_sq > 0 else math.inf

    def steps_factor(self, batch_size: float) -> float:
        """Steps needed at ``batch_size`` relative to the minimum (infinite batch):
        ``S / S_min = 1 + B_crit / B`` (the paper's equation 2.11, with B_noise ≈ B_simple)."""
        return 1.0 + self.b_simple / batch_size

    def examples_factor(self, batch_size: float) -> float:
        """Examples (compute) needed at ``batch_size`` relative to the minimum (batch
        size 1): ``E / E_min = 1 + B / B_crit``."""
        return 1.0 + batch_size / self.b_simple

    def __str__(self) -> str:
        lines = [
            f"noise_scale: {len(self.big_sq)} steps of {self.big_batch} examples "
            f"(small batches of {self.small_batch})",
            f"  |G|^2 ~ {self.grad_sq:.4g}   tr(Sigma) ~ {self.trace_cov:.4g}",
            f"  B_simple ~ {self.b_simple:.4g} examples (critical batch size)",
        ]
        if self.grad_sq <= 0:
            lines.append(
                "  the |G|^2 estimate is <= 0: noise dominates at this big batch; measure "
                "more steps or with more batches_per_step"
            )
        elif math.isfinite(self.b_simple):
            for batch in (self.b_simple / 4, self.b_simple, 4 * self.b_simple):
                lines.append(
                    f"  batch {batch:>10.4g}: x{self.steps_factor(batch):.2f} the minimum "
                    f"steps, x{self.examples_factor(batch):.2f} the minimum examples"
                )
        return "\n".join(lines)


def noise_scale(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    batches_per_step: int = 8,
    num_steps: int = 20,
    ema: float = 0.9,
    batch_size: int | None = None,
    progress: bool = True,
) -> NoiseScaleResult:
    """Estimate the simple gradient noise scale B_simple and the critical batch size.

    Each step takes ``batches_per_step`` batches of ``data`` (cycled like
    :func:`~ferroptim.tune.lr_find`'s), computes each one's gradient with
    ``loss_fn(model, batch).backward()`` (the model in train mode), and from the squared
    norms of the single-batch gradients and of their mean estimates |G|^2 and tr(Σ). Their
    bias-corrected moving averages (decay ``ema``) give B_simple = tr(Σ)/|G|^2.

    Without ``optimizer`` every step measures at the model's current weights (the moving
    average then just pools the steps). With one, each step also applies
    ``optimizer.step()`` with the big batch's gradient, so the estimate follows a short
    stretch of training. Either way the model, optimizer and RNG states are restored
    bitwise afterwards, as by ``lr_find``.

    Args:
        model: the model; ``loss_fn`` must return the *mean* loss over the batch.
        data: batches of equal size (batches of another size, such as a DataLoader's
            last partial batch, are skipped).
        loss_fn: ``(model, batch) -> scalar loss tensor``.
        optimizer: if given, train with it during the measurement (restored afterwards).
        batches_per_step: small batches per big batch (B_big = batches_per_step × B_small).
        num_steps: big batches measured.
        ema: decay of the moving averages of both estimates.
        batch_size: the small batch size; by default the leading dimension of the first
            tensor found in the first batch.
        progress: a progress bar (tqdm if installed, else a line on stderr); False for none.

    How to read it: B_simple is measured in examples. Training at a batch size well below
    it, doubling the batch halves the steps needed (near-perfect scaling); well above it,
    a bigger batch barely reduces the steps and wastes compute. The paper's trade-off is
    ``S/S_min = 1 + B_crit/B`` steps and ``E/E_min = 1 + B/B_crit`` examples, so
    ``B = B_crit`` costs twice the minimum of each.

    Limits: B_simple equals the paper's B_noise = tr(HΣ)/(GᵀHG) only when the Hessian H is
    a multiple of the identity; for real networks the two were found to agree within a
    small factor, which makes this an order-of-magnitude guide, not a precise batch size.
    The noise scale grows during training as the loss falls (often by 10x or more), so a
    value measured at initialisation understates the batch size useful later: measure at
    a few points of training. It is defined for plain SGD; for Adam-style optimizers it
    still tracks the useful batch size but less tightly. Each step's |G|^2 estimate is a
    small difference of large numbers: with few steps, or B_big far below B_simple, the
    estimate is noisy or even negative (check ``b_simple_series``). Batch-coupled layers
    (BatchNorm) make batch gradients not quite averages of independent examples.
    """
    _check_args(batches_per_step, num_steps, ema, batch_size)
    snapshot = Snapshot.take(model, optimizer)
    batches = _batches(data)
    bar = Progress(num_steps, "noise_scale", progress)
    try:
        model.train()
        meter = _Meter(model, batches, loss_fn, batch_size)
        small_sq: list[float] = []
        big_sq: list[float] = []
        for _ in range(num_steps):
            small, big = meter.step(batches_per_step, optimizer)
            small_sq.append(small)
            big_sq.append(big)
            b_big = batches_per_step * meter.batch_size
            latest = _running(small_sq, big_sq, meter.batch_size, b_big, ema)[-1]
            bar.update(b_simple=latest[2])
    finally:
        bar.close()
        batches.close()
        snapshot.restore()
    return _result(small_sq, big_sq, meter.batch_size, batches_per_step, ema)


def _check_args(batches_per_step: int, num_steps: int, ema: float, batch_size: int | None) -> None:
    if batches_per_step < 2:
        raise ValueError(f"batches_per_step must be at least 2, got {batches_per_step}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


class _Meter:
    """Computes one step's squared gradient norms, single batches and their mean."""

    def __init__(
        self, model: nn.Module, batches: Iterator[Any], loss_fn: LossFn, batch_size: int | None
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.model = model
        self.batches = batches
        self.loss_fn = loss_fn
        self.batch_size = batch_size or 0
        self.sums = [torch.zeros_like(p) for p in self.params]

    def next_batch(self) -> Any:
        """The next batch of the small batch size (inferred from the first batch unless
        given); batches of another size are skipped, a DataLoader's last one say."""
        for skipped, batch in enumerate(self.batches):
            size = _leading_size(batch)
            if self.batch_size == 0:
                if size is None:
                    raise ValueError("noise_scale could not infer the batch size: pass batch_size")
                self.batch_size = size
            if size is None or size == self.batch_size:
                return batch
            if skipped >= 100:
                raise ValueError(
                    f"noise_scale: 100 batches in a row held {size} examples, not "
                    f"batch_size={self.batch_size}"
                )
        raise AssertionError("unreachable: _batches never ends")

    def step(self, count: int, optimizer: torch.optim.Optimizer | None) -> tuple[float, float]:
        for total in self.sums:
            total.zero_()
        small = 0.0
        for _ in range(count):
            for p in self.params:
                p.grad = None
            self.loss_fn(self.model, self.next_batch()).backward()
            pairs = zip(self.params, self.sums, strict=True)
            grads = [(p.grad, total) for p, total in pairs if p.grad is not None]
            small += _sq_norm([g for g, _ in grads])
            for grad, total in grads:
                total.add_(grad)
        with torch.no_grad():
            for p, total in zip(self.params, self.sums, strict=True):
                p.grad = total / count
        big = _sq_norm([p.grad for p in self.params])
        if optimizer is not None:
            optimizer.step()
        return small / count, big


def _sq_norm(tensors: list[Any]) -> float:
    # float64 accumulation: the estimators subtract nearly equal squared norms.
    return math.fsum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors)


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            size = _leading_size(item)
            if size is not None:
                return size
    return None


def _running(
    small_sq: list[float], big_sq: list[float], b_small: int, b_big: int, ema: float
) -> list[tuple[float, float, float]]:
    """After each step: the bias-corrected moving averages of |G|^2 and tr(Σ), and their
    ratio B_simple."""
    out = []
    grad_avg = trace_avg = 0.0
    for t, (small, big) in enumerate(zip(small_sq, big_sq, strict=True), start=1):
        grad_est = (b_big * big - b_small * small) / (b_big - b_small)
        trace_est = (small - big) / (1 / b_small - 1 / b_big)
        grad_avg = ema * grad_avg + (1 - ema) * grad_est
        trace_avg = ema * trace_avg + (1 - ema) * trace_est
        debias = 1 - ema**t
        grad, trace = grad_avg / debias, trace_avg / debias
        out.append((grad, trace, trace / grad if grad != 0 else math.inf))
    return out


def _result(
    small_sq: list[float], big_sq: list[float], b_small: int, per_step: int, ema: float
) -> NoiseScaleResult:
    series = _running(small_sq, big_sq, b_small, per_step * b_small, ema)
    grad, trace, ratio = series[-1]
    return NoiseScaleResult(
        b_simple=ratio,
        grad_sq=grad,
        trace_cov=trace,
        small_batch=b_small,
        big_batch=per_step * b_small,
        small_sq=small_sq,
        big_sq=big_sq,
        b_simple_series=[r for _, _, r in series],
    )

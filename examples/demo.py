"""Train the same model with torch.optim.AdamW and with ferroptim.AdamW, side by side.

ferroptim asks one change of a training loop, the optimizer's import:

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # before
    opt = ferroptim.AdamW(model.parameters(), lr=1e-3)  # after

This demo trains a 64-1024-1024-10 MLP on scikit-learn's bundled digits data set
(8x8 images of handwritten digits; nothing is downloaded) twice, from the same
initial weights and with the same batch order: once with torch.optim.AdamW
(torch's default implementation) and once with ferroptim.AdamW, with the same
hyperparameters. Per epoch it prints both runs' train loss and test accuracy and
the median time of their ``opt.step()`` calls; at the end, how far apart the two
models' weights are.

    python examples/demo.py [--epochs 10] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, field

import ferroptim
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

HIDDEN = 1024
HYPERPARAMETERS = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-2}


@dataclass
class Digits:
    """Standardised digits features (64 per image) and labels, split into train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int = 0) -> Digits:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)  # statistics of the training set only

    def features(x: object) -> Tensor:
        return torch.tensor(scaler.transform(x), dtype=torch.float32)

    return Digits(
        features(x_train),
        torch.tensor(y_train, dtype=torch.long),
        features(x_test),
        torch.tensor(y_test, dtype=torch.long),
    )


def make_model(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


@dataclass
class Run:
    """One training run: a model, its optimizer, and what each epoch measured."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    step_times: list[list[float]] = field(default_factory=list)

    def train_epoch(self, data: Digits, batches: list[Tensor]) -> None:
        """One pass over ``batches`` (index tensors); times each ``opt.step()``."""
        self.model.train()
        total, times = 0.0, []
        for idx in batches:
            x, y = data.x_train[idx], data.y_train[idx]
            self.opt.zero_grad()
            loss = nn.functional.cross_entropy(self.model(x), y)
            loss.backward()
            start = time.perf_counter()
            self.opt.step()
            times.append(time.perf_counter() - start)
            total += loss.item() * len(idx)
        self.losses.append(total / len(data.y_train))
        self.step_times.append(times)
        self.accuracies.append(self.accuracy(data.x_test, data.y_test))

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        self.model.eval()
        return (self.model(x).argmax(dim=1) == y).float().mean().item()

    def median_step(self, epoch: int | None = None) -> float:
        """Median ``opt.step()`` time of one epoch, or of the whole run."""
        if epoch is not None:
            return statistics.median(self.step_times[epoch])
        return statistics.median(t for epoch_times in self.step_times for t in epoch_times)


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_data(args.seed)
    torch.manual_seed(args.seed)
    model = make_model()
    runs = [
        Run("torch.optim", model, torch.optim.AdamW(model.parameters(), **HYPERPARAMETERS)),
    ]
    twin = copy.deepcopy(model)  # the same initial weights
    runs.append(Run("ferroptim", twin, ferroptim.AdamW(twin.parameters(), **HYPERPARAMETERS)))
    torch_run, ferro_run = runs

    n_params = sum(p.numel() for p in model.parameters())
    n_train, n_test = len(data.y_train), len(data.y_test)
    steps = -(-n_train // args.batch_size)
    print(
        f"MLP 64-{HIDDEN}-{HIDDEN}-10 ({n_params:,} parameters) on scikit-learn digits: "
        f"{n_train} train / {n_test} test images, batch {args.batch_size}, {steps} steps/epoch"
    )
    print(
        f"AdamW(lr={HYPERPARAMETERS['lr']}, weight_decay={HYPERPARAMETERS['weight_decay']}); "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"ferroptim {ferroptim.__version__} ({ferroptim.simd_level()}, "
        f"{ferroptim.get_num_threads()} threads)"
    )
    print()
    names = "{:>12} {:>12}".format(*(run.name for run in runs))
    print(f"       {'train loss':^25}   {'test accuracy':^25}   {'median opt.step()':^25}")
    print(f"epoch  {names}   {names}   {names}")

    shuffle = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        batches = list(torch.randperm(n_train, generator=shuffle).split(args.batch_size))
        for run in runs:  # the same batches, in the same order, for both
            run.train_epoch(data, batches)
        print(
            f"{epoch + 1:>5}  {torch_run.losses[-1]:>12.6f} {ferro_run.losses[-1]:>12.6f}   "
            f"{torch_run.accuracies[-1]:>12.2%} {ferro_run.accuracies[-1]:>12.2%}   "
            f"{ms(torch_run.median_step(epoch)):>12} {ms(ferro_run.median_step(epoch)):>12}"
        )

    param_diff = max_param_diff(torch_run.model, ferro_run.model)
    loss_diff = max(abs(a - b) for a, b in zip(torch_run.losses, ferro_run.losses, strict=True))
    t_torch, t_ferro = torch_run.median_step(), ferro_run.median_step()
    print()
    print(f"max |torch.optim - ferroptim| over all parameters after training: {param_diff:.2e}")
    print(
        f"ferroptim step: {ms(t_ferro)} median vs torch.optim {ms(t_torch)} "
        f"({t_torch / t_ferro:.1f}x faster); train losses agree to {loss_diff:.1e}"
    )


if __name__ == "__main__":
    main()

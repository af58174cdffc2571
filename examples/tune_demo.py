"""Tune the demo's model with ferroptim.tune: find the learning rate, train, size the batch.

On the same 64-1024-1024-10 MLP and scikit-learn digits data as ``examples/demo.py``:

1. ``ferroptim.tune.lr_find`` runs the learning-rate range test with ferroptim.AdamW,
   prints its table and saves the curve to ``docs/lr_find.png``; the model and optimizer
   come back bitwise as they were (checked below);
2. training then uses the suggested learning rate as OneCycleLR's peak;
3. ``ferroptim.tune.noise_scale`` estimates the gradient noise scale B_simple, the
   critical batch size, at initialisation and after the first epoch.

    pip install ".[demo,plot]" && python examples/tune_demo.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import ferroptim
import ferroptim.tune
import torch
from demo import Digits, load_data, make_model  # examples/demo.py, beside this file
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

PLOT = Path(__file__).resolve().parent.parent / "docs" / "lr_find.png"


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    model.eval()
    return (model(data.x_test).argmax(dim=1) == data.y_test).float().mean().item()


def same_state(a: dict, b: dict) -> bool:
    """Bitwise equality of two (nested) state dicts."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=PLOT, help="where to save the lr_find plot")
    args = parser.parse_args()

    data = load_data(args.seed)
    torch.manual_seed(args.seed)
    model = make_model()
    opt = ferroptim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    train = TensorDataset(data.x_train, data.y_train)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)

    # 1. The learning-rate range test. Everything it touches is restored afterwards.
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), torch.get_rng_state()))
    result = ferroptim.tune.lr_find(
        model, opt, loader, loss_fn, start_lr=1e-6, end_lr=1.0, num_iters=100
    )
    after = (model.state_dict(), opt.state_dict(), torch.get_rng_state())
    print(result)
    print(f"model, optimizer and RNG restored bitwise: {same_state(before, after)}")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    print(f"plot: {result.plot(args.plot)}")

    # 2. Train with the suggested learning rate as OneCycleLR's peak.
    max_lr = result.suggestion
    assert max_lr is not None, "the range test recorded too few points to suggest an lr"
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, epochs=args.epochs, steps_per_epoch=len(loader)
    )
    small = 16  # the noise scale's small batch: 8 of them make a big batch of 128
    noise_loader = DataLoader(train, batch_size=small, shuffle=True, drop_last=True)
    initial = ferroptim.tune.noise_scale(model, noise_loader, loss_fn, num_steps=40)
    print(f"\nOneCycleLR(max_lr={max_lr:.2e}), {args.epochs} epochs of {len(loader)} steps")
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(
            f"epoch {epoch + 1}: train loss {total / len(loader):.4f}, "
            f"test accuracy {accuracy(model, data):.2%}"
        )
        if epoch == 0:  # 3. the noise scale again, one epoch into training
            trained = ferroptim.tune.noise_scale(model, noise_loader, loss_fn, num_steps=40)

    print(f"\nnoise scale at initialisation:\n{initial}\nafter one epoch:\n{trained}")
    print(
        f"B_simple grew from {initial.b_simple:.0f} to {trained.b_simple:.0f} examples in one "
        "epoch: as the loss falls, larger batches stay useful for longer."
    )


if __name__ == "__main__":
    main()

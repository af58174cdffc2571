"""Problems for the LBFGS tests (tests/test_lbfgs.py) and its benchmark: each builds its
parameters and a closure-maker from a seed, in a given dtype."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PROBLEMS", "Problem", "Trajectory", "run"]


@dataclass
class Problem:
    """Parameters and a loss over them."""

    params: list[torch.nn.Parameter]
    loss: Callable[[], torch.Tensor]


def _draw(
    fn: Callable[..., torch.Tensor], gen: torch.Generator, dtype: torch.dtype, *shape: int
) -> torch.Tensor:
    """Values drawn in float64, then rounded: the float32 problem is the float64 one."""
    return fn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def rosenbrock(dtype: torch.dtype, seed: int = 0) -> Problem:
    """The chained Rosenbrock function over two tensors (53 elements: ragged for every
    SIMD width)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(_draw(torch.rand, gen, dtype, 37) * 2 - 1.2)
    b = torch.nn.Parameter(_draw(torch.rand, gen, dtype, 4, 4) * 2 - 1.2)

    def loss() -> torch.Tensor:
        x = torch.cat([a, b.reshape(-1)])
        return ((1 - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()

    return Problem([a, b], loss)


def least_squares(dtype: torch.dtype, seed: int = 0, rows: int = 200, cols: int = 37) -> Problem:
    """``mean((A W^T + b - T)^2)`` with a weight matrix and a bias."""
    gen = torch.Generator().manual_seed(seed)
    a = _draw(torch.randn, gen, dtype, rows, cols)
    target = _draw(torch.randn, gen, dtype, rows, 13)
    w = torch.nn.Parameter(_draw(torch.randn, gen, dtype, 13, cols) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(13, dtype=dtype))

    def loss() -> torch.Tensor:
        return ((a @ w.t() + bias - target) ** 2).mean()

    return Problem([w, bias], loss)


def mlp(dtype: torch.dtype, seed: int = 0) -> Problem:
    """A 10-32-1 tanh MLP fitting a smooth function of its inputs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1, dtype=torch.float64),
    ).to(dtype)
    x = _draw(torch.randn, gen, dtype, 64, 10)
    y = torch.sin(x.sum(dim=1, keepdim=True))

    def loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x), y)

    return Problem(list(model.parameters()), loss)


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "rosenbrock": rosenbrock,
    "least_squares": least_squares,
    "mlp": mlp,
}


@dataclass
class Trajectory:
    """What each ``step`` returned and left: losses, flat parameters, the state."""

    losses: list[float]
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    problem: Problem


def run(
    cls: type[torch.optim.Optimizer],
    problem: Problem,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    **kwargs: Any,
) -> Trajectory:
    """``steps`` calls of ``step(closure)``; a given ``optimizer`` is continued instead."""
    opt = optimizer if optimizer is not None else cls(problem.params, **kwargs)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = problem.loss()
        loss.backward()
        return loss

    losses: list[float] = []
    params: list[torch.Tensor] = []
    for _ in range(steps):
        losses.append(float(opt.step(closure)))
        params.append(torch.cat([p.detach().reshape(-1) for p in problem.params]).clone())
    return Trajectory(losses, params, opt, problem)

"""Steps on torch's OpenMP team (rust/parallel.rs, ``openmp``): where torch's libgomp is
loaded and torch runs on as many threads as ferroptim, chunks run on OpenMP's team instead of
ferroptim's pool. Results must be bitwise the same either way and on any thread count, and
``FERROPTIM_OPENMP=0`` must keep steps on the pool."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ferroptim

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="the OpenMP path is Linux-only"
    ),
    # (which threads wake, and whether a team member comes late, depend on the machine's load)
    pytest.mark.alone,
]

#: Several of the engine's 64K-element chunks, plus small tensors sharing one.
SHAPES = [(300_001,), (512, 700), (1000,), (3,), (200_000,)]
STEPS = 3


@pytest.fixture
def two_threads():
    before = (torch.get_num_threads(), ferroptim.get_num_threads())
    torch.set_num_threads(2)
    ferroptim.set_num_threads(2)
    yield
    torch.set_num_threads(before[0])
    ferroptim.set_num_threads(before[1])


def _train(**kwargs: object) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = ferroptim.AdamW(params, lr=1e-2, weight_decay=0.1, **kwargs)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("kwargs", [{}, {"max_grad_norm": 1.0}], ids=["plain", "clipped"])
def test_team_pool_and_one_thread_agree_bitwise(two_threads, monkeypatch, kwargs):
    on_team = _train(**kwargs)
    monkeypatch.setenv("FERROPTIM_OPENMP", "0")
    on_pool = _train(**kwargs)
    monkeypatch.delenv("FERROPTIM_OPENMP")
    ferroptim.set_num_threads(1)
    inline = _train(**kwargs)
    for a, b, c in zip(on_team, on_pool, inline, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def _pool_cpu_ns() -> int:
    """CPU time so far of ferroptim's pool helpers (threads named ``ferroptim-N``)."""
    total = 0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            if task.joinpath("comm").read_text().startswith("ferroptim-"):
                total += int(task.joinpath("schedstat").read_text().split()[0])
        except OSError:  # the thread ended meanwhile
            continue
    return total


def test_the_team_replaces_the_pool_unless_disabled(two_threads, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(4_000_000, generator=gen).requires_grad_()]
    params[0].grad = torch.randn(4_000_000, generator=gen)
    opt = ferroptim.SGD(params, lr=0.01, momentum=0.9)
    opt.step()  # the pool exists from here on

    monkeypatch.setenv("FERROPTIM_OPENMP", "0")
    before = _pool_cpu_ns()
    for _ in range(20):
        opt.step()
    on_pool = _pool_cpu_ns() - before

    monkeypatch.delenv("FERROPTIM_OPENMP")
    # On the team the helpers are never woken: at most stray wake-ups, far below the
    # pool's share of 20 steps over 4M elements. (Where the machine is busy enough that
    # a team member comes late, the step backs off to the pool for a second, by design:
    # the best of three rounds, each after that second has passed, is the team's.)
    on_team = []
    for _ in range(3):
        time.sleep(1.1)
        before = _pool_cpu_ns()
        for _ in range(20):
            opt.step()
        on_team.append(_pool_cpu_ns() - before)

    assert on_pool > 0, "FERROPTIM_OPENMP=0: the pool's helpers did no work"
    assert min(on_team) < on_pool / 10, (on_team, on_pool)

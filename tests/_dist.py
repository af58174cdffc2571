"""Running test workers in a real 2-process gloo group on 127.0.0.1.

:func:`run_workers` spawns ``world_size`` fresh interpreters (``spawn`` start
method: no forked torch state), each of which joins a gloo process group on a
free local port, calls ``worker(rank, world_size, outdir, **kwargs)`` and saves
what it returns with ``torch.save`` to ``outdir/rank{rank}.pt``. The parent joins
with a deadline: a worker that raises, dies or hangs fails the test (with the
worker's traceback), it never hangs the suite.

Workers must be module-level functions of an importable module (the spawned
interpreter imports them by name); the tests directory is on ``sys.path`` of the
children because it is on the parent's.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

#: Every worker run must finish within this many seconds.
DEFAULT_TIMEOUT = 90.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    port: int,
    worker: Callable[..., Any],
    outdir: str,
    kwargs: dict[str, Any],
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    # Gloo on the loopback interface only.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    out = Path(outdir)
    try:
        import ferroptim
        import torch.distributed as dist

        # Two ranks on a 2-core machine: one thread each.
        torch.set_num_threads(1)
        ferroptim.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT),
        )
        try:
            result = worker(rank, world_size, out, **kwargs)
            torch.save(result, out / f"rank{rank}.pt")
            # Leave together: a rank whose peer has already closed its sockets can abort.
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_workers(
    worker: Callable[..., Any],
    outdir: Path,
    *,
    world_size: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> list[Any]:
    """Runs ``worker`` on every rank of a fresh gloo group; returns each rank's result."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_entry,
            args=(rank, world_size, port, worker, str(outdir), kwargs),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
    errors = []
    for rank in range(world_size):
        err = outdir / f"rank{rank}.error"
        if err.exists():
            errors.append(f"--- rank {rank} ---\n{err.read_text()}")
    if errors:
        raise AssertionError(f"{worker.__name__} failed:\n" + "\n".join(errors))
    if hung:
        raise AssertionError(f"{worker.__name__}: ranks {hung} did not finish in {timeout:.0f}s")
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        raise AssertionError(f"{worker.__name__}: worker exit codes {codes}")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]

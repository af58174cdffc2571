"""Process-wide configuration (threads, SIMD level, backend), its environment variables,
and fork safety (forked children and DataLoader workers step without deadlocking)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import ferroptim

KNOWN_SIMD_LEVELS = ("avx512", "avx2", "neon", "scalar")


# ----------------------------------------------------------------------------------------
# Setters and getters
# ----------------------------------------------------------------------------------------


def test_num_threads_round_trip():
    for n in (1, 3, 2):
        ferroptim.set_num_threads(n)
        assert ferroptim.get_num_threads() == n


@pytest.mark.parametrize("bad", [0, -1, -(2**40)], ids=["zero", "minus-one", "huge-negative"])
def test_set_num_threads_rejects_non_positive(bad):
    before = ferroptim.get_num_threads()
    with pytest.raises(ValueError, match="at least 1"):
        ferroptim.set_num_threads(bad)
    assert ferroptim.get_num_threads() == before


def test_max_num_threads_is_four_per_core_and_at_least_256():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert ferroptim.max_num_threads() == max(4 * (cores or 1), 256)


@pytest.mark.parametrize(
    "excess", [1, 10**6, 2**63, 10**30], ids=["one-over", "1e6", "2^63", "1e30"]
)
def test_set_num_threads_rejects_absurd_counts_without_spawning(excess):
    """A typo'd thread count must not spawn threads until the machine stalls: a clear
    ValueError, the setting unchanged, and no thread started."""
    ferroptim.set_num_threads(2)
    limit = ferroptim.max_num_threads()
    bad = excess if excess > limit else limit + excess
    threads_before = threading.active_count()
    with pytest.raises(ValueError, match=f"at most {limit}"):
        ferroptim.set_num_threads(bad)
    assert ferroptim.get_num_threads() == 2
    assert threading.active_count() == threads_before


def test_the_thread_cap_itself_is_accepted_and_steps():
    """The largest accepted count builds its pool and steps to torch's numbers."""
    limit = ferroptim.max_num_threads()
    ferroptim.set_num_threads(limit)
    assert ferroptim.get_num_threads() == limit
    p = torch.nn.Parameter(torch.linspace(-1, 1, 300_001))
    q = torch.nn.Parameter(p.detach().clone())
    opt = ferroptim.SGD([p], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    for i in range(3):
        p.grad = torch.sin(torch.arange(300_001.0) * (i + 1))
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("bad", ["2", 2.0, None, True], ids=["str", "float", "none", "bool"])
def test_set_num_threads_rejects_non_int(bad):
    before = ferroptim.get_num_threads()
    with pytest.raises(TypeError):
        ferroptim.set_num_threads(bad)
    assert ferroptim.get_num_threads() == before


def test_simd_levels_reported(simd_levels):
    assert ferroptim.simd_level() in simd_levels
    assert set(simd_levels) <= set(KNOWN_SIMD_LEVELS)
    assert len(set(simd_levels)) == len(simd_levels)
    assert simd_levels[-1] == "scalar", "best first, the scalar reference last"


def test_each_supported_simd_level_can_be_forced(simd_levels):
    for level in simd_levels:
        assert ferroptim.set_simd_level(level) == level
        assert ferroptim.simd_level() == level


@pytest.mark.parametrize("bad", ["sse9", "", "AVX3", "scalar2"])
def test_set_simd_level_rejects_unknown_names(bad):
    before = ferroptim.simd_level()
    with pytest.raises(ValueError):
        ferroptim.set_simd_level(bad)
    assert ferroptim.simd_level() == before


def test_set_simd_level_rejects_levels_this_cpu_lacks(simd_levels):
    missing = [level for level in KNOWN_SIMD_LEVELS if level not in simd_levels]
    if not missing:
        pytest.skip("this CPU supports every known level")
    before = ferroptim.simd_level()
    for level in missing:
        with pytest.raises(ValueError, match=level):
            ferroptim.set_simd_level(level)
    assert ferroptim.simd_level() == before


@pytest.mark.parametrize("bad", [3, b"avx2"], ids=["int", "bytes"])
def test_set_simd_level_rejects_non_str(bad):
    with pytest.raises((TypeError, ValueError)):
        ferroptim.set_simd_level(bad)


def test_backend_round_trip():
    assert ferroptim.get_backend() == "auto"
    ferroptim.set_backend("torch")
    assert ferroptim.get_backend() == "torch"
    ferroptim.set_backend("auto")
    assert ferroptim.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["gpu", "cuda", "", "Torch ", None, 1], ids=repr)
def test_set_backend_rejects_unknown(bad):
    with pytest.raises((ValueError, TypeError)):
        ferroptim.set_backend(bad)
    assert ferroptim.get_backend() == "auto"


def test_public_api():
    for name in (
        "Adam",
        "AdamW",
        "SGD",
        "RMSprop",
        "Adagrad",
        "Adamax",
        "NAdam",
        "RAdam",
        "Adadelta",
        "Rprop",
        "ASGD",
        "LBFGS",
        "clip_grad_norm_",
        "clip_grad_value_",
        "get_total_norm",
        "get_backend",
        "get_num_threads",
        "max_num_threads",
        "set_backend",
        "set_num_threads",
        "set_simd_level",
        "simd_level",
        "supported_simd_levels",
        "__version__",
    ):
        assert name in ferroptim.__all__
        assert hasattr(ferroptim, name)
    assert isinstance(ferroptim.__version__, str) and ferroptim.__version__


# ----------------------------------------------------------------------------------------
# Environment variables (a fresh interpreter each)
# ----------------------------------------------------------------------------------------


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FERROPTIM_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _unsupported_level() -> str:
    missing = [lv for lv in KNOWN_SIMD_LEVELS if lv not in ferroptim.supported_simd_levels()]
    return missing[0] if missing else "sse9"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FERROPTIM_SIMD", "sse9"),
        ("FERROPTIM_SIMD", "unsupported-on-this-cpu"),
        ("FERROPTIM_NUM_THREADS", "0"),
        ("FERROPTIM_NUM_THREADS", "-2"),
        ("FERROPTIM_NUM_THREADS", "two"),
        ("FERROPTIM_NUM_THREADS", "1.5"),
        ("FERROPTIM_NUM_THREADS", "1000000"),
        ("FERROPTIM_NUM_THREADS", "max+1"),
        ("FERROPTIM_NUM_THREADS", "99999999999999999999999"),
        ("FERROPTIM_BACKEND", "gpu"),
        ("FERROPTIM_BACKEND", "cuda"),
    ],
)
def test_invalid_environment_fails_import(var, value):
    if value == "unsupported-on-this-cpu":
        value = _unsupported_level()
    if value == "max+1":
        value = str(ferroptim.max_num_threads() + 1)
    result = run_python("import ferroptim", {var: value}, timeout=60)
    assert result.returncode != 0, f"import succeeded with {var}={value}"
    assert "ValueError" in result.stderr, result.stderr
    assert var in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("env", "checks"),
    [
        (
            {"FERROPTIM_SIMD": "scalar"},
            "assert ferroptim.simd_level() == 'scalar'\n"
            "assert ferroptim.set_simd_level(None) == 'scalar', 'None returns to the env level'",
        ),
        ({"FERROPTIM_NUM_THREADS": "1"}, "assert ferroptim.get_num_threads() == 1"),
        ({"FERROPTIM_NUM_THREADS": "3"}, "assert ferroptim.get_num_threads() == 3"),
        (
            {"FERROPTIM_NUM_THREADS": "256"},
            "assert ferroptim.get_num_threads() == 256 <= ferroptim.max_num_threads()",
        ),
        ({"FERROPTIM_BACKEND": "torch"}, "assert ferroptim.get_backend() == 'torch'"),
        ({"FERROPTIM_BACKEND": "auto"}, "assert ferroptim.get_backend() == 'auto'"),
        (
            {"FERROPTIM_SIMD": "", "FERROPTIM_NUM_THREADS": "", "FERROPTIM_BACKEND": ""},
            "assert ferroptim.get_backend() == 'auto'\n"
            "assert ferroptim.simd_level() == ferroptim.supported_simd_levels()[0]",
        ),
    ],
    ids=[
        "simd-scalar",
        "threads-1",
        "threads-3",
        "threads-256",
        "backend-torch",
        "backend-auto",
        "empty",
    ],
)
def test_valid_environment_takes_effect(env, checks):
    code = f"""
        import torch, ferroptim
        {checks.replace(chr(10), chr(10) + " " * 8)}
        # ... and a step works under these settings, and matches torch (on one intra-op
        # thread: see conftest.restore_ferroptim_config).
        torch.set_num_threads(1)
        for name, kw in (("AdamW", dict()), ("SGD", dict(momentum=0.9)),
                         ("RMSprop", dict(momentum=0.5)), ("Adagrad", dict())):
            p = torch.nn.Parameter(torch.linspace(-1, 1, 70001))
            q = torch.nn.Parameter(torch.linspace(-1, 1, 70001))
            opt = getattr(ferroptim, name)([p], lr=0.1, max_grad_norm=50.0, **kw)
            ref = getattr(torch.optim, name)([q], lr=0.1, foreach=False, **kw)
            for i in range(3):
                p.grad = torch.cos(torch.arange(70001.0) * (i + 1))
                q.grad = p.grad.clone()
                opt.step()
                torch.nn.utils.clip_grad_norm_([q], 50.0)
                ref.step()
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            g = torch.cos(torch.arange(70001.0))
            torch.testing.assert_close(
                ferroptim.get_total_norm([g]), torch.nn.utils.get_total_norm([g]),
                rtol=1e-5, atol=0)
        print("ok")
    """
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_default_threads_is_the_machine_cores():
    result = run_python("import ferroptim; print(ferroptim.get_num_threads())", {})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) == (os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------
# Concurrency and fork safety
# ----------------------------------------------------------------------------------------

BIG = 150_001  # > 64K elements: several parallel chunks


def _adam_reference(init: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    q = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([q], lr=0.01, amsgrad=True, foreach=False)
    for g in grads:
        q.grad = g.clone()
        opt.step()
    return q.detach()


def _ferro_steps(init: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(init.clone())
    opt = ferroptim.Adam([p], lr=0.01, amsgrad=True)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_concurrent_steps_from_python_threads():
    """The GIL is released during a step: optimizers stepped from several Python threads
    at once (sharing the pool) give the same numbers as one at a time."""
    ferroptim.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(BIG, generator=gen) for _ in range(4)]
    grads = [[torch.randn(BIG, generator=gen) for _ in range(5)] for _ in range(4)]
    expected = [_ferro_steps(i, g) for i, g in zip(inits, grads, strict=True)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(k):
        try:
            results[k] = _ferro_steps(inits[k], grads[k])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a concurrent step hung"
    assert not errors, errors
    for k in range(4):
        assert torch.equal(results[k], expected[k])


def _wait_child(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not finish within {timeout}s (deadlock?)")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("child_threads", [None, 2], ids=["default", "child-sets-2-threads"])
def test_forked_child_steps_without_deadlock(child_threads):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(BIG, generator=gen)
    grads = [torch.randn(BIG, generator=gen) for _ in range(3)]
    expected = _adam_reference(init, grads)

    # The parent steps multi-threaded first, so the pool (and its workers) exist.
    ferroptim.set_num_threads(2)
    parent = _ferro_steps(init, grads)
    torch.testing.assert_close(parent, expected, rtol=1e-5, atol=1e-6)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            # torch's own OpenMP pool is not fork-safe: like a DataLoader worker, the child
            # keeps torch single-threaded (ferroptim's pool is what is under test).
            torch.set_num_threads(1)
            threads = ferroptim.get_num_threads()
            if threads != 1:
                code = 3  # a forked child steps single-threaded
            else:
                if child_threads is not None:
                    ferroptim.set_num_threads(child_threads)
                child = _ferro_steps(init, grads)
                code = 0 if torch.equal(child, parent) else 2
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    exit_code = _wait_child(pid)
    assert exit_code != 3, "the forked child does not report 1 thread"
    assert exit_code != 2, "the forked child's step differs from the parent's"
    assert exit_code == 0, f"forked child failed with exit code {exit_code}"
    # The parent's pool still works after the fork.
    assert torch.equal(_ferro_steps(init, grads), parent)


class _StepDataset(torch.utils.data.Dataset):
    """Each item runs a ferroptim step inside the DataLoader worker."""

    def __init__(self, init: torch.Tensor, grads: list[torch.Tensor]) -> None:
        self.init = init
        self.grads = grads

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        info = torch.utils.data.get_worker_info()
        out = _ferro_steps(self.init * (index + 1), self.grads)
        return out, ferroptim.get_num_threads(), -1 if info is None else info.id


def test_dataloader_workers_step():
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(BIG, generator=gen)
    grads = [torch.randn(BIG, generator=gen) for _ in range(2)]
    ferroptim.set_num_threads(2)
    _ferro_steps(init, grads)  # the parent's pool exists before the workers fork
    loader = torch.utils.data.DataLoader(
        _StepDataset(init, grads),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=60,
    )
    seen_workers = set()
    results = {}
    for index, (out, threads, worker) in enumerate(loader):
        results[index] = out
        seen_workers.add(int(worker))
        assert int(threads) == 1, "DataLoader workers are forked: they step single-threaded"
    assert seen_workers == {0, 1}
    for index, out in results.items():
        expected = _adam_reference(init * (index + 1), grads)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

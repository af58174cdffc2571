"""Shared pieces of ferroptim's benchmarks: cases, contenders and an interleaved timer.

Used by the pytest-benchmark suite (``test_*.py``) and by ``report.py``.

* A :class:`Case` is a list of parameter shapes, built once per process with fixed
  values and gradients that every contender shares.
* A :class:`Suite` names the contenders for one operation: ``ferroptim``, torch's
  variants (``torch fused`` / ``foreach`` / ``for-loop`` / ``default``) and,
  optionally, a ``floor`` (a kernel with the same memory traffic and no arithmetic).
  Each contender is a factory ``params -> Runner``; a :class:`Runner` is the timed
  call plus an optional untimed ``prepare`` before every call.
* :data:`SUITES` is the registry. Adding an optimizer (SGD with momentum, RMSprop,
  Adagrad, ...) or gradient clipping is one more entry: :func:`optimizer` turns an
  optimizer class into a factory, :func:`function` does the same for a plain call
  (``clip_grad_norm_``), :func:`torch_variants` makes torch's four flavours of an
  optimizer, and ``bytes_per_element`` states the memory traffic. ``test_<suite>.py``
  is then three lines (see ``test_adamw.py``) and ``report.py --suite <name>`` works.
* :func:`interleave` runs contenders round-robin (warm-up first, fewer rounds for
  contenders too slow for the time budget) and returns every sample, so ratios come
  from the same run on a noisy machine.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import ferroptim
import torch
from ferroptim import _core
from torch import Tensor

Shape = tuple[int, ...]

# -- cases ------------------------------------------------------------------------------


def gpt2_like_shapes(
    layers: int = 12, d_model: int = 384, vocab: int = 8192, context: int = 512
) -> tuple[Shape, ...]:
    """Parameter shapes of a GPT-2-style decoder (tied embedding), in module order.

    Per layer: ln_1, attn qkv, attn proj, ln_2, mlp fc, mlp proj (weights and biases,
    12 tensors); plus token and position embeddings and the final layer norm. The
    defaults give 148 tensors and about 25M elements (GPT-2 small is d=768, 124M).
    """
    d = d_model
    shapes: list[Shape] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]  # attention qkv
        shapes += [(d, d), (d,)]  # attention output projection
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]  # mlp up
        shapes += [(4 * d, d), (d,)]  # mlp down
    shapes += [(d,), (d,)]  # ln_f
    return tuple(shapes)


@dataclass(frozen=True)
class Case:
    """A parameter list to step: a name, a one-line description, and shapes."""

    name: str
    title: str
    shapes: tuple[Shape, ...]
    #: Whether the case is big enough for thread scaling to matter.
    big: bool = False

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "transformer",
            "GPT-2-like stack: 12 layers, d=384, vocab 8192",
            gpt2_like_shapes(),
            big=True,
        ),
        Case("1000x1K", "1000 tensors of 1024 elements", ((1024,),) * 1000, big=True),
        Case("32M", "one tensor of 32M elements", ((32 * 2**20,),), big=True),
        Case("16", "one tensor of 16 elements", ((16,),)),
    )
}


@functools.lru_cache(maxsize=1)
def case_data(name: str, seed: int = 0) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(initial parameter values, gradients) of a case, float32; the last case asked is cached.

    Contenders clone the values and share the gradients (no step writes a grad).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = CASES[name].shapes
    values = tuple(torch.randn(s, generator=gen) * 0.02 for s in shapes)
    grads = tuple(torch.randn(s, generator=gen) * 1e-3 for s in shapes)
    return values, grads


def fresh_params(name: str) -> list[Tensor]:
    """A new copy of a case's parameters, each with the case's shared gradient set."""
    values, grads = case_data(name)
    params = []
    for v, g in zip(values, grads, strict=True):
        p = v.clone().requires_grad_(True)
        p.grad = g
        params.append(p)
    return params


# -- contenders -------------------------------------------------------------------------


@dataclass
class Runner:
    """One contender ready to run: ``step`` is timed, ``prepare`` (if any) runs untimed before
    every ``step``. ``keep`` holds whatever must stay alive while the runner is used."""

    step: Callable[[], object]
    prepare: Callable[[], object] | None = None
    keep: object = None

    def __call__(self) -> None:
        if self.prepare is not None:
            self.prepare()
        self.step()


#: A contender: builds a :class:`Runner` on parameters whose ``.grad`` is set.
Factory = Callable[[list[Tensor]], Runner]


def optimizer(cls: type[torch.optim.Optimizer], **kwargs: object) -> Factory:
    """Factory for ``cls(params, **kwargs)``; the runner times ``step()``."""

    def make(params: list[Tensor]) -> Runner:
        opt = cls(params, **kwargs)
        return Runner(opt.step, keep=opt)

    return make


def function(fn: Callable[..., object], *, writes_grads: bool = False, **kwargs: object) -> Factory:
    """Factory for a call ``fn(params, **kwargs)`` that is not an optimizer step, e.g.
    ``function(torch.nn.utils.clip_grad_norm_, writes_grads=True, max_norm=1.0)``.

    With ``writes_grads`` each runner gets its own copy of the gradients (cases share them).
    """

    def make(params: list[Tensor]) -> Runner:
        if writes_grads:
            for p in params:
                p.grad = p.grad.clone()
        return Runner(lambda: fn(params, **kwargs), keep=params)

    return make


def torch_variants(
    cls: type[torch.optim.Optimizer], *, fused: bool = True, **kwargs: object
) -> dict[str, Factory]:
    """torch's implementations of one optimizer: fused (if torch has it), foreach,
    for-loop, and the default (no flags: whatever torch picks for CPU tensors)."""
    variants = {}
    if fused:
        variants["torch fused"] = optimizer(cls, fused=True, **kwargs)
    variants["torch foreach"] = optimizer(cls, foreach=True, **kwargs)
    variants["torch for-loop"] = optimizer(cls, foreach=False, **kwargs)
    variants["torch default"] = optimizer(cls, **kwargs)
    return variants


def adam_floor(params: list[Tensor]) -> Runner:
    """``stream_probe``: Adam's traffic (read p, g, m, v; write p, m, v) with no arithmetic,
    on ferroptim's engine and pool. Plans are one-shot, so ``prepare`` builds a fresh one."""
    grads = [p.grad for p in params]
    work = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    plan: list[_core.GroupPlan] = []

    def prepare() -> None:
        plan[:] = [_core.GroupPlan.from_tensors(work, grads, [m, v], [None] * len(work))]

    def step() -> None:
        _core.stream_probe(plan.pop())

    return Runner(step, prepare, keep=(work, grads, m, v))


@dataclass(frozen=True)
class Suite:
    """Everything needed to benchmark one operation against its references."""

    name: str
    title: str
    #: Bytes of memory traffic per float32 element (see DESIGN.md, "Performance model").
    bytes_per_element: int
    ours: Factory
    #: torch's implementations, the strongest first (it is the one thread scaling shows).
    references: Mapping[str, Factory]
    floor: Factory | None = None
    #: Cases the floor is measured on (it is one more full-size allocation).
    floor_cases: tuple[str, ...] = ("32M",)
    cases: tuple[str, ...] = tuple(CASES)

    def contenders(self, case: str) -> dict[str, Factory]:
        """Name -> factory for a case: ``ferroptim``, the references, then ``floor``."""
        out: dict[str, Factory] = {"ferroptim": self.ours, **self.references}
        if self.floor is not None and case in self.floor_cases:
            out["floor"] = self.floor
        return out


ADAMW_HYPER: dict[str, object] = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-2}

SUITES: dict[str, Suite] = {
    "adamw": Suite(
        name="adamw",
        title="ferroptim.AdamW vs torch.optim.AdamW",
        bytes_per_element=28,
        ours=optimizer(ferroptim.AdamW, **ADAMW_HYPER),
        references=torch_variants(torch.optim.AdamW, **ADAMW_HYPER),
        floor=adam_floor,
    ),
    # More suites slot in here, e.g.
    #   "sgd": Suite("sgd", "ferroptim.SGD vs torch.optim.SGD (momentum 0.9)", 20,
    #                optimizer(ferroptim.SGD, lr=0.01, momentum=0.9),
    #                torch_variants(torch.optim.SGD, lr=0.01, momentum=0.9)),
    #   "rmsprop": ... torch_variants(torch.optim.RMSprop, fused=False, lr=0.01) ...
    #   "clip": Suite("clip", "clip_grad_norm_", 12,  # read g for the norm, then read+write g
    #                 function(ferroptim.clip_grad_norm_, writes_grads=True, max_norm=1.0),
    #                 {"torch foreach": function(torch.nn.utils.clip_grad_norm_,
    #                                            writes_grads=True, max_norm=1.0, foreach=True),
    #                  ...}),
}


def bench_params(suite: Suite) -> list:
    """``pytest.param(case, contender)`` for every case and contender of a suite, marked with
    one benchmark group per case so pytest-benchmark's table puts contenders side by side."""
    import pytest

    return [
        pytest.param(
            case,
            contender,
            id=f"{case}-{contender.replace(' ', '_')}",
            marks=pytest.mark.benchmark(group=f"{suite.name} {case}"),
        )
        for case in suite.cases
        for contender in suite.contenders(case)
    ]


# -- threads and machine ----------------------------------------------------------------


def set_threads(n: int) -> None:
    """Runs both libraries on ``n`` threads (only calls what changes)."""
    if ferroptim.get_num_threads() != n:
        ferroptim.set_num_threads(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_machine() -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "ferroptim": ferroptim.__version__,
        "simd_level": ferroptim.simd_level(),
        "ferroptim_threads": ferroptim.get_num_threads(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


class OtherLoad:
    """Measures how much CPU time processes other than this one took, from ``/proc/stat``
    (Linux; steal time by the hypervisor counts as taken)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime

    def share(self) -> float | None:
        """Fraction of all cores' time since construction used by other processes."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall, busy, own = (e - s for e, s in zip(end, self._start, strict=True))
        return max(0.0, (busy - own) / (wall * cpu_cores())) if wall > 0 else None


def torch_default_impl(cls: type[torch.optim.Optimizer] = torch.optim.AdamW) -> str:
    """Which implementation ``cls(params)`` (no flags) uses for CPU float32 params."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    fused, foreach = _default_to_fused_or_foreach([torch.zeros(1)], False, False)
    return "fused" if fused else "foreach" if foreach else "for-loop"


# -- interleaved timing -----------------------------------------------------------------


@dataclass
class Samples:
    """Seconds per call of one contender."""

    times: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return 0.0
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]


@dataclass
class Entry:
    """A runner in an interleaved run, with the thread count it runs on."""

    runner: Runner
    threads: int
    samples: Samples = field(default_factory=Samples)
    #: Run in every ``stride``-th round (slow contenders get fewer rounds).
    stride: int = 1
    #: Timed calls per round (fast contenders collect several samples per round).
    reps: int = 1


@contextmanager
def gc_paused() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _timed(runner: Runner) -> float:
    if runner.prepare is not None:
        runner.prepare()
    t0 = time.perf_counter()
    runner.step()
    return time.perf_counter() - t0


def interleave(
    entries: Sequence[Entry],
    *,
    rounds: int,
    warmup: int = 3,
    budget: float = 4.0,
    min_rounds: int = 5,
    round_time: float = 2e-3,
    max_reps: int = 100,
) -> None:
    """Times every entry round-robin (rotating the order), appending seconds per call to
    ``entry.samples``.

    Warm-up calls (untimed for the result) estimate each entry's cost. An entry whose
    ``rounds`` calls would exceed ``budget`` seconds runs only in every ``stride``-th
    round (at least ``min_rounds`` times); an entry much faster than ``round_time``
    makes several timed calls per round. An entry that turns out slower than its
    warm-up (a busy machine) stops once it has used its budget and has ``min_rounds``
    samples, or three times its budget: the report shows its sample count. When the
    thread count changes between entries, one untimed call lets the new pool start.
    """
    current = -1
    for entry in entries:
        set_threads(entry.threads)
        current = entry.threads
        warm: list[float] = []
        while len(warm) < max(warmup, 1) and sum(warm) < budget / 4:
            warm.append(_timed(entry.runner))
        cost = max(min(warm), 1e-7)  # first calls fault in fresh memory: take the fastest
        entry.reps = max(1, min(max_reps, int(round_time / cost)))
        entry.stride = max(1, min(math.ceil(cost * rounds / budget), rounds // min_rounds))

    def exhausted(entry: Entry) -> bool:
        spent = sum(entry.samples.times)
        return spent >= 3 * budget or (spent >= budget and len(entry.samples) >= min_rounds)

    with gc_paused():
        for r in range(rounds):
            # Rotate the order so each entry follows each other one in turn (what ran just
            # before, e.g. torch's still-spinning OpenMP threads or a warm cache, matters).
            shift = r % len(entries)
            for entry in [*entries[shift:], *entries[:shift]]:
                if r % entry.stride or exhausted(entry):
                    continue
                if entry.threads != current:
                    set_threads(entry.threads)
                    current = entry.threads
                    entry.runner()
                entry.samples.times.extend(_timed(entry.runner) for _ in range(entry.reps))


# -- formatting -------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale:
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{seconds * 1e9:.2g} ns"


def fmt_count(n: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def fmt_numel(n: int) -> str:
    """An element count: ``32M`` when it is a whole number of 2^20, else decimal (``24.7M``)."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    return fmt_count(n)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table; ``align`` has one of ``l``/``r`` per column."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for cell, width, a in zip(cells, widths, align, strict=True):
            out.append(str(cell).ljust(width) if a == "l" else str(cell).rjust(width))
        return "| " + " | ".join(out) + " |"

    rules = {"l": lambda w: "-" * w, "r": lambda w: "-" * (w - 1) + ":"}
    rule = [rules[a](w) for w, a in zip(widths, align, strict=True)]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *(line(r) for r in rows)])

"""Shared pieces of ferroptim's benchmarks: cases, contenders and an interleaved timer.

Used by the pytest-benchmark suite (``test_*.py``) and by ``report.py``.

* A :class:`Case` is a list of parameter shapes, built once per process with fixed
  values and gradients that every contender shares.
* A :class:`Suite` names the contenders for one operation: ``ferroptim``, torch's
  variants (``torch fused`` / ``foreach`` / ``for-loop`` / ``default``) and,
  optionally, a ``floor`` (a kernel with the same memory traffic and no arithmetic).
  Each contender is a factory ``params -> Runner``; a :class:`Runner` is the timed
  call plus an optional untimed ``prepare`` before every call.
* :data:`SUITES` is the registry: AdamW, SGD with momentum, Adagrad, RMSprop, Adamax, NAdam,
  Lion (against lion-pytorch), LARS and LAMB (against pytorch-optimizer), Muon (2-D weights),
  RAdam, Adadelta,
  Rprop, ASGD, SparseAdam, LBFGS (``step(closure)`` on its own closure cases, :func:`lbfgs`),
  ``clip_grad_norm_``, AdamW with in-step clipping against torch's clip + step, and
  the cost of ferroptim's own options (``adamw_options``). Adding one is one more
  entry: :func:`optimizer` turns an optimizer class into a factory, :func:`function`
  does the same for a plain call (``clip_grad_norm_``), :func:`torch_variants` makes
  torch's four flavours of an optimizer, :func:`sequence` chains calls (clip, then
  step), :func:`restore_grads` rewrites a runner's gradients before every call (for
  contenders that write them), and ``bytes_per_element`` states the memory traffic.
  ``test_<suite>.py`` is then three lines (see ``test_adamw.py``) and
  ``report.py --suite <name>`` works.
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
import lion_pytorch
import pytorch_optimizer
import schedulefree
import torch
from ferroptim import _core
from torch import Tensor

Shape = tuple[int, ...]

# -- cases ------------------------------------------------------------------------------


_PROBE = _core.Kernel("stream_probe", {})


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
    #: Sparse gradients: rows looked up per step (repeats included, as an embedding's
    #: backward gives them, uncoalesced); 0: dense gradients.
    looked_up_rows: int = 0
    #: A closure-driven problem (LBFGS): the shapes are a model's, whose loss
    #: :func:`lbfgs_problem` builds; only the suites that name it run it.
    closure: bool = False

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        """Elements a step streams: every element, or a sparse gradient's values."""
        if self.looked_up_rows:
            return sum(self.looked_up_rows * math.prod(s[1:]) for s in self.shapes)
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
        Case(
            "embedding",
            "a 1M x 64 embedding, 4096 rows looked up per step (sparse gradient)",
            ((2**20, 64),),
            looked_up_rows=4096,
        ),
        Case(
            "mlp",
            "a 10-32-1 tanh MLP on 64 samples (385 parameters in 4 tensors)",
            ((32, 10), (32,), (1, 32), (1,)),
            closure=True,
        ),
        Case(
            "lsq10M",
            "least squares ||W A^T - T||^2: W 64 x 160000 (10.24M parameters), A 8 x 160000",
            ((64, 160_000),),
            # Not `big`: no floor column (a step is closures and many passes, not one
            # stream of a known traffic).
            closure=True,
        ),
    )
}


#: The cases with dense gradients (every optimizer steps them).
DENSE_CASES: tuple[str, ...] = tuple(
    name for name, c in CASES.items() if not c.looked_up_rows and not c.closure
)


def gpt2_hidden_matrices(layers: int = 12, d_model: int = 384) -> tuple[Shape, ...]:
    """The 2-D hidden weights of :func:`gpt2_like_shapes`' stack (what Muon steps: no
    embeddings, biases or norms): per layer attention qkv and projection, MLP up and down."""
    d = d_model
    return ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)) * layers


#: Matrix cases (only the suites that ask for them: Muon takes 2-D parameters only).
MATRIX_CASES: tuple[str, ...] = ("transformer_2d", "64x256x256")
CASES.update(
    {
        "transformer_2d": Case(
            "transformer_2d",
            "the GPT-2-like stack's 48 hidden 2-D weights (12 layers, d=384)",
            gpt2_hidden_matrices(),
            big=True,
        ),
        "64x256x256": Case("64x256x256", "64 matrices of 256 x 256", ((256, 256),) * 64),
    }
)


@functools.lru_cache(maxsize=1)
def case_data(name: str, seed: int = 0) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(initial parameter values, gradients) of a case, float32; the last case asked is cached.

    Contenders clone the values and share the gradients (no step writes a grad).
    """
    gen = torch.Generator().manual_seed(seed)
    case = CASES[name]
    values = tuple(torch.randn(s, generator=gen) * 0.02 for s in case.shapes)
    if case.looked_up_rows:
        grads = tuple(_looked_up(s, case.looked_up_rows, gen) for s in case.shapes)
    else:
        grads = tuple(torch.randn(s, generator=gen) * 1e-3 for s in case.shapes)
    return values, grads


def _looked_up(shape: Shape, rows: int, gen: torch.Generator) -> Tensor:
    """An embedding's sparse gradient: ``rows`` rows drawn with repeats, uncoalesced."""
    indices = torch.randint(0, shape[0], (1, rows), generator=gen)
    values = torch.randn((rows, *shape[1:]), generator=gen) * 1e-3
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)


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


def on_bfloat16(factory: Factory) -> Factory:
    """``factory`` on bfloat16 copies of the case's params and grads (a model trained in
    bfloat16), made when the runner is."""

    def make(params: list[Tensor]) -> Runner:
        narrow = []
        for p in params:
            q = p.detach().to(torch.bfloat16).requires_grad_(True)
            q.grad = None if p.grad is None else p.grad.to(torch.bfloat16)
            narrow.append(q)
        runner = factory(narrow)
        return Runner(runner.step, runner.prepare, keep=(runner.keep, narrow))

    return make


def bitsandbytes_adamw8bit() -> dict[str, Factory]:
    """bitsandbytes' ``AdamW8bit`` (blockwise 8-bit states, its CPU path) as a contender
    where bitsandbytes is installed (the ``bench`` extra pins it), else nothing."""
    try:
        import bitsandbytes as bnb  # (optional, and slow to import)
    except ImportError:
        return {}
    return {"bitsandbytes AdamW8bit": optimizer(bnb.optim.AdamW8bit, **ADAMW_HYPER)}


def bitsandbytes_column() -> tuple[Column, ...]:
    if not bitsandbytes_adamw8bit():
        return ()
    return (Column("vs bitsandbytes AdamW8bit", "bitsandbytes AdamW8bit"),)


def trained(cls: type[torch.optim.Optimizer], **kwargs: object) -> Factory:
    """:func:`optimizer` for a Schedule-Free optimizer: put in train mode (``.train()``)
    before its steps, as its reference requires."""

    def make(params: list[Tensor]) -> Runner:
        opt = cls(params, **kwargs)
        opt.train()  # type: ignore[attr-defined]
        return Runner(opt.step, keep=opt)

    return make


def optimizer_after(cls: type[torch.optim.Optimizer], steps: int, **kwargs: object) -> Factory:
    """:func:`optimizer` whose optimizer has taken ``steps`` untimed steps when the runner
    is made: every timed step is then past a warm-up phase of the algorithm (RAdam's first
    five steps skip the adaptive update)."""

    def make(params: list[Tensor]) -> Runner:
        opt = cls(params, **kwargs)
        for _ in range(steps):
            opt.step()
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


def lbfgs_problem(params: list[Tensor]) -> Callable[[], Tensor]:
    """The loss of a closure case (:attr:`Case.closure`) over its parameters, by their
    shapes: four tensors are the MLP ``mlp``, one matrix is ``lsq10M``'s least squares.
    Data are fixed (seeded) and float32."""
    gen = torch.Generator().manual_seed(1)
    if len(params) == 4:
        w1, b1, w2, b2 = params
        x = torch.randn(64, w1.shape[1], generator=gen)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        return lambda: torch.nn.functional.mse_loss(torch.tanh(x @ w1.t() + b1) @ w2.t() + b2, y)
    (w,) = params
    a = torch.randn(8, w.shape[1], generator=gen)
    target = torch.randn(w.shape[0], 8, generator=gen)
    return lambda: ((w @ a.t() - target) ** 2).sum()


def lbfgs(cls: type[torch.optim.Optimizer], **kwargs: object) -> Factory:
    """Factory timing ``step(closure)`` of ``cls(params, **kwargs)`` on a closure case. The
    untimed ``prepare`` puts the parameters back and clears the state, so every timed step
    is the same optimisation from the same start (negative tolerances: every step runs
    ``max_iter`` iterations, none stops early)."""

    def make(params: list[Tensor]) -> Runner:
        loss_fn = lbfgs_problem(params)
        opt = cls(params, tolerance_grad=-1.0, tolerance_change=-1.0, **kwargs)
        start = [p.detach().clone() for p in params]

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        def prepare() -> None:
            with torch.no_grad():
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
            opt.state.clear()

        return Runner(lambda: opt.step(closure), prepare, keep=(opt, start))

    return make


def averaged_model(decay: float) -> Factory:
    """Factory for ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
    over the case's params, timing its ``update_parameters(model)`` (its first update,
    a copy, is made untimed)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def make(params: list[Tensor]) -> Runner:
        model = torch.nn.Module()
        # (Parameters sharing the params' memory: the model sees every step's values)
        model.params = torch.nn.ParameterList(torch.nn.Parameter(p.detach()) for p in params)
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        averaged.update_parameters(model)
        return Runner(lambda: averaged.update_parameters(model), keep=(model, averaged))

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


def sequence(*factories: Factory) -> Factory:
    """Factory for calls made one after another on the same parameters, timed together,
    e.g. ``clip_grad_norm_`` then ``step()``."""

    def make(params: list[Tensor]) -> Runner:
        runners = [factory(params) for factory in factories]
        prepares = [r.prepare for r in runners if r.prepare is not None]

        def step() -> None:
            for runner in runners:
                runner.step()

        def prepare() -> None:
            for p in prepares:
                p()

        return Runner(step, prepare if prepares else None, keep=runners)

    return make


def restore_grads(factory: Factory) -> Factory:
    """Gives each runner its own copy of the case's gradients and rewrites it from the
    shared values in the untimed ``prepare`` before every call, so a contender that
    writes its gradients (torch's ``clip_grad_norm_``, GradScaler's unscale) sees the
    same gradients every round. Wrap every contender of a suite alike: the copy also
    leaves the gradients freshly written (as backward does), whatever the step does."""

    def make(params: list[Tensor]) -> Runner:
        shared = [p.grad for p in params]
        own = [g.clone() for g in shared]
        for p, g in zip(params, own, strict=True):
            p.grad = g
        inner = factory(params)

        def prepare() -> None:
            torch._foreach_copy_(own, shared)
            if inner.prepare is not None:
                inner.prepare()

        return Runner(inner.step, prepare, keep=(inner, own, shared))

    return make


#: The loss scale of the GradScaler contenders (GradScaler's default initial scale).
AMP_SCALE = 65536.0


def amp_scaling(cls: type[torch.optim.Optimizer], **kwargs: object) -> Factory:
    """Factory for ``cls(params, **kwargs)`` stepped with the two tensors torch.amp.GradScaler
    sets on an optimizer with ``_step_supports_amp_scaling`` before calling its ``step()``:
    ``grad_scale`` (the loss scale) and ``found_inf`` (0: no inf/nan seen)."""

    def make(params: list[Tensor]) -> Runner:
        opt = cls(params, **kwargs)
        if not getattr(opt, "_step_supports_amp_scaling", False):
            raise TypeError(f"{cls.__name__} does not take GradScaler's scale in its step")
        opt.grad_scale = torch.tensor(AMP_SCALE)
        opt.found_inf = torch.tensor(0.0)
        return Runner(opt.step, keep=opt)

    return make


def torch_unscale(factory: Factory) -> Factory:
    """``factory``'s step preceded by what ``GradScaler.unscale_`` does for an optimizer
    without ``_step_supports_amp_scaling``: ``torch._amp_foreach_non_finite_check_and_unscale_``
    (gradients multiplied by 1/scale in place, inf/nan flagged), then the step unless
    flagged (``found_inf.item()``, as ``GradScaler.step``). The gradients change every
    call: wrap it in :func:`restore_grads`."""

    def make(params: list[Tensor]) -> Runner:
        inner = factory(params)
        grads = [p.grad for p in params]
        inv_scale = torch.tensor(AMP_SCALE).double().reciprocal().float()  # as GradScaler
        found_inf = torch.zeros(())

        def prepare() -> None:
            found_inf.zero_()
            if inner.prepare is not None:
                inner.prepare()

        def step() -> None:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            if not found_inf.item():
                inner.step()

        return Runner(step, prepare, keep=(inner, grads))

    return make


def grad_scaler_step(cls: type[torch.optim.Optimizer], **kwargs: object) -> Factory:
    """Factory timing ``torch.amp.GradScaler("cpu").step(opt)`` on ``cls(params, **kwargs)``:
    whatever GradScaler does for that optimizer. For one with ``_step_supports_amp_scaling``
    (ferroptim's and torch's with ``fused=True``) that is an inf check of every gradient
    (``_check_inf_per_device``: the unscale kernel with scale 1) and the step with
    ``grad_scale``/``found_inf`` set. ``scaler.update()`` runs untimed in ``prepare``."""

    def make(params: list[Tensor]) -> Runner:
        opt = cls(params, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=AMP_SCALE, growth_interval=2**30)
        scaler.scale(torch.ones(()))  # creates the scale tensor, as scaling a loss does
        stepped = [False]

        def prepare() -> None:
            if stepped[0]:
                scaler.update()
                stepped[0] = False

        def step() -> None:
            scaler.step(opt)
            stepped[0] = True

        return Runner(step, prepare, keep=(opt, scaler))

    return make


def adam_floor(params: list[Tensor]) -> Runner:
    """``stream_probe``: Adam's traffic (read p, g, m, v; write p, m, v: 28 bytes per float32
    element) with no arithmetic, on ferroptim's engine and pool. Suites with other traffic
    use it as the machine's streaming bandwidth (see :attr:`Suite.floor_bytes_per_element`).
    Plans are one-shot, so ``prepare`` builds a fresh one."""
    grads = [p.grad for p in params]
    work = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    plan: list[_core.GroupPlan] = []

    def prepare() -> None:
        plan[:] = [_core.GroupPlan.from_tensors(work, grads, [m, v], [])]

    def step() -> None:
        _PROBE.step(plan.pop())

    return Runner(step, prepare, keep=(work, grads, m, v))


def newton_schulz_matmuls(ns_steps: int = 5) -> Factory:
    """Only the matrix products of torch's Muon step (its default ``ns_coefficients``):
    ``ns_steps`` x (``X @ X.T``, ``addmm``, ``addmm``) in bfloat16 on each gradient,
    normalised and laid out as torch's Newton–Schulz has it (wide side last), untimed.
    What no Muon step can go below with torch's ``mm``."""
    from torch.optim import _muon

    a, b, c = _muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C

    def make(params: list[Tensor]) -> Runner:
        inputs = []
        for p in params:
            x = p.grad.to(torch.bfloat16, copy=True)
            x = x.T if x.size(0) > x.size(1) else x
            inputs.append(x.div_(x.norm().clamp(min=_muon.EPS)))

        def step() -> None:
            for x in inputs:
                for _ in range(ns_steps):
                    gram = x @ x.T
                    update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
                    x = torch.addmm(x, update, x, beta=a)

        return Runner(step, keep=inputs)

    return make


OURS = "ferroptim"
FLOOR = "floor"


@dataclass(frozen=True)
class Column:
    """A column of a suite's table: ``contender``'s median over ``baseline``'s, shown as a
    ratio (``2.50×``: ``baseline`` takes 1/2.5 of the time) or, with ``overhead``, as a
    percentage (``+3.0%``: ``contender`` takes 3% longer)."""

    label: str
    contender: str
    baseline: str = OURS
    overhead: bool = False

    def value(self, samples: Mapping[str, Samples]) -> float | None:
        if self.contender not in samples or self.baseline not in samples:
            return None
        return samples[self.contender].median / samples[self.baseline].median

    def format(self, samples: Mapping[str, Samples]) -> str:
        value = self.value(samples)
        if value is None:
            return "–"
        return f"{100 * (value - 1):+.1f}%" if self.overhead else f"{value:.2f}×"


@dataclass(frozen=True)
class Suite:
    """Everything needed to benchmark one operation against its references."""

    name: str
    #: Heading of the suite's table.
    title: str
    #: Bytes of memory traffic per float32 element of ``ours`` (see DESIGN.md,
    #: "Performance model"): what its GB/s column and the floor comparison use.
    bytes_per_element: int
    ours: Factory
    #: The other contenders: torch's implementations, the strongest first (it is the one
    #: thread scaling shows); in a ``self_relative`` suite, ferroptim's own variants too.
    references: Mapping[str, Factory]
    floor: Factory | None = None
    #: Cases the floor is measured on (it is one more full-size allocation).
    floor_cases: tuple[str, ...] = ("32M",)
    #: Traffic of the floor kernel per element (``stream_probe``: 28). A suite with other
    #: traffic is compared with the floor's bandwidth: its time at the floor's GB/s.
    floor_bytes_per_element: int = 28
    #: (by default every case with dense gradients: a sparse one is for the optimizers
    #: that take sparse gradients, and names itself)
    cases: tuple[str, ...] = DENSE_CASES
    #: Table columns; None: one ratio per reference, ``vs <flavour>``.
    columns: tuple[Column, ...] | None = None
    #: ferroptim against itself (option costs): the summary shows its columns instead of
    #: the ratio to torch's best flavour and to torch's default.
    self_relative: bool = False
    #: Whether the report also times ferroptim and the first reference on 1 thread.
    thread_scaling: bool = False
    #: Share of the report's per-contender time budget this suite uses.
    budget_share: float = 1.0
    #: Bullet points printed under the suite's heading (method details).
    notes: tuple[str, ...] = ()

    def contenders(self, case: str) -> dict[str, Factory]:
        """Name -> factory for a case: ``ferroptim``, the references, then ``floor``."""
        out: dict[str, Factory] = {OURS: self.ours, **self.references}
        if self.floor is not None and case in self.floor_cases:
            out[FLOOR] = self.floor
        return out

    def table_columns(self) -> tuple[Column, ...]:
        if self.columns is not None:
            return self.columns
        return tuple(Column(f"vs {r.removeprefix('torch ')}", r) for r in self.references)


ADAMW_HYPER: dict[str, object] = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-2}
SGD_HYPER: dict[str, object] = {"lr": 0.01, "momentum": 0.9}
RMSPROP_HYPER: dict[str, object] = {"lr": 0.01}
NADAM_HYPER: dict[str, object] = {"lr": 2e-3, "weight_decay": 1e-2, "decoupled_weight_decay": True}
LION_HYPER: dict[str, object] = {"lr": 1e-4, "weight_decay": 1e-2}
ADAN_HYPER: dict[str, object] = {"lr": 1e-3, "weight_decay": 2e-2, "weight_decouple": True}
ADEMAMIX_HYPER: dict[str, object] = {
    "lr": 1e-3,
    "weight_decay": 1e-2,
    "weight_decouple": True,
    "t_alpha_beta3": 1e4,
}
MUON_HYPER: dict[str, object] = {"lr": 0.02}
LARS_HYPER: dict[str, object] = {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9}
EMA_DECAY = 0.999
LAMB_HYPER: dict[str, object] = {"lr": 1e-3, "weight_decay": 1e-2}
SF_ADAMW_HYPER: dict[str, object] = {"lr": 2.5e-3, "weight_decay": 1e-2, "warmup_steps": 1000}
SF_SGD_HYPER: dict[str, object] = {"lr": 0.1, "weight_decay": 1e-4, "warmup_steps": 1000}
RADAM_HYPER: dict[str, object] = {"lr": 1e-3, "weight_decay": 1e-2, "decoupled_weight_decay": True}

#: Where torch has no fused kernel its for-loop may run a list of small-state tensors
#: partly from cache: the floor is measured on the lists too, so the report can show
#: the ratio to torch that a kernel at the floor would get.
_LIST_FLOORS = ("transformer", "1000x1K", "32M")

clip_grad_norm_ = torch.nn.utils.clip_grad_norm_

#: Contenders of the AdamW-with-clipping suite (every one under :func:`restore_grads`).
_ADAMW_CLIP: dict[str, Factory] = {
    "torch fused": sequence(
        function(clip_grad_norm_, max_norm=1.0, foreach=True),
        optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
    ),
    "torch foreach": sequence(
        function(clip_grad_norm_, max_norm=1.0, foreach=True),
        optimizer(torch.optim.AdamW, foreach=True, **ADAMW_HYPER),
    ),
    "torch default": sequence(
        function(clip_grad_norm_, max_norm=1.0),
        optimizer(torch.optim.AdamW, **ADAMW_HYPER),
    ),
}

#: ferroptim.AdamW's options and GradScaler paths (every one under :func:`restore_grads`).
_ADAMW_OPTIONS: dict[str, Factory] = {
    "skip_nonfinite": optimizer(ferroptim.AdamW, skip_nonfinite=True, **ADAMW_HYPER),
    "max_grad_norm": optimizer(ferroptim.AdamW, max_grad_norm=1e9, **ADAMW_HYPER),
    "both": optimizer(ferroptim.AdamW, skip_nonfinite=True, max_grad_norm=1e9, **ADAMW_HYPER),
    # fused=True: GradScaler hands the step its scale (in-kernel unscaling), as for torch's.
    "grad_scale": amp_scaling(ferroptim.AdamW, fused=True, **ADAMW_HYPER),
    "GradScaler.step": grad_scaler_step(ferroptim.AdamW, fused=True, **ADAMW_HYPER),
    "torch fused": optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
    "torch unscale+fused": torch_unscale(optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER)),
    "torch GradScaler.step": grad_scaler_step(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
}

#: Note of the suites whose contenders run under :func:`restore_grads`.
_SAME_GRADS = (
    "**Same gradients every round:** torch's `clip_grad_norm_` and GradScaler's unscale "
    "rewrite gradients in place, so every contender (ferroptim's too) has its own copy of "
    "the case's gradients, rewritten from the shared values in an untimed step before each "
    "call (`restore_grads`); every timed call starts from freshly written gradients, as "
    "after backward."
)

SUITES: dict[str, Suite] = {
    "adamw": Suite(
        name="adamw",
        title="ferroptim.AdamW vs torch.optim.AdamW: one `step()`",
        bytes_per_element=28,
        ours=optimizer(ferroptim.AdamW, **ADAMW_HYPER),
        references=torch_variants(torch.optim.AdamW, **ADAMW_HYPER),
        floor=adam_floor,
        thread_scaling=True,
        notes=("**Traffic:** 28 bytes/element (read p, g, m, v; write p, m, v).",),
    ),
    "sgd": Suite(
        name="sgd",
        title="ferroptim.SGD vs torch.optim.SGD (lr 0.01, momentum 0.9): one `step()`",
        bytes_per_element=20,
        ours=optimizer(ferroptim.SGD, **SGD_HYPER),
        references=torch_variants(torch.optim.SGD, **SGD_HYPER),
        floor=adam_floor,
        budget_share=0.5,
        notes=("**Traffic:** 20 bytes/element (read p, g, momentum buffer; write p, buffer).",),
    ),
    "adagrad": Suite(
        name="adagrad",
        title="ferroptim.Adagrad vs torch.optim.Adagrad (defaults, lr 0.01): one `step()`",
        bytes_per_element=20,
        ours=optimizer(ferroptim.Adagrad),
        references=torch_variants(torch.optim.Adagrad),
        floor=adam_floor,
        budget_share=0.5,
        notes=("**Traffic:** 20 bytes/element (read p, g, sum; write p, sum).",),
    ),
    "rmsprop": Suite(
        name="rmsprop",
        title="ferroptim.RMSprop vs torch.optim.RMSprop (lr 0.01, alpha 0.99): one `step()`",
        bytes_per_element=20,
        ours=optimizer(ferroptim.RMSprop, **RMSPROP_HYPER),
        references=torch_variants(torch.optim.RMSprop, fused=False, **RMSPROP_HYPER),
        floor=adam_floor,
        budget_share=0.5,
        notes=(
            "**Traffic:** 20 bytes/element (read p, g, square_avg; write p, square_avg).",
            "torch has no fused RMSprop.",
        ),
    ),
    "adamax": Suite(
        name="adamax",
        title="ferroptim.Adamax vs torch.optim.Adamax (defaults, lr 2e-3): one `step()`",
        bytes_per_element=28,
        ours=optimizer(ferroptim.Adamax),
        references=torch_variants(torch.optim.Adamax, fused=False),
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element (read p, g, exp_avg, exp_inf; write p, exp_avg, "
            "exp_inf).",
            "torch has no fused Adamax.",
        ),
    ),
    "nadam": Suite(
        name="nadam",
        title=(
            "ferroptim.NAdam vs torch.optim.NAdam (lr 2e-3, decoupled weight decay 0.01): "
            "one `step()`"
        ),
        bytes_per_element=28,
        ours=optimizer(ferroptim.NAdam, **NADAM_HYPER),
        references=torch_variants(torch.optim.NAdam, fused=False, **NADAM_HYPER),
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element (read p, g, exp_avg, exp_avg_sq; write p, exp_avg, "
            "exp_avg_sq).",
            "torch has no fused NAdam.",
        ),
    ),
    "lion": Suite(
        name="lion",
        title=(
            "ferroptim.Lion vs lion_pytorch.Lion (lion-pytorch's default flavour; lr 1e-4, "
            "weight decay 0.01): one `step()`"
        ),
        bytes_per_element=20,
        ours=optimizer(ferroptim.Lion, **LION_HYPER),
        references={"lion-pytorch": optimizer(lion_pytorch.Lion, **LION_HYPER)},
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 20 bytes/element (read p, g, exp_avg; write p, exp_avg).",
            "torch has no Lion: the reference is lion-pytorch's `Lion` (a Python for-loop of "
            "torch ops per tensor, its default; no foreach/fused flavour is chosen by default).",
        ),
    ),
    "ademamix": Suite(
        name="ademamix",
        title=(
            "ferroptim.AdEMAMix vs pytorch_optimizer.AdEMAMix (its default flavour; lr 1e-3, "
            "decoupled weight decay 0.01, warmup 1e4 steps): one `step()`"
        ),
        bytes_per_element=36,
        ours=optimizer(ferroptim.AdEMAMix, **ADEMAMIX_HYPER),
        references={
            f"pytorch-optimizer {flavour}": optimizer(
                pytorch_optimizer.AdEMAMix, **flags, **ADEMAMIX_HYPER
            )
            for flavour, flags in (("default", {}), ("for-loop", {"foreach": False}))
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 36 bytes/element (read p, g, exp_avg, exp_avg_sq, exp_avg_slow; "
            "write p and the three states).",
            "torch has no AdEMAMix: the reference is pytorch-optimizer's `AdEMAMix`, whose "
            "default on the CPU is its foreach flavour (torch `_foreach_*` ops).",
        ),
    ),
    "schedulefree_adamw": Suite(
        name="schedulefree_adamw",
        title=(
            "ferroptim.ScheduleFreeAdamW vs schedulefree.AdamWScheduleFree (its default "
            "flavour; lr 2.5e-3, weight decay 0.01, warmup 1000 steps): one `step()`"
        ),
        bytes_per_element=28,
        ours=restore_grads(trained(ferroptim.ScheduleFreeAdamW, **SF_ADAMW_HYPER)),
        references={
            f"schedulefree {flavour}": restore_grads(
                trained(schedulefree.AdamWScheduleFree, **flags, **SF_ADAMW_HYPER)
            )
            for flavour, flags in (("default", {}), ("for-loop", {"foreach": False}))
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element (read y, g, z, exp_avg_sq; write y, z, exp_avg_sq).",
            "torch has no Schedule-Free AdamW: the reference is the schedulefree package's "
            "`AdamWScheduleFree`, whose default on the CPU is its foreach flavour (torch "
            "`_foreach_*` ops). It overwrites the gradients: every contender's are rewritten "
            "(untimed) before each step.",
        ),
    ),
    "schedulefree_sgd": Suite(
        name="schedulefree_sgd",
        title=(
            "ferroptim.ScheduleFreeSGD vs schedulefree.SGDScheduleFree (its default flavour; "
            "lr 0.1, momentum 0.9, weight decay 1e-4, warmup 1000 steps): one `step()`"
        ),
        bytes_per_element=20,
        ours=restore_grads(trained(ferroptim.ScheduleFreeSGD, **SF_SGD_HYPER)),
        references={
            f"schedulefree {flavour}": restore_grads(
                trained(schedulefree.SGDScheduleFree, **flags, **SF_SGD_HYPER)
            )
            for flavour, flags in (("default", {}), ("for-loop", {"foreach": False}))
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 20 bytes/element (read y, g, z; write y, z).",
            "torch has no Schedule-Free SGD: the reference is the schedulefree package's "
            "`SGDScheduleFree`, whose default on the CPU is its foreach flavour. It overwrites "
            "the gradients (weight decay): every contender's are rewritten (untimed) before "
            "each step.",
        ),
    ),
    "adan": Suite(
        name="adan",
        title=(
            "ferroptim.Adan vs pytorch_optimizer.Adan (its default flavour; lr 1e-3, "
            "decoupled weight decay 0.02): one `step()`"
        ),
        bytes_per_element=44,
        ours=optimizer(ferroptim.Adan, **ADAN_HYPER),
        references={
            f"pytorch-optimizer {flavour}": optimizer(pytorch_optimizer.Adan, **flags, **ADAN_HYPER)
            for flavour, flags in (("default", {}), ("for-loop", {"foreach": False}))
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 44 bytes/element (read p, g, exp_avg, exp_avg_sq, exp_avg_diff, "
            "previous_grad; write p and the four states).",
            "torch has no Adan: the reference is pytorch-optimizer's `Adan`, whose default on "
            "the CPU is its foreach flavour (torch `_foreach_*` ops).",
        ),
    ),
    "ema": Suite(
        name="ema",
        title=(
            "ferroptim.AdamW(ema_decay=0.999) vs AdamW followed by AveragedModel's EMA "
            "update (get_ema_multi_avg_fn(0.999)): one `step()`"
        ),
        bytes_per_element=36,
        ours=optimizer(ferroptim.AdamW, ema_decay=EMA_DECAY, **ADAMW_HYPER),
        references={
            "ferroptim AdamW": optimizer(ferroptim.AdamW, **ADAMW_HYPER),
            "ferroptim+AveragedModel": sequence(
                optimizer(ferroptim.AdamW, **ADAMW_HYPER), averaged_model(EMA_DECAY)
            ),
            "torch fused+AveragedModel": sequence(
                optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
                averaged_model(EMA_DECAY),
            ),
            "torch default+AveragedModel": sequence(
                optimizer(torch.optim.AdamW, **ADAMW_HYPER), averaged_model(EMA_DECAY)
            ),
        },
        floor=adam_floor,
        columns=(
            Column("EMA cost", OURS, "ferroptim AdamW", overhead=True),
            Column("vs ferroptim+AveragedModel", "ferroptim+AveragedModel"),
            Column("vs torch fused+AveragedModel", "torch fused+AveragedModel"),
            Column("vs torch default+AveragedModel", "torch default+AveragedModel"),
        ),
        budget_share=0.5,
        notes=(
            "**Traffic:** 36 bytes/element (AdamW's 28, plus reading and writing the "
            "average; the param is read back from cache); AdamW then AveragedModel's "
            "`_foreach_lerp_` streams 28 + 12.",
            "**EMA cost:** how much longer ferroptim's step takes with `ema_decay` than "
            "without (the issue's bound: 40%).",
        ),
    ),
    "bf16_states": Suite(
        name="bf16_states",
        title=(
            "ferroptim.AdamW(state_dtype=torch.bfloat16) (bf16 moments, stochastic "
            "rounding) vs torch.optim.AdamW on float32 states: one `step()`"
        ),
        bytes_per_element=20,
        ours=optimizer(ferroptim.AdamW, state_dtype=torch.bfloat16, **ADAMW_HYPER),
        references={
            "torch fused": optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
            "torch default": optimizer(torch.optim.AdamW, **ADAMW_HYPER),
            "ferroptim float32 states": optimizer(ferroptim.AdamW, **ADAMW_HYPER),
        },
        floor=adam_floor,
        columns=(
            Column("vs torch fused", "torch fused"),
            Column("vs torch default", "torch default"),
            Column("vs ferroptim float32 states", "ferroptim float32 states"),
        ),
        budget_share=0.5,
        notes=(
            "**Traffic:** 20 bytes/element (param read and written, grad read: 12; two "
            "bfloat16 moments read and written: 8) against float32 AdamW's 28: a kernel at "
            "the floor is at most 28/20 = 1.4x torch's fused float32 step.",
        ),
    ),
    "q8_states": Suite(
        name="q8_states",
        title=(
            'ferroptim.AdamW(state_dtype="8bit") (8-bit blockwise moments) vs '
            "torch.optim.AdamW on float32 states: one `step()`"
        ),
        bytes_per_element=16,
        ours=optimizer(ferroptim.AdamW, state_dtype="8bit", **ADAMW_HYPER),
        references={
            "torch fused": optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
            "torch default": optimizer(torch.optim.AdamW, **ADAMW_HYPER),
            "ferroptim float32 states": optimizer(ferroptim.AdamW, **ADAMW_HYPER),
            "ferroptim bf16 states": optimizer(
                ferroptim.AdamW, state_dtype=torch.bfloat16, **ADAMW_HYPER
            ),
            **bitsandbytes_adamw8bit(),
        },
        floor=adam_floor,
        columns=(
            Column("vs torch fused", "torch fused"),
            Column("vs torch default", "torch default"),
            Column("vs ferroptim float32 states", "ferroptim float32 states"),
            Column("vs ferroptim bf16 states", "ferroptim bf16 states"),
            *bitsandbytes_column(),
        ),
        budget_share=0.5,
        notes=(
            "**Traffic:** about 16 bytes/element (param read and written, grad read: 12; two "
            "8-bit moments read and written: 4; one float32 scale per 256 elements each) "
            "against float32 AdamW's 28: a kernel at the floor is at most 1.75x torch's "
            "fused float32 step. Small tensors (under 4096 elements: `min_8bit_size`) keep "
            "float32 states, as bitsandbytes does.",
        ),
    ),
    "q8_params": Suite(
        name="q8_params",
        title=(
            "ferroptim.AdamW on a bfloat16 model with 8-bit states "
            '(`state_dtype="8bit", stochastic_rounding=True`) vs torch.optim.AdamW on the '
            "float32 model: one `step()`"
        ),
        bytes_per_element=10,
        ours=on_bfloat16(
            optimizer(ferroptim.AdamW, state_dtype="8bit", stochastic_rounding=True, **ADAMW_HYPER)
        ),
        references={
            "torch fused": optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
            "torch default": optimizer(torch.optim.AdamW, **ADAMW_HYPER),
            "ferroptim bf16 params": on_bfloat16(
                optimizer(ferroptim.AdamW, stochastic_rounding=True, **ADAMW_HYPER)
            ),
        },
        floor=adam_floor,
        columns=(
            Column("vs torch fused", "torch fused"),
            Column("vs torch default", "torch default"),
            Column("vs ferroptim bf16 states", "ferroptim bf16 params"),
        ),
        budget_share=0.5,
        notes=(
            "**Traffic:** about 10 bytes/element (bfloat16 param read and written, grad "
            "read: 6; two 8-bit moments read and written: 4) against float32 AdamW's 28: a "
            "kernel at the floor is at most 2.8x torch's fused float32 step.",
        ),
    ),
    "bf16_params": Suite(
        name="bf16_params",
        title=(
            "ferroptim.AdamW on a bfloat16 model (bf16 params, grads and states, "
            "`stochastic_rounding=True`) vs torch.optim.AdamW on the float32 model: one `step()`"
        ),
        bytes_per_element=14,
        ours=on_bfloat16(optimizer(ferroptim.AdamW, stochastic_rounding=True, **ADAMW_HYPER)),
        references={
            "torch fused": optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
            "torch default": optimizer(torch.optim.AdamW, **ADAMW_HYPER),
            "ferroptim master_weights": on_bfloat16(
                optimizer(ferroptim.AdamW, master_weights=True, **ADAMW_HYPER)
            ),
            "torch fused bf16 params": on_bfloat16(
                optimizer(torch.optim.AdamW, fused=True, **ADAMW_HYPER)
            ),
            "torch for-loop bf16 params": on_bfloat16(
                optimizer(torch.optim.AdamW, foreach=False, **ADAMW_HYPER)
            ),
            # no master copy, no stochastic rounding: torch's for-loop semantics in Rust
            "ferroptim torch semantics": on_bfloat16(optimizer(ferroptim.AdamW, **ADAMW_HYPER)),
        },
        floor=adam_floor,
        columns=(
            Column("vs torch fused", "torch fused"),
            Column("vs torch default", "torch default"),
            Column("master_weights vs torch fused", "torch fused", "ferroptim master_weights"),
            Column("vs torch fused on bf16", "torch fused bf16 params"),
            Column("vs torch for-loop on bf16", "torch for-loop bf16 params"),
            Column(
                "torch semantics vs torch for-loop (default) on bf16",
                "torch for-loop bf16 params",
                "ferroptim torch semantics",
            ),
            Column(
                "torch semantics vs torch fused on bf16",
                "torch fused bf16 params",
                "ferroptim torch semantics",
            ),
        ),
        budget_share=0.5,
        notes=(
            "**Traffic:** with `stochastic_rounding=True` 14 bytes/element (bfloat16 param "
            "read and written, grad read: 6; two bfloat16 moments read and written: 8) "
            "against float32 AdamW's 28: a kernel at the floor is at most 2x torch's fused "
            "float32 step. With `master_weights=True` 30 bytes/element (bfloat16 param read "
            "and written and grad read: 6; the float32 master read and written: 8; float32 "
            "moments: 16).",
            'Without either keyword ("ferroptim torch semantics") ferroptim steps a '
            "bfloat16 model as torch's for-loop does, every op rounded, in Rust: 14 "
            "bytes/element.",
            "torch's own bfloat16 AdamW rounds every intermediate to bfloat16 (the for-loop) "
            "or keeps bfloat16 moments with round-to-nearest stores (fused); neither keeps a "
            "float32 master or rounds stochastically.",
        ),
    ),
    "bf16_nadam": Suite(
        name="bf16_nadam",
        title=(
            "ferroptim.NAdam on a bfloat16 model (no keyword: torch's for-loop semantics, "
            "every op rounded, in Rust) vs torch.optim.NAdam on the same bfloat16 params: "
            "one `step()`"
        ),
        bytes_per_element=14,
        ours=on_bfloat16(optimizer(ferroptim.NAdam, **NADAM_HYPER)),
        references={
            "torch for-loop bf16 params": on_bfloat16(
                optimizer(torch.optim.NAdam, foreach=False, **NADAM_HYPER)
            ),
            "torch foreach bf16 params": on_bfloat16(
                optimizer(torch.optim.NAdam, foreach=True, **NADAM_HYPER)
            ),
            "ferroptim float32 model": optimizer(ferroptim.NAdam, **NADAM_HYPER),
        },
        floor=adam_floor,
        columns=(
            Column("vs torch for-loop (default) on bf16", "torch for-loop bf16 params"),
            Column("vs torch foreach on bf16", "torch foreach bf16 params"),
            Column("vs ferroptim on the float32 model", "ferroptim float32 model"),
        ),
        budget_share=0.5,
        notes=(
            "**Traffic:** 14 bytes/element (bfloat16 param read and written, grad read: 6; "
            "two bfloat16 moments read and written: 8). The same bits as torch's for-loop "
            "in the bulk of each tensor (tests/test_low_params_torch_semantics.py); RAdam, "
            "Adadelta, Rprop, ASGD, Lion, Adan, AdEMAMix and Schedule-Free step bfloat16 params "
            "the same way (the last four as their reference implementations do).",
            "torch has no fused NAdam; its foreach rounds as the for-loop does.",
        ),
    ),
    "radam": Suite(
        name="radam",
        title=(
            "ferroptim.RAdam vs torch.optim.RAdam (lr 1e-3, decoupled weight decay 0.01): "
            "one `step()`"
        ),
        bytes_per_element=28,
        ours=optimizer_after(ferroptim.RAdam, 5, **RADAM_HYPER),
        references={
            f"torch {flavour}": optimizer_after(torch.optim.RAdam, 5, **flags, **RADAM_HYPER)
            for flavour, flags in (
                ("foreach", {"foreach": True}),
                ("for-loop", {"foreach": False}),
                ("default", {}),
            )
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element (read p, g, exp_avg, exp_avg_sq; write p, exp_avg, "
            "exp_avg_sq).",
            "**Rectified steps:** every contender takes 5 untimed steps first, so every timed "
            "step is the adaptive update (`rho_t > 5`), with its square root and division.",
            "torch has no fused RAdam.",
        ),
    ),
    "adadelta": Suite(
        name="adadelta",
        title="ferroptim.Adadelta vs torch.optim.Adadelta (defaults, lr 1.0): one `step()`",
        bytes_per_element=28,
        ours=optimizer(ferroptim.Adadelta),
        references=torch_variants(torch.optim.Adadelta, fused=False),
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element (read p, g, square_avg, acc_delta; write p, "
            "square_avg, acc_delta).",
            "torch has no fused Adadelta.",
        ),
    ),
    "rprop": Suite(
        name="rprop",
        title="ferroptim.Rprop vs torch.optim.Rprop (defaults, lr 0.01): one `step()`",
        bytes_per_element=28,
        ours=optimizer(ferroptim.Rprop),
        references=torch_variants(torch.optim.Rprop, fused=False),
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element (read p, g, prev, step_size; write p, prev, step_size).",
            "torch has no fused Rprop.",
        ),
    ),
    "asgd": Suite(
        name="asgd",
        title="ferroptim.ASGD vs torch.optim.ASGD (defaults, lr 0.01, t0 10): one `step()`",
        bytes_per_element=20,
        # (t0 = 10: the benchmark's steps average into ax, ASGD's costlier branch)
        ours=optimizer(ferroptim.ASGD, t0=10.0),
        references=torch_variants(torch.optim.ASGD, fused=False, t0=10.0),
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 20 bytes/element (read p, g, ax; write p, ax).",
            "torch has no fused ASGD.",
        ),
    ),
    "adafactor": Suite(
        name="adafactor",
        title="ferroptim.Adafactor vs torch.optim.Adafactor (defaults, lr 0.01): one `step()`",
        # (the 1000x1K and 32M cases are vectors: a full `variance`, the costlier kind)
        bytes_per_element=32,
        ours=optimizer(ferroptim.Adafactor),
        references=torch_variants(torch.optim.Adafactor, fused=False),
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** vectors 32 bytes/element (pass 1 reads p; pass 2 reads g, "
            "updates variance; pass 3 reads p, g, variance, writes p); matrices 24 (pass 1 "
            "reads p, g; pass 2 reads g; pass 3 reads p, g, writes p; row_var and col_var "
            "are tiny).",
            "torch has no fused Adafactor; its default is the for-loop.",
        ),
    ),
    "clip": Suite(
        name="clip",
        title="ferroptim.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_",
        bytes_per_element=12,
        ours=function(ferroptim.clip_grad_norm_, writes_grads=True, max_norm=1e9),
        references={
            "torch foreach": function(
                clip_grad_norm_, writes_grads=True, max_norm=1e9, foreach=True
            ),
            "torch for-loop": function(
                clip_grad_norm_, writes_grads=True, max_norm=1e9, foreach=False
            ),
            "torch default": function(clip_grad_norm_, writes_grads=True, max_norm=1e9),
        },
        floor=adam_floor,
        budget_share=0.5,
        notes=(
            "**Traffic:** 12 bytes/element (read g for the norm, then read and write g).",
            "**max_norm = 1e9:** the coefficient is 1.0, so the gradients are the same every "
            "round; both libraries still multiply every gradient by it (neither skips a "
            "coefficient of 1), so the work is that of a real clip.",
        ),
    ),
    "adamw_clip": Suite(
        name="adamw_clip",
        title=(
            "ferroptim.AdamW(max_grad_norm=1.0) vs torch's clip_grad_norm_(params, 1.0) + "
            "torch.optim.AdamW: one clipped `step()`"
        ),
        bytes_per_element=32,
        ours=restore_grads(optimizer(ferroptim.AdamW, max_grad_norm=1.0, **ADAMW_HYPER)),
        references={name: restore_grads(f) for name, f in _ADAMW_CLIP.items()},
        floor=adam_floor,
        budget_share=0.5,
        notes=(
            "**Traffic:** ferroptim 32 bytes/element (read g for the norm, then AdamW's 28 "
            "with the coefficient applied as g is read); torch's pair 40 (clip's 12, then 28).",
            "**torch fused** = `clip_grad_norm_(foreach=True)` + `AdamW(fused=True).step()`; "
            "**torch foreach** = `clip_grad_norm_(foreach=True)` + `AdamW(foreach=True).step()`; "
            "**torch default** = both with no flags. The gradients' norm is about 5 "
            "(coefficient about 0.2): a real clip.",
            _SAME_GRADS,
        ),
    ),
    "adamw_options": Suite(
        name="adamw_options",
        title="Cost of ferroptim.AdamW's options and of GradScaler: one `step()`",
        bytes_per_element=28,
        ours=restore_grads(optimizer(ferroptim.AdamW, **ADAMW_HYPER)),
        references={name: restore_grads(f) for name, f in _ADAMW_OPTIONS.items()},
        columns=(
            Column("skip_nonfinite", "skip_nonfinite", overhead=True),
            Column("max_grad_norm", "max_grad_norm", overhead=True),
            Column("both", "both", overhead=True),
            Column("grad_scale", "grad_scale", overhead=True),
            Column("GradScaler.step", "GradScaler.step", overhead=True),
            Column("torch unscale", "torch unscale+fused", "torch fused", overhead=True),
            Column("vs torch unscale+fused", "torch unscale+fused", "grad_scale"),
            Column("vs torch GradScaler.step", "torch GradScaler.step", "GradScaler.step"),
        ),
        self_relative=True,
        budget_share=0.5,
        notes=(
            "ferroptim against itself: **ferroptim** is plain `AdamW` (lr 1e-3, weight decay "
            "0.01); each percentage is a variant's extra time over that step's median, "
            "from the same interleaved run. **skip_nonfinite** = `skip_nonfinite=True`; "
            "**max_grad_norm** = `max_grad_norm=1e9` (the norm pass; coefficient 1.0); "
            "**both** = both options (the finiteness check rides on the norm pass); "
            "**grad_scale** = `AdamW(fused=True)` with "
            "`opt.grad_scale = torch.tensor(65536.0)`, "
            "`opt.found_inf = torch.tensor(0.0)` set before `step()`: what GradScaler "
            "hands an optimizer with `_step_supports_amp_scaling` (`fused=True`), gradients "
            "unscaled as the kernel reads them; **GradScaler.step** = a real "
            "`torch.amp.GradScaler('cpu').step(opt)`, which also runs torch's inf check "
            "over every gradient first (`_check_inf_per_device`), `update()` untimed.",
            "**torch unscale** = `torch._amp_foreach_non_finite_check_and_unscale_(grads, "
            "found_inf, 1/65536)` + `found_inf.item()` + `AdamW(fused=True).step()` (what "
            "`GradScaler.unscale_` + `step` do), over torch's plain fused step; "
            "**vs torch unscale+fused** = that pair's time over ferroptim's grad_scale "
            "step; **vs torch GradScaler.step** = `GradScaler.step` on torch's fused AdamW "
            "over GradScaler.step on ferroptim's.",
            _SAME_GRADS,
        ),
    ),
    "lars": Suite(
        name="lars",
        title=(
            "ferroptim.LARS vs pytorch_optimizer.LARS (its default flavour on CPU: foreach; "
            "lr 0.1, weight decay 1e-4, momentum 0.9): one `step()`"
        ),
        bytes_per_element=28,
        # The reference writes its update into p.grad: every contender gets its own
        # gradients, rewritten before each call.
        ours=restore_grads(optimizer(ferroptim.LARS, **LARS_HYPER)),
        references={
            "pytorch-optimizer": restore_grads(optimizer(pytorch_optimizer.LARS, **LARS_HYPER))
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes/element: the norms' pass reads p and g (8), the update "
            "reads p, g, momentum_buffer and writes p, momentum_buffer (20).",
            "torch has no LARS: the reference is pytorch-optimizer's `LARS` (pinned 4.1.0), "
            "whose default on CPU is its foreach flavour.",
            _SAME_GRADS,
        ),
    ),
    "lamb": Suite(
        name="lamb",
        title=(
            "ferroptim.LAMB vs pytorch_optimizer.Lamb (its default flavour on CPU: foreach; "
            "lr 1e-3, decoupled weight decay 0.01): one `step()`"
        ),
        bytes_per_element=40,
        ours=optimizer(ferroptim.LAMB, **LAMB_HYPER),
        references={
            f"pytorch-optimizer {flavour}": optimizer(pytorch_optimizer.Lamb, **flags, **LAMB_HYPER)
            for flavour, flags in (("default", {}), ("for-loop", {"foreach": False}))
        },
        floor=adam_floor,
        floor_cases=_LIST_FLOORS,
        budget_share=0.5,
        notes=(
            "**Traffic:** 40 bytes/element in two passes: the moments and norms' pass reads "
            "p, g, exp_avg, exp_avg_sq and writes exp_avg, exp_avg_sq (24), the update reads "
            "p, exp_avg, exp_avg_sq and writes p (16).",
            "torch has no LAMB: the reference is pytorch-optimizer's `Lamb` (pinned 4.1.0), "
            "whose default on CPU is its foreach flavour.",
        ),
    ),
    "muon": Suite(
        name="muon",
        title=(
            "ferroptim.Muon vs torch.optim.Muon (lr 0.02, other arguments torch's defaults): "
            "one `step()` on 2-D weights"
        ),
        bytes_per_element=16,
        ours=optimizer(ferroptim.Muon, **MUON_HYPER),
        references={
            "torch default": optimizer(torch.optim.Muon, **MUON_HYPER),
            "NS matmuls": newton_schulz_matmuls(),
        },
        cases=MATRIX_CASES,
        columns=(
            Column("vs torch", "torch default"),
            Column("matmuls / ferroptim", "NS matmuls"),
        ),
        budget_share=0.5,
        notes=(
            "**Where the time goes:** Newton–Schulz's 15 bfloat16 matrix products per "
            "matrix (torch's `mm`/`addmm`, which ferroptim calls too, so results are "
            "bitwise torch's). `NS matmuls` times only those products; `matmuls / "
            "ferroptim` is the share of ferroptim's step they take.",
            "**Rust part:** the momentum and Nesterov update, one pass (read g, m; write "
            "m, u: 16 bytes/element) instead of torch's two `lerp`s.",
        ),
    ),
    "sparse_adam": Suite(
        name="sparse_adam",
        title=(
            "ferroptim.SparseAdam vs torch.optim.SparseAdam (defaults): one `step()` on a "
            "sparse embedding gradient"
        ),
        bytes_per_element=28,
        ours=optimizer(ferroptim.SparseAdam),
        references={"torch default": optimizer(torch.optim.SparseAdam)},
        cases=("embedding",),
        budget_share=0.5,
        notes=(
            "**Traffic:** 28 bytes per looked-up element (read p, g, exp_avg, exp_avg_sq; "
            "write p, exp_avg, exp_avg_sq), plus coalescing the gradient (both sides: torch's "
            "`coalesce`).",
            "torch has one SparseAdam implementation (a for-loop of sparse tensor ops).",
            "No floor column: scattered rows are bound by memory latency, not by streaming "
            "bandwidth.",
        ),
    ),
    "lbfgs": Suite(
        name="lbfgs",
        title=(
            "ferroptim.LBFGS vs torch.optim.LBFGS: one `step(closure)` (fixed-step L-BFGS, "
            "mlp: max_iter=60, history_size=100; lsq10M: max_iter=10, history_size=10)"
        ),
        # Per iteration with n history pairs: 2n + 1 passes of 8-12 bytes per element;
        # the column reads as one pass (read two vectors, write one).
        bytes_per_element=12,
        ours=lambda params: lbfgs(ferroptim.LBFGS, **_lbfgs_kwargs(params))(params),
        references={
            "torch default": lambda params: lbfgs(torch.optim.LBFGS, **_lbfgs_kwargs(params))(
                params
            )
        },
        cases=("mlp", "lsq10M"),
        budget_share=0.5,
        notes=(
            "Each timed `step(closure)` starts from the same parameters with an empty state "
            "(restored untimed), and runs exactly `max_iter` iterations, one closure "
            "evaluation each (`tolerance_grad = tolerance_change = -1`; no line search): "
            "the closure's forward/backward is in both times.",
            "mlp: the history grows to 59 pairs within the step, where torch's two-loop "
            "recursion is ~240 small tensor ops per iteration in Python; ferroptim runs it in "
            "one Rust call. lsq10M: memory-bound vector work over 10.24M float32 elements "
            "(history up to 9 pairs: torch 4n + 2 passes, ferroptim 2n + 1, fused).",
        ),
    ),
}


def _lbfgs_kwargs(params: list[Tensor]) -> dict[str, object]:
    if len(params) == 4:  # mlp: Python overhead, a long history
        return {"lr": 0.1, "max_iter": 60, "history_size": 100}
    return {"lr": 0.01, "max_iter": 10, "history_size": 10}


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


def torch_default_clip_impl() -> str:
    """Which implementation ``torch.nn.utils.clip_grad_norm_`` (no ``foreach``) uses for CPU
    float32 gradients."""
    from torch.utils._foreach_utils import _has_foreach_support

    return "foreach" if _has_foreach_support([torch.zeros(1)], torch.device("cpu")) else "for-loop"


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

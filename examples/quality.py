"""Training quality of lower-precision AdamW: bf16 and 8-bit states and bf16 params
against fp32.

Trains two small models, nothing downloaded, with AdamW in several precisions and compares
their losses with torch.optim.AdamW in float32 (the reference):

* ``digits``: the demo's 64-1024-1024-10 MLP on scikit-learn's bundled digits
  (``examples/demo.py``), batch 64, the demo's lr 1e-3 and weight decay 1e-2, 400 steps;
* ``charlm``: a 2-layer causal transformer (d_model 64, context 64), batch 32, predicting
  the next character of text generated here by a small stochastic grammar (a made-up lexicon,
  subject-verb agreement, verbs that take only some objects, nested relative clauses,
  quoted speech), so the loss keeps falling for a while: spelling first, then grammar;
  lr 3e-3, weight decay 0.1, 400 steps.

Variants (each model trained once per seed; a seed fixes the initial weights and the
batch order, the same for every variant; warmup then cosine decay of the learning rate):

* ``fp32``: ``torch.optim.AdamW`` on float32 params (the reference; on CPU torch's
  default is its for-loop implementation);
* ``ferro-fp32``: ``ferroptim.AdamW``, float32;
* ``bf16-states``: ``ferroptim.AdamW(..., state_dtype=torch.bfloat16)``: float32 params,
  exp_avg/exp_avg_sq kept in bfloat16 with stochastic rounding;
* ``8bit-states``: ``ferroptim.AdamW(..., state_dtype="8bit")`` with ``min_8bit_size=0``:
  float32 params, every exp_avg/exp_avg_sq 8-bit blockwise (bitsandbytes' maps), even
  the small tensors bitsandbytes would leave in float32 (the harshest case);
* ``bf16-params-8bit``: the bfloat16 model with ``stochastic_rounding=True`` and 8-bit
  states (``min_8bit_size=0``): about 10 bytes of step traffic per param;
* ``bnb-8bit``: ``bitsandbytes.optim.AdamW8bit(..., min_8bit_size=0)`` (where
  bitsandbytes is installed): the same 8-bit format, its CPU implementation;
* ``bf16-params-rne``: the model in bfloat16 (params, activations, grads) stepped by
  ``torch.optim.AdamW(foreach=False)``: every update rounded to nearest, so updates under
  half an ulp of the param are lost (the baseline expected to fall behind);
* ``bf16-params-sr``: the same bfloat16 model stepped by
  ``ferroptim.AdamW(..., stochastic_rounding=True)``: the param and its (bfloat16) states
  rounded stochastically;
* ``bf16-params-master``: the same bfloat16 model with ``master_weights=True``: an fp32
  master copy of each param (and fp32 states) in the optimizer state, the bfloat16 param
  written as the master rounded to nearest.

A variant whose keyword this ferroptim does not have is skipped with a message.

Reports the final loss (mean train loss over the last 10% of steps, mean of the seeds) and
the held-out loss at the end, per model and variant, each with its relative gap to
``fp32`` in percent: a markdown table on stdout, the numbers in ``docs/quality.json``
and the loss curves (mean over seeds, smoothed) in ``docs/quality.png``.

    pip install ".[demo,plot]" && python examples/quality.py   # ~4 min, one thread
    python examples/quality.py --quick                          # ~20 s smoke run, one seed

(Both measured with all six variants on one thread of a Xeon (Sapphire Rapids) shared with
other work: 250 s and 20 s; each variant takes about 40 s of the full run.)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ferroptim
import torch
from demo import HYPERPARAMETERS, load_data, make_model  # examples/demo.py, beside this file
from torch import Tensor, nn
from torch.nn import functional as F

DOCS = Path(__file__).resolve().parent.parent / "docs"
Batch = tuple[Tensor, Tensor]
OptimizerFactory = Callable[..., torch.optim.Optimizer]

# ----------------------------------------------------------------------------------------
# Variants: which optimizer, on params of which dtype
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of stepping AdamW: the optimizer, the dtype of the model it steps, and the
    ferroptim keyword it needs (``None``: any version)."""

    name: str
    param_dtype: torch.dtype
    make: OptimizerFactory
    needs: str | None = None
    #: A package the variant imports (a reference implementation), if any.
    package: str | None = None

    def missing(self) -> str | None:
        """Why this ferroptim cannot run the variant, or ``None`` when it can."""
        if self.package is not None and importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed"
        if self.needs is None or self.needs in inspect.signature(ferroptim.AdamW).parameters:
            return None
        return f"ferroptim {ferroptim.__version__}'s AdamW has no `{self.needs}` keyword"


def _bitsandbytes_adamw8bit(params: Iterable[Tensor], **hp: Any) -> torch.optim.Optimizer:
    import bitsandbytes as bnb  # (optional: the test extra pins it)

    return bnb.optim.AdamW8bit(params, min_8bit_size=0, **hp)


VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", torch.float32, torch.optim.AdamW),
    Variant("ferro-fp32", torch.float32, ferroptim.AdamW),
    Variant(
        "bf16-states",
        torch.float32,
        lambda params, **hp: ferroptim.AdamW(params, state_dtype=torch.bfloat16, **hp),
        needs="state_dtype",
    ),
    Variant(
        "8bit-states",
        torch.float32,
        lambda params, **hp: ferroptim.AdamW(
            [{"params": list(params), "min_8bit_size": 0}], state_dtype="8bit", **hp
        ),
        needs="state_dtype",
    ),
    Variant(
        "bf16-params-8bit",
        torch.bfloat16,
        lambda params, **hp: ferroptim.AdamW(
            [{"params": list(params), "min_8bit_size": 0}],
            state_dtype="8bit",
            stochastic_rounding=True,
            **hp,
        ),
        needs="stochastic_rounding",
    ),
    # bitsandbytes' 8-bit AdamW (its CPU path), every moment 8-bit as in 8bit-states.
    Variant("bnb-8bit", torch.float32, _bitsandbytes_adamw8bit, package="bitsandbytes"),
    # torch's for-loop: what a bf16 model gets from torch.optim on CPU (round to nearest).
    Variant(
        "bf16-params-rne",
        torch.bfloat16,
        lambda params, **hp: torch.optim.AdamW(params, foreach=False, **hp),
    ),
    Variant(
        "bf16-params-sr",
        torch.bfloat16,
        lambda params, **hp: ferroptim.AdamW(params, stochastic_rounding=True, **hp),
        needs="stochastic_rounding",
    ),
    Variant(
        "bf16-params-master",
        torch.bfloat16,
        lambda params, **hp: ferroptim.AdamW(params, master_weights=True, **hp),
        needs="master_weights",
    ),
)
REFERENCE = "fp32"
#: Steps per model: the full experiment's and the smoke run's (--quick).
STEPS = {"digits": 400, "charlm": 400}
QUICK_STEPS = {"digits": 60, "charlm": 80}

# ----------------------------------------------------------------------------------------
# Generated text: a small stochastic grammar over a made-up lexicon
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lexicon:
    """Words of a made-up language; verbs take objects from their own subset of nouns."""

    nouns: list[str]
    verbs: list[str]
    adjectives: list[str]
    names: list[str]
    objects: dict[str, list[str]]


def make_lexicon(seed: int = 0) -> Lexicon:
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprtvz" for v in "aeiou"]

    taken: set[str] = set()  # the word classes are disjoint

    def words(count: int, lengths: Sequence[int]) -> list[str]:
        out: set[str] = set()
        while len(out) < count:
            word = "".join(rng.choice(syllables) for _ in range(rng.choice(lengths)))
            if word not in taken:
                out.add(word)
                taken.add(word)
        return sorted(out)

    nouns = words(30, (1, 2, 2, 3))
    verbs = words(16, (1, 2))
    # Each verb takes objects from its own 6 nouns: a dependency across several words.
    objects = {verb: rng.sample(nouns, 6) for verb in verbs}
    return Lexicon(
        nouns, verbs, words(10, (2, 3)), [n.capitalize() for n in words(8, (2,))], objects
    )


class Grammar:
    """Sentences of the lexicon's language, drawn from ``random.Random(seed)``.

    Words are drawn with Zipf-like frequencies (a long tail to learn); a verb agrees in
    number with its subject (``-s`` marks a plural noun and a singular verb); its object
    comes from the verb's own nouns; noun phrases take relative clauses (nested, depth
    decaying) and some sentences are quoted speech of a name.
    """

    def __init__(self, lexicon: Lexicon, seed: int) -> None:
        self.lex = lexicon
        self.rng = random.Random(seed)

    def pick(self, items: Sequence[str]) -> str:
        # Zipf: item k has weight 1/(k+1).
        return self.rng.choices(items, weights=[1 / (k + 1) for k in range(len(items))])[0]

    def noun_phrase(self, plural: bool, depth: int, noun: str | None = None) -> str:
        if not plural and noun is None and self.rng.random() < 0.15:
            return self.pick(self.lex.names)
        noun = noun or self.pick(self.lex.nouns)
        det = self.rng.choice(("the", "some", "two")) if plural else self.rng.choice(("the", "a"))
        adjs = [self.pick(self.lex.adjectives) for _ in range(self.rng.choice((0, 0, 1, 2)))]
        words = [det, *adjs, noun + ("s" if plural else "")]
        if depth > 0 and self.rng.random() < 0.3:
            words += ["that", self.verb_phrase(plural, depth - 1)]
        return " ".join(words)

    def verb_phrase(self, plural: bool, depth: int) -> str:
        verb = self.pick(self.lex.verbs)
        obj = self.noun_phrase(
            self.rng.random() < 0.4, depth, self.rng.choice(self.lex.objects[verb])
        )
        return f"{verb if plural else verb + 's'} {obj}"

    def sentence(self) -> str:
        plural = self.rng.random() < 0.4
        text = f"{self.noun_phrase(plural, 2)} {self.verb_phrase(plural, 2)}"
        if self.rng.random() < 0.15:
            return f'"{text}", said {self.pick(self.lex.names)}.'
        return text[0].upper() + text[1:] + "."

    def text(self, chars: int) -> str:
        parts: list[str] = []
        size = 0
        while size < chars:
            paragraph = " ".join(self.sentence() for _ in range(self.rng.randint(2, 5))) + "\n"
            parts.append(paragraph)
            size += len(paragraph)
        return "".join(parts)[:chars]


# ----------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        above = torch.ones(context, context, dtype=torch.bool).triu(1)
        self.register_buffer("mask", above, persistent=False)  # True: masked (the future)
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        # Attention written out: torch's CPU flash-attention backward is slow in bfloat16.
        scores = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]))
        scores = scores.masked_fill(self.mask[:t, :t], float("-inf"))
        y = scores.float().softmax(dim=-1).to(v.dtype) @ v  # softmax in float32
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """A small GPT: token and position embeddings, ``layers`` blocks, a linear head."""

    def __init__(self, vocab: int, context: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.blocks = nn.Sequential(*(Block(d_model, heads, context) for _ in range(layers)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


# ----------------------------------------------------------------------------------------
# Tasks: a model, its batches and its loss
# ----------------------------------------------------------------------------------------


@dataclass
class Task:
    """What one model trains on: batches per seed, a held-out set, the hyperparameters."""

    name: str
    title: str
    make_model: Callable[[], nn.Module]
    batches: Callable[[int, int], list[Batch]]  # (seed, steps) -> the batches, in order
    heldout: Batch
    lr: float
    weight_decay: float
    steps: int
    warmup: int

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        if inputs.is_floating_point():  # the inputs in the model's dtype (bf16 variants)
            inputs = inputs.to(next(model.parameters()).dtype)
        logits = model(inputs)
        # The loss in float32 whatever the model's dtype, as mixed-precision recipes do.
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def digits_task(steps: int, batch_size: int = 64) -> Task:
    data = load_data(0)

    def batches(seed: int, steps: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed)
        out: list[Batch] = []
        while len(out) < steps:  # epochs of a fresh permutation each, as in the demo
            for idx in torch.randperm(len(data.y_train), generator=gen).split(batch_size):
                out.append((data.x_train[idx], data.y_train[idx]))
        return out[:steps]

    return Task(
        "digits",
        "MLP 64-1024-1024-10 on digits",
        make_model,
        batches,
        (data.x_test, data.y_test),
        lr=HYPERPARAMETERS["lr"],  # the demo's
        weight_decay=HYPERPARAMETERS["weight_decay"],
        steps=steps,
        warmup=steps // 20,
    )


CONTEXT = 64
D_MODEL = 64


def charlm_task(steps: int, batch_size: int = 32, d_model: int = D_MODEL) -> Task:
    lexicon = make_lexicon(0)
    train_text = Grammar(lexicon, seed=1).text(300_000)
    heldout_text = Grammar(lexicon, seed=2).text(16 * (CONTEXT + 1))
    chars = sorted(set(train_text) | set(heldout_text))
    code = {c: i for i, c in enumerate(chars)}

    def encode(text: str) -> Tensor:
        return torch.tensor([code[c] for c in text], dtype=torch.long)

    train = encode(train_text)
    heldout = encode(heldout_text).view(16, CONTEXT + 1)

    def batches(seed: int, steps: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed)
        out: list[Batch] = []
        for _ in range(steps):
            start = torch.randint(len(train) - CONTEXT - 1, (batch_size, 1), generator=gen)
            window = train[start + torch.arange(CONTEXT + 1)]
            out.append((window[:, :-1], window[:, 1:]))
        return out

    return Task(
        "charlm",
        f"char transformer (2x{d_model}, context {CONTEXT}) on generated text",
        lambda: CharLM(len(chars), CONTEXT, d_model=d_model, layers=2, heads=4),
        batches,
        (heldout[:, :-1], heldout[:, 1:]),
        lr=3e-3,
        weight_decay=0.1,
        steps=steps,
        warmup=steps // 20,
    )


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def warmup_cosine(steps: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to ``floor`` times the peak learning rate: the late,
    small steps are where rounding to nearest loses updates."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class RunResult:
    losses: list[float]
    heldout: float
    seconds: float
    model: nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)
    #: Of ``seconds``, the time in ``optimizer.step()``.
    step_seconds: float = 0.0


def train(task: Task, variant: Variant, seed: int, batches: Sequence[Batch]) -> RunResult:
    """One run: the seed's initial weights (cast to the variant's dtype) and batches."""
    torch.manual_seed(seed)  # the initial weights, and ferroptim's stochastic-rounding seed
    model = task.make_model().to(variant.param_dtype)
    opt = variant.make(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(len(batches), task.warmup))
    losses: list[float] = []
    start = time.perf_counter()
    step_seconds = 0.0
    model.train()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        step_start = time.perf_counter()
        opt.step()
        step_seconds += time.perf_counter() - step_start
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        heldout = task.loss(model, task.heldout).item()
    return RunResult(losses, heldout, seconds, model, opt, step_seconds)


def tail_mean(losses: Sequence[float], fraction: float = 0.1) -> float:
    """The final loss: the mean train loss over the last ``fraction`` of the steps."""
    n = max(1, round(len(losses) * fraction))
    return statistics.fmean(losses[-n:])


@dataclass
class Summary:
    """One model and variant over the seeds."""

    final: list[float]  # per seed
    heldout: list[float]
    seconds: list[float]
    curve: list[float]  # train loss per step, mean over seeds
    step_seconds: list[float] = field(default_factory=list)

    def as_json(self, reference: Summary | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "final_loss": statistics.fmean(self.final),
            "final_loss_per_seed": self.final,
            "heldout_loss": statistics.fmean(self.heldout),
            "heldout_loss_per_seed": self.heldout,
            "train_seconds": sum(self.seconds),
            "step_seconds": sum(self.step_seconds),
        }
        if reference is not None:
            out["final_gap_pct"] = gap(self.final, reference.final)
            out["heldout_gap_pct"] = gap(self.heldout, reference.heldout)
        return out


def gap(values: Sequence[float], reference: Sequence[float]) -> float:
    """Relative gap of the mean over seeds to the reference's, in percent."""
    ref = statistics.fmean(reference)
    return 100 * (statistics.fmean(values) - ref) / ref


def run_task(
    task: Task, variants: Iterable[Variant], seeds: Sequence[int], log: bool = True
) -> dict[str, Summary]:
    results: dict[str, list[RunResult]] = {}
    for seed in seeds:
        batches = task.batches(seed, task.steps)  # the same order for every variant
        for variant in variants:
            run = train(task, variant, seed, batches)
            results.setdefault(variant.name, []).append(run)
            if log:
                print(
                    f"  {task.name:>7} seed {seed} {variant.name:<19} final "
                    f"{tail_mean(run.losses):.4f} held-out {run.heldout:.4f} ({run.seconds:.1f} s,"
                    f" steps {run.step_seconds:.2f} s)",
                    flush=True,
                )
    return {
        name: Summary(
            [tail_mean(r.losses) for r in runs],
            [r.heldout for r in runs],
            [r.seconds for r in runs],
            [statistics.fmean(step) for step in zip(*(r.losses for r in runs), strict=True)],
            [r.step_seconds for r in runs],
        )
        for name, runs in results.items()
    }


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


def markdown_table(tasks: Sequence[Task], summaries: dict[str, dict[str, Summary]]) -> str:
    lines = [
        "| model | variant | final train loss (± std over seeds) | vs fp32 "
        "| held-out loss | vs fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task in tasks:
        ref = summaries[task.name].get(REFERENCE)
        for name, s in summaries[task.name].items():
            final = f"{statistics.fmean(s.final):.4f}"
            if len(s.final) > 1:
                final += f" ± {statistics.stdev(s.final):.4f}"
            held = f"{statistics.fmean(s.heldout):.4f}"
            gaps = ("", "")
            if ref is not None and name != REFERENCE:
                gaps = (f"{gap(s.final, ref.final):+.2f}%", f"{gap(s.heldout, ref.heldout):+.2f}%")
            lines.append(f"| {task.name} | {name} | {final} | {gaps[0]} | {held} | {gaps[1]} |")
    return "\n".join(lines)


def json_report(
    tasks: Sequence[Task], summaries: dict[str, dict[str, Summary]], **meta: Any
) -> dict[str, Any]:
    """Everything the table shows, per seed too, with how it was run."""

    def variants(task: Task) -> dict[str, Any]:
        ref = summaries[task.name].get(REFERENCE)
        return {
            name: s.as_json(ref if name != REFERENCE else None)
            for name, s in summaries[task.name].items()
        }

    return {
        "what": "final loss: mean train loss over the last 10% of steps, mean over seeds; "
        "held-out loss after the last step; gaps in % of fp32's",
        **meta,
        "tasks": {
            task.name: {
                "title": task.title,
                "steps": task.steps,
                "lr": task.lr,
                "weight_decay": task.weight_decay,
                "variants": variants(task),
            }
            for task in tasks
        },
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(tasks: Sequence[Task], summaries: dict[str, dict[str, Summary]], path: Path) -> None:
    """Loss curves (top) and their relative gap to fp32 (bottom), one column per model."""
    import matplotlib  # the plot extra; imported here only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7.5), squeeze=False)
    for col, task in enumerate(tasks):
        window = max(1, task.steps // 25)
        top, bottom = axes[0][col], axes[1][col]
        ref = summaries[task.name].get(REFERENCE)
        ref_curve = smooth(ref.curve, window) if ref else None
        for name, s in summaries[task.name].items():
            curve = smooth(s.curve, window)
            style = {"linestyle": "--"} if name == "ferro-fp32" else {}
            top.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1.2, **style)
            if ref_curve is not None:
                rel = [100 * (c - r) / r for c, r in zip(curve, ref_curve, strict=True)]
                bottom.plot(range(1, len(rel) + 1), rel, label=name, linewidth=1.2, **style)
        top.set_yscale("log")
        seeds = len(next(iter(summaries[task.name].values())).final)
        top.set_title(f"{task.title}\n(train loss, mean of {seeds} seeds, moving average {window})")
        top.set_xlabel("step")
        top.set_ylabel("loss")
        top.legend(fontsize=8)
        band = bottom.axhspan(-1, 1, color="0.92", label="±1% of fp32")
        bottom.axhline(0, color="black", linewidth=0.6)
        # Linear within ±1% (the target), logarithmic beyond (RNE's gap grows to 100s of %).
        bottom.set_yscale("symlog", linthresh=1)
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        low, high = bottom.get_ylim()
        bottom.set_ylim(min(low, -2), max(high, 10))  # at least one labelled decade above 1
        bottom.set_xlabel("step")
        bottom.set_ylabel("train loss vs fp32 (%, symlog)")
        bottom.set_xlim(task.steps // 4, task.steps)  # early steps' relative gaps are noise
        bottom.legend(handles=[band], loc="lower right", fontsize=8)  # colours as above
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def select(names: Iterable[str]) -> tuple[list[Variant], dict[str, str]]:
    """The named variants this ferroptim can run, and why the others are skipped."""
    variants: list[Variant] = []
    skipped: dict[str, str] = {}
    for variant in VARIANTS:
        if variant.name in names:
            reason = variant.missing()
            if reason is None:
                variants.append(variant)
            else:
                skipped[variant.name] = reason
                print(f"skipping {variant.name}: {reason}")
    return variants, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a ~20 s smoke run: 1 seed, fewer steps"
    )
    parser.add_argument("--seeds", type=int, default=3)
    # One thread by default: on a shared machine two threads of each of several processes
    # contend and run many times slower; the losses do not depend on it.
    parser.add_argument("--threads", type=int, default=1, help="torch's and ferroptim's")
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], metavar="NAME")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for quality.json and quality.png (default: docs/, nothing with --quick)",
    )
    args = parser.parse_args()
    out = args.out if args.out is not None or args.quick else DOCS

    torch.set_num_threads(args.threads)
    ferroptim.set_num_threads(args.threads)
    seeds = list(range(1 if args.quick else args.seeds))
    variants, skipped = select(args.variants)
    steps = QUICK_STEPS if args.quick else STEPS
    tasks = [digits_task(steps["digits"]), charlm_task(steps["charlm"])]
    print(
        f"torch {torch.__version__}, ferroptim {ferroptim.__version__}, {args.threads} "
        f"thread(s), seeds {seeds}, variants {[v.name for v in variants]}"
    )
    start = time.perf_counter()
    summaries = {task.name: run_task(task, variants, seeds) for task in tasks}
    elapsed = time.perf_counter() - start
    print()
    print(markdown_table(tasks, summaries))
    print(f"\n{elapsed:.0f} s of training and evaluation ({args.threads} thread(s))")
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    report = json_report(
        tasks,
        summaries,
        command="python examples/quality.py" + (" --quick" if args.quick else ""),
        torch=torch.__version__,
        ferroptim=ferroptim.__version__,
        cpu=cpu_name(),
        threads=args.threads,
        seeds=seeds,
        seconds=round(elapsed, 1),
        skipped=skipped,
    )
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(tasks, summaries, out / "quality.png")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")


if __name__ == "__main__":
    main()

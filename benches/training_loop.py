"""The optimizer step inside a real training loop: forward, backward, then ``opt.step()``.

The other suites time a step on fixed gradients, one step after another contender's. A real
step follows backward: torch's OpenMP workers have just run backward's kernels and keep
spinning for a while (libgomp's spin-wait before they sleep), the gradients are freshly
written, and ferroptim's own pool has slept through the forward and backward passes. This
module measures exactly that.

Each contender (ferroptim or one of torch's flavours of the same optimizer) gets its own copy
of the same model (same initial weights) and its own optimizer; every round, in rotated order,
each contender runs one iteration on the same fixed batch: ``zero_grad()``, forward, loss,
``backward()``, then the timed ``opt.step()``. Only the step is timed for the ratio; the
whole iteration is timed too. All contenders run the same number of iterations on the same
data, so their parameters stay close (a smoke test checks it).

Models (``LOOP_MODELS``): a small transformer encoder language model (token embedding,
``torch.nn.TransformerEncoder``, a linear head; no dropout, so every iteration is the same
computation) and an MLP classifier.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import ferroptim
import torch
from harness import ADAMW_HYPER, SGD_HYPER, Samples, gc_paused
from torch import Tensor, nn

# -- models -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopModel:
    """A model and its fixed batch: ``build()`` returns the module, ``batch()`` (inputs,
    targets), ``loss(model, inputs, targets)`` the scalar loss."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]


class EncoderLM(nn.Module):
    """Token embedding, a pre-norm ``nn.TransformerEncoder`` (no dropout) and a linear head."""

    def __init__(self, vocab: int, d_model: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))))


def encoder_model(
    vocab: int = 4096,
    d_model: int = 384,
    heads: int = 6,
    layers: int = 8,
    batch: int = 2,
    seq: int = 32,
) -> LoopModel:
    def build() -> nn.Module:
        return EncoderLM(vocab, d_model, heads, layers)

    def make_batch() -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(vocab, (batch, seq + 1), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    def loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = model(tokens)
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    return LoopModel(
        "encoder",
        f"transformer encoder LM: {layers} layers, d={d_model}, vocab {vocab}, "
        f"batch {batch}×{seq} tokens",
        build,
        make_batch,
        loss,
    )


def mlp_model(
    inputs: int = 512, hidden: int = 2048, depth: int = 4, classes: int = 10, batch: int = 32
) -> LoopModel:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        width = inputs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        return nn.Sequential(*layers)

    def make_batch() -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(2)
        return torch.randn(batch, inputs, generator=gen), torch.randint(
            classes, (batch,), generator=gen
        )

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    return LoopModel(
        "mlp",
        f"MLP: {inputs}→{hidden}×{depth}→{classes}, GELU, batch {batch}",
        build,
        make_batch,
        loss,
    )


#: The full-size models (the report) and small ones of the same shape (smoke tests).
LOOP_MODELS: dict[str, Callable[[], LoopModel]] = {
    "encoder": encoder_model,
    "mlp": mlp_model,
}
QUICK_MODELS: dict[str, Callable[[], LoopModel]] = {
    "encoder": lambda: encoder_model(vocab=256, d_model=64, heads=4, layers=2, seq=16),
    "mlp": lambda: mlp_model(inputs=64, hidden=128, depth=2, batch=32),
}

# -- optimizers -------------------------------------------------------------------------

OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _opt(cls: type[torch.optim.Optimizer], **kwargs: object) -> OptFactory:
    return lambda params: cls(params, **kwargs)


#: Optimizer family -> contender -> factory; ferroptim first, then torch's fused reference.
LOOP_OPTIMIZERS: dict[str, dict[str, OptFactory]] = {
    "adamw": {
        "ferroptim": _opt(ferroptim.AdamW, **ADAMW_HYPER),
        "torch fused": _opt(torch.optim.AdamW, fused=True, **ADAMW_HYPER),
        "torch foreach": _opt(torch.optim.AdamW, foreach=True, **ADAMW_HYPER),
        "torch default": _opt(torch.optim.AdamW, **ADAMW_HYPER),
    },
    "sgd": {
        "ferroptim": _opt(ferroptim.SGD, **SGD_HYPER),
        "torch fused": _opt(torch.optim.SGD, fused=True, **SGD_HYPER),
        "torch foreach": _opt(torch.optim.SGD, foreach=True, **SGD_HYPER),
        "torch default": _opt(torch.optim.SGD, **SGD_HYPER),
    },
}

# -- the loop ---------------------------------------------------------------------------


@dataclass
class Trainer:
    """One contender: its model copy, optimizer, and the times of its iterations."""

    model: nn.Module
    opt: torch.optim.Optimizer
    step: Samples = field(default_factory=Samples)
    iteration: Samples = field(default_factory=Samples)
    losses: list[float] = field(default_factory=list)


@dataclass
class LoopResult:
    model: LoopModel
    family: str
    num_tensors: int
    numel: int
    trainers: dict[str, Trainer]


def iterate(spec: LoopModel, trainer: Trainer, inputs: Tensor, targets: Tensor) -> None:
    """One training iteration; appends the step's and the iteration's seconds."""
    t0 = time.perf_counter()
    trainer.opt.zero_grad()
    loss = spec.loss(trainer.model, inputs, targets)
    loss.backward()
    t1 = time.perf_counter()
    trainer.opt.step()
    t2 = time.perf_counter()
    trainer.step.times.append(t2 - t1)
    trainer.iteration.times.append(t2 - t0)
    trainer.losses.append(loss.item())


def run_loop(
    spec: LoopModel,
    family: str,
    contenders: Mapping[str, OptFactory],
    *,
    rounds: int,
    warmup: int = 2,
    seed: int = 0,
) -> LoopResult:
    """Trains one copy of ``spec``'s model per contender, interleaved round-robin (the order
    rotated every round), ``warmup`` untimed iterations each, then ``rounds`` timed ones."""
    torch.manual_seed(seed)
    base = spec.build()
    params = list(base.parameters())
    inputs, targets = spec.batch()
    trainers: dict[str, Trainer] = {}
    for name, factory in contenders.items():
        model = copy.deepcopy(base)
        trainers[name] = Trainer(model, factory(list(model.parameters())))
    order = list(trainers.values())
    with gc_paused():
        for trainer in order:
            for _ in range(warmup):
                iterate(spec, trainer, inputs, targets)
            trainer.step.times.clear()
            trainer.iteration.times.clear()
        for r in range(rounds):
            shift = r % len(order)
            for trainer in [*order[shift:], *order[:shift]]:
                iterate(spec, trainer, inputs, targets)
    return LoopResult(spec, family, len(params), sum(p.numel() for p in params), trainers)


def params_of(result: LoopResult, contender: str) -> list[Tensor]:
    return [p.detach() for p in result.trainers[contender].model.parameters()]


def median_ratio(reference: Samples, ours: Samples) -> float:
    return reference.median / ours.median if ours.median > 0 else math.inf

"""bfloat16/float16 params without master copies or stochastic rounding: Adam, AdamW,
SGD, RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta, Rprop and ASGD step them in Rust
with torch's for-loop semantics (every op's result rounded to the param's dtype, scalars
converted as torch converts them), not on torch's path; Lion with ``lion_pytorch``'s,
Adan and AdEMAMix with ``pytorch_optimizer``'s (its per-parameter loop), the
Schedule-Free pair with ``schedulefree``'s.

* Every step, from the same values, ferroptim's Rust step equals
  ``torch.optim.X(foreach=False)`` on the same params bit for bit, except for the few
  elements at a tensor's end that torch computes with scalar 16-bit arithmetic (which
  also rounds intermediates: see :func:`_assert_as_torch`). Every flag combination,
  bfloat16 and float16, params wider than any SIMD width with ragged tails, a transposed
  param, a param without a grad.
* Hundreds of steps stay with torch's for-loop (not with its fused kernel, which rounds
  once: measurably elsewhere).
* The step ran in Rust; 1 and N threads and every SIMD level give the same bits;
  ``fused=True`` keeps torch's fused kernel.
"""

from __future__ import annotations

import itertools
from typing import Any

import ferroptim
import lion_pytorch
import pytest
import pytorch_optimizer
import schedulefree
import torch
from _kernels import kernel_calls
from torch import nn

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]

#: (ferroptim class, torch class, flag combinations)
ADAM_FLAGS = [
    {"weight_decay": wd, "amsgrad": ams, "maximize": mx}
    for wd, ams, mx in itertools.product([0.0, 0.1], [False, True], [False, True])
]
SGD_FLAGS = [
    {"momentum": m, "dampening": d, "nesterov": n, "weight_decay": wd, "maximize": mx}
    for m, d, n, wd, mx in itertools.product(
        [0.0, 0.9], [0.0, 0.1], [False, True], [0.0, 0.05], [False, True]
    )
    if not (n and (m == 0 or d != 0))  # torch: Nesterov needs momentum and no dampening
    and not (m == 0 and d != 0)
]
RMSPROP_FLAGS = [
    {"centered": c, "momentum": m, "weight_decay": wd, "maximize": mx}
    for c, m, wd, mx in itertools.product([False, True], [0.0, 0.9], [0.0, 0.1], [False, True])
]
ADAGRAD_FLAGS = [
    {"lr_decay": d, "weight_decay": wd, "initial_accumulator_value": a, "maximize": mx}
    for d, wd, a, mx in itertools.product([0.0, 0.01], [0.0, 0.1], [0.0, 0.1], [False, True])
]
ADAMAX_FLAGS = [
    {"weight_decay": wd, "maximize": mx} for wd, mx in itertools.product([0.0, 0.1], [False, True])
]
#: NAdam and RAdam: L2 or decoupled decay; RAdam's first steps are unrectified
#: (``rho_t <= 5`` until step 6), so 12 steps cover both branches.
DECAY_FLAGS = [
    {"weight_decay": wd, "decoupled_weight_decay": d, "maximize": mx}
    for wd, d, mx in itertools.product([0.0, 0.1], [False, True], [False, True])
    if not (d and wd == 0.0)
]
ADADELTA_FLAGS = [
    {"weight_decay": wd, "maximize": mx} for wd, mx in itertools.product([0.0, 0.1], [False, True])
]
#: Rprop: etas that bfloat16/float16 do not hold exactly (0.3, 1.7), and bounds that
#: clamp within the 12 steps.
RPROP_FLAGS = [
    {"etas": etas, "step_sizes": sizes, "maximize": mx}
    for etas, sizes, mx in itertools.product(
        [(0.5, 1.2), (0.3, 1.7)], [(1e-6, 50.0), (3e-3, 3e-2)], [False, True]
    )
]
#: ASGD: averaging from step 3 (t0) or never within the run; decay toward zero.
ASGD_FLAGS = [
    {"t0": t0, "lambd": 1e-2, "weight_decay": wd, "maximize": mx}
    for t0, wd, mx in itertools.product([3.0, 1e6], [0.0, 0.1], [False, True])
]
#: Lion (``lion_pytorch`` has no ``maximize``: ferroptim's negates the gradient, exact).
LION_FLAGS = [
    {"weight_decay": 0.0},
    {"weight_decay": 0.1, "betas": (0.8, 0.95)},
    {"weight_decay": 0.5, "decoupled_weight_decay": True},
]
#: Adan: no decay, the reference's divided decay (``p /= 1 + lr*wd``) or decoupled.
ADAN_FLAGS = [
    {"weight_decay": wd, "weight_decouple": d, "maximize": mx}
    for wd, d, mx in itertools.product([0.0, 0.02], [False, True], [False, True])
    if not (d and wd == 0.0)
]
#: AdEMAMix: L2, decoupled or fixed decay, and the alpha/beta3 warmup within the run.
ADEMAMIX_FLAGS = [
    {"weight_decay": 0.0},
    {"weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.1, "weight_decouple": True},
    {"weight_decay": 0.1, "weight_decouple": True, "fixed_decay": True, "maximize": True},
    {"t_alpha_beta3": 8.0, "alpha": 3.0},
]
#: Schedule-Free (no ``maximize`` in the reference): decay, and a warmup within the run.
SCHEDULEFREE_FLAGS = [
    {"weight_decay": wd, "warmup_steps": w} for wd, w in itertools.product([0.0, 0.1], [0, 5])
]
#: The optimizers torch.optim does not have, and the implementation each follows (the
#: pytorch-optimizer ones in their per-parameter loop; their foreach flavour rounds alike).
REFERENCES: dict[str, Any] = {
    "Lion": lion_pytorch.Lion,
    "Adan": pytorch_optimizer.Adan,
    "AdEMAMix": pytorch_optimizer.AdEMAMix,
    "ScheduleFreeAdamW": schedulefree.AdamWScheduleFree,
    "ScheduleFreeSGD": schedulefree.SGDScheduleFree,
}
#: Keywords that choose a reference's per-parameter loop.
PER_PARAM = {name: {"foreach": False} for name in REFERENCES if name != "Lion"}
CASES = [
    *[("Lion", {"lr": 1e-2, **f}) for f in LION_FLAGS],
    *[("Adan", {"lr": 1e-2, **f}) for f in ADAN_FLAGS],
    *[("AdEMAMix", {"lr": 1e-2, **f}) for f in ADEMAMIX_FLAGS],
    *[("ScheduleFreeAdamW", {"lr": 1e-2, **f}) for f in SCHEDULEFREE_FLAGS],
    *[("ScheduleFreeSGD", {"lr": 1e-2, **f}) for f in SCHEDULEFREE_FLAGS],
    *[("NAdam", {"lr": 1e-2, **f}) for f in DECAY_FLAGS],
    *[("RAdam", {"lr": 1e-2, **f}) for f in DECAY_FLAGS],
    *[("Adadelta", {"lr": 0.5, **f}) for f in ADADELTA_FLAGS],
    *[("Rprop", {"lr": 1e-2, **f}) for f in RPROP_FLAGS],
    *[("ASGD", {"lr": 1e-2, **f}) for f in ASGD_FLAGS],
    *[("Adamax", {"lr": 1e-2, **f}) for f in ADAMAX_FLAGS],
    *[("RMSprop", {"lr": 1e-2, **f}) for f in RMSPROP_FLAGS],
    *[("Adagrad", {"lr": 1e-1, **f}) for f in ADAGRAD_FLAGS],
    *[("Adam", {"lr": 1e-2, **f}) for f in ADAM_FLAGS],
    *[("AdamW", {"lr": 1e-2, **f}) for f in ADAM_FLAGS],
    *[("SGD", {"lr": 3e-2, **f}) for f in SGD_FLAGS],
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, kwargs = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items() if k != "lr")


class Params(nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.matrix = nn.Parameter(torch.randn(37, 129, generator=g).to(dtype))
        self.vector = nn.Parameter(torch.randn(4099, generator=g).to(dtype))
        self.small = nn.Parameter(torch.randn(3, generator=g).to(dtype))
        self.transposed = nn.Parameter(torch.randn(70, 33, generator=g).to(dtype).t())


def _pair(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[Any, ...]:
    """ferroptim's optimizer and its reference on two copies of the same params: torch's
    for-loop, or the implementation ferroptim's class follows (:data:`REFERENCES`)."""
    ours_model, torch_model = Params(dtype), Params(dtype)
    ours = getattr(ferroptim, name)(ours_model.parameters(), **kwargs)
    if name in REFERENCES:
        reference = REFERENCES[name]
        theirs = reference(torch_model.parameters(), **PER_PARAM.get(name, {}), **kwargs)
    else:
        theirs = getattr(torch.optim, name)(torch_model.parameters(), foreach=False, **kwargs)
    return ours_model, _training(ours), torch_model, _training(theirs)


def _training(optimizer: Any) -> Any:
    """The optimizer in train mode (Schedule-Free's ``train()``; the others have none)."""
    if hasattr(optimizer, "train"):
        optimizer.train()
    return optimizer


def _set_grads(models: list[nn.Module], step: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for named in zip(*(m.named_parameters() for m in models), strict=True):
        grad = torch.randn(named[0][1].shape, generator=g).to(dtype)
        for pname, p in named:
            p.grad = None if (pname == "small" and step % 4 == 3) else grad.clone()


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in the order they lie in memory."""
    return t.detach().as_strided((t.numel(),), (1,), t.storage_offset())


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise equality in memory order, NaN equal to NaN."""
    a, b = _memory_order(a), _memory_order(b)
    return (a == b) | (a.isnan() & b.isnan())


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values lie between a and b (16-bit floats)."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)  # sign-magnitude to a monotonic line
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return (ia - ib).abs()


#: The widest vector torch's CPU kernels step 16-bit floats in (AVX-512: 32 lanes).
TORCH_LANES = 32


def _assert_as_torch(got: torch.Tensor, want: torch.Tensor, what: str) -> int:
    """Bit for bit in the bulk of the tensor; returns how many elements differ.

    torch's elementwise kernels compute the bulk of a tensor vectorised: each op in
    float32, rounded once to the param's dtype, which is what ferroptim does. The last
    elements that do not fill a vector (under 32, at the end of memory: one chunk on one
    thread here) go through scalar bfloat16/float16 arithmetic, which rounds
    intermediates too (``grad.add(param, alpha=wd)`` rounds the product before the sum):
    those are free. In the bulk an element may differ where torch's float32 intermediate
    is an ulp from ours on an exact tie of the 16-bit rounding (vectorised math differs
    by CPU): at most 2 ulps, and rarely."""
    assert got.dtype == want.dtype and got.stride() == want.stride(), what
    n = got.numel()
    bulk = n - n % TORCH_LANES
    got, want = _memory_order(got), _memory_order(want)
    # (float16 Adam divides by an eps that float16 rounds to 0: NaN on both sides)
    apart = torch.where(got.isnan() & want.isnan(), 0, _ulps_apart(got, want))[:bulk]
    off = int((apart > 0).sum())
    worst = int(apart.max()) if bulk else 0
    assert worst <= 2, f"{what}: {worst} ulps apart in the bulk"
    assert off <= max(2, bulk // 5_000), f"{what}: {off} of {bulk} differ in the bulk"
    return off


def _set_grads_like_params(models: list[nn.Module], step: int, dtype: torch.dtype) -> None:
    """As :func:`_set_grads`, each grad laid out like its param: torch vectorises an op
    only over operands laid out alike (a transposed param with a contiguous grad steps
    entirely through the scalar path, rounding intermediates everywhere)."""
    _set_grads(models, step, dtype)
    for model in models:
        for p in model.parameters():
            if p.grad is not None:
                p.grad = torch.empty_like(p).copy_(p.grad)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_each_step_is_torch_for_loop_step(
    case: tuple[str, dict[str, Any]], dtype: torch.dtype
) -> None:
    name, kwargs = case
    ours_model, ours, torch_model, theirs = _pair(name, kwargs, dtype)
    off = 0
    with kernel_calls() as calls:
        for step in range(12):
            _set_grads_like_params([ours_model, torch_model], step, dtype)
            ours.step()
            theirs.step()
            pairs = zip(ours_model.named_parameters(), torch_model.parameters(), strict=True)
            for (pname, p), q in pairs:
                off += _assert_as_torch(p, q, f"step {step}: {pname}")
                for key, value in theirs.state[q].items():
                    if key == "step":
                        assert float(ours.state[p][key]) == float(value)
                        continue
                    got = ours.state[p][key]
                    off += _assert_as_torch(got, value, f"step {step}: {pname}.{key}")
                    with torch.no_grad():
                        got.copy_(value)  # the next step starts from the same values
                with torch.no_grad():
                    p.copy_(q)
    assert sum(calls.values()) == 12, "the low-precision params did not step in Rust"
    total = sum(p.numel() for p in ours_model.parameters()) * 12
    assert off <= max(4, total // 20_000), f"{off} of {total} param elements-steps differ"


@pytest.mark.parametrize("dtype", LOW)
# (every optimizer of CASES with a foreach or fused flavour: all but Lion)
@pytest.mark.parametrize("name", sorted({name for name, _ in CASES} - {"Lion"}))
def test_hundreds_of_steps_stay_with_torch_for_loop(name: str, dtype: torch.dtype) -> None:
    """A trajectory: ferroptim keeps to torch's for-loop (Adan, AdEMAMix: the reference's
    per-parameter loop), far closer than torch's fused kernel (float32 math, one
    rounding; the optimizers without one are compared with their foreach, which rounds
    as the for-loop does) does."""
    kwargs: dict[str, Any] = {"lr": 1e-2} if name == "Rprop" else {"lr": 1e-2, "weight_decay": 0.01}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    ours_model, ours, torch_model, theirs = _pair(name, kwargs, dtype)
    other_model = Params(dtype)
    has_fused = name in ("Adam", "AdamW", "SGD", "Adagrad")
    flavour = {"fused": True} if has_fused else {"foreach": True}
    other_class = REFERENCES.get(name) or getattr(torch.optim, name)
    other = _training(other_class(other_model.parameters(), **flavour, **kwargs))
    for step in range(300):
        _set_grads_like_params([ours_model, torch_model, other_model], step, dtype)
        ours.step()
        theirs.step()
        other.step()
    for p, q, f in zip(
        ours_model.parameters(), torch_model.parameters(), other_model.parameters(), strict=True
    ):
        bulk = p.numel() - p.numel() % TORCH_LANES
        if bulk == 0:
            continue
        ours_same = _same(p, q)[:bulk].float().mean().item()
        other_same = _same(f, q)[:bulk].float().mean().item()
        assert ours_same > 0.995, f"{ours_same:.4f} of the elements agree with torch's for-loop"
        if "fused" in flavour:
            assert ours_same > other_same


@pytest.mark.parametrize("dtype", LOW)
def test_threads_and_simd_levels_give_the_same_bits(
    dtype: torch.dtype, simd_levels: list[str]
) -> None:
    runs = []
    for threads, level in [(1, simd_levels[-1]), (ferroptim.max_num_threads(), simd_levels[0])]:
        ferroptim.set_num_threads(threads)  # (the autouse fixture restores both)
        ferroptim.set_simd_level(level)
        model = Params(dtype)
        opt = ferroptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
        for step in range(6):
            _set_grads([model], step, dtype)
            opt.step()
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def test_fused_true_keeps_torch_fused_kernel() -> None:
    """``fused=True`` on bfloat16 params: torch's fused kernel (float32 math, rounded
    once), bit for bit, not the for-loop's per-op rounding."""
    ours_model, torch_model = Params(torch.bfloat16), Params(torch.bfloat16)
    ours = ferroptim.AdamW(ours_model.parameters(), lr=1e-2, fused=True)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, fused=True)
    with kernel_calls() as calls:
        for step in range(5):
            _set_grads_like_params([ours_model, torch_model], step, torch.bfloat16)
            ours.step()
            theirs.step()
    assert sum(calls.values()) == 0
    for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(p, q)

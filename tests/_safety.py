"""Twins for the memory-safety tests: a ferroptim optimizer and its torch.optim reference
on identical params, fed identical gradients, with the same mutation applied to both.

Shared by ``test_safety.py`` (deterministic attack cases) and ``test_safety_stateful.py``
(hypothesis state machine). Comparisons are on the bytes of every param, grad and state
tensor (logical values: a lazily negated / conjugated tensor is resolved first), so a
write outside a tensor or a wrong sign cannot hide under a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from conftest import FAMILIES, TOLERANCES, Family, ferroptim

#: The families under attack, with kwargs under which every state buffer exists.
SAFETY_FAMILIES: dict[str, dict[str, Any]] = {
    "Adam": {"amsgrad": True},
    "AdamW": {"weight_decay": 0.05},
    "SGD": {"momentum": 0.9, "weight_decay": 0.01},
    "RMSprop": {"momentum": 0.5, "centered": True},
    "Adagrad": {"initial_accumulator_value": 0.1, "lr_decay": 0.01},
    "Adamax": {"weight_decay": 0.05},
    "NAdam": {"weight_decay": 0.05, "decoupled_weight_decay": True},
    "Lion": {"weight_decay": 0.05, "decoupled_weight_decay": True},
    "AdEMAMix": {"weight_decay": 0.05, "weight_decouple": True, "t_alpha_beta3": 10.0},
    "Adan": {"weight_decay": 0.05},
    "ScheduleFreeAdamW": {"weight_decay": 0.05, "warmup_steps": 5, "r": 0.5},
    "ScheduleFreeSGD": {"weight_decay": 0.05, "warmup_steps": 5, "momentum": 0.5},
    "RAdam": {"weight_decay": 0.05, "decoupled_weight_decay": True},
    "Adadelta": {"weight_decay": 0.05},
    "Rprop": {"etas": (0.4, 1.3), "step_sizes": (1e-5, 1.0)},
    "ASGD": {"weight_decay": 0.05, "t0": 1.0, "lambd": 0.01},
}


def family_kwargs(name: str) -> dict[str, Any]:
    return {"lr": 0.01, **SAFETY_FAMILIES[name]}


def buffer_keys(name: str) -> tuple[str, ...]:
    """The family's state buffers (without the step counter and other per-tensor scalar
    state) under its safety kwargs."""
    family = FAMILIES[name]
    group = {**family.make_torch([torch.zeros(1)], **family_kwargs(name)).defaults}
    return tuple(k for k in family.state_keys(group) if k not in family.scalar_state)


def logical_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``'s logical values (lazy neg/conj bits resolved), row-major."""
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A copy of every byte of ``t``'s storage, read only within the storage's own size
    (safe even for a tensor whose storage was resized under it)."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage).clone()


@dataclass
class Twin:
    """One side: its params, its optimizer and, for ferroptim, its slow-path calls."""

    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    is_ferro: bool
    slow_calls: list[int] = field(default_factory=lambda: [0])
    #: Tensors a mutation must keep alive (a swapped-out param, a freed-and-reused block).
    keep: list[Any] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a step may touch: params, grads, state tensors."""
        out: list[torch.Tensor] = []
        for p in self.params:
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
            out.extend(v for v in self.opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))
        return out

    def storage_snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(t, storage_bytes(t)) for t in self.tensors()]


def make_params(shapes: list[tuple[tuple[int, ...], torch.dtype]], seed: int) -> list[Any]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=d)) for s, d in shapes]


def make_twins(
    name: str, groups: list[list[tuple[tuple[int, ...], torch.dtype]]], seed: int = 0
) -> tuple[Twin, Twin]:
    """Twins over identical params, one param group per entry of ``groups``."""
    family: Family = FAMILIES[name]
    shapes = [s for g in groups for s in g]
    fparams, tparams = make_params(shapes, seed), make_params(shapes, seed)

    def grouped(params: list[Any]) -> list[dict[str, Any]]:
        out, start = [], 0
        for g in groups:
            out.append({"params": params[start : start + len(g)]})
            start += len(g)
        return out

    ferro = Twin(fparams, family.make_ferro(grouped(fparams), **family_kwargs(name)), True)
    ref = Twin(tparams, family.make_torch(grouped(tparams), **family_kwargs(name)), False)
    # Count slow-path preparations of the first group: a step that makes none ran on
    # its cached plan.
    original = ferro.opt._prepare_slow
    calls = ferro.slow_calls
    first = ferro.opt.param_groups[0]

    def spy(group: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if group is first:
            calls[0] += 1
        return original(group, *args, **kwargs)

    ferro.opt._prepare_slow = spy  # type: ignore[method-assign]
    return ferro, ref


def fresh_grads(
    params: list[torch.nn.Parameter], gen: torch.Generator
) -> list[torch.Tensor | None]:
    """A random gradient of each param's current shape and dtype."""
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def assign(twin: Twin, grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(twin.params, grads, strict=True):
        p.grad = None if g is None else g.clone()


def step(twin: Twin) -> BaseException | None:
    try:
        twin.opt.step()
    except Exception as exc:
        return exc
    return None


def _outside_extent(t: torch.Tensor) -> torch.Tensor:
    """Boolean mask over the bytes of ``t``'s storage: True where ``t`` does not reach."""
    nbytes = t.untyped_storage().nbytes()
    item = t.element_size()
    mask = torch.ones(nbytes, dtype=torch.bool)
    if t.numel():
        elements = torch.arange(nbytes // item).as_strided(t.shape, t.stride(), t.storage_offset())
        mask[(elements.reshape(-1, 1) * item + torch.arange(item)).reshape(-1)] = False
    return mask


def assert_outside_unchanged(before: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    """After a successful step: no byte of any storage outside its tensor changed (a write
    through a stale length, offset or stride would land there)."""
    for i, (t, data) in enumerate(before):
        now = storage_bytes(t)
        assert now.numel() == data.numel(), f"{what}: tensor {i}'s storage was resized"
        outside = _outside_extent(t)
        assert torch.equal(now[outside], data[outside]), (
            f"{what}: tensor {i} {tuple(t.shape)}: bytes outside the tensor were written"
        )


def grad_bytes(twin: Twin) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The bytes of every grad that is not its param's own memory (one that is, is
    stepped with it, as in torch)."""
    return [
        (p.grad, logical_bytes(p.grad))
        for p in twin.params
        if p.grad is not None
        and p.grad.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    ]


def assert_grads_untouched(before: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for i, (g, data) in enumerate(before):
        assert torch.equal(logical_bytes(g), data), f"grad {i} {tuple(g.shape)} was written"


def assert_storages_unchanged(before: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    for i, (t, data) in enumerate(before):
        assert torch.equal(storage_bytes(t), data), f"{what}: tensor {i} written by a failing step"


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.stride() == b.stride(), f"{what}: strides {a.stride()} != {b.stride()}"
    if not torch.equal(logical_bytes(a), logical_bytes(b)):
        diff = a.detach().resolve_conj().resolve_neg() - b.detach().resolve_conj().resolve_neg()
        raise AssertionError(f"{what}: not byte-equal (max abs diff {diff.abs().max().item():g})")


def _close(
    a: torch.Tensor, b: torch.Tensor, what: str, tolerance: dict[str, float], strides: bool = True
) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert not strides or a.stride() == b.stride(), f"{what}: strides {a.stride()} != {b.stride()}"
    if a.dtype not in TOLERANCES:
        _same(a, b, what)
        return
    torch.testing.assert_close(
        a.detach().resolve_conj().resolve_neg(),
        b.detach().resolve_conj().resolve_neg(),
        **tolerance,
        msg=lambda m: f"{what}: {m}",
    )


def assert_twins_equal(
    ferro: Twin, ref: Twin, *, exact: bool = False, tolerance_scale: float = 1.0
) -> None:
    """Params, grads and every state entry equal. Grads and step counters are compared
    byte for byte (neither implementation may touch a grad); params and state buffers
    within the dtype's tolerance (DESIGN's contract 2: ferroptim rounds correctly where
    torch's for-loop may be an ulp off), or byte for byte if ``exact``."""

    def compare(a: torch.Tensor, b: torch.Tensor, what: str, strides: bool = True) -> None:
        if exact:
            _same(a, b, what)
        else:
            tolerance = {k: v * tolerance_scale for k, v in TOLERANCES.get(b.dtype, {}).items()}
            _close(a, b, what, tolerance, strides)

    for i, (pf, pt) in enumerate(zip(ferro.params, ref.params, strict=True)):
        what = f"param {i} {tuple(pt.shape)}"
        compare(pf, pt, what)
        assert (pf.grad is None) == (pt.grad is None), f"{what}: grad presence"
        if pt.grad is not None:
            # (a grad may hold values derived from the param: see grads_untouched for the
            # byte-for-byte check that a step never writes one)
            compare(pf.grad, pt.grad, f"{what} grad")
        sf, st = ferro.opt.state.get(pf, {}), ref.opt.state.get(pt, {})
        assert set(sf) == set(st), f"{what}: state keys {sorted(sf)} != {sorted(st)}"
        for key, vt in st.items():
            vf = sf[key]
            if isinstance(vt, torch.Tensor):
                assert isinstance(vf, torch.Tensor), f"{what} state[{key!r}] not a tensor"
                if key == "step":
                    # By value: ferroptim turns a step counter it cannot step in place (an
                    # int32 tensor, say) into torch's float32 scalar; torch keeps the dtype.
                    # (counted in float32, as torch counts its own)
                    expected = float(vt) if vt.is_floating_point() else float(vt.float())
                    assert float(vf) == expected, f"{what} step {float(vf)} != {expected}"
                    assert vf.dtype == vt.dtype or not vt.is_floating_point(), what
                else:
                    # Values, not strides: ferroptim re-lays its own state out like the
                    # param once (a param transposed under it, say); torch keeps it.
                    compare(vf, vt, f"{what} state[{key!r}]", strides=False)
            else:
                assert vf == vt, f"{what} state[{key!r}]: {vf!r} != {vt!r}"
    for gf, gt in zip(ferro.opt.param_groups, ref.opt.param_groups, strict=True):
        assert gf["lr"] == gt["lr"]


def resync(ref: Twin, ferro: Twin) -> None:
    """After both raised: torch's for-loop wrote the params and state it reached before
    its error, ferroptim wrote nothing. Copies ferroptim's (untouched) params and state
    into torch's twin, so later steps compare from the same point."""
    with torch.no_grad():
        for pf, pt in zip(ferro.params, ref.params, strict=True):
            if pf.shape == pt.shape and pf.dtype == pt.dtype:
                pt.copy_(pf)
            ref.opt.state.pop(pt, None)
            if pf in ferro.opt.state:
                ref.opt.state[pt] = {
                    k: v.clone() if isinstance(v, torch.Tensor) else v
                    for k, v in ferro.opt.state[pf].items()
                }


def same_error_type(ferro_error: BaseException, torch_error: BaseException) -> None:
    assert isinstance(ferro_error, type(torch_error)), (
        f"torch raises {type(torch_error).__name__}({torch_error}); "
        f"ferroptim {type(ferro_error).__name__}({ferro_error})"
    )


__all__ = ["ferroptim"]

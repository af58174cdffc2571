"""Memory safety of the cached plan (issue 8, section 1).

Each case trains a ferroptim optimizer and its torch.optim twin (for-loop reference,
float64, identical params and grads) for a few steps, so ferroptim's cached plan is
active, then applies the same adversarial mutation to both and steps several more times.
After every step: params, grads and every state tensor are byte-equal, or both raised
the same kind of error and ferroptim wrote nothing (every byte of every storage it can
reach is compared). Where torch itself corrupts the heap or segfaults (a storage resized
under a tensor), torch is not run: ferroptim must refuse with a RuntimeError and write
nothing, and once the tensor is whole again, both step identically.

Every case runs twice: with the cached plan's native re-check, and with it disabled
(``_core._native_recheck(disable=True)``: every step takes the slow path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from _safety import (
    SAFETY_FAMILIES,
    Twin,
    assert_grads_untouched,
    assert_outside_unchanged,
    assert_storages_unchanged,
    assert_twins_equal,
    assign,
    buffer_keys,
    fresh_grads,
    grad_bytes,
    make_twins,
    resync,
    same_error_type,
    step,
)
from conftest import FAMILIES, ferroptim

F64, C128 = torch.float64, torch.complex128

#: The params of every case: ragged lengths, a 2-d rectangle and a square (for
#: transposes) in the first group, whose plan is cached; a complex param and two
#: zero-size params (they must step like torch) in a second group: ferroptim never caches
#: a plan for a group holding those, so the first group's plan stays measurable.
GROUPS: list[list[tuple[tuple[int, ...], torch.dtype]]] = [
    [
        ((1000,), F64),  # V
        ((1000, 4), F64),  # M
        ((33, 7), F64),  # R
        ((16, 16), F64),  # S
        ((37,), F64),  # T
    ],
    [
        ((64,), C128),  # C
        ((0,), F64),  # Z
        ((3, 0), F64),  # Z2
    ],
]
V, M, R, S, T, C, Z, Z2 = range(sum(map(len, GROUPS)))

WARM_STEPS = 3
AFTER_STEPS = 4

#: A mutation: ``(twin, k)`` with k the index of the step after the mutation point; it
#: runs after that step's fresh grads were assigned. Grad mutations act on even k (the
#: plan is re-built on the odd steps in between), param/state mutations once (k == 0).
Mutate = Callable[[Twin, int], None]


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Mutate
    #: "torch": outcome must equal torch's; "refuse": torch would corrupt memory (or, for
    #: a grad aliasing a state buffer, reads it mid-update: ferroptim refuses by design):
    #: ferroptim raises a RuntimeError and writes nothing, torch is not run on that step.
    expect: str = "torch"
    #: Whether the re-check must reject the cached plan at the mutation (a step with a
    #: slow-path preparation, or an error).
    invalidates: bool = True
    #: ``(k) -> bool``: steps on which ``expect`` applies (others compare with torch).
    broken_on: Callable[[int], bool] = lambda k: True
    #: What the torch twin gets instead of ``mutate`` (default: the same), where torch
    #: refuses an input ferroptim steps: the lazily conjugated complex grads/params that
    #: torch's ``view_as_real`` rejects are stepped by ferroptim as if resolved.
    torch_mutate: Mutate | None = None
    #: ``(torch's, ferroptim's)``: a known difference in exception type.
    other_error: tuple[type, type] | None = None


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _once(fn: Callable[[Twin], None]) -> Mutate:
    return lambda twin, k: fn(twin) if k == 0 else None


def _even(fn: Callable[[Twin, int], None]) -> Mutate:
    return lambda twin, k: fn(twin, k) if k % 2 == 0 else None


#: Sizes the ferroptim twin's re-allocations picked (the torch twin allocates the same),
#: and how often the freed address was hit (``ADDRESS_HITS[True]``).
_PICKED: list[int] = []
ADDRESS_HITS: dict[bool, int] = {True: 0, False: 0}


def _smaller_at_same_address(address: int, n: int, dtype: torch.dtype, twin: Twin) -> torch.Tensor:
    """After a tensor of ``n`` elements at ``address`` was freed, allocates smaller tensors
    until one lands at that address (the heap-overflow attack); returns the last one
    tried. Whether the address was hit or not, the step must not write outside it."""
    if twin.is_ferro:
        candidate = torch.empty(0, dtype=dtype)
        for size in (n - 1, n // 2, n - 8, n // 4, 100, 3 * n // 4, 10):
            candidate = torch.empty(size, dtype=dtype)
            if candidate.data_ptr() == address:
                break
            twin.keep.append(candidate)  # keep misses alive so the next try is elsewhere
        ADDRESS_HITS[candidate.data_ptr() == address] += 1
        _PICKED.append(candidate.numel())
    else:
        candidate = torch.empty(_PICKED.pop(), dtype=dtype)
    candidate.copy_(torch.linspace(-1, 1, candidate.numel(), dtype=dtype))
    return candidate


def _param_data(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Twin], None]:
    def mutate(twin: Twin) -> None:
        twin.params[V].data = fn(twin.params[V].data)

    return mutate


def _param_empty_then_smaller(twin: Twin) -> None:
    p = twin.params[V]
    address, n = p.data_ptr(), p.numel()
    p.data = torch.empty(0, dtype=p.dtype)  # frees the param's storage
    p.data = _smaller_at_same_address(address, n, p.dtype, twin)


def _state_empty_then_smaller(key: str) -> Callable[[Twin], None]:
    def mutate(twin: Twin) -> None:
        buf = twin.opt.state[twin.params[V]][key]
        address, n = buf.data_ptr(), buf.numel()
        buf.data = torch.empty(0, dtype=buf.dtype)  # frees the buffer's storage
        buf.data = _smaller_at_same_address(address, n, buf.dtype, twin)

    return mutate


def _state(key: str, fn: Callable[[torch.Tensor], torch.Tensor], index: int = V) -> Mutate:
    def mutate(twin: Twin) -> None:
        buf = twin.opt.state[twin.params[index]][key]
        buf.data = fn(buf.data)

    return _once(mutate)


def _grad_data_overlapping(twin: Twin, k: int) -> None:
    # (4, 1000) with strides (4, 1) over 1012 floats: the (1000, 4) param's strides and
    # byte count, but a storage a quarter of the size.
    x = torch.randn(1012, generator=_seeded(k), dtype=F64).as_strided((4, 1000), (4, 1))
    twin.params[M].grad.data = x


def _resize(target: str, nbytes: int) -> Mutate:
    def mutate(twin: Twin, k: int) -> None:
        p = twin.params[V]
        t = {"param": p, "grad": p.grad}.get(target)
        if t is None:
            t = twin.opt.state[p][target]
        t.untyped_storage().resize_(nbytes)

    # A resized grad is replaced by the next step's fresh grad: broken on even steps only.
    if target == "grad":
        return _even(mutate)
    return lambda twin, k: mutate(twin, k) if k == 0 else None


def _neg_grad(twin: Twin, k: int) -> None:
    for i in (V, M, C):
        g = twin.params[i].grad
        twin.params[i].grad = torch._neg_view(g.neg())  # same values, lazily negated
        assert twin.params[i].grad.is_neg()


def _conj_imag_grad(twin: Twin, k: int) -> None:
    for i in (V, R):
        g = twin.params[i].grad
        z = torch.complex(torch.zeros_like(g), -g)
        twin.params[i].grad = z.conj().imag  # == g, carrying the negation bit
        assert twin.params[i].grad.is_neg()


def _conj_grad(twin: Twin, k: int) -> None:
    g = twin.params[C].grad
    twin.params[C].grad = g.conj().resolve_conj().conj()  # == g, carrying the conj bit
    assert twin.params[C].grad.is_conj()


def _conj_param(twin: Twin) -> None:
    p = twin.params[C]
    p.data = p.data.conj().resolve_conj().conj()
    assert p.is_conj()


def _neg_param(twin: Twin) -> None:
    for i in (V, S):
        p = twin.params[i]
        p.data = torch._neg_view(p.data.clone())
        assert p.is_neg()


def _swap(index: int, shape: tuple[int, ...]) -> Mutate:
    def mutate(twin: Twin) -> None:
        other = torch.nn.Parameter(torch.randn(shape, generator=_seeded(7), dtype=F64))
        torch.utils.swap_tensors(twin.params[index], other)
        twin.keep.append(other)
        assert twin.params[index].grad is None  # the grad moved with the old tensor

    return _once(mutate)


def _transpose(index: int) -> Mutate:
    def mutate(twin: Twin) -> None:
        p = twin.params[index]
        p.data = p.data.t()

    return _once(mutate)


def _noncontiguous_grads(twin: Twin, k: int) -> None:
    gen = _seeded(100 + k)
    twin.params[V].grad = torch.randn(2000, generator=gen, dtype=F64)[::2]
    twin.params[R].grad = torch.randn(33, 14, generator=gen, dtype=F64)[:, 1::2]
    twin.params[M].grad = torch.randn(4, 1000, generator=gen, dtype=F64).t()
    twin.params[S].grad = torch.randn(16, 16, generator=gen, dtype=F64).t()


def _grad_is_param(twin: Twin, k: int) -> None:
    twin.params[V].grad = twin.params[V].detach()
    twin.params[T].grad = twin.params[T].detach()[:]


def _grad_is_staged_param(layout: str) -> Mutate:
    """A grad that is its param's memory, where the param is stepped in a staged copy
    (lazily negated, or with gaps in memory): torch's AdamW decays the param, hence the
    grad, before reading it."""

    def mutate(twin: Twin, k: int) -> None:
        p = twin.params[R]
        if k == 0:
            if layout == "neg":
                p.data = torch._neg_view(p.data.clone())
            else:
                wide = torch.zeros(33, 14, dtype=F64)
                p.data = wide[:, ::2].copy_(p.data)
        if k % 2 == 0:
            p.grad = p.detach()

    return mutate


def _grad_is_state(key: str) -> Mutate:
    def mutate(twin: Twin, k: int) -> None:
        p = twin.params[V]
        p.grad = twin.opt.state[p][key]

    return _even(mutate)


def cases(family: str) -> list[Case]:
    keys = buffer_keys(family)
    out = [
        Case("zero-size-params", lambda twin, k: None, invalidates=False),
        Case("param-data-empty", _once(_param_data(lambda d: torch.empty(0, dtype=F64)))),
        Case("param-data-empty-then-smaller-same-address", _once(_param_empty_then_smaller)),
        Case("param-data-prefix", _once(_param_data(lambda d: d[:100]))),
        Case("grad-data-overlapping-4x1000", _even(_grad_data_overlapping)),
        Case("grad-neg-view", _even(_neg_grad)),
        Case("grad-conj-imag", _even(_conj_imag_grad)),
        # (the complex param's group never has a cached plan: nothing to invalidate)
        Case(
            "grad-conj-bit-complex",
            _even(_conj_grad),
            invalidates=False,
            torch_mutate=lambda twin, k: None,  # the same values, resolved
        ),
        Case(
            "param-conj-bit-complex",
            _once(_conj_param),
            invalidates=False,
            torch_mutate=lambda twin, k: None,  # the same values, resolved
        ),
        Case("param-neg-view", _once(_neg_param)),
        Case("swap-tensors-same-shape", _swap(V, (1000,))),
        Case("swap-tensors-other-shape", _swap(V, (500,))),
        Case("param-transposed-rect", _transpose(R)),
        Case("param-transposed-square", _transpose(S)),
        Case("grad-noncontiguous", _even(_noncontiguous_grads)),
        Case("grad-is-param", _even(_grad_is_param)),
        Case("grad-is-param-neg-view", _grad_is_staged_param("neg")),
        Case("grad-is-param-with-gaps", _grad_is_staged_param("gaps")),
    ]
    for target in ("param", "grad", *keys):
        for nbytes in (8, 0):
            out.append(
                Case(
                    f"resize-{target}-storage-{nbytes}",
                    _resize(target, nbytes),
                    expect="refuse",
                    broken_on=(lambda k: k % 2 == 0) if target == "grad" else (lambda k: True),
                )
            )
    for key in keys:
        out += [
            Case(f"state-{key}-prefix", _state(key, lambda d: d[:100])),
            Case(
                f"state-{key}-empty-then-smaller-same-address",
                _once(_state_empty_then_smaller(key)),
            ),
            Case(f"state-{key}-as-int32", _state(key, lambda d: d.view(torch.int32))),
            Case(f"state-{key}-as-float32", _state(key, lambda d: d.view(torch.float32))),
            Case(
                f"state-{key}-complex-as-float64",
                _state(key, lambda d: torch.view_as_real(d), C),
                invalidates=False,
                # torch's error is a TypeError where it calls view_as_real on the real
                # buffer (Adam, RMSprop, Adagrad), ferroptim's a RuntimeError.
                other_error=(TypeError, RuntimeError),
            ),
            Case(
                f"grad-is-state-{key}",
                _grad_is_state(key),
                expect="refuse",
                broken_on=lambda k: k % 2 == 0,
            ),
        ]
    if FAMILIES[family].has_step:
        for key in FAMILIES[family].scalar_state:  # step, NAdam's mu_product
            out.append(Case(f"state-{key}-as-int32", _state(key, lambda d: d.view(torch.int32))))
    return out


CASES = [
    pytest.param(family, case, id=f"{family}-{case.name}")
    for family in SAFETY_FAMILIES
    for case in cases(family)
]


@pytest.fixture(params=["native-recheck", "slow-path-only"])
def recheck(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Runs a test with the cached plan's native re-check, then with it disabled."""
    native = request.param == "native-recheck"
    assert ferroptim._core._native_recheck(disable=not native) is native, (
        "torch's tensor layout was not recognised: cached plans would never be used"
    )
    try:
        yield native
    finally:
        ferroptim._core._native_recheck(disable=False)


def _step_twins(
    ferro: Twin, ref: Twin, *, run_torch: bool
) -> tuple[BaseException | None, BaseException | None]:
    before, grads = ferro.storage_snapshot(), grad_bytes(ferro)
    ferror = step(ferro)
    if ferror is not None:
        assert_storages_unchanged(before, f"ferroptim ({type(ferror).__name__}: {ferror})")
    else:
        assert_outside_unchanged(before, "ferroptim")
        assert_grads_untouched(grads)
    return ferror, (step(ref) if run_torch else None)


@pytest.mark.parametrize(("family", "case"), CASES)
def test_mutation_between_steps(family: str, case: Case, recheck: bool) -> None:
    ferro, ref = make_twins(family, GROUPS)
    gen = torch.Generator().manual_seed(1)
    for _ in range(WARM_STEPS):
        grads = fresh_grads(ferro.params, gen)
        assign(ferro, grads)
        assign(ref, grads)
        slow_before = ferro.slow_calls[0]
        ferror, terror = _step_twins(ferro, ref, run_torch=True)
        assert ferror is None and terror is None, (ferror, terror)
        assert_twins_equal(ferro, ref)
    # The first group's last warm step ran on its cached plan (re-check disabled: on the
    # slow path).
    assert ferro.slow_calls[0] == slow_before + (0 if recheck else 1)

    for k in range(AFTER_STEPS):
        grads = fresh_grads(ferro.params, gen)
        assign(ferro, grads)
        assign(ref, grads)
        case.mutate(ferro, k)
        (case.torch_mutate or case.mutate)(ref, k)
        slow_before = ferro.slow_calls[0]
        broken = case.expect == "refuse" and case.broken_on(k)
        ferror, terror = _step_twins(ferro, ref, run_torch=not broken)
        if k == 0 and case.invalidates:
            assert ferror is not None or ferro.slow_calls[0] > slow_before, (
                "the cached plan was used after the mutation"
            )
        if broken:
            assert isinstance(ferror, RuntimeError), f"ferroptim did not refuse: {ferror!r}"
            continue
        if terror is not None:
            assert ferror is not None, f"torch raises {terror!r}; ferroptim stepped"
            if case.other_error is not None and isinstance(terror, case.other_error[0]):
                assert isinstance(ferror, case.other_error[1]), repr(ferror)
            else:
                same_error_type(ferror, terror)
            resync(ref, ferro)
            continue
        assert ferror is None, f"torch steps; ferroptim raised {ferror!r}"
        assert_twins_equal(ferro, ref)


#: valgrind replaces malloc: a freed block is not handed out again at once.
_UNDER_VALGRIND = "vgpreload" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.parametrize("target", ["param", "state"])
@pytest.mark.parametrize("family", list(SAFETY_FAMILIES))
def test_reallocation_at_the_freed_address(family: str, target: str) -> None:
    """The heap-overflow attack proper: repeated until the smaller tensor lands at the freed
    address of the planned param (or state buffer) — every try must end in torch's error
    with nothing written, or torch's result. Whether the allocator hands the address out
    again depends on its state (it usually does within a few tries, not always): the
    deterministic form of the attack is ``test_smaller_storage_at_the_same_address``."""
    key = buffer_keys(family)[0]
    mutate = _param_empty_then_smaller if target == "param" else _state_empty_then_smaller(key)
    hits_before = ADDRESS_HITS[True]
    for attempt in range(40):
        case = Case(f"{target}-realloc", _once(mutate))
        test_mutation_between_steps(family, case, True)
        if ADDRESS_HITS[True] > hits_before and attempt >= 3:
            break


def _param_moved_then_shrunk_in_place(twin: Twin, k: int) -> None:
    """The heap-overflow attack made deterministic: at k=0 the param moves into a Python
    buffer (and the next step plans it there); at k=1 a new, smaller storage over the same
    bytes replaces it — same address, fewer bytes, another storage object."""
    p = twin.params[V]
    if k == 0:
        memory = bytearray(p.element_size() * p.numel())
        twin.keep.append(memory)
        p.data = torch.frombuffer(memory, dtype=p.dtype).view(p.shape).copy_(p.data)
    elif k == 1:
        memory = next(m for m in reversed(twin.keep) if isinstance(m, bytearray))
        smaller = memoryview(memory)[: p.element_size() * (p.numel() // 2)]
        p.data = torch.frombuffer(smaller, dtype=p.dtype)
        assert p.data_ptr() == torch.frombuffer(memory, dtype=p.dtype).data_ptr()


@pytest.mark.parametrize("family", list(SAFETY_FAMILIES))
def test_smaller_storage_at_the_same_address(family: str, recheck: bool) -> None:
    case = Case("param-smaller-storage-same-address", _param_moved_then_shrunk_in_place)
    test_mutation_between_steps(family, case, recheck)


@pytest.mark.xfail(
    strict=True,
    reason="known difference (not memory safety): torch's Adagrad and momentum-free SGD "
    "refuse a grad that crosses its param (same memory, other strides: internal overlap "
    "in param.addcdiv_/add_); ferroptim reads a copy of the grad and steps",
)
@pytest.mark.parametrize("family", ["Adagrad"])
def test_grad_crossing_its_param(family: str) -> None:
    case = Case(
        "grad-crossing-param",
        _once(lambda t: setattr(t.params[S], "grad", t.params[S].detach().t())),
    )
    test_mutation_between_steps(family, case, True)

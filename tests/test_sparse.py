"""Sparse gradients (``nn.Embedding(sparse=True)``).

SGD and Adagrad support them in torch: ferroptim hands sparse-grad params to torch's own
implementation and must give torch's results, while the dense params of the same group
still step in Rust. Optimizers without sparse support (RMSprop, Adam) raise torch's error
before writing anything; so does Adagrad with weight decay (torch: "weight_decay option is
not compatible with sparse gradients").
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FAMILIES, assert_unchanged, ferroptim, rust_calls, snapshot, tol

STEPS = 60
F32 = tol(torch.float32)


class Model(torch.nn.Module):
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(1000, 16, sparse=True, dtype=dtype)
        self.lin = torch.nn.Linear(16, 4, dtype=dtype)
        self.bias = torch.nn.Parameter(torch.zeros(4, dtype=dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(self.emb(idx).mean(1))) + self.bias


def batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    # Few distinct rows per batch, with repeats: uncoalesced sparse grads, rows that get
    # no gradient for many steps.
    return [
        (
            torch.randint(0, 1000, (8, 5), generator=gen),
            torch.randn(8, 4, generator=gen, dtype=dtype),
        )
        for _ in range(n)
    ]


def train(factory, groups_of, dtype=torch.float32, steps=STEPS):
    model = Model(dtype=dtype)
    opt = factory(groups_of(model))
    losses = []
    for idx, y in batches(steps, dtype):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(idx), y)
        loss.backward()
        assert model.emb.weight.grad.is_sparse
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def one_group(model):
    return model.parameters()


def split_groups(model):
    return [
        {"params": [model.emb.weight, model.lin.weight]},
        {"params": [model.lin.bias, model.bias], "lr": 0.05},
    ]


#: Every registry configuration whose sparse gradients torch steps (``sparse_cases``).
SPARSE_CASES = [
    pytest.param(name, kwargs, id=case)
    for name, family in FAMILIES.items()
    for case, kwargs in family.sparse_cases.items()
]


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("groups_of", [one_group, split_groups], ids=["one-group", "two-groups"])
@pytest.mark.parametrize(("family", "kwargs"), SPARSE_CASES)
def test_sparse_embedding_matches_torch(family, kwargs, groups_of, dtype):
    """An embedding with sparse grads and dense params in the same group: torch's numbers
    for both, the dense ones stepped by the Rust kernel."""
    family = FAMILIES[family]
    with rust_calls() as calls:
        fm, fo, fl = train(lambda g: family.make_ferro(g, **kwargs), groups_of, dtype)
    tm, to, tl = train(lambda g: family.make_torch(g, **kwargs), groups_of, dtype)
    kernel = f"{family.name.lower()}_step"
    assert calls[kernel] >= STEPS, f"the dense params did not step in Rust: {dict(calls)}"
    assert fl == pytest.approx(tl, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(fm.named_parameters(), tm.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(dtype), msg=name)
        sa, sb = fo.state.get(a, {}), to.state.get(b, {})
        assert list(sa) == list(sb), name
        for key, value in sb.items():
            assert isinstance(sa[key], torch.Tensor)
            assert sa[key].is_sparse == value.is_sparse, f"{name} {key}"
            if key == "step":
                assert float(sa[key]) == float(value)
            else:
                torch.testing.assert_close(_dense(sa[key]), _dense(value), **tol(dtype))
    # The state_dict has torch's structure, sparse buffers included.
    sf, st = fo.state_dict(), to.state_dict()
    assert sorted(sf["state"]) == sorted(st["state"])
    for index, state in st["state"].items():
        assert list(sf["state"][index]) == list(state)


@pytest.mark.parametrize(("family", "kwargs"), SPARSE_CASES)
def test_sparse_embedding_on_the_forced_torch_backend(family, kwargs):
    ferroptim.set_backend("torch")
    family = FAMILIES[family]
    fm, _, fl = train(lambda g: family.make_ferro(g, **kwargs), one_group, steps=20)
    tm, _, tl = train(lambda g: family.make_torch(g, **kwargs), one_group, steps=20)
    assert fl == pytest.approx(tl, rel=1e-5, abs=1e-6)
    for a, b in zip(fm.parameters(), tm.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **F32)


@pytest.mark.parametrize("family", [name for name, f in FAMILIES.items() if f.sparse])
def test_sparse_embedding_with_max_grad_norm(family):
    """In-step clipping counts the sparse gradient's norm (of its coalesced values), as
    torch's clip_grad_norm_ does, and clips it like the dense ones."""
    family = FAMILIES[family]
    kwargs = {"lr": 0.1, **family.common}
    fm, fo = Model(), None
    tm = Model()
    fo = family.make_ferro(fm.parameters(), max_grad_norm=0.3, **kwargs)
    to = family.make_torch(tm.parameters(), **kwargs)
    for idx, y in batches(30):
        for model in (fm, tm):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(idx), y).backward()
        fo.step()
        norm = torch.nn.utils.clip_grad_norm_(tm.parameters(), 0.3)
        to.step()
        torch.testing.assert_close(fo.last_grad_norm, norm, rtol=1e-5, atol=0)
    for a, b in zip(fm.parameters(), tm.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **F32)


def _sparse_step_setup(family: str, kwargs: dict[str, Any]):
    fam = FAMILIES[family]
    model = Model()
    opt = fam.make_ferro(split_groups(model), **kwargs)
    # A few good (dense) steps first, so there is state to protect.
    for idx, y in batches(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(idx), y).backward()
        model.emb.weight.grad = model.emb.weight.grad.to_dense()
        opt.step()
    idx, y = batches(4)[-1]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(idx), y).backward()
    assert model.emb.weight.grad.is_sparse
    return model, opt


def _torch_error(family: str, kwargs: dict[str, Any]) -> BaseException:
    model = Model()
    opt = FAMILIES[family].make_torch(split_groups(model), **kwargs)
    idx, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(idx), y).backward()
    with pytest.raises(Exception) as error:  # (torch's: RuntimeError)
        opt.step()
    return error.value


#: Every registry configuration whose sparse gradients torch refuses (``sparse_errors``;
#: by default, a typical one of each optimizer torch steps no sparse gradients for).
UNSUPPORTED = [
    pytest.param(name, kwargs, id=case)
    for name, family in FAMILIES.items()
    for case, kwargs in (
        family.sparse_errors or ({} if family.sparse else {name: {"lr": 0.01, **family.common}})
    ).items()
]


@pytest.mark.parametrize(("family", "kwargs"), UNSUPPORTED)
def test_unsupported_sparse_grads_raise_torchs_error(family, kwargs):
    expected = _torch_error(family, kwargs)
    _, opt = _sparse_step_setup(family, kwargs)
    with pytest.raises(type(expected)) as error:
        opt.step()
    assert str(error.value) == str(expected)


@pytest.mark.parametrize(("family", "kwargs"), UNSUPPORTED)
def test_unsupported_sparse_grads_write_nothing(family, kwargs):
    """Contract 5: the error comes before any tensor — in any group, params or state
    (step counters included) — is written."""
    model, opt = _sparse_step_setup(family, kwargs)
    params = list(model.parameters())
    before = snapshot(opt, params)
    with pytest.raises(type(_torch_error(family, kwargs))):
        opt.step()
    assert_unchanged(before, opt, params)

"""LBFGS: torch.optim's class, its vector work in Rust (``rust/kernels/lbfgs.rs``).

torch's ``LBFGS.step`` keeps the parameters as one flat vector and, per iteration, runs
the two-loop recursion over the history in Python: two dot products and two ``add_``
per history pair (400 small tensor ops for the default ``history_size=100``), each a
Python call. Here one Rust call runs the whole recursion (``2n + 1`` fused passes over
memory), another updates every parameter (``p += t * d``), and the line search's dot
products and the ``abs().max()`` / ``abs().sum()`` tests run in Rust too.

The control flow, the state (one entry on the first parameter: ``func_evals``,
``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``,
``prev_flat_grad``, ``prev_loss``, ``al``) and its types are torch's: scalars torch keeps
as 0-d tensors (``ro[i]``, ``H_diag``, ``al[i]``, ``t`` on the first iteration, the line
search's directional derivatives) are 0-d tensors of the parameters' dtype here too, with
the values torch's tensor arithmetic gives them (each rounded to that dtype), so a
checkpoint moves between torch.optim.LBFGS and ferroptim.LBFGS in both directions. The
one difference in the numbers: dot products and sums are accumulated in float64 in a
fixed order (the same bits for any thread count and SIMD level), where torch's BLAS
accumulates in the dtype in its own order.

Parameters that are not all CPU float32 or all CPU float64 tensors (or plain
``nn.Parameter``), and ``ferroptim.set_backend("torch")``, run torch's own
implementation. A vector the Rust side refuses (a non-contiguous parameter, a state
tensor of another dtype after a checkpoint) is handled by torch's op for that operation,
before anything is written.
"""

from __future__ import annotations

import inspect
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _config, _core
from ferroptim._ema import EmaMixin
from ferroptim._torch_compat import (
    hooked_step,
    lbfgs_cubic_interpolate,
    lbfgs_torch_step,
    to_scalar,
)

__all__ = ["LBFGS"]

#: Whether this torch's LBFGS takes ``maximize``.
_TORCH_TAKES_MAXIMIZE = "maximize" in inspect.signature(torch.optim.LBFGS.__init__).parameters

_RUST_DTYPES = (torch.float32, torch.float64)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _rounder(dtype: torch.dtype) -> Callable[[float], float]:
    """How a Python float becomes a 0-d tensor of ``dtype`` (or meets one in a comparison):
    rounded to float32 for float32 (out of range: infinity, as torch casts)."""
    if dtype != torch.float32:
        return float

    def to_float32(value: float) -> float:
        try:
            return struct.unpack("f", struct.pack("f", value))[0]
        except OverflowError:
            return math.copysign(math.inf, value)

    return to_float32


def _dot(a: Tensor, b: Tensor) -> float:
    """``a.dot(b)``'s value (float64 accumulation in Rust; torch's op if Rust refuses)."""
    try:
        return _core.lbfgs_dot(a, b)
    except ValueError:
        return float(a.dot(b))


def _abs_max(x: Tensor) -> float:
    try:
        return _core.lbfgs_abs(x)[0]
    except ValueError:
        return float(x.abs().max())


def _abs_sum(x: Tensor) -> float:
    try:
        return _core.lbfgs_abs(x, True)[1]
    except ValueError:
        return float(x.abs().sum())


def _dot_pair(y: Tensor, s: Tensor) -> tuple[float, float]:
    try:
        return _core.lbfgs_dot_pair(y, s)
    except ValueError:
        return float(y.dot(s)), float(y.dot(y))


def _scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor of ``like``'s dtype holding ``value`` (exactly representable)."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _two_loop(
    flat_grad: Tensor,
    old_dirs: list[Tensor],
    old_stps: list[Tensor],
    ro: list[Any],
    h_diag: Any,
    al: list[Any],
) -> tuple[Tensor, float]:
    """The direction ``d`` and ``gtd = flat_grad.dot(d)``: one Rust call, or torch's code.

    torch assigns a new 0-d tensor to each ``al[i]``; Rust writes the same values into
    the 0-d tensors already there (``al`` is scratch: torch overwrites it before reading
    it, and a loaded checkpoint's tensors are the state's own, as ``prev_flat_grad``,
    which torch itself updates in place)."""
    num_old = len(old_dirs)
    if len(al) < num_old:
        raise IndexError("list assignment index out of range")  # torch's al[i] = ...
    q = flat_grad.neg()
    if num_old and al[num_old - 1] is None:
        # New history slots: torch assigns a fresh 0-d tensor to al[i]; Rust writes
        # into ours (entries are filled in order, so only the last can be new).
        for i in range(num_old):
            if al[i] is None:
                al[i] = torch.zeros((), dtype=q.dtype)
    try:
        gtd = _core.lbfgs_direction(
            q, flat_grad, old_dirs, old_stps, ro, float(h_diag), al[:num_old]
        )
    except ValueError:
        # torch's loop verbatim (a state tensor of another dtype or layout, say).
        for i in range(num_old - 1, -1, -1):
            al[i] = old_stps[i].dot(q) * ro[i]
            q.add_(old_dirs[i], alpha=-al[i])
        d = r = torch.mul(q, h_diag)
        for i in range(num_old):
            be_i = old_dirs[i].dot(r) * ro[i]
            r.add_(old_stps[i], alpha=al[i] - be_i)
        return d, float(flat_grad.dot(d))
    return q, gtd


def _strong_wolfe(
    obj_func: Callable[[Any, Any, Tensor], tuple[float, Tensor]],
    x: list[Tensor],
    t: Any,
    d: Tensor,
    f: float,
    g: Tensor,
    gtd: Tensor,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, Tensor, Any, int]:
    """torch's ``_strong_wolfe`` (torch/optim/lbfgs.py, BSD-3-Clause, itself ported from
    torch7's lswolfe.lua), line for line, with its vector ops in Rust: ``g_new.dot(d)`` and
    ``d.abs().max()`` are 0-d tensors of d's dtype as in torch, their values accumulated in
    float64. The scalar arithmetic (Python floats mixed with those 0-d tensors) is torch's."""
    d_norm = _scalar(_abs_max(d), d)
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = _scalar(_dot(g_new, d), d)

    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    bracket: list[Any] = []
    bracket_f: list[Any] = []
    bracket_g: list[Tensor] = []
    bracket_gtd: list[Any] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = lbfgs_cubic_interpolate(
            t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step)
        )
        t_prev = tmp
        f_prev = f_new
        g_prev = g_new.clone(memory_format=torch.contiguous_format)
        gtd_prev = gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = _scalar(_dot(g_new, d), d)
        ls_iter += 1

    if ls_iter == max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    return _zoom(
        obj_func,
        x,
        d,
        f,
        gtd,
        d_norm,
        (bracket, bracket_f, bracket_g, bracket_gtd),
        (done, ls_iter, ls_func_evals),
        (c1, c2, tolerance_change, max_ls),
    )


def _zoom(
    obj_func: Callable[[Any, Any, Tensor], tuple[float, Tensor]],
    x: list[Tensor],
    d: Tensor,
    f: float,
    gtd: Tensor,
    d_norm: Tensor,
    brackets: tuple[list[Any], list[Any], list[Tensor], list[Any]],
    progress: tuple[bool, int, int],
    constants: tuple[float, float, float, int],
) -> tuple[float, Tensor, Any, int]:
    """The zoom phase of torch's ``_strong_wolfe`` (split off only to keep each function
    short): refine the bracket until a point satisfies the strong Wolfe conditions."""
    bracket, bracket_f, bracket_g, bracket_gtd = brackets
    done, ls_iter, ls_func_evals = progress
    c1, c2, tolerance_change, max_ls = constants
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = lbfgs_cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        t, insuf_progress = _away_from_boundary(t, bracket, insuf_progress)
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = _scalar(_dot(g_new, d), d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[low_pos] = gtd_new
    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


def _away_from_boundary(t: Any, bracket: list[Any], insuf_progress: bool) -> tuple[Any, bool]:
    """torch's sufficient-progress test: a trial point too close to the bracket's ends
    moves to 0.1 of its length away from the nearest end."""
    eps = 0.1 * (max(bracket) - min(bracket))
    if min(max(bracket) - t, t - min(bracket)) < eps:
        if insuf_progress or t >= max(bracket) or t <= min(bracket):
            if abs(t - max(bracket)) < abs(t - min(bracket)):
                t = max(bracket) - eps
            else:
                t = min(bracket) + eps
            return t, False
        return t, True
    return t, False


class LBFGS(EmaMixin, torch.optim.LBFGS):
    """``torch.optim.LBFGS`` with its vector work in Rust: same arguments, defaults,
    state and ``state_dict``; see the module docstring."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        maximize: bool = False,
        ema_decay: float | None = None,
    ) -> None:
        # (torch's LBFGS took `maximize` only in later releases: torch 2.11's has none)
        if maximize and not _TORCH_TAKES_MAXIMIZE:
            raise ValueError(
                f"maximize=True needs a newer torch: torch {torch.__version__}'s "
                "LBFGS has no maximize"
            )
        extra = {"maximize": maximize} if _TORCH_TAKES_MAXIMIZE else {}
        super().__init__(
            params,
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
            **extra,
        )
        self._ema_init(ema_decay)

    def _in_rust(self) -> bool:
        """Whether this step runs ferroptim's path: one group of plain CPU tensors, all
        float32 or all float64, and the Rust backend."""
        if _config.get_backend() == "torch" or len(self.param_groups) != 1:
            return False
        params = self._params
        if not params:
            return False
        dtype = params[0].dtype
        return dtype in _RUST_DTYPES and all(
            type(p) in _PLAIN_TYPES and p.dtype == dtype and p.device.type == "cpu" for p in params
        )

    def _add_grad(self, step_size: Any, update: Tensor) -> None:
        """torch's ``_add_grad`` (``p.add_(update[segment].view_as(p), alpha=step_size)`` for
        every parameter) in one Rust call; torch's loop for parameters Rust refuses
        (non-contiguous, overlapping)."""
        if self.__dict__.get("_ferro_active"):
            try:
                _core.lbfgs_add(self._params, float(step_size), update)
            except ValueError:
                pass
            else:
                # What torch's in-place `add_` records: a graph that saved a parameter
                # refuses to backprop through it afterwards.
                torch.autograd.graph.increment_version(self._params)
                return
        super()._add_grad(step_size, update)

    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Performs a single optimization step (up to ``max_iter`` L-BFGS iterations).

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        if not self._in_rust():
            loss = lbfgs_torch_step()(self, closure)
        else:
            # Only ferroptim's step updates parameters through Rust: torch's own step (the
            # forced torch backend) calls `_add_grad` too.
            self._ferro_active = True
            try:
                with torch.no_grad():
                    loss = self._ferro_step(closure)
            finally:
                self._ferro_active = False
        if self.param_groups[0].get("ema_decay") is not None:
            self._ema_after_step({})
        return loss

    step = hooked_step(step)

    def _ferro_step(self, closure: Callable[[], Any]) -> Any:
        # torch's LBFGS.step, line for line (its comments are torch's), with the vector
        # work in Rust and the scalars as torch computes them; split into helpers only
        # to keep each function short.
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        maximize = group.get("maximize", False)

        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = -float(orig_loss) if maximize else float(orig_loss)
        state["func_evals"] += 1

        flat_grad = self._gather_flat_grad()
        tol = _Tolerances(group, flat_grad.dtype)
        if _abs_max(flat_grad) <= tol.grad:
            return orig_loss

        memory = _Memory.of(state)
        run = _Run(closure=closure, group=group, state=state, tol=tol, loss=loss)
        run.flat_grad = flat_grad
        n_iter = 0
        while n_iter < group["max_iter"]:
            n_iter += 1
            state["n_iter"] += 1
            gtd = self._direction(run, memory)
            if gtd > -tol.change_c:  # directional derivative is below tolerance
                break
            if self._move(run, memory, gtd, last=n_iter == group["max_iter"]):
                break
        memory.store(state)
        return orig_loss

    def _direction(self, run: _Run, memory: _Memory) -> float:
        """Updates the memory and the direction ``d``, the step length ``t``; returns
        ``gtd = flat_grad.dot(d)``."""
        state, flat_grad = run.state, run.flat_grad
        if state["n_iter"] == 1:
            memory.d = flat_grad.neg()
            memory.old_dirs, memory.old_stps, memory.ro = [], [], []
            memory.H_diag = 1
            gtd = -_dot(flat_grad, flat_grad)  # flat_grad.dot(-flat_grad)
        else:
            y = flat_grad.sub(memory.prev_flat_grad)
            s = memory.d.mul(memory.t)
            ys, yy = _dot_pair(y, s)
            if ys > run.tol.curvature:
                if len(memory.old_dirs) == run.group["history_size"]:
                    memory.old_dirs.pop(0)
                    memory.old_stps.pop(0)
                    memory.ro.pop(0)
                memory.old_dirs.append(y)
                memory.old_stps.append(s)
                ys_tensor = _scalar(ys, y)
                memory.ro.append(1.0 / ys_tensor)
                memory.H_diag = ys_tensor / _scalar(yy, y)
            if "al" not in state:
                state["al"] = [None] * run.group["history_size"]
            memory.d, gtd = _two_loop(
                flat_grad, memory.old_dirs, memory.old_stps, memory.ro, memory.H_diag, state["al"]
            )
        if memory.prev_flat_grad is None:
            memory.prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
        else:
            memory.prev_flat_grad.copy_(flat_grad)
        memory.prev_loss = run.loss
        lr = to_scalar(run.group["lr"])
        if state["n_iter"] == 1:
            memory.t = min(1.0, 1.0 / _scalar(_abs_sum(flat_grad), flat_grad)) * lr
        else:
            memory.t = lr
        return gtd

    def _move(self, run: _Run, memory: _Memory, gtd: float, last: bool) -> bool:
        """Steps along ``d`` (line search or fixed step); returns whether to stop."""
        group, d = run.group, memory.d
        ls_func_evals = 0
        opt_cond = False
        if group["line_search_fn"] is not None:
            if group["line_search_fn"] != "strong_wolfe":
                raise RuntimeError("only 'strong_wolfe' is supported")
            x_init = self._clone_param()

            def obj_func(x: list[Tensor], t: Any, d: Tensor) -> tuple[float, Tensor]:
                return self._directional_evaluate(run.closure, x, t, d)

            run.loss, run.flat_grad, memory.t, ls_func_evals = _strong_wolfe(
                obj_func,
                x_init,
                memory.t,
                d,
                run.loss,
                run.flat_grad,
                _scalar(gtd, d),
                max_ls=group["max_eval"] - run.current_evals,
            )
            self._add_grad(memory.t, d)
            opt_cond = _abs_max(run.flat_grad) <= run.tol.grad
        else:
            self._add_grad(memory.t, d)
            if not last:
                # re-evaluate function only if not in last iteration
                with torch.enable_grad():
                    loss = run.closure()
                run.loss = -float(loss) if group.get("maximize", False) else float(loss)
                run.flat_grad = self._gather_flat_grad()
                opt_cond = _abs_max(run.flat_grad) <= run.tol.grad
                ls_func_evals = 1
        run.current_evals += ls_func_evals
        run.state["func_evals"] += ls_func_evals

        # check conditions
        if last or run.current_evals >= group["max_eval"] or opt_cond:
            return True
        # lack of progress: d.mul(t).abs().max() (rounding is monotonic, so the largest
        # product is the rounded product of the largest |d|)
        rounded = run.tol.rounded
        if rounded(_abs_max(d) * abs(rounded(float(memory.t)))) <= run.tol.change_c:
            return True
        return abs(run.loss - memory.prev_loss) < run.tol.change


class _Tolerances:
    """The group's tolerances as torch's tests see them: compared with a 0-d tensor of
    the flat vectors' dtype, a Python float is rounded to that dtype first."""

    def __init__(self, group: dict[str, Any], dtype: torch.dtype) -> None:
        self.rounded = _rounder(dtype)
        self.grad = self.rounded(group["tolerance_grad"])
        self.change = group["tolerance_change"]
        self.change_c = self.rounded(self.change)
        # torch's `ys > 1e-10` (the curvature condition for a history update)
        self.curvature = self.rounded(1e-10)


@dataclass
class _Run:
    """One ``step`` call's running values (torch's locals)."""

    closure: Callable[[], Any]
    group: dict[str, Any]
    state: dict[str, Any]
    tol: _Tolerances
    loss: float
    flat_grad: Tensor = field(default_factory=lambda: torch.empty(0))
    current_evals: int = 1


@dataclass
class _Memory:
    """The state torch carries between iterations and steps, under torch's names."""

    d: Any = None
    t: Any = None
    old_dirs: Any = None
    old_stps: Any = None
    ro: Any = None
    H_diag: Any = None
    prev_flat_grad: Any = None
    prev_loss: Any = None

    @classmethod
    def of(cls, state: dict[str, Any]) -> _Memory:
        return cls(**{key: state.get(key) for key in _MEMORY_KEYS})

    def store(self, state: dict[str, Any]) -> None:
        for key in _MEMORY_KEYS:
            state[key] = getattr(self, key)


_MEMORY_KEYS = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")

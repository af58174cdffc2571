"""The hand-written type stub ``ferroptim/_core.pyi`` describes the compiled extension:
the same names, and for every function and method the same parameters in the same
order (PyO3 publishes them as ``__text_signature__``)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import ferroptim
from ferroptim import _core

STUB = Path(ferroptim.__file__).with_name("_core.pyi")


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(encoding="utf-8"))


def _parameters(node: ast.FunctionDef) -> list[str]:
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    return names[1:] if names and names[0] == "self" and not is_static else names


def _stub_members() -> dict[str, ast.AST]:
    members: dict[str, ast.AST] = {}
    for node in _stub_tree().body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            members[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = node
    return members


def _runtime_parameters(obj: object) -> list[str]:
    names = list(inspect.signature(obj).parameters)  # type: ignore[arg-type]
    return names[1:] if names[:1] == ["self"] else names


def test_stub_declares_exactly_what_the_extension_exports():
    dunder = {name for name in dir(_core) if name.startswith("__")} - {"__version__"}
    exported = set(dir(_core)) - dunder
    assert set(_stub_members()) == exported


def test_stub_functions_take_the_extensions_parameters():
    for name, node in _stub_members().items():
        if isinstance(node, ast.FunctionDef):
            assert _parameters(node) == _runtime_parameters(getattr(_core, name)), name


def test_stub_classes_declare_the_extensions_methods_and_parameters():
    for name, node in _stub_members().items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(_core, name)
        methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        runtime = {m for m in vars(cls) if not m.startswith("__")}
        assert set(methods) - {"__init__"} == runtime, name
        for method_name, method in methods.items():
            target = cls if method_name == "__init__" else getattr(cls, method_name)
            if any(isinstance(d, ast.Name) and d.id == "property" for d in method.decorator_list):
                assert inspect.isgetsetdescriptor(target), f"{name}.{method_name} is no property"
                continue
            assert _parameters(method) == _runtime_parameters(target), f"{name}.{method_name}"

"""Command-line flags generated from dataclasses: one ``--flag`` per field, documented by the
field's docstring (the string literal right after it) and its default."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any

__all__ = ["add_dataclass_arguments", "dataclass_from_args", "field_docs"]


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal that follows each field in the class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        stmts = body.body
        for stmt, nxt in zip(stmts, stmts[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``(scalar type, is_list)`` for ``int``, ``float | None``, ``list[int]``, ``Literal[...]``..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0]), False
    return annotation, False


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add ``--{prefix}{field-name}`` for every field of dataclass ``cls``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().split("\n")[0])
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, is_list = _base_type(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        convert = _bool if kind is bool else kind if kind in (int, float, str) else str
        if kind in (int, float, bool) and _is_optional(hints[f.name]):
            convert = _or_none(convert)
        flag = "--" + prefix + f.name.replace("_", "-")
        choices = None
        if typing.get_origin(_strip_optional(hints[f.name])) is typing.Literal:
            choices = list(typing.get_args(_strip_optional(hints[f.name])))
        group.add_argument(
            flag,
            dest=prefix.replace("-", "_") + f.name,
            type=convert,
            nargs="+" if is_list else None,
            default=argparse.SUPPRESS,
            choices=choices,
            metavar=None if choices else f.name.upper(),
            help=f"{docs.get(f.name, '')} (default: {default!r})",
        )


def _is_optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _or_none(convert):
    """``convert``, with ``none`` / ``null`` (any case) for None: ``--ema-gamma none``."""

    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in errors
    return parse


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def dataclass_from_args(
    cls: type, args: argparse.Namespace, base: Any = None, prefix: str = ""
) -> Any:
    """Build ``cls`` from the flags that were given, on top of ``base`` (an instance) or defaults."""
    given = {
        f.name: getattr(args, prefix.replace("-", "_") + f.name)
        for f in dataclasses.fields(cls)
        if hasattr(args, prefix.replace("-", "_") + f.name)
    }
    if base is not None:
        return dataclasses.replace(base, **given)
    return cls(**given)

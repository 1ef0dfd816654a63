"""MkDocs hook: the configuration guide's key tables, generated from the config dataclasses.

A page asks for a table with a marker line, ``<!-- config-keys: train -->`` or
``<!-- config-keys: tokfsm -->``; the hook replaces it with one row per key (dotted, as
``key=value`` overrides spell it), its type and its default, and for TokFSM its value in
each preset. The tables are read from the code at build time, so they cannot drift from
what ``codebook train`` and ``codebook fsm`` accept.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any

from codebook_lens.experiments.tokfsm.config import PRESETS, FSMExperimentConfig, load_fsm_config
from codebook_lens.training.config import TrainConfig

MARKER = re.compile(r"^<!-- config-keys: (\w+) -->$", re.MULTILINE)


def _type_name(tp: Any) -> str:
    """``int``, ``float or None``, ``list[str]``, ``one of "cosine", "linear"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [dataclasses.asdict(v) for v in value]
    return "`" + json.dumps(value) + "`"


def _item_type(tp: Any) -> Any:
    """The dataclass of a ``list[SomeDataclass]`` field, else None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)[:1] or (None,)
        if dataclasses.is_dataclass(item):
            return item
    return None


def key_rows(cls: type, instances: list[Any], prefix: str = "") -> list[list[str]]:
    """``[key, type, value in each instance...]`` for every leaf key of dataclass ``cls``.

    A nested dataclass is walked into (``optim.lr``); a list of dataclasses gets a row
    for the list and one per field of its items (``codebooks.sites[].k``), whose
    default is the field's own (``required`` when it has none).
    """
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key, tp = prefix + field.name, hints[field.name]
        values = [getattr(obj, field.name) for obj in instances]
        if dataclasses.is_dataclass(tp):
            rows += key_rows(tp, values, key + ".")
            continue
        rows.append([f"`{key}`", _type_name(tp)] + [_value(v) for v in values])
        item = _item_type(tp)
        if item is not None:
            rows += _item_rows(item, key + "[].", len(instances))
    return rows


def _item_rows(cls: type, prefix: str, width: int) -> list[list[str]]:
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            default = field.default_factory() if callable(field.default_factory) else None
            rows += key_rows(tp, [default] * width, prefix + field.name + ".") if default else []
            continue
        if field.default is not dataclasses.MISSING:
            value = _value(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            value = _value(field.default_factory())
        else:
            value = "required"
        rows.append([f"`{prefix}{field.name}`", _type_name(tp)] + [value] * width)
    return rows


def table(name: str) -> str:
    """The Markdown table that ``<!-- config-keys: NAME -->`` stands for."""
    if name == "train":
        cls, columns, instances = TrainConfig, ["default"], [TrainConfig()]
    elif name == "tokfsm":
        cls, columns = FSMExperimentConfig, [f"`--preset {p}`" for p in PRESETS]
        instances = [load_fsm_config(p) for p in PRESETS]
    else:
        raise ValueError(f"unknown config table {name!r}: use train or tokfsm")
    head = ["key", "type", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in key_rows(cls, instances)]
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: table(m.group(1)), markdown)

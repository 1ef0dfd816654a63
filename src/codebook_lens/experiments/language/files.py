"""The regex and topic files of the natural-language experiment (YAML), read and checked.

``regexes.yaml``: ``patterns: [{name, pattern}, ...]`` (RE2 syntax).
``topics.yaml``: ``prompts: [text, ...]`` and ``topics: [{name, words: [...], text}, ...]``.
The packaged files sit beside this module; a run may name others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from codebook_lens.analysis.search import SearchError, compile_pattern
from codebook_lens.experiments.language.config import PACKAGE_DIR
from codebook_lens.training.config import ConfigError


@dataclass(frozen=True)
class Regex:
    name: str
    pattern: str


@dataclass(frozen=True)
class Topic:
    name: str
    words: tuple[str, ...]
    text: str


def packaged_files(kind: str) -> list[str]:
    """The names of the packaged ``kind`` files (``topics`` or ``regexes``): the listed
    one and its held-out counterparts, e.g. ``topics``, ``topics-heldout``, ..."""
    return sorted(p.stem for p in PACKAGE_DIR.glob(f"{kind}*.yaml"))


def data_file(value: str | None, default: Path) -> Path:
    """The topic or regex file a run reads: ``default`` for ``None``; ``value`` as a path
    where a file is there; else a packaged file by its name (``topics-heldout3`` for
    ``topics-heldout3.yaml`` beside this module); else ``value`` as given (reading it
    then fails with the packaged names listed)."""
    if value is None:
        return default
    path = Path(value)
    if path.is_file():
        return path
    packaged = PACKAGE_DIR / f"{value}.yaml"
    if path.name == value and packaged.is_file():
        return packaged
    return path


def _read(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        names = ", ".join(packaged_files("regexes" if what == "regex" else "topics"))
        raise ConfigError(
            f"the {what} file {path} does not exist (a path, or a packaged file's name: {names})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _items(data: dict, key: str, path: str | Path) -> list:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path} must hold a non-empty list under {key!r}")
    return items


def load_regexes(path: str | Path) -> list[Regex]:
    """The named patterns of a regex file, each compiled once to check it."""
    out: list[Regex] = []
    for i, item in enumerate(_items(_read(path, "regex"), "patterns", path)):
        if not isinstance(item, dict) or not {"name", "pattern"} <= set(item):
            raise ConfigError(f"{path}: patterns[{i}] must be a mapping with name and pattern")
        name, pattern = str(item["name"]), item["pattern"]
        try:
            compile_pattern(pattern)
        except SearchError as err:
            raise ConfigError(f"{path}: pattern {name!r}: {err}") from None
        out.append(Regex(name, pattern))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: pattern names must be distinct, got {names}")
    return out


def load_topics(path: str | Path) -> tuple[list[str], list[Topic]]:
    """``(prompts, topics)`` of a topic file."""
    data = _read(path, "topic")
    prompts = _items(data, "prompts", path)
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"{path}: prompts must be non-empty strings")
    topics: list[Topic] = []
    for i, item in enumerate(_items(data, "topics", path)):
        if not isinstance(item, dict) or not {"name", "words"} <= set(item):
            raise ConfigError(f"{path}: topics[{i}] must be a mapping with name and words")
        words = item["words"]
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise ConfigError(f"{path}: topics[{i}].words must be a list of non-empty strings")
        text = item.get("text", "")
        if not isinstance(text, str):
            raise ConfigError(f"{path}: topics[{i}].text must be a string")
        topics.append(Topic(str(item["name"]), tuple(w.strip() for w in words), text))
    names = [t.name for t in topics]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: topic names must be distinct, got {names}")
    return list(prompts), topics

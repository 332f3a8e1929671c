"""Pipeline configs: one TOML file per dataset protocol.

A pipeline is plain data (sections ``dataset``, ``features``, ``split``, ``train``,
``evaluate``); code reads it, never the other way round. Command-line overrides use
dotted keys (``train.epochs=20``) whose values are parsed as TOML, so types stay honest.

The packaged pipelines live in ``cfrh/pipelines/`` (installed with the package); a name is looked up
in ``./pipelines`` first, then there. Relative paths in a pipeline file resolve against the file's own
folder, except in the packaged ones, whose relative paths (``data/coco``, ``cache/demo-data``) are meant
for the working directory, like ``./cache`` and ``./runs``.
"""
from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import CfrhError

PIPELINES_DIR = Path(__file__).resolve().parent / "pipelines"
SECTIONS = ("dataset", "features", "split", "train", "evaluate")


class ConfigError(CfrhError, ValueError):
    """A pipeline file or override is malformed; the message names the file and the fix."""


@dataclass
class Pipeline:
    name: str
    path: Path | None
    dataset: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    @property
    def packaged(self) -> bool:
        """True for a pipeline shipped inside the package (``cfrh/pipelines/``)."""
        return self.path is not None and self.path.parent == PIPELINES_DIR

    @property
    def base_dir(self) -> Path:
        """Where relative paths resolve: the pipeline file's folder; the working directory for a packaged
        pipeline (or one built in memory)."""
        if self.path is None or self.packaged:
            return Path.cwd()
        return self.path.parent

    def resolve_path(self, value: str | os.PathLike) -> Path:
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{s: copy.deepcopy(getattr(self, s)) for s in SECTIONS}}


def available_pipelines() -> list[str]:
    return sorted(p.stem for p in PIPELINES_DIR.glob("*.toml"))


def find_pipeline_file(name_or_path: str | os.PathLike) -> Path:
    """A path to a ``.toml`` file, or a name looked up in ``./pipelines`` then the package's ``pipelines/``."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"{candidate}: pipeline file not found; give a path to a .toml file or one of: "
                              f"{', '.join(available_pipelines())}")
        return candidate.resolve()
    for folder in (Path.cwd() / "pipelines", PIPELINES_DIR):
        f = folder / f"{name_or_path}.toml"
        if f.is_file():
            return f.resolve()
    raise ConfigError(f"unknown pipeline {str(name_or_path)!r}: choose one of {', '.join(available_pipelines())} "
                      f"or give a path to a .toml file")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (["section", "key"], value parsed as TOML; bare words stay strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=20)")
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.split(".") if k.strip()]
    if len(keys) < 2 or keys[0] not in SECTIONS:
        raise ConfigError(f"override {text!r}: the key must start with one of {', '.join(SECTIONS)}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def apply_overrides(pipeline: Pipeline, overrides: Iterable[str]) -> Pipeline:
    out = copy.deepcopy(pipeline)
    for text in overrides:
        keys, value = parse_override(text)
        node = getattr(out, keys[0])
        for k in keys[1:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def load_pipeline(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()) -> Pipeline:
    path = find_pipeline_file(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the file") from None
    unknown = set(data) - set(SECTIONS) - {"name", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: name, description, "
                          f"{', '.join(SECTIONS)}")
    if "reader" not in data.get("dataset", {}):
        raise ConfigError(f"{path}: [dataset] needs a 'reader' (e.g. reader = \"coco\")")
    pipe = Pipeline(name=data.get("name", path.stem), path=path,
                    **{s: data.get(s, {}) for s in SECTIONS})
    return apply_overrides(pipe, overrides)

"""The configuration reference (docs/config.md), generated from the typed signatures that *are* the config schema.

``visor config-reference --write`` regenerates the page; a test fails when it is stale. Every key a stage YAML
takes is listed with its type, default and the docstring line that explains it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parents[2] / "docs" / "config.md"

HEADER = """# Configuration reference

Generated from the typed signatures by `visor config-reference --write`; `tests/test_docs.py` fails when it is
stale. A stage YAML has `model` (a stage class and its `init_args`), `data` (the DataModule), `trainer` (Lightning's
`Trainer`, see `visor fit --help`) and the visor keys below; every YAML in `experiments/` starts with the command
that runs it. Any key can be set on the command line: `--model.init_args.lr 3e-5`, `--data.batch_size 4`.
"""


def _type(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return re.sub(r"\b(typing|visor_lightning\.[\w.]+)\.", "", text).replace("|", "\\|")


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    return f"`{value!r}`"


def _doc_args(obj: Any) -> dict[str, str]:
    """``Args:`` entries of a Google-style docstring (continuation lines joined)."""
    doc = inspect.getdoc(obj) or ""
    m = re.search(r"^Args[^\n]*:\n(.*?)(?:\n\S|\Z)", doc, flags=re.S | re.M)
    out: dict[str, str] = {}
    if not m:
        return out
    names: list[str] = []
    for line in m.group(1).splitlines():
        head = re.match(r"^ {4}([\w, ]+):\s*(.*)$", line)
        if head:
            names = [n.strip() for n in head.group(1).split(",")]
            for n in names:
                out[n] = head.group(2).strip()
        elif names and line.strip():
            for n in names:
                out[n] += " " + line.strip()
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comments`` of dataclass fields, read from the source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _rows(items: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | `{t}` | {d} | {m} |" for k, t, d, m in items]
    return lines


def _init_rows(cls: type, own_only: bool = False) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls.__init__)
    docs = _doc_args(cls)
    out = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out.append((name, _type(hints.get(name, p.annotation)), _default(p.default), docs.get(name, "")))
    return out


def _dataclass_rows(cls: type) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            "(see below)" if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        shown = "(see below)" if default == "(see below)" else _default(default)
        out.append((f.name, _type(hints[f.name]), shown, notes.get(f.name, "")))
    return out


def generate() -> str:
    from visor_lightning.data.datamodule import VisorDataModule
    from visor_lightning.lit import stages
    from visor_lightning.lit.module import VisorLitModule
    from visor_lightning.models.schedule import ScheduleConfig
    from visor_lightning.models.spec import BackboneSpec, TextSpec, VisionSpec

    parts = [HEADER]
    parts += ["## `model.init_args` (every stage)", "", (inspect.getdoc(VisorLitModule) or "").split("\n\n")[0], ""]
    parts += _rows(_init_rows(VisorLitModule)) + [""]
    parts += ["## Stages (`model.class_path`)", ""]
    for name, cls in inspect.getmembers(stages, inspect.isclass):
        if not issubclass(cls, VisorLitModule) or cls is VisorLitModule or cls.__module__ != stages.__name__:
            continue
        parts += [f"### `visor_lightning.lit.{name}`", "", (inspect.getdoc(cls) or "").split("\n\n")[0], "",
                  f"Trains by default: {', '.join(cls.default_parts)}; validation evaluates: `{cls.default_eval}`.", ""]
        own = [r for r in _init_rows(cls) if r[0] not in inspect.signature(VisorLitModule.__init__).parameters]
        if own:
            parts += _rows(own) + [""]
    parts += ["## `model.init_args.backbone`", "", (inspect.getdoc(BackboneSpec) or "").split("\n\n")[0], ""]
    parts += _rows(_dataclass_rows(BackboneSpec)) + [""]
    for label, cls in (("backbone.text", TextSpec), ("backbone.vision", VisionSpec)):
        parts += [f"### `{label}`", "", (inspect.getdoc(cls) or "").split("\n\n")[0], ""]
        parts += _rows(_dataclass_rows(cls)) + [""]
    parts += ["## `model.init_args.schedule`", "", (inspect.getdoc(ScheduleConfig) or "").split("\n\n")[0], ""]
    parts += _rows(_dataclass_rows(ScheduleConfig)) + [""]
    parts += ["## `data` (`VisorDataModule`)", "", (inspect.getdoc(VisorDataModule) or "").split("\n\n")[0], ""]
    parts += _rows(_init_rows(VisorDataModule)) + [""]
    parts += ["## visor keys of `visor fit`", ""]
    parts += _rows(_cli_rows()) + [""]
    return "\n".join(parts)


def _cli_rows() -> list[tuple[str, str, str, str]]:
    """The arguments ``VisorCLI.add_arguments_to_parser`` adds, read from a parser it fills."""
    from jsonargparse import ArgumentParser

    from visor_lightning.lit.cli import VisorCLI

    parser = ArgumentParser()
    VisorCLI.add_arguments_to_parser(None, parser)  # type: ignore[arg-type]  # uses only the parser
    out = []
    for action in parser._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        typ = getattr(action, "_typehint", None) or action.type
        out.append((action.dest, _type(typ) if typ else "", _default(action.default), action.help or ""))
    return out


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="visor config-reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(PAGE.parents[1])} (default: print)")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    text = generate()
    if a.write:
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    else:
        print(text)
    return 0

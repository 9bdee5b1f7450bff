"""Every unknown key of a config at once, each with its file, line and a "did you mean".

Why: jsonargparse (under LightningCLI) stops at the first unknown key and names neither file nor line; a typo under
``data:`` read "Group 'data' does not accept option 'batch_sise'". Every entry point that reads a stage config
(``visor fit/validate/test``, ``eval``, ``submit``, ``pipeline``, ``flops``) checks it here first, against the keys
the classes it configures accept (their ``__init__`` signatures and dataclass fields), so all of them report the
same way. Values are still checked by jsonargparse and the classes themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any

# a schema: key -> sub-schema (a dict) or None (anything below is not checked here); the key "*" stands for any key
# (a list's items are keyed by their index)
Schema = dict[str, Any]

# LightningCLI's own top-level keys, and what VisorCLI.add_arguments_to_parser adds
TOP_LEVEL = ("seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path", "config",
             "experiment", "run_name", "global_batch_size", "checkpoint_every_n_steps", "mlflow", "weights_only")


class ConfigError(ValueError):
    """A config's problems, one per line; ``visor <command>: error: <this>`` is what the user sees."""


@dataclasses.dataclass
class Problem:
    key: str  # dotted
    where: str  # "FILE line N" or "the command line"
    expected: list[str]

    def __str__(self) -> str:
        near = difflib.get_close_matches(self.key.rsplit(".", 1)[-1], self.expected, n=1, cutoff=0.6)
        parent = self.key.rsplit(".", 1)[0] + "." if "." in self.key else ""
        expected = sorted(k for k in self.expected if k != "*")
        hint = f"did you mean {_shown(parent)}{near[0]}?" if near else f"expected one of: {', '.join(expected)}"
        return f"{self.where}: unknown key {_shown(self.key)} ({hint})"


def _shown(key: str) -> str:
    """``stages.0.fitargs`` -> ``stages[0].fitargs`` (list items are keyed by index inside)."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)


def _params(cls: type) -> Schema:
    """The keyword arguments ``cls(...)`` accepts, over its whole MRO (stages pass ``**kwargs`` to the base)."""
    out: Schema = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        hints = _hints(init)
        for p in params:
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                out.setdefault(p.name, _schema_of(hints.get(p.name)))
    return out


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that does not resolve here: its keys go unchecked below it
        return {}


def _schema_of(tp: Any) -> Schema | None:
    """A dataclass type (or ``X | None`` of one) -> its fields, recursively; anything else is not checked below."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            hints = _hints(t)
            return {f.name: _schema_of(hints.get(f.name)) for f in dataclasses.fields(t)}
    return None


@lru_cache(maxsize=None)
def _base_schema() -> Schema:
    from lightning.pytorch import Trainer

    from visor_lightning.data.datamodule import VisorDataModule

    data = _params(VisorDataModule)
    return {**{k: None for k in TOP_LEVEL}, "trainer": _params(Trainer), "data": data}


def import_class(class_path: str) -> type:
    """``visor_lightning.lit.Universal`` -> the class; a ValueError naming it when it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"model.class_path {class_path!r} is not an importable class "
                         "(e.g. visor_lightning.lit.Universal)") from None


def stage_schema(class_path: str | None) -> Schema:
    """The keys a stage config may hold; ``model.init_args`` are those of ``class_path`` (when it imports)."""
    schema = dict(_base_schema())
    model: Schema = {"class_path": None, "init_args": None, "dict_kwargs": None}
    if class_path:
        try:
            model["init_args"] = _params(import_class(class_path))
        except ValueError:
            pass  # jsonargparse names a class that does not import
    schema["model"] = model
    return schema


def _key_lines(path: Path) -> list[tuple[str, int, str | None]]:
    """Every mapping key of a YAML file as (dotted key, 1-based line, its value if a scalar), in file order."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return []  # the loader itself reports what is wrong with the file
    out: list[tuple[str, int, str | None]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out.append((key, k.start_mark.line + 1, v.value if isinstance(v, yaml.ScalarNode) else None))
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{prefix}{i}.")

    walk(root, "")
    return out


def _unknown(keys: list[tuple[str, str]], schema: Schema) -> list[Problem]:
    problems = []
    for key, where in keys:
        level: Any = schema
        parts = key.split(".")
        for i, part in enumerate(parts):
            if level is None:
                break
            if part not in level and "*" in level:
                level = level["*"]
                continue
            if part not in level:
                problems.append(Problem(".".join(parts[: i + 1]), where, list(level)))
                break
            level = level[part]
    seen, out = set(), []
    for p in problems:  # a wrong parent key is reported once (at its own line), not once per key below it
        source = p.where.rsplit(" line ", 1)[0]
        if (p.key, source) not in seen:
            seen.add((p.key, source))
            out.append(p)
    return out


def _class_path(keys: list[tuple[str, int, str | None]], overrides: list[str]) -> str | None:
    """The stage class the files' keys (in stacking order) and the overrides name last."""
    found = None
    for key, _, value in keys:
        if key == "model.class_path" and value:
            found = value
    for i, a in enumerate(overrides):
        if a.startswith("--model.class_path") or a == "--model":
            value = a.split("=", 1)[1] if "=" in a else (overrides[i + 1] if i + 1 < len(overrides) else None)
            if value and not value.startswith(("{", "-")):
                found = value
    return found


def stage_problems(argv: list[str], where: str = "the command line") -> list[Problem]:
    """Every unknown key of a stage command line: the keys of each ``--config`` file (with its line) and each dotted
    ``--key`` override (``where`` names where those were given)."""
    files = [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [Path(a.split("=", 1)[1]) for a in argv if a.startswith("--config=")]
    in_files = [(f, _key_lines(f)) for f in files if f.is_file()]
    schema = stage_schema(_class_path([k for _, lines in in_files for k in lines], argv))
    keys = [(k, f"{f} line {n}") for f, lines in in_files for k, n, _ in lines]
    keys += [(a[2:].split("=", 1)[0].rstrip("+"), where) for a in argv  # --trainer.callbacks+=X appends
             if a.startswith("--") and "." in a.split("=", 1)[0] and not a.startswith("--config")]
    return _unknown(keys, schema)


def check_stage_args(argv: list[str]) -> None:
    """Raise :class:`ConfigError` listing every unknown key of a stage command line (:func:`stage_problems`)."""
    raise_problems(stage_problems(argv))


def key_problems(path: Path, schema: Schema) -> list[Problem]:
    """Every key of YAML file ``path`` that ``schema`` does not know."""
    return _unknown([(k, f"{path} line {n}") for k, n, _ in _key_lines(Path(path))], schema)


def model_schema() -> Schema:
    """The ``model:`` section of a model config (``visor flops``' kind): backbone, schedule, policy_width."""
    from visor_lightning.models.schedule import ScheduleConfig
    from visor_lightning.models.spec import BackboneSpec

    return {"backbone": _schema_of(BackboneSpec), "schedule": _schema_of(ScheduleConfig), "policy_width": None}


def check_model_keys(path: Path) -> None:
    """Raise :class:`ConfigError` listing every unknown key under ``model:`` of a model config."""
    keys = [(k, f"{path} line {n}") for k, n, _ in _key_lines(Path(path)) if k.startswith("model.")]
    raise_problems(_unknown(keys, {"model": model_schema()}))


def raise_problems(problems: list[Problem]) -> None:
    if len(problems) == 1:
        raise ConfigError(str(problems[0]))
    if problems:
        raise ConfigError(f"{len(problems)} unknown keys:\n" + "\n".join(f"  {p}" for p in problems))

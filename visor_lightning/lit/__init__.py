"""Lightning layer: one LightningModule per training stage over the plain ``VisorModel``, and the CLI.

The stage classes are imported on first use (PEP 562), so that importing a light submodule (``tracking``,
``weights``) does not pull in Lightning: ``visor eval --help`` and friends stay fast."""

from __future__ import annotations

from typing import Any

__all__ = ["CAPretrain", "DenseBase", "FullFinetune", "PolicyTraining", "Universal", "VisorLitModule"]


def __getattr__(name: str) -> Any:
    if name == "VisorLitModule":
        from .module import VisorLitModule

        return VisorLitModule
    if name in __all__:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Lightning layer: one LightningModule per training stage over the plain ``VisorModel``, and the CLI."""

from .module import VisorLitModule
from .stages import CAPretrain, DenseBase, FullFinetune, PolicyTraining, Universal

__all__ = ["CAPretrain", "DenseBase", "FullFinetune", "PolicyTraining", "Universal", "VisorLitModule"]

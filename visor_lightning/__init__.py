"""VISOR-Lightning: VISion On Request vision-language models, trained in stages with PyTorch Lightning.

Kept import-light on purpose: ``visor --help`` must not pay for torch/transformers.
"""

__version__ = "0.1.0"

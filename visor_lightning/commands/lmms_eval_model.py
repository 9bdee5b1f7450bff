"""lmms-eval's model class for ``--model visor`` (imports lmms-eval: only with the ``eval`` extra installed).

The package's ``lmms_eval.models`` entry point (pyproject.toml) points at :func:`manifest`, so ``lmms-eval
--model visor`` finds the class without any import by the user. The work is done by
:class:`~visor_lightning.commands.lmms_eval_adapter.VisorLMM`, which is tested without lmms-eval.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

from visor_lightning.commands.lmms_eval_adapter import POLICY, VisorLMM

CLASS_PATH = "visor_lightning.commands.lmms_eval_model.Visor"


class Visor(lmms):
    """``--model_args weights=...,processor=...,target=policy|sa[...]|dense|fastv(k=K,r=R)[,max_acc_drop=X]``
    (``max_acc_drop``: the knob of a router trained with objective correctness); lmms-eval's own
    ``--batch_size`` and ``--device`` arrive as keyword arguments too (``max_batch_size`` is not used)."""

    def __init__(self, weights: str, processor: str, target: str = POLICY, batch_size: int | str = 1,
                 max_new_tokens: int | str = 32, token_pool: int | str | None = None, device: str | None = None,
                 dtype: str | None = None, max_acc_drop: float | str | None = None, **unused: Any) -> None:
        super().__init__()
        self.core = VisorLMM(weights=weights, processor=processor, target=target, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, token_pool=token_pool, device=device, dtype=dtype,
                             max_acc_drop=max_acc_drop)

    def generate_until(self, requests):
        return self.core.generate_until(requests, self.task_dict)

    def loglikelihood(self, requests):
        return self.core.loglikelihood(requests, self.task_dict)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("visor: multi-round generation is not supported; use single-round tasks")


def manifest():
    """The entry point's payload: lmms-eval registers ``visor`` from it when it starts."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="visor", simple_class_path=CLASS_PATH)

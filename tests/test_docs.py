"""docs/config.md is generated from the typed signatures: it must match them, and every key must say what it does."""

from __future__ import annotations

from visor_lightning.commands.config_reference import PAGE, generate


def test_config_reference_is_current_and_complete():
    text = generate()
    assert PAGE.read_text() == text, "docs/config.md is stale: run `visor config-reference --write`"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 60
    undocumented = [r.split("`")[1] for r in rows if r.rstrip().endswith("|  |")]
    assert not undocumented, f"keys without a meaning (add a docstring Args entry or a field comment): {undocumented}"
    for key in ("token_pool", "init_from", "eval_configs", "num_ca", "feasible", "batches_per_epoch", "global_batch_size",
                "checkpoint_every_n_steps", "objective", "sample_per"):
        assert f"| `{key}` |" in text, key

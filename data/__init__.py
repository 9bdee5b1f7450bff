"""Data pipeline (imported as ``visor_lightning.data``): WebDataset shards, streaming DataModule, collation."""

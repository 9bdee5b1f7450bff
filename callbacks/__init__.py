"""Lightning callbacks (imported as ``visor_lightning.callbacks``): budget logging, MLflow artifacts."""

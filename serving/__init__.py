"""Tools for serving a trained model, above both sides: ``evaluation`` (any saved classifier on a labelled
file, with fairness) and ``compress`` (int8 quantization and pruning, with a before/after report)."""

__all__ = ["compress", "evaluation"]

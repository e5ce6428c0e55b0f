"""The shared kernel: what both the coordinator (``server``) and the institution nodes (``client``) import.

Imports nothing from any other fedpriv package. Public modules:

- ``config``: :class:`~common.config.RunConfig` and the node config, typed and validated once at the edge.
- ``data``, ``cleaning``: dataset schema, readers (CSV/TSV/JSONL/Parquet, encrypted containers), tokenization.
- ``model``, ``inference``: build/load the BERT classifier, trainable-tensor selection, batched prediction.
- ``crypto``: the encrypted dataset container and key handling.
- ``ledger``: the signed, hash-chained privacy ledger and its verification.
- ``privacy``: DP accounting, noise calibration.
- ``fairness``, ``metrics``: confusion counts, classification metrics, fairness report
  (:class:`~common.fairness.FairnessReport`) and thresholds.
- ``fsutil``: the one atomic-write helper; ``seeds``: name-derived seeds.

Modules are imported explicitly (``from common.model import build_model``); importing ``common`` alone loads
nothing heavy.
"""

__all__ = ["cleaning", "config", "crypto", "data", "fairness", "fsutil", "inference", "ledger", "metrics", "model",
           "privacy", "seeds"]

"""A whole federation on one machine, for researchers trying settings.

- ``runner``: prepare simulated nodes (partitioned, optionally encrypted data) and run Flower's simulation
  engine with the real ServerApp and ClientApp.
- ``partition``, ``synthetic``: partitioners (IID, Dirichlet, by group) and the synthetic demo data.
- ``crossval``: K-fold cross-validation of a federation.
- ``tune``: hyperparameter search, with its privacy policy (:func:`~simulations.tune.tuning_policy`).

Imports ``server``, ``client`` and ``common``.
"""

__all__ = ["crossval", "partition", "runner", "synthetic", "tune"]

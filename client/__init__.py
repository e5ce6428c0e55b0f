"""The institution's node: the fedpriv ClientApp and everything that runs only on the institution's machine.

Public modules: :mod:`client.app` (the ClientApp and its train/evaluate handlers), :mod:`client.node` (the
node's config and data), :mod:`client.budget` (its budget and spend, read from its signed ledger),
:mod:`client.replay` (released rounds kept for a repeated request), :mod:`client.count_noise` (noised
evaluation counts), :mod:`client.train` and :mod:`client.ghost` (local DP-SGD training), :mod:`client.features`
(the frozen-encoder feature cache). Importing this package loads nothing heavy.
"""

__all__ = ["app", "budget", "count_noise", "features", "ghost", "node", "replay", "train"]

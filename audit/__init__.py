"""Checking what was spent, without trusting the platform: tools that sit above both sides.

Public modules: :mod:`audit.run` (``fedpriv audit RUN_DIR``: verify ledgers, recompute ε, hold it to the
budgets), :mod:`audit.accounting` (the independent accountants), :mod:`audit.empirical` (``fedpriv audit
empirical``: the canary audit of the DP-SGD implementation), :mod:`audit.dirac` (its gradient-canary attack)
and :mod:`audit.onerun` (its statistics). Importing this package loads nothing heavy.
"""

__all__ = ["accounting", "dirac", "empirical", "onerun", "run"]

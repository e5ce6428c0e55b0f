"""The coordinator: the Flower ServerApp and everything only it uses.

- ``app``: the ServerApp (``server.app:app``, built by :func:`~server.app.build_server_app`).
- ``loop``: :func:`~server.loop.run_federation`, a short driver over the round's named steps in ``rounds``
  (sample, train, aggregate, record, checkpoint) and ``evaluate`` (federated and held-out evaluation).
- ``validate``, ``aggregate``: checks on every node reply; FedAvg and robust aggregation.
- ``central_dp``: optional client-level central DP.
- ``selection``: best-round selection and early stopping.
- ``rundir``, ``rows``: the run directory; typed ``metrics.jsonl`` rows (:class:`~server.rows.RoundRow`).
- ``report``, ``plots``, ``htmlreport``, ``status``: the run report and ``fedpriv status``.

Imports only ``common``; never ``client``. Importing ``server`` alone loads nothing heavy.
"""

__all__ = ["aggregate", "app", "central_dp", "evaluate", "htmlreport", "loop", "plots", "report", "rounds", "rows",
           "rundir", "selection", "status", "validate"]

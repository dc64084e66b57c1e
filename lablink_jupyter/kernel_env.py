"""What a kernel started by this Jupyter server needs to reach LabLink, put in its environment.

Kernels inherit the server's environment, so exporting `LABLINK_URL` (and the
server's token as `LABLINK_TOKEN`) at start-up lets a `StudentPanel` in any of
its notebooks find the allocator with nothing to type.
"""

from __future__ import annotations

import logging
import os
from typing import Any

#: The allocator's URL, with the server's base_url.
URL_VARIABLE = "LABLINK_URL"
#: A token the allocator accepts for the student.
TOKEN_VARIABLE = "LABLINK_TOKEN"
#: What JupyterHub gives each single-user server (and so its kernels): the user's own token.
HUB_TOKEN_VARIABLE = "JUPYTERHUB_API_TOKEN"
#: Where JupyterHub told the single-user server to listen (its bind URL, not always connectable).
HUB_SERVER_URL_VARIABLE = "JUPYTERHUB_SERVICE_URL"

KERNEL_VARIABLES = (URL_VARIABLE, TOKEN_VARIABLE)

#: Addresses a server listens on that a kernel on the same machine reaches through loopback.
_LOOPBACK_REACHABLE = {"", "localhost", "0.0.0.0", "::", "127.0.0.1", "::1"}  # noqa: S104


def kernel_url(serverapp: Any) -> str | None:
    """The URL a kernel on this machine uses to reach the server, or None (a Unix socket)."""
    if getattr(serverapp, "sock", ""):
        return None
    scheme = "https" if getattr(serverapp, "certfile", "") else "http"
    ip = serverapp.ip or ""
    if ip in _LOOPBACK_REACHABLE:
        host = "[::1]" if ip in ("::", "::1") else "127.0.0.1"
    else:
        host = f"[{ip}]" if ":" in ip else ip
    return f"{scheme}://{host}:{serverapp.port}{serverapp.base_url}"


def export_for_kernels(serverapp: Any, log: logging.Logger) -> None:
    """Put LABLINK_URL (and LABLINK_TOKEN when the server has a token) into os.environ.

    An operator's own LABLINK_URL is left alone. Under JupyterHub nothing is
    exported: kernels already carry the server's URL and the user's own token,
    and the Hub's identity provider would not take the server's token anyway.
    """
    if os.environ.get(URL_VARIABLE):
        log.info("LabLink: kernels use %s=%s, set before the server started",
                 URL_VARIABLE, os.environ[URL_VARIABLE])
        return
    if os.environ.get(HUB_SERVER_URL_VARIABLE) and os.environ.get(HUB_TOKEN_VARIABLE):
        log.info("LabLink: kernels find this server through JupyterHub's %s and %s",
                 HUB_SERVER_URL_VARIABLE, HUB_TOKEN_VARIABLE)
        return
    url = kernel_url(serverapp)
    if url is None:
        log.info("LabLink: the server listens on a Unix socket; kernels need %s set", URL_VARIABLE)
        return
    os.environ[URL_VARIABLE] = url
    token = getattr(serverapp.identity_provider, "token", "")
    if token and not os.environ.get(HUB_TOKEN_VARIABLE):
        os.environ[TOKEN_VARIABLE] = token
    log.info("LabLink: kernels started by this server reach it at %s", url)

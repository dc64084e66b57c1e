"""Running under JupyterHub: the allocator as the Hub's managed service.

JupyterHub starts the service with `JUPYTERHUB_SERVICE_NAME`, its API token and
the URL to listen on in the environment. `jupyter lablink` started that way
loads JupyterHub's own server extension (the one `jupyterhub-singleuser` uses),
so browsers log in with Hub OAuth, and closes Jupyter's own APIs: every Hub user
allowed to open the service could otherwise start a kernel in it.

A student's single-user server needs nothing from here: it loads LabLink as an
ordinary extension, with the same `database_url`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jupyter_server.auth import Authorizer, User
from tornado import web

#: The server extension JupyterHub's package registers (its Hub OAuth identity provider).
HUB_EXTENSION = "jupyterhub"

#: The Jupyter resource LabLink handlers name, should they ask the authorizer.
LABLINK_RESOURCE = "lablink"

_SERVICE_VARIABLES = ("JUPYTERHUB_SERVICE_NAME", "JUPYTERHUB_API_TOKEN", "JUPYTERHUB_SERVICE_URL")


def started_as_hub_service(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether JupyterHub started this process as a managed service with a URL."""
    # A user's server has the token and URL too, but never a service name.
    return all(environ.get(name) for name in _SERVICE_VARIABLES)


def hub_service_server_settings() -> dict[str, Any]:
    """ServerApp settings for `jupyter lablink` run as the Hub's service."""
    return {
        "authorizer_class": LabLinkServiceAuthorizer,
        "terminals_enabled": False,
    }


class LabLinkServiceAuthorizer(Authorizer):
    """On the Hub service, Jupyter's kernels, terminals and files stay closed; LabLink's routes answer."""

    def is_authorized(self, handler: web.RequestHandler, user: User, action: str, resource: str) -> bool:
        """Only LabLink's own resource; LabLink's handlers decide who may do what there."""
        return resource == LABLINK_RESOURCE

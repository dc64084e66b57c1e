"""Running under JupyterHub: the allocator as the Hub's managed service.

JupyterHub starts the service with `JUPYTERHUB_SERVICE_NAME`, its API token and
the URL to listen on in the environment. `jupyter lablink` started that way
loads JupyterHub's own server extension (the one `jupyterhub-singleuser` uses),
so browsers log in with Hub OAuth, and students' kernels with their server's
API token, and closes Jupyter's own APIs: every Hub user allowed to open the
service could otherwise start a kernel in it.

A student's single-user server loads LabLink too (installing the package enables
it), but with no `database_url` it serves nothing: the allocator is the service,
and the student's panels call it at `LABLINK_URL`.
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


def started_as_hub_user_server(base_url: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this Jupyter server is the one JupyterHub spawned for a user (not its service)."""
    # A server a student starts by hand inside theirs inherits JUPYTERHUB_USER, but not
    # the base_url the Hub gave the spawned one.
    prefix = environ.get("JUPYTERHUB_SERVICE_PREFIX", "")
    return (bool(environ.get("JUPYTERHUB_USER")) and not started_as_hub_service(environ)
            and bool(prefix) and _with_slash(prefix) == _with_slash(base_url))


def _with_slash(path: str) -> str:
    return path if path.endswith("/") else path + "/"


#: Front ends that installing JupyterLab (say, in the Hub's environment) enables in every
#: Jupyter server: on the service they would only be empty shells, as it runs no kernels.
FRONT_ENDS = ("jupyterlab", "notebook", "jupyter_lsp", "nbclassic")


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

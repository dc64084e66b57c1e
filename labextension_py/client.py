"""The small HTTP client the notebook panels use to reach the allocator.

Calls are blocking `requests` calls: the panels run them in an executor and
await them from the kernel's event loop, so the kernel never freezes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from lablink_jupyter import routes
from lablink_jupyter.kernel_env import (
    HUB_SERVER_URL_VARIABLE,
    HUB_TOKEN_VARIABLE,
    TOKEN_VARIABLE,
    URL_VARIABLE,
)

#: Seconds to wait for a quick answer; long-polls add their own window to it.
DEFAULT_TIMEOUT = 15.0

HOW_TO_CONFIGURE = (
    "Could not find the LabLink server: set LABLINK_URL (the Jupyter server's URL, with "
    "its base_url) and LABLINK_TOKEN, or give the panel both: StudentPanel(url=..., token=...) "
    "or InstructorPanel(url=..., token=...)."
)
NOT_RECOGNISED_HINT = (
    "The LabLink server did not recognise this notebook's credentials ({source}): set "
    "LABLINK_TOKEN to a token that server accepts, or give the panel one: StudentPanel(token=...) "
    "or InstructorPanel(token=...)."
)


class LabLinkError(Exception):
    """The allocator refused a call, or could not be reached; `error` and `hint` say why."""

    def __init__(self, status: int | None, error: str, hint: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.hint = hint


@dataclass(frozen=True)
class ServerAddress:
    """Where the allocator is, and the token to show it."""

    url: str
    token: str | None = field(repr=False)
    source: str  # how it was found, for messages


def discover(url: str | None = None, token: str | None = None) -> ServerAddress:
    """Find the allocator: explicit arguments, LABLINK_*, JupyterHub, then the kernel's own server."""
    if url:
        return ServerAddress(_with_slash(url), token or _environment_token(), "arguments")
    if os.environ.get(URL_VARIABLE):
        # Under JupyterHub, LABLINK_URL is the Hub's LabLink service, and the Hub's token
        # for this user's server is what identifies the student there.
        return ServerAddress(_with_slash(os.environ[URL_VARIABLE]), token or _environment_token(),
                             URL_VARIABLE)
    hub_url = os.environ.get(HUB_SERVER_URL_VARIABLE)
    hub_token = os.environ.get(HUB_TOKEN_VARIABLE)
    if hub_url and hub_token:
        # The student's own server, where a course runs replicas (database_url set there).
        return ServerAddress(_connectable(_with_slash(hub_url)), token or hub_token, "JupyterHub")
    parent = _parent_server()
    if parent is not None:
        return ServerAddress(parent.url, token or parent.token, parent.source)
    raise LabLinkError(None, HOW_TO_CONFIGURE)


def _environment_token() -> str | None:
    # LABLINK_TOKEN when set; under JupyterHub, the user's own API token.
    return os.environ.get(TOKEN_VARIABLE) or os.environ.get(HUB_TOKEN_VARIABLE) or None


def _parent_server() -> ServerAddress | None:
    """The Jupyter server that started this kernel, from its runtime file."""
    parent_pid = os.environ.get("JPY_PARENT_PID")
    if not parent_pid:
        return None
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        return None
    for info in list_running_servers():
        if str(info.get("pid")) == parent_pid:
            return ServerAddress(_connectable(_with_slash(info["url"])), info.get("token") or None,
                                 "parent server")
    return None


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _connectable(url: str) -> str:
    """`url` with a listen-on-everything host (JupyterHub's bind URL may have one) made loopback."""
    parts = urlsplit(url)
    if parts.hostname in (None, "", "0.0.0.0", "::"):  # noqa: S104
        netloc = "127.0.0.1" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class LabLinkClient:
    """Blocking calls to the allocator's student and instructor routes."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, *, address: ServerAddress | None = None) -> None:
        self.address = address or discover(url, token)
        self.timeout = timeout
        self.session = requests.Session()
        if self.address.token:
            # The Authorization header, not ?token=: JupyterHub 5 ignores tokens in URLs.
            self.session.headers["Authorization"] = f"token {self.address.token}"

    def copy(self) -> LabLinkClient:
        """A client for the same server with an HTTP session of its own."""
        return LabLinkClient(self.address.url, self.address.token, self.timeout, address=self.address)

    def _credentials(self) -> str:
        if not self.address.token:
            return "it sent no token"
        return f"the token from {self.address.source}"

    def url_for(self, path: str) -> str:
        """The absolute URL of a route path."""
        return urljoin(self.address.url, path)

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """One request; the parsed JSON answer, or LabLinkError with the server's error and hint."""
        try:
            response = self.session.request(
                method, self.url_for(path), json=json, params=params,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except requests.Timeout:
            raise LabLinkError(None, "The LabLink server did not answer in time.",
                               "Try again in a moment.") from None
        except requests.RequestException:
            raise LabLinkError(None, f"Cannot reach the LabLink server at {self.address.url}.",
                               "Check that the server is running, then try again.") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            recognised = isinstance(body, dict) and body.get("user")
            if response.status_code in (401, 403) and not recognised:
                # The server's own hint speaks to a browser; a kernel needs another token.
                error = body.get("error") if isinstance(body, dict) and body.get("error") else (
                    f"The LabLink server answered {response.status_code}.")
                raise LabLinkError(response.status_code, str(error),
                                   NOT_RECOGNISED_HINT.format(source=self._credentials()))
            if isinstance(body, dict) and body.get("error"):
                raise LabLinkError(response.status_code, str(body["error"]), body.get("hint"))
            raise LabLinkError(response.status_code,
                               f"The LabLink server answered {response.status_code}.",
                               "Is LabLink enabled on this server?")
        if body is None:
            raise LabLinkError(response.status_code, "The LabLink server sent an answer that is not JSON.")
        return body

    # -- student routes -------------------------------------------------------------

    def request_vm(self, crd_command: str) -> dict[str, Any]:
        """Paste a CRD command; the VM and PIN."""
        return self.call("POST", routes.REQUEST_VM, json={"crd_command": crd_command})  # type: ignore[no-any-return]

    def my_vm(self, wait: float = 0, known: str | None = None) -> dict[str, Any]:
        """The student's VM; with `wait`, long-polls until its status differs from `known`."""
        params: dict[str, Any] = {}
        if wait:
            params = {"wait": wait, "known": known or "none"}
        return self.call("GET", routes.MY_VM, params=params, timeout=self.timeout + wait)  # type: ignore[no-any-return]

    def release(self) -> dict[str, Any]:
        """Give the VM back."""
        return self.call("POST", routes.RELEASE, json={})  # type: ignore[no-any-return]

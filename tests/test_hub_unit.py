"""How `jupyter lablink` recognises that JupyterHub started it, and what it closes then."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lablink_jupyter import hub
from lablink_jupyter.app import LabLink

SERVICE_ENV = {
    "JUPYTERHUB_SERVICE_NAME": "lablink",
    "JUPYTERHUB_API_TOKEN": "service-token",
    "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:10101",
}


def test_a_managed_service_is_recognised():
    assert hub.started_as_hub_service(SERVICE_ENV)


@pytest.mark.parametrize("missing", sorted(SERVICE_ENV))
def test_a_users_server_or_a_plain_shell_is_not_a_service(missing):
    # A user's server has the token and the URL, never a service name.
    assert not hub.started_as_hub_service({k: v for k, v in SERVICE_ENV.items() if k != missing})
    assert not hub.started_as_hub_service({**SERVICE_ENV, missing: ""})


@pytest.mark.parametrize("resource", ["kernels", "terminals", "contents", "sessions", "api", "server", "files"])
def test_the_service_authorizer_closes_jupyters_own_apis(resource):
    authorizer = hub.LabLinkServiceAuthorizer()
    for action in ("read", "write", "execute"):
        assert not authorizer.is_authorized(None, None, action, resource)  # type: ignore[arg-type]
    assert authorizer.is_authorized(None, None, "read", hub.LABLINK_RESOURCE)  # type: ignore[arg-type]


def test_secrets_come_from_the_environment_when_not_configured(monkeypatch):
    monkeypatch.setenv("LABLINK_DATABASE_URL", "postgresql://lablink@db.example.edu/lablink")
    monkeypatch.setenv("LABLINK_ENROLL_TOKEN", "fleet-token-from-env")
    app = LabLink()
    assert app.database_url == "postgresql://lablink@db.example.edu/lablink"
    assert app.enrollment_token == "fleet-token-from-env"
    configured = LabLink(database_url="postgresql://other@db.example.edu/x", enrollment_token="t")
    assert configured.database_url == "postgresql://other@db.example.edu/x"
    assert configured.enrollment_token == "t"


def test_without_the_environment_the_defaults_stay_empty(monkeypatch):
    monkeypatch.delenv("LABLINK_DATABASE_URL", raising=False)
    monkeypatch.delenv("LABLINK_ENROLL_TOKEN", raising=False)
    app = LabLink()
    assert app.database_url == "" and app.enrollment_token == ""


def test_a_refused_hub_user_is_told_who_can_make_them_an_instructor():
    app = LabLink(instructor_group="teachers")
    hub_user = SimpleNamespace(username="erin", hub_user={"name": "erin", "admin": False, "groups": []})
    hint = app.how_to_make_instructor("erin", hub_user)
    assert hint.startswith("Ask whoever runs JupyterHub") and "Hub admin" in hint and "'teachers'" in hint
    plain_user = SimpleNamespace(username="erin")
    assert app.how_to_make_instructor("erin", plain_user) == (
        "Ask whoever runs LabLink to add erin to c.LabLink.instructors.")

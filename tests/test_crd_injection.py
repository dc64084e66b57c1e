"""A pasted command never becomes a command: end to end, down to the argv start-host is run with.

Each paste carries something a shell would run (`;`, `&&`, `$(…)`, backticks, a
second line) or extra flags. Either the code is extracted cleanly — and the
stand-in start-host on a real `lablink-subscribe` VM records exactly the argv
the VM program builds, with nothing from the paste but the code — or the paste
is refused and nothing reaches the VM. No marker file is ever created.
"""

from __future__ import annotations

from pathlib import Path

from conftest import fresh_code, query, until
from lablink_jupyter.crd import CODE_RE, REDIRECT_URL

START = "DISPLAY= /opt/google/chrome-remote-desktop/start-host"
REDIRECT = f'--redirect-url="{REDIRECT_URL}"'
WINDOWS = r'& "${{Env:PROGRAMFILES(X86)}}\Google\Chrome Remote Desktop\CurrentVersion\remoting_start_host.exe"'

#: (paste, whether the code is extracted cleanly); {code}, {other} and {mark} are filled in
#: (so WINDOWS doubles its braces).
PASTES = [
    (f'{START} --code="{{code}}" {REDIRECT} --name=$(hostname); touch {{mark}}', True),
    (f'{START} --code="{{code}}" {REDIRECT} --name=$(hostname) && touch {{mark}}', True),
    (f'{START} --code="{{code}}" {REDIRECT} --name=$(hostname)\ntouch {{mark}}', True),
    (f'{START} --code="{{code}}" {REDIRECT} --name=$(hostname)\r\n`touch {{mark}}`', True),
    (f'{START} --code="{{code}}" --pin=000000 --user-name=root --redirect-url=https://evil.example/ '
     '--name=$(touch {mark})', True),
    (f'{START} --code="{{code}}" --code="{{code}}" {REDIRECT}', True),
    (f"{START} --code='{{code}}'\"; touch {{mark}}\" {REDIRECT}", True),
    (f'{WINDOWS} --code="{{code}}" {REDIRECT} --name=$Env:COMPUTERNAME; Remove-Item -Recurse C:\\', True),
    ('$ {code}', True),
    (f'{START} --code="{{code}}$(touch {{mark}})" {REDIRECT}', False),
    (f'{START} --code="{{code}}`touch {{mark}}`" {REDIRECT}', False),
    (f'{START} --code={{code}};touch {{mark}} {REDIRECT}', False),
    (f'{START} --code={{code}}&&touch {{mark}}', False),
    (f'{START} --code="{{code}} --pin=123456" {REDIRECT}', False),
    (f'{START} --code="{{code}}\n--user-name=root" {REDIRECT}', False),
    (f'{START} --code="{{code}}\\"; touch {{mark}}; echo \\"" {REDIRECT}', False),
    (f'{START} --code="{{code}}%0Atouch%20{{mark}}" {REDIRECT}', False),
    (f'{START} --code="{{code}}" --code="{{other}}" {REDIRECT}', False),
    ('{code}; touch {mark}', False),
    ('{code} && touch {mark}', False),
    ('$(touch {mark})', False),
    ('--code="$(touch {mark})"', False),
]


async def test_pasted_shell_never_reaches_start_host(lablink, vm_factory, tmp_path: Path) -> None:
    vm = vm_factory("lab-vm-1")
    # Waiting, and marked available (the poll subscribes first, then marks the VM seen).
    await until(lambda: lablink.allocator.listener.waiter_count == 1 and query(
        lablink.database_url, "SELECT status FROM vms") == [("available",)], within=60)
    mark = tmp_path / "pwned"
    pin = None
    delivered = 0
    for template, clean in PASTES:
        code, other = fresh_code(), fresh_code()
        paste = template.format(code=code, other=other, mark=mark)
        reply = await lablink.request_vm("alice", paste)
        if not clean:
            assert reply.code == 400 and reply.body["hint"], (paste, reply)
            assert code not in reply.error
            continue
        assert reply.code == 200, (paste, reply)
        # What was left out is said, without repeating the paste.
        left_out = any(part in template for part in (";", "&&", "\ntouch", "`", "--pin"))
        assert any("left out" in note for note in reply.body["notes"]) == left_out, (paste, reply)
        assert str(mark) not in str(reply.body["notes"])
        pin = pin or reply.body["pin"]
        await lablink.wait_for_status("alice", "active")
        delivered += 1
        calls = vm.calls()
        assert len(calls) == delivered, (paste, calls)
        assert calls[-1]["argv"] == [str(vm.crd_dir / "start-host"), f"--code={code}",
                                     f"--redirect-url={REDIRECT_URL}", "--name=lab-vm-1"], paste
        assert calls[-1]["stdin"] == f"{pin}\n{pin}\n"
        assert CODE_RE.fullmatch(code)
    assert delivered == sum(clean for _, clean in PASTES)
    assert not mark.exists(), "a pasted command ran"
    assert len(vm.calls()) == delivered  # nothing refused reached the VM

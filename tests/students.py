"""Many students on one test server: one Jupyter token each, as JupyterHub gives each user their own.

Its own module so that allocator subprocesses can load it too
(`--ServerApp.identity_provider_class=students.StudentsIdentityProvider`).
"""

from __future__ import annotations

from typing import Any

from jupyter_server.auth import User
from jupyter_server.auth.identity import PasswordIdentityProvider

#: Per-student Jupyter tokens.
STUDENT_TOKENS = {f"tok-{name}": name for name in ["alice", "bob", "carol", "dave", "erin"]}
STUDENT_TOKENS.update({f"tok-student{n}": f"student{n}" for n in range(100)})


class StudentsIdentityProvider(PasswordIdentityProvider):
    """Knows one token per student, so a test server has many users."""

    async def get_user(self, handler: Any) -> User | None:  # type: ignore[override]
        token = self.get_token(handler)
        if token in STUDENT_TOKENS:
            handler._token_authenticated = True
            return User(STUDENT_TOKENS[token])
        return await super().get_user(handler)  # type: ignore[misc,no-any-return]

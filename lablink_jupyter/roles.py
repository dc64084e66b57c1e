"""Who may manage the fleet: the one place that decides whether a user is an instructor."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from jupyter_server.auth.identity import (
    IdentityProvider,
    LegacyIdentityProvider,
    PasswordIdentityProvider,
)

#: Jupyter's own identity providers, which know one person (the server's owner), not a class:
#: whoever logs in holds the server's own token or password.
SINGLE_USER_PROVIDERS = (IdentityProvider, PasswordIdentityProvider, LegacyIdentityProvider)


@dataclass(frozen=True)
class InstructorRule:
    """The settings that make someone an instructor (copied from the LabLink traits)."""

    instructors: Collection[str] = ()
    instructor_group: str = ""
    hub_admins_are_instructors: bool = True
    owner_is_instructor: bool = True


def hub_user_model(user: Any) -> dict[str, Any] | None:
    """The JupyterHub user model behind a Jupyter user, if the server runs under a Hub.

    jupyterhub's single-user extension returns a `JupyterHubUser` whose
    `hub_user` is the model the Hub gave for the token: with the identify
    scopes it holds `name`, `admin` and `groups`.
    """
    model = getattr(user, "hub_user", None)
    return model if isinstance(model, dict) else None


def is_instructor(user: Any, rule: InstructorRule, identity_provider: Any = None) -> bool:
    """Whether the logged-in Jupyter `user` may manage the fleet."""
    if user is None:
        return False
    username = getattr(user, "username", None)
    if not isinstance(username, str) or not username:
        return False
    if username in rule.instructors:
        return True
    hub_user = hub_user_model(user)
    if hub_user is not None:
        if rule.hub_admins_are_instructors and hub_user.get("admin") is True:
            return True
        groups = hub_user.get("groups")
        if rule.instructor_group and isinstance(groups, list) and rule.instructor_group in groups:
            return True
        return False
    if rule.owner_is_instructor and type(identity_provider) in SINGLE_USER_PROVIDERS:
        # Everyone who logs in to such a server holds its token or password and can
        # already run any code on it; under JupyterHub this never applies.
        return bool(identity_provider.auth_enabled)
    return False

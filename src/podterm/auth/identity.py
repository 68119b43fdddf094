"""Who is asking: the identity an authenticator vouches for.

An :class:`Identity` is a plain value.  It is built once per request by
:mod:`podterm.auth.authn` and then only read: by the authorization check, by
the session (its owner), and later by audit events.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The group whose members may do anything until RBAC lands (issue 3: "until
#: the RBAC work lands, only the group podterm:admins is allowed").
ADMINS_GROUP = "podterm:admins"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller.

    Attributes:
        user: the user name (kube-apiserver's token file column 2).
        uid: the user's stable id (column 3).
        groups: group names (column 4), in file order.
        method: how it was authenticated, e.g. ``"token"``, ``"generated-admin"``.
    """

    user: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    method: str = "token"

    @property
    def is_admin(self) -> bool:
        """True when the identity belongs to ``podterm:admins``."""
        return ADMINS_GROUP in self.groups

    def __repr__(self) -> str:
        return f"<Identity {self.user} groups={','.join(self.groups) or '-'} via {self.method}>"

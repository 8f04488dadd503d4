"""Redis users for each role, so a worker cannot do what only the aggregator may do.

Workers read everything of a run but write only their own kind of keys: work-unit claims and
leases (`units:*`), their registration and stats (`worker:*`, `workers`) and announcements (the
`deltas` stream). The version pointer, the versions stream, the done bitmaps, the lock and the
config are read-only to them, so a worker's credentials can neither commit a version nor mark a
unit done. The aggregator writes every key of a run; the evaluator writes only `eval`. Key
patterns are the whole boundary: commands run inside Lua scripts are checked against them too.
Object-store credentials are split the same way (deploy/minio/*.json).
"""

from __future__ import annotations

import redis

from diloco.errors import ConfigError

ROLES = ("worker", "aggregator", "evaluator")

_COMMANDS = "+@all -@admin -@dangerous"
_RULES = {
    "worker": ["%R~diloco:{*}:*", "~diloco:{*}:units:*", "~diloco:{*}:worker:*", "~diloco:{*}:workers",
               "%W~diloco:{*}:deltas"],
    "aggregator": ["~diloco:{*}:*"],
    "evaluator": ["%R~diloco:{*}:*", "~diloco:{*}:eval"],
}


def rules(role: str, password: str) -> list[str]:
    """The ACL SETUSER rules of a role (user name = role)."""
    if role not in _RULES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if not password:
        raise ValueError(f"the {role} user needs a password")
    return ["reset", "on", f">{password}", *_COMMANDS.split(), *_RULES[role]]


def apply(r: redis.Redis, passwords: dict[str, str], *, save: bool = False) -> None:
    """Create or replace the users for the given roles; ACL SAVE if the server has an aclfile."""
    for role, password in passwords.items():
        # One SETUSER starting with `reset`: a user in use never has an empty rule set in between.
        r.execute_command("ACL", "SETUSER", role, *rules(role, password))
    if save:
        try:
            r.execute_command("ACL", "SAVE")
        except redis.ResponseError as e:
            raise ConfigError(f"ACL SAVE failed ({e}): start redis-server with --aclfile to keep the users") from None

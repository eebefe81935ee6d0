"""Which kept session child a database session may share: the child's launch identity.

Units of the same app user and venv whose environments differ only in the variable that
carries the database URL would start identical session children; one child can then hold a
connection per URL (the URL is sent with the request that opens it). The key is a digest of
everything a child is started with, with the URL's exact text replaced by a placeholder;
anything that makes the URL hard to replace exactly means no sharing (the URL stays in the key).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.context import AppContext

PLACEHOLDER = "\x00driftwatch-url\x00"
# The largest EnvironmentFile read for the key; a larger one is not shared.
MAX_ENV_FILE_BYTES = 1024 * 1024
# A URL made only of these is replaced as text: nothing systemd's environment file parser
# treats specially (quotes, backslash, $, #, ;, whitespace) can sit inside it.
_PLAIN_URL = re.compile(r"[A-Za-z0-9+.:/@%?&=_~,\[\]!*()-]+")


@dataclass(frozen=True)
class ChildKey:
    """A shared child's key, and the variables the child drops (they carry one unit's URL)."""

    digest: str
    unset: tuple[str, ...]
    shared: bool


def url_variables(env: Mapping[str, str], url: str) -> tuple[str, ...]:
    """Pure: the variables whose value is exactly the URL (libpq reads none of them)."""
    return tuple(sorted(k for k, v in env.items() if v == url and not k.upper().startswith("PG")))


def read_env_file(path: str) -> bytes | None:
    """An EnvironmentFile's bytes as root reads them (None: missing, unreadable, too large)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_ENV_FILE_BYTES + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_ENV_FILE_BYTES else None


def child_key(ctx: AppContext, url: str, guard: list[Any], allow_root: bool, probe_user: str,
              read: Callable[[str], bytes | None] = read_env_file) -> ChildKey:
    """Pure but for reading the unit's EnvironmentFiles: the key of the child a session on
    url may share, or, on any doubt, a key of its own (the URL and unit in it)."""
    unset = url_variables(ctx.environment, url)
    settings = dict(ctx.exec_settings)
    files = settings.pop("EnvironmentFiles", None) or []
    chosen: dict[str, Any] = {
        "user": ctx.user, "group": ctx.group, "groups": list(ctx.supplementary_groups),
        "cwd": ctx.working_directory, "python": ctx.python, "venv": ctx.venv,
        "dynamic": ctx.dynamic_user, "unset": list(unset),
        "env": sorted(ctx.environment.items()), "guard": guard, "allow_root": allow_root,
        "probe_user": probe_user, "files": [],
        "exec": sorted((str(k), repr(v)) for k, v in settings.items()),
    }
    for path, optional in files:
        data = read(str(path))
        # Their text is hashed, not their path: two units' files differ in path and URL.
        chosen["files"].append([bool(optional), None if data is None else
                                hashlib.sha256(data.replace(url.encode(), PLACEHOLDER.encode())
                                               ).hexdigest()])
    plain = bool(_PLAIN_URL.fullmatch(url)) and len(url) >= 8
    doubt = not plain or any(d is None for _, d in chosen["files"])
    if not doubt:
        env = {k: (PLACEHOLDER if k in unset else v) for k, v in ctx.environment.items()}
        # The URL anywhere else (another variable, a credential, an option) is not shared.
        doubt = any(url in v for v in env.values())
        chosen["env"] = sorted(env.items())
        text = json.dumps(chosen, sort_keys=True)
        masked = text.replace(json.dumps(url)[1:-1], json.dumps(PLACEHOLDER)[1:-1])
        env_entries = [e for e in settings.get("Environment") or []
                       if str(e).split("=", 1)[0] not in unset]
        doubt = doubt or any(url in str(e) for e in env_entries) or \
            any(url in repr(v) for k, v in settings.items() if k != "Environment")
        text = masked
    if doubt:
        chosen.update(unit=ctx.unit, url=url)
        text = json.dumps(chosen, sort_keys=True)
    return ChildKey(hashlib.sha256(text.encode()).hexdigest(), unset if not doubt else (),
                    not doubt)

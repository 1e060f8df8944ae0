"""Which class a call runs in: the request's `priority`, the server's default, and the caller
token's default and ceiling (docs/priority.md).

A bearer token may carry classes, in the tokens file (`--auth-tokens-file`), after the token:

    s3cr3t-backfill  default=bulk ceiling=bulk
    s3cr3t-newsroom  default=interactive

`default`: the class of this token's calls that name none (else the server's `--default-priority`,
made no more urgent than the ceiling). `ceiling`: the most urgent class the token may ask for
(default: interactive, no limit). Asking above the ceiling is refused with PERMISSION_DENIED,
never clamped: a back-fill that believes it runs interactive would hide the mistake in its
latency, so it is told at once. Without tokens (or for `--auth-token`), every caller may ask for
any class.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..domain import Priority
from ..errors import ConfigError, PermissionDenied

CLASS_NAMES = {p.name.lower(): p for p in Priority}
Metadata = Iterable[tuple[str, str | bytes]] | None


@dataclass(frozen=True)
class TokenClasses:
    """What one token may ask for."""

    default: Priority | None = None
    """None: the server's default, made no more urgent than `ceiling`."""
    ceiling: Priority = Priority.INTERACTIVE


def parse_token_line(line: str, where: str) -> tuple[str, TokenClasses]:
    """`TOKEN [default=CLASS] [ceiling=CLASS]`, as one line of the tokens file holds it."""
    token, *fields = line.split()
    values: dict[str, Priority] = {}
    for field in fields:
        name, _, value = field.partition("=")
        if name not in ("default", "ceiling") or name in values:
            raise ConfigError(f"{where}: a bearer token must be one printable word without "
                              f"spaces, followed only by default=CLASS and/or ceiling=CLASS "
                              f"(not {field!r})")
        if value.lower() not in CLASS_NAMES:
            raise ConfigError(f"{where}: {name}={value!r} is not a class (one of "
                              f"{', '.join(CLASS_NAMES)})")
        values[name] = CLASS_NAMES[value.lower()]
    classes = TokenClasses(values.get("default"), values.get("ceiling", Priority.INTERACTIVE))
    if classes.default is not None and classes.default < classes.ceiling:
        raise ConfigError(f"{where}: default={classes.default.name.lower()} is more urgent "
                          f"than the token's ceiling={classes.ceiling.name.lower()}")
    return token, classes


def bearer_token(metadata: Metadata, key: str = "authorization") -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if the call sent one."""
    for name, value in metadata or ():
        if name.lower() != key or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


@dataclass(frozen=True)
class CallerClasses:
    """The classes of the caller asking: what it gets unasked, and the most it may ask."""

    default: Priority
    ceiling: Priority


class PriorityRules:
    """Resolves each call's class from its request and its token."""

    def __init__(self, default: Priority,
                 tokens: Mapping[str, TokenClasses] | None = None) -> None:
        self.default = default
        self._tokens = [(t.encode(), c) for t, c in (tokens or {}).items()]

    def caller(self, metadata: Metadata) -> CallerClasses:
        """The classes of the token the call presents (any class, when it carries none)."""
        classes = TokenClasses()
        presented = bearer_token(metadata)
        if presented is not None and self._tokens:
            raw = presented.encode()
            # Compared with every token, each in constant time, like the authentication.
            for token, token_classes in self._tokens:
                if hmac.compare_digest(raw, token):
                    classes = token_classes
        default = classes.default if classes.default is not None else max(self.default,
                                                                           classes.ceiling)
        return CallerClasses(default, classes.ceiling)

    def resolve(self, requested: Priority | None, metadata: Metadata) -> Priority:
        """The call's class: `requested` (None: the caller's default). Raises PermissionDenied
        when it is more urgent than the caller's token allows."""
        caller = self.caller(metadata)
        if requested is None:
            return caller.default
        if requested < caller.ceiling:
            raise PermissionDenied(
                f"priority: this token may ask for {caller.ceiling.name} at most, not "
                f"{requested.name}; leave priority unspecified (it defaults to "
                f"{caller.default.name}) or use a token allowed more")
        return requested

"""Optional API keys: `Authorization: Bearer <key>` on every route except the ones left open.

Keys come from `RESNET_SERVE_API_KEYS` (comma separated) and/or a file of one key per line
(`--api-keys-file`, typically a mounted Kubernetes Secret). The file is checked on every
request (one `stat`) and re-read when it changed, so a rotated Secret takes effect without
a restart; several keys may be valid at once, which is how a rotation overlaps. With
neither source configured no key is asked for. Keys are compared in constant time and
never logged.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized

log = logging.getLogger("resnet_serve.security")

# Always open: the OpenAPI document and its viewer describe the API and hold no data.
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
METRICS_PATHS = frozenset({"/metrics"})


class KeyFileError(Exception):
    """The API key file cannot be read, or holds no key."""


def read_key_file(path: Path) -> list[bytes]:
    """The keys of a keys file: one a line, blank lines and `#` comments skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {exc}") from exc
    keys = [line.strip() for line in text.splitlines()]
    found = [key.encode() for key in keys if key and not key.startswith("#")]
    if not found:
        raise KeyFileError(f"the API key file {path} holds no key")
    return found


class ApiKeys:
    """The keys accepted now. Raises `KeyFileError` at construction if the file is unusable;
    later, an unreadable or empty file keeps the last good keys (and logs why), so a
    half-written Secret update never opens the service nor locks everyone out."""

    def __init__(self, env_keys: Iterable[str], path: Path | None) -> None:
        self._env_keys = [key.encode() for key in env_keys if key]
        self._path = path
        self._file_keys: list[bytes] = []
        self._file_stamp: tuple[int, int, int] | None = None
        if path is not None:
            self._file_keys = read_key_file(path)
            self._file_stamp = self._stamp()

    @property
    def enabled(self) -> bool:
        return bool(self._env_keys) or self._path is not None

    def _stamp(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            status = os.stat(self._path)  # follows the symlinks a mounted Secret swaps
        except OSError:
            return None
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    def _refresh(self) -> None:
        if self._path is None:
            return
        stamp = self._stamp()
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        try:
            self._file_keys = read_key_file(self._path)
        except KeyFileError as exc:
            log.error("%s; keeping the %d key(s) read before", exc, len(self._file_keys))
            return
        log.info("API keys re-read from %s: %d key(s)", self._path, len(self._file_keys))

    def accepts(self, presented: bytes) -> bool:
        """Compare against every key (no early exit), each in constant time."""
        self._refresh()
        matched = False
        for key in (*self._env_keys, *self._file_keys):
            matched |= hmac.compare_digest(presented, key)
        return matched


def bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """Refuses (401, the service's JSON error) HTTP requests without an accepted key."""

    def __init__(
        self, app: ASGIApp, keys: ApiKeys, open_paths: frozenset[str], on_refused: object
    ) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths
        self.on_refused = on_refused  # callable(Unauthorized, path) -> ASGI response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.keys.accepts(token):
            await self.app(scope, receive, send)
            return
        error = Unauthorized(
            "a valid API key is required: send 'Authorization: Bearer <key>'"
            if token is None
            else "the API key is not valid"
        )
        response = self.on_refused(error, scope["path"])  # type: ignore[operator]
        await response(scope, receive, send)


def open_paths(for_probes: bool, for_metrics: bool) -> frozenset[str]:
    """The paths that need no key, given whether probes and metrics need one."""
    paths = set(DOC_PATHS)
    if not for_probes:
        paths |= PROBE_PATHS
    if not for_metrics:
        paths |= METRICS_PATHS
    return frozenset(paths)

"""`python -m service.healthcheck`: the container image's HEALTHCHECK.

Asks the server in the same container for `GET /healthz` on the port its own settings
name (RESNET_SERVE_PORT), so the check follows the configuration instead of repeating it.
Exit status 0 when it answers 200, 1 otherwise. Liveness, not readiness: a server that is
warming up or draining is healthy. With RESNET_SERVE_API_KEY_FOR_PROBES the check sends one
of the server's own API keys (from RESNET_SERVE_API_KEYS or the keys file), so keyed probes
do not turn the container unhealthy.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from service.config import Settings
from service.frontend.security import KeyFileError, read_key_file


def check(port: int, timeout_s: float = 3.0, api_key: str | None = None) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz")
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def probe_key(settings: Settings) -> str | None:
    """A key the server accepts, when its probes need one (None when they do not)."""
    if not settings.api_key_for_probes:
        return None
    if settings.api_keys:
        return settings.api_keys[0].get_secret_value()
    if settings.api_keys_file is not None:
        return read_key_file(settings.api_keys_file)[0].decode()
    return None  # no keys configured: the server asks for none


def main() -> int:
    try:
        settings = Settings()
        api_key = probe_key(settings)
    except (ValidationError, KeyFileError) as exc:
        print(f"healthcheck: invalid settings: {exc}", file=sys.stderr)
        return 1
    healthy = check(settings.port, api_key=api_key)
    if not healthy:
        print(f"healthcheck: no 200 from 127.0.0.1:{settings.port}/healthz", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())

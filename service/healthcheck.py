"""`python -m service.healthcheck`: the container image's HEALTHCHECK.

Asks the server in the same container for `GET /healthz` on the port its own settings
name (RESNET_SERVE_PORT), so the check follows the configuration instead of repeating it.
Exit status 0 when it answers 200, 1 otherwise. Liveness, not readiness: a server that is
warming up or draining is healthy.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from service.config import Settings


def check(port: int, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"healthcheck: invalid settings: {exc}", file=sys.stderr)
        return 1
    healthy = check(settings.port)
    if not healthy:
        print(f"healthcheck: no 200 from 127.0.0.1:{settings.port}/healthz", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""JSON responses and the one error shape: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from service.errors import Draining, ServiceError

JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, headers=headers, media_type=JSON)


def error_response(error: ServiceError) -> Response:
    headers = dict(error.headers)
    if isinstance(error, Draining):
        headers["Connection"] = "close"  # send the client's next request to another replica
    return json_response(error.body(), error.status, headers)

"""Response shapes and request-body descriptions for the OpenAPI docs at /docs.

The hot endpoints encode their JSON directly (orjson) rather than validating their own
output; these models describe that output for clients and the docs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# A 16x16 PNG, so the JSON example in /docs works when tried out.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mNkYDjBQApgEWBgGNUwqmGYagAAMvQB9qYB"
    "NbAAAAAASUVORK5CYII="
)


class ModelRef(BaseModel):
    name: str
    version: str
    precision: str
    trained: bool = Field(description="false: random, untrained weights; labels are meaningless")


class Prediction(BaseModel):
    index: int = Field(description="class index in the model's output", examples=[281])
    label: str = Field(examples=["tabby"])
    score: float = Field(description="softmax probability", examples=[0.87])


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[list[Prediction]] = Field(
        description="one list per image, in request order, highest score first"
    )


class EmbedResponse(BaseModel):
    model: ModelRef
    embeddings: list[list[float]] | list[str] = Field(
        description="one vector per image, in request order; with encoding=base64, each is "
        "the base64 of `dim` little-endian float32 values"
    )
    dim: int = Field(examples=[2048])
    normalized: bool
    encoding: Literal["json", "base64"]


class ErrorBody(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "undecodable image or malformed body",
        413: "body, image count or pixel count too large",
        415: "unsupported media type",
        422: "invalid parameter",
        429: "queue full; retry after the Retry-After header",
        503: "model not ready, or the server is draining",
        504: "the request's deadline passed",
    }.items()
}


def image_request_body(
    extra_fields: dict[str, Any], json_example: dict[str, Any]
) -> dict[str, Any]:
    """The three ways to send images, for `openapi_extra`."""
    binary = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "description": "One image as the raw body, files in a multipart field named "
            "`files` (repeatable), or JSON with base64 images.",
            "content": {
                "image/jpeg": {"schema": binary},
                "image/png": {"schema": binary},
                "image/webp": {"schema": binary},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["files"],
                        "properties": {"files": {"type": "array", "items": binary}, **extra_fields},
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "contentEncoding": "base64"},
                            },
                            **extra_fields,
                        },
                    },
                    "example": {"images": [EXAMPLE_PNG_BASE64], **json_example},
                },
            },
        }
    }

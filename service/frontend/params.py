"""Request parameters (`top_k`, `normalize`, `encoding`): read from the query string or
the body's fields, and validated before the request is admitted, so a bad one costs no
engine run. Error messages quote at most a short prefix of what the client sent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from service.errors import InvalidParameter, shown

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
ENCODINGS = ("json", "base64")


@dataclass(frozen=True)
class PredictParams:
    top_k: int


@dataclass(frozen=True)
class EmbedParams:
    normalize: bool
    encoding: Literal["json", "base64"]


def check_fields(fields: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        names = ", ".join(shown(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidParameter(
            f"unknown field(s): {names}{more}; allowed: {', '.join(sorted(allowed))}"
        )


def predict_params(values: Mapping[str, object], default_top_k: int, classes: int) -> PredictParams:
    return PredictParams(top_k=int_param("top_k", values.get("top_k"), default_top_k, 1, classes))


def embed_params(values: Mapping[str, object]) -> EmbedParams:
    encoding = choice_param("encoding", values.get("encoding"), "json", ENCODINGS)
    return EmbedParams(
        normalize=bool_param("normalize", values.get("normalize"), True),
        encoding="base64" if encoding == "base64" else "json",
    )


def bool_param(name: str, value: object, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidParameter(f"{name} must be true or false, not {shown(value)}")


def int_param(name: str, value: object, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidParameter(f"{name} must be an integer, not {shown(value)}")
    try:
        number = int(value) if isinstance(value, int | float) else int(str(value).strip())
    except (ValueError, OverflowError) as exc:
        raise InvalidParameter(f"{name} must be an integer, not {shown(value)}") from exc
    if not low <= number <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}, not {shown(number)}")
    return number


def choice_param(name: str, value: object, default: str, choices: tuple[str, ...]) -> str:
    if value is None:
        return default
    if value not in choices:
        raise InvalidParameter(f"{name} must be one of {', '.join(choices)}, not {shown(value)}")
    return str(value)

"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the server makes goes through ``APIError`` so that clients (the ``openai`` library raises
``BadRequestError`` / ``AuthenticationError`` from these) see one shape, never FastAPI's default 422.
"""
from __future__ import annotations

import json

from pydantic import ValidationError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """A request the server refuses: HTTP ``status``, a message for people, the offending ``param``."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, status=self.status, param=self.param, code=self.code)


def error_body(message: str, *, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# pydantic error types -> OpenAI-ish codes (the message says the rest)
_CODES = {"missing": "missing_required_parameter", "json_invalid": "invalid_json",
          "extra_forbidden": "unknown_parameter"}


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic validation error, as a 400 naming the field (``messages.0.role``)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    # Union members add their type name to the location (``prompt.str``); drop those for the user.
    loc = [str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    param = ".".join(loc) or None
    what = "is required" if first["type"] == "missing" else f"is invalid: {first.get('msg', 'bad value')}"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    message = f"`{param}` {what}{more}" if param else f"{first.get('msg', 'invalid request')}{more}"
    return APIError(message, param=param, code=_CODES.get(first["type"], "invalid_value"))


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 for malformed JSON / a body that is not an object."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError("The request body must be a JSON object", code="invalid_json")
    return obj

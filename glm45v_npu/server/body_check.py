"""Reading a request body: JSON decoded, checked for what no tokenizer or schema takes, validated as the endpoint's
model, and, for a large body, all of that first done in a process of its own within a time limit (README:
"Limits"), so that a body of a few MB of small JSON values cannot hold the interpreter lock the engine needs."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from ..apart import Apart, TooLong
from ..errors import FieldError, Glm45vError

APART_BYTES = 64 * 1024  # bodies larger than this are read and checked apart first (a smaller one decodes in < 5 ms)
BODY_CHECK_S = 10.0  # what reading and checking one body may take in that process
MAX_BODY_OBJECTS = 65_536  # objects, arrays and strings in one body (numbers are cheap and not counted)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def validated(body: bytes, model_name: str, model: type[BaseModel]) -> Any:
    return _validated(decoded(body), model_name, model)


def decoded(body: bytes) -> dict:
    """The body's JSON object, or an ApiError saying why it is not one."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, or nesting deeper than the parser goes
        raise ApiError(400, f"the body is JSON this server does not read ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _validated(data: dict, model_name: str, model: type[BaseModel]) -> Any:
    where = lone_surrogate(data)
    if where is not None:
        raise ApiError(400, f"{where}: the text holds a lone UTF-16 surrogate (not a character)", param=where)
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = param_of(first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if req.model is not None and req.model != model_name:
        raise ApiError(400, f"model {req.model!r} is not served here (this server serves {model_name!r})",
                       param="model", code="model_not_found")
    bad = req.unsupported()
    if bad:
        raise ApiError(400, f"{bad} is not supported by this server", param=bad)
    return req


def lone_surrogate(data: Any) -> str | None:
    """Where in the body a string holds a lone surrogate (JSON escapes allow it; no tokenizer takes it)."""
    stack = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def param_of(loc: tuple) -> str:
    """pydantic's error location as the request field (without the type tags it adds for unions)."""
    parts = []
    for x in loc:
        if isinstance(x, str) and (x in _TYPE_TAGS or "[" in x):
            break
        parts.append(f"[{x}]" if isinstance(x, int) else ("." if parts else "") + str(x))
    return "".join(parts)


def count_objects(data: Any, limit: int) -> int:
    """Objects, arrays and strings in `data`, counting stops past `limit`."""
    n, stack = 0, [data]
    while stack and n <= limit:
        value = stack.pop()
        if isinstance(value, str):
            n += 1
        elif isinstance(value, dict):
            n += 1 + len(value)  # the keys are strings
            stack.extend(value.values())
        elif isinstance(value, list):
            n += 1
            stack.extend(value)
    return n


def refusal(body: bytes, model_name: str, model: type[BaseModel], defaults: dict,
            max_model_len: int) -> tuple | None:
    """In the checking process: why the body is refused (ApiError's arguments), or None to read it for real."""
    try:
        data = decoded(body)
        _validated(data, model_name, model).prepared(defaults, max_model_len)
        if count_objects(data, MAX_BODY_OBJECTS) > MAX_BODY_OBJECTS:
            return 400, f"the body holds more than {MAX_BODY_OBJECTS} objects, arrays and strings (the limit)"
    except ApiError as e:
        return e.status, e.message, e.kind, e.param, e.code
    except FieldError as e:
        return 400, str(e), "invalid_request_error", e.field
    except Glm45vError as e:
        return 400, str(e)
    except RecursionError:
        return 400, "the request nests too deeply to be read"
    return None


_APART = Apart()


def apart(body: bytes, model_name: str, model: type[BaseModel], defaults: dict,
          max_model_len: int) -> tuple | None:
    """`refusal`, run in the checking process within BODY_CHECK_S."""
    try:
        return _APART.run(refusal, body, model_name, model, defaults, max_model_len, timeout=BODY_CHECK_S)
    except TooLong:
        return 400, f"the body took longer than {BODY_CHECK_S:.0f} s to read and check (the limit)"


def warm() -> None:
    """Start the checking process now (a server's start-up), not on the first large body."""
    _APART.run(int, timeout=60)


def close() -> None:
    """Stop the checking process (a server's shutdown; the next large body starts a fresh one)."""
    _APART.close()

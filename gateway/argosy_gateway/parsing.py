"""Request bodies: read only what routing needs; vLLM judges everything else.

The gateway reads the ``model`` (a string), ``stream`` (a boolean when present), ``user``
(for session affinity, ignored unless a string) and the prompt prefix (for prefix
affinity). Any other field, valid or not, is vLLM's business: the raw body is forwarded
unchanged, and vLLM's own 400 reaches the client as vLLM wrote it.

The gateway answers 400 itself only for bodies it cannot route: not UTF-8, not JSON, not
an object, nested too deeply, or without a string ``model``. Multipart bodies (the audio
paths) are scanned for their ``model`` field in place, without copying the file.

Pure: no web framework, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from argosy_gateway.errors import GatewayError, bad_request

JSON_BODY: Final = "json"
MULTIPART_BODY: Final = "multipart"

_MULTIPART_FIELDS: Final = (b"model", b"stream", b"user")
_PREFIX_FIELDS: Final = ("messages", "prompt", "input", "query", "text_1", "queries", "tokens")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str
    stream: bool
    user: str | None
    body: Mapping[str, Any] = field(default_factory=dict)  # the decoded JSON (empty for multipart)


def parse_request(kind: str, raw: bytes, content_type: str | None = None) -> ParsedRequest:
    """Read ``model``/``stream``/``user`` from a body; raise GatewayError (400) when it cannot be routed.

    ``kind`` is JSON_BODY or MULTIPART_BODY (then ``content_type`` carries the boundary).
    """
    if kind == MULTIPART_BODY:
        return parse_multipart(raw, content_type or "")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"Request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json") from None
    try:
        body = _loads(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"Request body must be a JSON object, not {_type_name(body)}.", code="invalid_json")
    model = body.get("model")
    if model.__class__ is not str or not model:
        model = _model(model)  # raises, or passes a str subclass
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(
            f"The 'stream' field must be a boolean, not {_type_name(stream)}.", param="stream", code="invalid_type"
        )
    user = body.get("user")
    return ParsedRequest(model, stream is True, user if isinstance(user, str) else None, body)


_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner json.loads ends in
_JSON_WHITESPACE = " \t\n\r"


def _loads(text: str) -> Any:
    """``json.loads(text)``, without its three Python-level calls for the usual body (an object).

    Anything else, and every error, goes through ``json.loads`` itself (its messages included).
    """
    if text[:1] == "{":
        try:
            value, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            return json.loads(text)  # raises json's own error
        if end == len(text) or not text[end:].strip(_JSON_WHITESPACE):
            return value
    return json.loads(text)


def _model(value: object) -> str:
    if value is None:
        raise bad_request("The 'model' field is required.", param="model", code="missing_required_parameter")
    if not isinstance(value, str) or not value:
        raise bad_request("The 'model' field must be a non-empty string.", param="model", code="invalid_type")
    return value


def _too_deep() -> GatewayError:
    # json refuses nesting deeper than the interpreter's recursion limit (about 1000 levels).
    return bad_request("Request body is nested too deeply.", code="invalid_json")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def multipart_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type, or None."""
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    for parameter in parameters.split(";"):
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip().strip('"')
            if value and len(value) <= 200:
                try:
                    return value.encode("ascii")
                except UnicodeEncodeError:
                    return None
    return None


def multipart_fields(raw: bytes, boundary: bytes, wanted: tuple[bytes, ...] = _MULTIPART_FIELDS) -> dict[str, bytes]:
    """The values of the ``wanted`` form fields; other parts (the audio file) are skipped, not copied."""
    delimiter = b"--" + boundary
    found: dict[str, bytes] = {}
    position = raw.find(delimiter)
    while position >= 0 and len(found) < len(wanted):
        start = position + len(delimiter)
        if raw.startswith(b"--", start):
            break  # the closing delimiter
        headers_end = raw.find(b"\r\n\r\n", start)
        if headers_end < 0:
            break
        following = raw.find(b"\r\n" + delimiter, headers_end + 4)
        if following < 0:
            break
        name = _part_name(raw[start:headers_end])
        if name is not None and name in wanted:
            found.setdefault(name.decode("ascii"), raw[headers_end + 4 : following])
        position = following + 2
    return found


def _part_name(headers: bytes) -> bytes | None:
    for line in headers.split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() != b"content-disposition":
            continue
        for parameter in value.split(b";")[1:]:
            key, _, quoted = parameter.strip().partition(b"=")
            if key.strip().lower() == b"name":
                return quoted.strip().strip(b'"')
    return None


def parse_multipart(raw: bytes, content_type: str) -> ParsedRequest:
    boundary = multipart_boundary(content_type)
    if boundary is None:
        raise bad_request("This path takes a multipart/form-data body (with a boundary).", code="invalid_content_type")
    fields = multipart_fields(raw, boundary)
    value = fields.get("model")
    if value is None:
        raise bad_request("The 'model' form field is required.", param="model", code="missing_required_parameter")
    try:
        model = value.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The 'model' form field is not valid UTF-8.", param="model", code="invalid_type") from None
    user = fields.get("user")
    return ParsedRequest(
        _model(model),
        fields.get("stream", b"").strip().lower() == b"true",
        user.decode("utf-8", "replace") if user is not None else None,
    )


def prompt_prefix(body: Mapping[str, Any], limit: int) -> str:
    """The first ``limit`` characters of the prompt: the key for prefix affinity.

    Whatever the path calls its prompt (``messages``, ``prompt``, ``input``, ``query``, ...);
    the Responses API's ``instructions`` come first, as a system message would.
    """
    parts: list[str] = []
    size = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        parts.append(instructions)
        size = len(instructions)
    for name in _PREFIX_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        ids = _token_ids(value, limit)
        if ids is not None:
            return ids  # token ids: the first ``limit`` tokens
        for text in _texts(value, limit - size):
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        break
    return "\x1e".join(parts)[:limit]


def _texts(value: object, budget: int) -> list[str]:
    """Text pieces of a prompt value, in order, until ``budget`` characters are collected."""
    if isinstance(value, str):
        return [value]
    while isinstance(value, list) and value and isinstance(value[0], str | list):
        value = value[0]  # a batch: the first prompt decides (a loop: nesting may be deep)
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return []
    texts: list[str] = []
    size = 0
    for item in value:  # messages or Responses input items
        content = item.get("content") if isinstance(item, dict) else None
        pieces = [content] if isinstance(content, str) else _content_texts(content)
        for piece in pieces:
            texts.append(piece)
            size += len(piece)
            if size >= budget:
                return texts
    return texts


def _token_ids(value: object, limit: int) -> str | None:
    while isinstance(value, list) and value and isinstance(value[0], list):
        value = value[0]
    if isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
        return ",".join(str(token) if isinstance(token, int) else "?" for token in value[:limit])
    return None


def _content_texts(content: object) -> list[str]:
    if not isinstance(content, list):
        return []
    return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]

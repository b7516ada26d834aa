"""Request body checks: parse once, check only what routing needs and obvious types.

The raw body is forwarded unchanged; this module only reads it. Pure: no web
framework, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from argosy_gateway.errors import bad_request

CHAT: Final = "chat"
COMPLETIONS: Final = "completions"
EMBEDDINGS: Final = "embeddings"

# Fields whose type is obvious from the OpenAI API; null is accepted for all of them.
_INTEGER_FIELDS: Final = ("max_tokens", "max_completion_tokens", "n", "seed", "top_k", "logprobs")
_NUMBER_FIELDS: Final = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_BOOLEAN_FIELDS: Final = ("stream", "echo")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str
    stream: bool
    user: str | None
    body: dict[str, Any]


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


def parse_request(kind: str, raw: bytes) -> ParsedRequest:
    """Parse and check a request body; raise GatewayError (400) when it is malformed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"Request body is not valid UTF-8 (byte {exc.start}).", code="invalid_json") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise bad_request("Request body is nested too deeply.", code="invalid_json") from None
    except ValueError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"Request body must be a JSON object, not {_type_name(body)}.", code="invalid_json")

    model = body.get("model")
    if model is None:
        raise bad_request("The 'model' field is required.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise bad_request("The 'model' field must be a non-empty string.", param="model", code="invalid_type")

    if kind == CHAT:
        messages = body.get("messages")
        if messages is None:
            raise bad_request("The 'messages' field is required.", param="messages", code="missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise bad_request("The 'messages' field must be a non-empty array.", param="messages", code="invalid_type")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(
                    f"messages[{index}] must be an object with a string 'role'.",
                    param=f"messages[{index}]",
                    code="invalid_type",
                )
    elif kind == COMPLETIONS:
        _require_text_or_array(body, "prompt")
    elif kind == EMBEDDINGS:
        _require_text_or_array(body, "input")

    for name in _BOOLEAN_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise _wrong_type(name, "a boolean", value)
    for name in _INTEGER_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _wrong_type(name, "an integer", value)
    for name in _NUMBER_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _wrong_type(name, "a number", value)
    stop = body.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _wrong_type("stop", "a string or an array of strings", stop)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _wrong_type("stream_options", "an object", stream_options)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _wrong_type("user", "a string", user)

    return ParsedRequest(model=model, stream=body.get("stream") is True, user=user, body=body)


def _require_text_or_array(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        raise bad_request(f"The '{name}' field is required.", param=name, code="missing_required_parameter")
    if not isinstance(value, str | list):
        raise _wrong_type(name, "a string or an array", value)


def _wrong_type(name: str, expected: str, value: object) -> Exception:
    return bad_request(
        f"The '{name}' field must be {expected}, not {_type_name(value)}.", param=name, code="invalid_type"
    )


def prompt_prefix(kind: str, body: dict[str, Any], limit: int) -> str:
    """The first ``limit`` characters of the prompt: the key for prefix affinity."""
    if kind == CHAT:
        parts: list[str] = []
        size = 0
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            for text in _texts(content):
                parts.append(text)
                size += len(text)
                if size >= limit:
                    return "\x1e".join(parts)[:limit]
        return "\x1e".join(parts)[:limit]
    value = body.get("prompt" if kind == COMPLETIONS else "input")
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        value = value[0]  # a batch: the first prompt decides
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, list):  # token ids
        return ",".join(str(token) for token in value[:limit])
    return ""


def _texts(content: object) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []

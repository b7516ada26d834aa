"""vLLM's OpenAI wire format: request validation and response bodies.

Bodies are built from cached byte templates so the simulator stays cheap enough to be the
"direct" baseline in benchmarks: per request only the id, the timestamp and the usage numbers
are formatted.
"""

from __future__ import annotations

import array
import base64
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

CHARS_PER_TOKEN = 4  # the simulator's tokenizer: every 4 characters of prompt text are one token
DEFAULT_EMBEDDING_DIM = 16

RequestKind = Literal["chat", "completion", "embedding"]


class RequestError(Exception):
    """A request vLLM would refuse; rendered as vLLM's error body with this status."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> bytes:
    """vLLM's ErrorResponse (current releases nest it under "error", like OpenAI)."""
    return json.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}},
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: RequestKind
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: the default reply (one sentence, finish_reason "stop")
    prompt_text: str  # what the prefix cache hashes; CHARS_PER_TOKEN characters per token
    prompt_tokens: int
    embedding_inputs: tuple[str, ...] = ()
    embedding_base64: bool = False


def _token_ids_text(ids: list[Any]) -> str:
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RequestError(400, "prompt token ids must be integers", param="prompt")
    return "".join(f"{i & 0xFFFF:04x}" for i in ids)


def _text_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def _prompt_text(prompt: Any) -> str:
    """One completion prompt as text: a string, a list of token ids, or a one-element list of either."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int) and not isinstance(prompt[0], bool):
            return _token_ids_text(prompt)
        if len(prompt) == 1:
            return _prompt_text(prompt[0])
        raise RequestError(
            400,
            "the simulator serves one prompt per request; send a batch as separate requests",
            param="prompt",
        )
    raise RequestError(400, "prompt must be a non-empty string or list of token ids", param="prompt")


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of message objects", param="messages")
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError(400, "each message must be an object", param="messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(400, "each message needs a string role", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RequestError(400, "message content must be a string or a list of parts", param="messages")
        parts.append(f"<|{role}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _optional_positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(400, f"{key} must be a positive integer", param=key)
    return value


def parse_request(kind: RequestKind, raw: bytes, max_model_len: int) -> ParsedRequest:
    """Validate a request body the way vLLM's pydantic models do; raise RequestError(400) if bad."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(400, "model must be a string", param="model")

    if kind == "embedding":
        return _parse_embedding(body, model, max_model_len)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be a boolean", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError(400, "stream_options must be an object", param="stream_options")
    if stream_options and not stream:
        raise RequestError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    include_usage = bool(stream_options and stream_options.get("include_usage"))
    n = body.get("n", 1)
    if n not in (None, 1):
        raise RequestError(400, "the simulator returns one choice per request (n=1)", param="n")

    if kind == "chat":
        prompt_text = _chat_text(body.get("messages"))
        max_tokens = _optional_positive_int(body, "max_completion_tokens") or _optional_positive_int(body, "max_tokens")
    else:
        if "prompt" not in body:
            raise RequestError(400, "prompt is required", param="prompt")
        prompt_text = _prompt_text(body["prompt"])
        max_tokens = _optional_positive_int(body, "max_tokens")

    prompt_tokens = _text_tokens(prompt_text)
    if prompt_tokens >= max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            param="input_tokens",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise RequestError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_tokens}).",
            param="max_tokens",
        )
    return ParsedRequest(kind, model, stream, include_usage, max_tokens, prompt_text, prompt_tokens)


def _parse_embedding(body: dict[str, Any], model: str, max_model_len: int) -> ParsedRequest:
    raw_input = body.get("input")
    inputs: list[str]
    if isinstance(raw_input, str):
        inputs = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        if all(isinstance(item, str) for item in raw_input):
            inputs = list(raw_input)
        elif all(isinstance(item, int) and not isinstance(item, bool) for item in raw_input):
            inputs = [_token_ids_text(raw_input)]
        elif all(isinstance(item, list) and item for item in raw_input):
            inputs = [_token_ids_text(item) for item in raw_input]
        else:
            raise RequestError(400, "input must be a string, a list of strings or of token ids", param="input")
    else:
        raise RequestError(400, "input must be a non-empty string or list", param="input")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    tokens = [_text_tokens(text) for text in inputs]
    if max(tokens) > max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{max(tokens)} tokens in the input for embedding generation. "
            "Please reduce the length of the input.",
            param="input_tokens",
        )
    return ParsedRequest(
        kind="embedding",
        model=model,
        stream=False,
        include_usage=False,
        max_tokens=None,
        prompt_text=inputs[0],
        prompt_tokens=sum(tokens),
        embedding_inputs=tuple(inputs),
        embedding_base64=encoding_format == "base64",
    )


def reply_tokens(model: str, address: str, max_tokens: int | None) -> tuple[list[str], str]:
    """The simulated output: a sentence naming the model and the server, as tokens, and the finish reason.

    Without max_tokens the sentence ends the reply ("stop"); with it, exactly max_tokens tokens are
    produced, repeating the sentence ("length"), so benchmarks get the length they ask for.
    """
    sentence = ["Simulated", " reply", " from", f" {model}", " at", f" {address}", "."]
    if max_tokens is None:
        return sentence, "stop"
    size = len(sentence)
    tokens = [sentence[i % size] if i < size or i % size else " " + sentence[0] for i in range(max_tokens)]
    return tokens, "length"


def _j(value: str) -> str:
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class StreamTemplate:
    """An SSE stream with a hole for the "stamp" (id through created) at the start of every event.

    Event i is EVENT_PREFIX + stamp + tails[i]; joined_parts lets the whole stream be built with
    one bytes.join when it is sent in one write.
    """

    tails: tuple[bytes, ...]
    joined_parts: tuple[bytes, ...]
    usage_head: bytes
    completion_tokens: int


EVENT_PREFIX = b'data: {"id":"'
DONE_EVENT = b"data: [DONE]\n\n"


class Renderer:
    """Builds response bodies for one server address; caches per (model, length) templates."""

    _CACHE_LIMIT = 4096

    def __init__(self, address: str) -> None:
        self.address = address
        self._plain: dict[tuple[RequestKind, str, int | None], tuple[str, int]] = {}
        self._streams: dict[tuple[RequestKind, str, int | None], StreamTemplate] = {}

    def _bounded(self, cache: dict[Any, Any]) -> None:
        if len(cache) >= self._CACHE_LIMIT:
            cache.clear()

    def completion_tokens(self, parsed: ParsedRequest) -> int:
        return len(reply_tokens(parsed.model, self.address, parsed.max_tokens)[0])

    def plain_body(self, parsed: ParsedRequest, request_id: str, created: int, cached_tokens: int) -> bytes:
        key = (parsed.kind, parsed.model, parsed.max_tokens)
        entry = self._plain.get(key)
        if entry is None:
            self._bounded(self._plain)
            entry = self._plain[key] = self._plain_template(parsed)
        template, completion_tokens = entry
        prompt_tokens = parsed.prompt_tokens
        return (
            template % (request_id, created, prompt_tokens, prompt_tokens + completion_tokens, cached_tokens)
        ).encode()

    def _plain_template(self, parsed: ParsedRequest) -> tuple[str, int]:
        tokens, finish = reply_tokens(parsed.model, self.address, parsed.max_tokens)
        text = _j("".join(tokens)).replace("%", "%%")
        model = _j(parsed.model).replace("%", "%%")
        usage = (
            f'"usage":{{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":{len(tokens)},'
            f'"prompt_tokens_details":{{"cached_tokens":%d}}}}'
        )
        if parsed.kind == "chat":
            template = (
                f'{{"id":"%s","object":"chat.completion","created":%d,"model":{model},"choices":[{{"index":0,'
                f'"message":{{"role":"assistant","content":{text},"refusal":null,"annotations":null,'
                f'"audio":null,"function_call":null,"tool_calls":[],"reasoning_content":null}},'
                f'"logprobs":null,"finish_reason":"{finish}","stop_reason":null}}],"service_tier":null,'
                f'"system_fingerprint":null,{usage},"prompt_logprobs":null,"kv_transfer_params":null}}'
            )
        else:
            template = (
                f'{{"id":"%s","object":"text_completion","created":%d,"model":{model},"choices":[{{"index":0,'
                f'"text":{text},"logprobs":null,"finish_reason":"{finish}","stop_reason":null,'
                f'"prompt_logprobs":null}}],"service_tier":null,"system_fingerprint":null,{usage},'
                f'"kv_transfer_params":null}}'
            )
        return template, len(tokens)

    def stream_template(self, parsed: ParsedRequest) -> StreamTemplate:
        key = (parsed.kind, parsed.model, parsed.max_tokens)
        template = self._streams.get(key)
        if template is None:
            self._bounded(self._streams)
            template = self._streams[key] = self._build_stream_template(parsed)
        return template

    def _build_stream_template(self, parsed: ParsedRequest) -> StreamTemplate:
        tokens, finish = reply_tokens(parsed.model, self.address, parsed.max_tokens)
        model = _j(parsed.model)
        last = len(tokens) - 1
        tails: list[str] = []
        if parsed.kind == "chat":
            tails.append(
                f',"model":{model},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                f'"logprobs":null,"finish_reason":null}}]}}\n\n'
            )
            for i, token in enumerate(tokens):
                end = f'"finish_reason":"{finish}","stop_reason":null' if i == last else '"finish_reason":null'
                tails.append(
                    f',"model":{model},"choices":[{{"index":0,"delta":{{"content":{_j(token)}}},'
                    f'"logprobs":null,{end}}}]}}\n\n'
                )
        else:
            for i, token in enumerate(tokens):
                end = f'"finish_reason":"{finish}"' if i == last else '"finish_reason":null'
                tails.append(
                    f',"model":{model},"choices":[{{"index":0,"text":{_j(token)},"logprobs":null,'
                    f'{end},"stop_reason":null}}]}}\n\n'
                )
        encoded = [tail.encode() for tail in tails]
        joined = [EVENT_PREFIX] + [tail + EVENT_PREFIX for tail in encoded[:-1]] + [encoded[-1]]
        usage_head = f',"model":{model},"choices":[],"usage":'.encode()
        return StreamTemplate(tuple(encoded), tuple(joined), usage_head, len(tokens))

    @staticmethod
    def stream_stamp(kind: RequestKind, request_id: str, created: int) -> bytes:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        return f'{request_id}","object":"{obj}","created":{created}'.encode()

    @staticmethod
    def usage_event(template: StreamTemplate, stamp: bytes, prompt_tokens: int, cached_tokens: int) -> bytes:
        completion = template.completion_tokens
        usage = (
            f'{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens + completion},'
            f'"completion_tokens":{completion},"prompt_tokens_details":{{"cached_tokens":{cached_tokens}}}}}}}\n\n'
        )
        return EVENT_PREFIX + stamp + template.usage_head + usage.encode()

    @staticmethod
    def embedding_body(parsed: ParsedRequest, request_id: str, created: int, dim: int) -> bytes:
        data = []
        for index, text in enumerate(parsed.embedding_inputs):
            vector = embedding_vector(text, dim)
            encoded: Any = (
                base64.b64encode(array.array("f", vector).tobytes()).decode() if parsed.embedding_base64 else vector
            )
            data.append({"index": index, "object": "embedding", "embedding": encoded})
        return json.dumps(
            {
                "id": request_id,
                "object": "list",
                "created": created,
                "model": parsed.model,
                "data": data,
                "usage": {
                    "prompt_tokens": parsed.prompt_tokens,
                    "total_tokens": parsed.prompt_tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            },
            separators=(",", ":"),
        ).encode()


def embedding_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text` (equal inputs give equal embeddings)."""
    digest = hashlib.shake_128(text.encode()).digest(2 * dim)
    raw = [int.from_bytes(digest[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, 2 * dim, 2)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]

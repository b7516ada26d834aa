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
# vLLM refuses a prompt text longer than max_model_len times its tokenizer's longest token before
# tokenizing it; this is that longest token for the simulator (real tokenizers: about 16 characters).
MAX_CHARS_PER_TOKEN = 16
DEFAULT_EMBEDDING_DIM = 16
# The vLLM release whose wire format this simulates; tests/contract/test_simulator_parity.py
# compares the two side by side with that release running.
VLLM_VERSION = "0.32.0"
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
# Log probabilities the simulated model gives: the chosen token, then each alternative.
CHOSEN_LOGPROB = -0.125

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
    logprobs: int | None = None  # None: no logprobs; else the number of top alternatives per token


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


def validation_message(message: str, parameter: str, value: Any = None) -> str:
    """vLLM's VLLMValidationError text: the message, then which parameter (and value) it is about."""
    suffix = f"parameter={parameter}" + ("" if value is None else f", value={value}")
    return f"{message} ({suffix})"


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, f"{key} must be an integer", param=key)
    return value


def _max_tokens(body: dict[str, Any], key: str, max_model_len: int) -> int | None:
    value = _optional_int(body, key)
    if value is None:
        return None
    if value < 1:
        raise RequestError(400, validation_message(f"{key} must be at least 1, got {value}.", key, value), param=key)
    if value > max_model_len:
        raise RequestError(
            400,
            validation_message(
                f"{key}={value} cannot be greater than max_model_len={max_model_len}. "
                "Please request fewer output tokens.",
                key,
                value,
            ),
            param=key,
        )
    return value


def _text_length_check(text: str, max_model_len: int) -> None:
    """vLLM's check before tokenizing: a text no tokenizer could fit into max_model_len tokens."""
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if len(text) > limit:
        raise RequestError(
            400,
            validation_message(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
                f"{len(text)} characters (more than {limit} characters, which is the upper bound for "
                f"{max_model_len} input tokens). Please reduce the length of the input prompt.",
                "input_text",
                len(text),
            ),
            param="input_text",
        )


def _logprobs(body: dict[str, Any], kind: RequestKind) -> int | None:
    """How many alternatives per token the request asks for, or None for no logprobs."""
    if kind == "chat":
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise RequestError(400, "logprobs must be a boolean", param="logprobs")
        top = _optional_int(body, "top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise RequestError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}", param="top_logprobs")
        return (top or 0) if wanted else None
    count = _optional_int(body, "logprobs")
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise RequestError(
            400, f"Requested sample logprobs of {count}, which is greater than max allowed: {MAX_LOGPROBS}",
            param="logprobs",
        )
    return count


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
        raise RequestError(
            400,
            validation_message("Stream options can only be defined when `stream=True`.", "stream_options"),
            param="stream_options",
        )
    include_usage = bool(stream_options and stream_options.get("include_usage"))
    n = body.get("n", 1)
    if n not in (None, 1):
        raise RequestError(400, "the simulator returns one choice per request (n=1)", param="n")

    if kind == "chat":
        prompt_text = _chat_text(body.get("messages"))
        _text_length_check(prompt_text, max_model_len)
        max_tokens = _max_tokens(body, "max_completion_tokens", max_model_len) or _max_tokens(
            body, "max_tokens", max_model_len
        )
    else:
        if "prompt" not in body:
            raise RequestError(400, "prompt is required", param="prompt")
        prompt_text = _prompt_text(body["prompt"])
        if isinstance(body["prompt"], str):
            _text_length_check(prompt_text, max_model_len)
        max_tokens = _max_tokens(body, "max_tokens", max_model_len)
    logprobs = _logprobs(body, kind)

    prompt_tokens = _text_tokens(prompt_text)
    if prompt_tokens >= max_model_len:
        # vLLM's tokenizer stops counting one token past the limit, hence "at least".
        # (vLLM itself lets a prompt of exactly max_model_len tokens through, with no room to answer.)
        counted = min(prompt_tokens, max_model_len + 1)
        qualifier = "at least " if counted == max_model_len + 1 else ""
        raise RequestError(
            400,
            validation_message(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
                f"{qualifier}{counted} input tokens, which exceeds this limit even without any output tokens. "
                "Please reduce the length of the input prompt.",
                "input_tokens",
                counted,
            ),
            param="input_tokens",
        )
    # Like vLLM, an answer that would overrun the context is cut short ("length"), not refused.
    room = max_model_len - prompt_tokens
    if (max_tokens or DEFAULT_REPLY_TOKENS) > room:
        max_tokens = room
    return ParsedRequest(kind, model, stream, include_usage, max_tokens, prompt_text, prompt_tokens, logprobs=logprobs)


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


DEFAULT_REPLY_TOKENS = 7  # the length of the sentence below


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


def _j(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def system_fingerprint(models: tuple[str, ...]) -> str:
    """Shaped like vLLM's: `vllm-<version>-<8 hex digits>` (vLLM hashes its config)."""
    return f"vllm-{VLLM_VERSION}-{hashlib.sha256(' '.join(models).encode()).hexdigest()[:8]}"


def _alternatives(tokens: list[str], index: int, count: int) -> list[str]:
    """`count` top tokens for position `index`: the chosen one first, then other tokens of the reply."""
    chosen = tokens[index]
    others = [token for token in dict.fromkeys(tokens) if token != chosen]
    others += [f" alt{n}" for n in range(max(0, count - 1 - len(others)))]
    return [chosen, *others][:count]


def _top_logprob(rank: int) -> float:
    return CHOSEN_LOGPROB if rank == 0 else -2.0 - rank


def chat_logprobs(tokens: list[str], indexes: range, top: int) -> dict[str, Any]:
    """choices[].logprobs of a chat answer: one entry per token with `top` alternatives."""

    def entry(token: str, rank: int) -> dict[str, Any]:
        return {"token": token, "logprob": _top_logprob(rank), "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(tokens[i], 0), "top_logprobs": [entry(t, r) for r, t in enumerate(_alternatives(tokens, i, top))]}
            for i in indexes
        ]
    }


def completion_logprobs(tokens: list[str], indexes: range, top: int) -> dict[str, Any]:
    """choices[].logprobs of a completion: parallel lists; top_logprobs maps token text to logprob."""
    offsets = [len("".join(tokens[:i])) for i in indexes]
    return {
        "text_offset": offsets,
        "token_logprobs": [CHOSEN_LOGPROB for _ in indexes],
        "tokens": [tokens[i] for i in indexes],
        "top_logprobs": [
            {t: _top_logprob(r) for r, t in enumerate(_alternatives(tokens, i, max(top, 1)))} for i in indexes
        ],
    }


def _logprobs_for(parsed: ParsedRequest, tokens: list[str], indexes: range) -> dict[str, Any] | None:
    if parsed.logprobs is None:
        return None
    render = chat_logprobs if parsed.kind == "chat" else completion_logprobs
    return render(tokens, indexes, parsed.logprobs)


@dataclass(frozen=True, slots=True)
class StreamTemplate:
    """An SSE stream with a hole for the "stamp" (id through created) at the start of every event.

    Event i is EVENT_PREFIX + stamp + tails[i]; joined_parts lets the whole stream be built with
    one bytes.join when it is sent in one write.
    """

    tails: tuple[bytes, ...]
    joined_parts: tuple[bytes, ...]
    usage_head: bytes
    usage_tail: bytes
    completion_tokens: int


EVENT_PREFIX = b'data: {"id":"'
DONE_EVENT = b"data: [DONE]\n\n"

# Placeholders in cached plain-body templates, filled per request with % formatting.
_ID, _CREATED, _PROMPT, _TOTAL, _CACHED = "@@id@@", "@@created@@", "@@prompt@@", "@@total@@", "@@cached@@"


class Renderer:
    """Builds response bodies for one server address; caches per request-shape templates.

    `prompt_tokens_details` mirrors vLLM's --enable-prompt-tokens-details: off, usage says null there.
    """

    _CACHE_LIMIT = 4096

    def __init__(self, address: str, fingerprint: str = "", prompt_tokens_details: bool = False) -> None:
        self.address = address
        self.fingerprint = fingerprint or system_fingerprint(())
        self.prompt_tokens_details = prompt_tokens_details
        self._plain: dict[tuple[Any, ...], tuple[str, int]] = {}
        self._streams: dict[tuple[Any, ...], StreamTemplate] = {}

    def _bounded(self, cache: dict[Any, Any]) -> None:
        if len(cache) >= self._CACHE_LIMIT:
            cache.clear()

    @staticmethod
    def _key(parsed: ParsedRequest) -> tuple[Any, ...]:
        return (parsed.kind, parsed.model, parsed.max_tokens, parsed.logprobs, parsed.include_usage)

    def completion_tokens(self, parsed: ParsedRequest) -> int:
        return len(reply_tokens(parsed.model, self.address, parsed.max_tokens)[0])

    def plain_body(self, parsed: ParsedRequest, request_id: str, created: int, cached_tokens: int) -> bytes:
        key = self._key(parsed)
        entry = self._plain.get(key)
        if entry is None:
            self._bounded(self._plain)
            entry = self._plain[key] = self._plain_template(parsed)
        template, completion_tokens = entry
        prompt_tokens = parsed.prompt_tokens
        values = (request_id, created, prompt_tokens, prompt_tokens + completion_tokens)
        if self.prompt_tokens_details:
            values += (cached_tokens,)
        return (template % values).encode()

    def _usage(self, completion_tokens: int, stream: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": _PROMPT, "total_tokens": _TOTAL, "completion_tokens": completion_tokens,
        }
        if self.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": _CACHED}
        elif not stream:
            usage["prompt_tokens_details"] = None
        if not stream:
            usage["completion_tokens_details"] = None
        return usage

    def _plain_template(self, parsed: ParsedRequest) -> tuple[str, int]:
        tokens, finish = reply_tokens(parsed.model, self.address, parsed.max_tokens)
        text = "".join(tokens)
        logprobs = _logprobs_for(parsed, tokens, range(len(tokens)))
        head = {"id": _ID, "object": "", "created": _CREATED, "model": parsed.model}
        choice: dict[str, Any]
        if parsed.kind == "chat":
            message = {
                "role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                "function_call": None, "reasoning": None,
            }
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish,
                      "stop_reason": None, "token_ids": None, "routed_experts": None}
            body = {**head, "object": "chat.completion", "choices": [choice], "service_tier": None,
                    "system_fingerprint": self.fingerprint, "usage": self._usage(len(tokens), stream=False),
                    "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                    "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": None,
                      "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
            body = {**head, "object": "text_completion", "choices": [choice], "service_tier": None,
                    "system_fingerprint": self.fingerprint, "usage": self._usage(len(tokens), stream=False),
                    "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
        return _fill_template(_j(body)), len(tokens)

    def stream_template(self, parsed: ParsedRequest) -> StreamTemplate:
        key = self._key(parsed)
        template = self._streams.get(key)
        if template is None:
            self._bounded(self._streams)
            template = self._streams[key] = self._build_stream_template(parsed)
        return template

    def _build_stream_template(self, parsed: ParsedRequest) -> StreamTemplate:
        tokens, finish = reply_tokens(parsed.model, self.address, parsed.max_tokens)
        model = _j(parsed.model)
        last = len(tokens) - 1
        # The closing chunk carries system_fingerprint: the usage chunk when there is one.
        fingerprint = f',"system_fingerprint":{_j(self.fingerprint)}'
        closing = "" if parsed.include_usage else fingerprint
        tails: list[str] = []
        for i, token in enumerate(tokens):
            logprobs = _j(_logprobs_for(parsed, tokens, range(i, i + 1)))
            ending = f'"finish_reason":"{finish}","stop_reason":null' if i == last else '"finish_reason":null'
            if parsed.kind == "chat":
                if i == 0:
                    tails.append(
                        f',"model":{model},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                        f'"logprobs":null,"finish_reason":null}}],"prompt_token_ids":null,"prompt_text":null}}\n\n'
                    )
                choice = (
                    f'{{"index":0,"delta":{{"content":{_j(token)}}},"logprobs":{logprobs},{ending},"token_ids":null}}'
                )
            else:
                if i != last:
                    ending += ',"stop_reason":null'
                choice = (
                    f'{{"index":0,"text":{_j(token)},"logprobs":{logprobs},{ending},'
                    f'"prompt_token_ids":null,"token_ids":null}}'
                )
            tails.append(f',"model":{model},"choices":[{choice}]{closing if i == last else ""}}}\n\n')
        encoded = [tail.encode() for tail in tails]
        joined = [EVENT_PREFIX] + [tail + EVENT_PREFIX for tail in encoded[:-1]] + [encoded[-1]]
        usage_head = f',"model":{model},"choices":[],"usage":'.encode()
        return StreamTemplate(tuple(encoded), tuple(joined), usage_head, f"{fingerprint}}}\n\n".encode(), len(tokens))

    @staticmethod
    def stream_stamp(kind: RequestKind, request_id: str, created: int) -> bytes:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        return f'{request_id}","object":"{obj}","created":{created}'.encode()

    def usage_event(self, template: StreamTemplate, stamp: bytes, prompt_tokens: int, cached_tokens: int) -> bytes:
        usage = self._usage(template.completion_tokens, stream=True)
        usage.update(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens + template.completion_tokens)
        if self.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return EVENT_PREFIX + stamp + template.usage_head + _j(usage).encode() + template.usage_tail


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


def _fill_template(text: str) -> str:
    """A JSON text with placeholders turned into %-format fields (and every other % escaped)."""
    text = text.replace("%", "%%")
    for placeholder, field in ((_ID, '"%s"'), (_CREATED, "%d"), (_PROMPT, "%d"), (_TOTAL, "%d"), (_CACHED, "%d")):
        text = text.replace(f'"{placeholder}"', field)
    return text


def embedding_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text` (equal inputs give equal embeddings)."""
    digest = hashlib.shake_128(text.encode()).digest(2 * dim)
    raw = [int.from_bytes(digest[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, 2 * dim, 2)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]

"""vLLM's other model-addressed endpoints, in the simplest faithful shape.

The Responses API (plain, streamed with vLLM's ``event:``/``data:`` framing, stored for
``GET /v1/responses/{id}``), rerank (``/rerank``, ``/v1/rerank``, ``/v2/rerank``), score
(``/score``, ``/v1/score``), ``/tokenize``, ``/detokenize``, ``/pooling``, ``/classify``, and the
audio transcription/translation paths (multipart forms). Answers are deterministic functions
of the input (the simulator's 4-characters-per-token tokenizer); they go through the engine's
batch limit like every other request but take no simulated time.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from argosy_vllm_sim.protocol import CHARS_PER_TOKEN, RequestError, embedding_vector, error_body, reply_tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STORED_RESPONSES = 10_000


def _tokens(text: str) -> list[int]:
    """The simulator's tokenizer: each 4 characters are one token id (their code points folded)."""
    return [
        sum(ord(c) for c in text[i : i + CHARS_PER_TOKEN]) % 32000 for i in range(0, len(text), CHARS_PER_TOKEN)
    ] or [0]


def _texts(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise RequestError(400, f"{param} must be a string or a non-empty list of strings", param=param)


def _score(a: str, b: str) -> float:
    """Cosine similarity of the two texts' simulated embeddings, mapped to 0..1."""
    va, vb = embedding_vector(a, 16), embedding_vector(b, 16)
    return round((sum(x * y for x, y in zip(va, vb, strict=True)) + 1) / 2, 6)


class ExtraEndpoints:
    """Handlers bound to one simulator (its models, engine slots, address and ids)."""

    def __init__(
        self,
        models: frozenset[str],
        max_model_len: int,
        address: Callable[[web.BaseRequest], str],
        admit: Callable[[], Awaitable[None]],
        release: Callable[[], None],
    ) -> None:
        self.models = models
        self.max_model_len = max_model_len
        self.address = address
        self.admit = admit
        self.release = release
        self._prefix = os.urandom(8).hex()
        self._count = 0
        self.stored: OrderedDict[str, bytes] = OrderedDict()

    def routes(self) -> list[tuple[str, str, Handler]]:
        json_paths: dict[str, Callable[[dict[str, Any], web.Request], Any]] = {
            "/v1/rerank": self._rerank,
            "/rerank": self._rerank,
            "/v2/rerank": self._rerank,
            "/v1/score": self._score,
            "/score": self._score,
            "/tokenize": self._tokenize,
            "/detokenize": self._detokenize,
            "/pooling": self._pooling,
            "/classify": self._classify,
        }
        routes: list[tuple[str, str, Handler]] = [
            ("POST", path, self._json_handler(function)) for path, function in json_paths.items()
        ]
        routes += [
            ("POST", "/v1/responses", self.create_response),
            ("GET", "/v1/responses/{response_id}", self.retrieve_response),
            ("POST", "/v1/responses/{response_id}/cancel", self.cancel_response),
            ("POST", "/v1/audio/transcriptions", self.audio),
            ("POST", "/v1/audio/translations", self.audio),
        ]
        return routes

    # -- helpers ----------------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._prefix}{self._count:016x}"

    def _list_answer(self, prefix: str, model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        """The envelope of vLLM's score, pooling and classify answers."""
        return {
            "id": self._id(prefix),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    def _error(self, err: RequestError) -> web.Response:
        return web.Response(
            status=err.status,
            body=error_body(err.status, err.message, err.err_type, err.param),
            content_type="application/json",
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        self._model(body.get("model"))
        return body

    def _model(self, model: Any) -> str:
        if not isinstance(model, str):
            raise RequestError(400, "model must be a string", param="model")
        if model not in self.models:
            raise RequestError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return model

    def _json_handler(self, function: Callable[[dict[str, Any], web.Request], Any]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                body = await self._body(request)
                await self.admit()
                try:
                    payload = function(body, request)
                finally:
                    self.release()
            except RequestError as err:
                return self._error(err)
            return web.Response(body=json.dumps(payload).encode(), content_type="application/json")

        return handle

    # -- pooling-style endpoints ------------------------------------------------------------------

    def _rerank(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        query = body.get("query")
        if not isinstance(query, str):
            raise RequestError(400, "query must be a string", param="query")
        documents = _texts(body.get("documents"), "documents")
        results = [
            {"index": index, "document": {"text": text}, "relevance_score": _score(query, text)}
            for index, text in enumerate(documents)
        ]
        results.sort(key=lambda r: -r["relevance_score"])
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n > 0:
            results = results[:top_n]
        tokens = sum(len(_tokens(query + text)) for text in documents)
        return {
            "id": self._id("rerank-"),
            "model": body["model"],
            "usage": {"total_tokens": tokens},
            "results": results,
        }

    def _score(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        first = _texts(body.get("text_1", body.get("queries")), "text_1")
        second = _texts(body.get("text_2", body.get("documents")), "text_2")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise RequestError(400, "text_1 and text_2 must have the same length (or text_1 one item)", param="text_2")
        data = [
            {"index": i, "object": "score", "score": _score(a, b)}
            for i, (a, b) in enumerate(zip(first, second, strict=True))
        ]
        tokens = sum(len(_tokens(a + b)) for a, b in zip(first, second, strict=True))
        return self._list_answer("score-", body["model"], data, tokens)

    def _tokenize(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list):
                raise RequestError(400, "messages must be a list", param="messages")
            text = "".join(f"<|{m.get('role')}|>\n{m.get('content')}\n" for m in messages if isinstance(m, dict))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError(400, "prompt must be a string", param="prompt")
            text = prompt
        tokens = _tokens(text)
        strs = [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
        return {
            "count": len(tokens),
            "max_model_len": self.max_model_len,
            "tokens": tokens,
            "token_strs": strs if body.get("return_token_strs") else None,
        }

    def _detokenize(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestError(400, "tokens must be a list of integers", param="tokens")
        return {"prompt": "".join(chr(0x61 + t % 26) for t in tokens)}

    def _pooling(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        inputs = _texts(body.get("input"), "input")
        data = [{"index": i, "object": "pooling", "data": embedding_vector(text, 16)} for i, text in enumerate(inputs)]
        return self._list_answer("pool-", body["model"], data, sum(len(_tokens(text)) for text in inputs))

    def _classify(self, body: dict[str, Any], request: web.Request) -> dict[str, Any]:
        inputs = _texts(body.get("input"), "input")
        data = []
        for index, text in enumerate(inputs):
            positive = _score(text, "positive")
            data.append(
                {
                    "index": index,
                    "label": "positive" if positive >= 0.5 else "negative",
                    "probs": [round(1 - positive, 6), positive],
                    "num_classes": 2,
                }
            )
        return self._list_answer("classify-", body["model"], data, sum(len(_tokens(text)) for text in inputs))

    # -- Responses API ----------------------------------------------------------------------------

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
            stream = body.get("stream", False)
            if stream is not None and not isinstance(stream, bool):
                raise RequestError(400, "stream must be a boolean", param="stream")
            max_tokens = body.get("max_output_tokens")
            if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
                raise RequestError(400, "max_output_tokens must be an integer", param="max_output_tokens")
            prompt = _response_input_text(body.get("input"), body.get("instructions"))
        except RequestError as err:
            return self._error(err)
        address = self.address(request)
        tokens, _ = reply_tokens(body["model"], address, max_tokens)
        response_id, item_id = self._id("resp_"), self._id("msg_")
        text = "".join(tokens)
        usage = {
            "input_tokens": len(_tokens(prompt)),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(tokens),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(_tokens(prompt)) + len(tokens),
        }
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        response = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": "completed",
            "instructions": body.get("instructions"),
            "max_output_tokens": max_tokens,
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }
        await self.admit()
        try:
            rendered = json.dumps(response).encode()
            if body.get("store", True) is not False:
                self.stored[response_id] = rendered
                while len(self.stored) > _STORED_RESPONSES:
                    self.stored.popitem(last=False)
            if not stream:
                return web.Response(body=rendered, content_type="application/json")
            answer = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await answer.prepare(request)
            in_progress = dict(response, status="in_progress", output=[], usage=None)
            empty_part = dict(part, text="")
            events: list[dict[str, Any]] = [
                {"type": "response.created", "response": in_progress},
                {"type": "response.in_progress", "response": in_progress},
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": dict(item, status="in_progress", content=[]),
                },
                {
                    "type": "response.content_part.added",
                    "output_index": 0,
                    "item_id": item_id,
                    "content_index": 0,
                    "part": empty_part,
                },
            ]
            events += [
                {
                    "type": "response.output_text.delta",
                    "output_index": 0,
                    "item_id": item_id,
                    "content_index": 0,
                    "delta": token,
                    "logprobs": [],
                }
                for token in tokens
            ]
            events += [
                {
                    "type": "response.output_text.done",
                    "output_index": 0,
                    "item_id": item_id,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                },
                {
                    "type": "response.content_part.done",
                    "output_index": 0,
                    "item_id": item_id,
                    "content_index": 0,
                    "part": part,
                },
                {"type": "response.output_item.done", "output_index": 0, "item": item},
                {"type": "response.completed", "response": response},
            ]
            for number, event in enumerate(events):
                event["sequence_number"] = number
                await answer.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            await answer.write_eof()
            return answer
        finally:
            self.release()

    async def retrieve_response(self, request: web.Request) -> web.StreamResponse:
        stored = self.stored.get(request.match_info["response_id"])
        if stored is None:
            return self._unknown_response(request)
        return web.Response(body=stored, content_type="application/json")

    async def cancel_response(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["response_id"] not in self.stored:
            return self._unknown_response(request)
        return self._error(RequestError(400, "Cannot cancel a synchronous response.", param="response_id"))

    def _unknown_response(self, request: web.Request) -> web.Response:
        identifier = request.match_info["response_id"]
        return self._error(
            RequestError(404, f"Invalid 'response_id': '{identifier}'.", "invalid_request_error", "response_id")
        )

    # -- audio ------------------------------------------------------------------------------------

    async def audio(self, request: web.Request) -> web.StreamResponse:
        try:
            form = await request.post()
        except ValueError as err:
            return self._error(RequestError(400, f"invalid form: {err}"))
        try:
            self._model(form.get("model"))
            upload = form.get("file")
            if not isinstance(upload, web.FileField):
                raise RequestError(400, "file is required (an audio file upload)", param="file")
            audio = upload.file.read()
        except RequestError as err:
            return self._error(err)
        await self.admit()
        try:
            seconds = len(audio) / 32000  # 16 kHz, 16-bit mono
            text = f"Simulated transcript of {len(audio)} bytes ({seconds:.1f} s)."
        finally:
            self.release()
        if form.get("response_format") == "text":
            return web.Response(text=text, content_type="text/plain")
        usage = {"type": "duration", "seconds": max(1, round(seconds))}
        return web.Response(body=json.dumps({"text": text, "usage": usage}).encode(), content_type="application/json")


def _response_input_text(value: Any, instructions: Any) -> str:
    parts = [instructions] if isinstance(instructions, str) else []
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, dict):
                raise RequestError(400, "input items must be objects", param="input")
            content = item.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    else:
        raise RequestError(400, "input must be a string or a list of input items", param="input")
    return "\n".join(parts)

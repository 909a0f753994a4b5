"""The completions and chat routes: request -> engine requests -> a JSON body or a server-sent event stream.

One HTTP request becomes one engine request per prompt (a completions ``prompt`` may be a list); the
engine forks the ``n`` samples itself. Choice ``index`` is ``prompt_index * n + sample_index``, as in
vLLM. The engine runs with ``RequestOutputKind.DELTA`` so each output carries only what is new.

Leaving early (client gone, cancelled) aborts every engine request of the HTTP request that has not
finished, from a ``finally``: the streaming response is cancelled by Starlette on disconnect, and the
non-streaming one by ``run_until_disconnect``.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.server.engine_loop import EngineLoop, RequestStream
from pagoda.server.errors import APIError
from pagoda.server.params import ModelInfo, build_sampling_params, check_model, check_token_ids, resolve_max_tokens
from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.server.responses import (
    SSE_DONE,
    LogprobsFormatter,
    chat_choice,
    chat_delta_choice,
    completion_choice,
    envelope,
    sse,
    usage,
)


@dataclass(slots=True)
class _Choice:
    """What one choice has produced so far."""
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    text_offset: int = 0


class OpenAIServing:
    """Turns validated requests into engine requests and their outputs into OpenAI responses."""

    def __init__(self, loop: EngineLoop, info: ModelInfo, tokenizer: Any, output_kind: Any = None):
        self.loop = loop
        self.info = info
        self.tokenizer = tokenizer
        self._engine_fields = {} if output_kind is None else {"output_kind": output_kind}

    # ---- prompts ---------------------------------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        # The request model validated ``prompt`` as one of its types, so a list's first element names its type.
        if isinstance(p, str):
            texts, ids = [p], []
        elif p and isinstance(p[0], int):
            texts, ids = [], [list(p)]
        elif p and isinstance(p[0], str):
            texts, ids = list(p), []
        elif p and isinstance(p[0], list):
            texts, ids = [], [list(x) for x in p]
        else:
            raise APIError("`prompt` must be a string, a list of token ids, or a non-empty list of either.",
                           param="prompt", code="invalid_value")
        for x in ids:
            check_token_ids(x, self.info, "prompt")
        return [self.tokenizer.encode(t, add_special_tokens=req.add_special_tokens) for t in texts] + ids

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError("This model's tokenizer has no chat template; use /v1/completions.", param="messages",
                           code="invalid_value")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" for part in content):
                    raise APIError("Only text content parts are supported.", param=f"messages.{i}.content",
                                   code="invalid_value")
                content = "".join(part.text or "" for part in content)
            msg = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, continue_final_message=req.continue_final_message,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                **(req.chat_template_kwargs or {}))
        except Exception as exc:   # the template's own checks (roles alternating, ...) are the user's error
            raise APIError(f"The chat template failed on these messages: {exc}", param="messages",
                           code="invalid_value") from None
        return self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)

    # ---- routes ----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        check_model(req.model, self.info)
        prompts = self._completion_prompts(req)
        return await self._serve(req, raw, prompts, "max_tokens", "prompt", req.max_tokens, chat=False)

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        check_model(req.model, self.info)
        prompt = self._chat_prompt(req)
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = req.max_tokens, "max_tokens"
        return await self._serve(req, raw, [prompt], param, "messages", max_tokens, chat=True)

    async def _serve(self, req, raw: Request, prompts: list[list[int]], max_param: str, prompt_param: str,
                     max_tokens: int | None, chat: bool):
        params = []
        for ids in prompts:
            m = resolve_max_tokens(max_tokens, len(ids), self.info, prompt_param=prompt_param,
                                   max_tokens_param=max_param)
            params.append(build_sampling_params(req, m, self.info, **self._engine_fields))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        streams = await self._submit(request_id, prompts, params)
        k = params[0].logprobs
        job = _Job(self, request_id, int(time.time()), req.n, chat, [len(p) for p in prompts],
                   None if k is None else LogprobsFormatter(self._decode, k))
        if req.stream:
            opts = req.stream_options
            gen = job.stream(streams, bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats))
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        body = await run_until_disconnect(raw, job.collect(streams))
        return JSONResponse(body) if body is not None else Response(status_code=499)

    async def _submit(self, request_id: str, prompts: list[list[int]], params: list) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(await self.loop.add_request(rid, {"prompt_token_ids": ids}, p))
        except BaseException:
            for s in streams:
                self.loop.abort(s.request_id)
            raise
        return streams

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class _Job:
    """One HTTP request's engine outputs, merged and shaped as a response or a stream."""

    def __init__(self, serving: OpenAIServing, request_id: str, created: int, n: int, chat: bool,
                 prompt_lens: list[int], logprobs: LogprobsFormatter | None):
        self.s = serving
        self.request_id, self.created, self.n, self.chat = request_id, created, n, chat
        self.prompt_tokens = sum(prompt_lens)
        self.choices = [_Choice() for _ in range(n * len(prompt_lens))]
        self.lp = logprobs
        self.obj = "chat.completion" if chat else "text_completion"

    def _usage(self) -> dict:
        return usage(self.prompt_tokens, sum(c.num_tokens for c in self.choices))

    def _update(self, i: int, out) -> list[tuple[int, _Choice, Any, dict | None]]:
        """Fold one engine output in; returns (index, choice, completion output, logprobs) per choice touched."""
        touched = []
        for c in out.outputs:
            idx = i * self.n + c.index
            ch = self.choices[idx]
            ch.num_tokens += len(c.token_ids)
            lp = None
            if self.lp is not None and c.logprobs is not None:
                steps = c.logprobs[-len(c.token_ids):] if c.token_ids else []
                if self.chat:
                    lp = self.lp.chat(c.token_ids, steps)
                else:
                    lp, ch.text_offset = self.lp.completion(c.token_ids, steps, ch.text_offset)
            if c.finish_reason is not None:
                ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
                if self.s.loop.metrics is not None:
                    self.s.loop.metrics.finished(c.finish_reason)
            touched.append((idx, ch, c, lp))
        return touched

    async def collect(self, streams: list[RequestStream]) -> dict:
        try:
            async for i, out in merge(streams):
                for _, ch, c, lp in self._update(i, out):
                    ch.text.append(c.text)
                    if lp is not None:
                        ch.logprobs.append(lp)
        finally:
            self._abort_unfinished(streams)
        make = chat_choice if self.chat else completion_choice
        choices = [make(idx, "".join(ch.text), self._join_logprobs(ch.logprobs), ch.finish_reason, ch.stop_reason)
                   for idx, ch in enumerate(self.choices)]
        return envelope(self.request_id, self.obj, self.created, self.s.info.name, choices, self._usage())

    def _join_logprobs(self, parts: list[dict]) -> dict | None:
        if self.lp is None:
            return None
        if self.chat:
            return {"content": [e for p in parts for e in p["content"]]}
        return {key: [e for p in parts for e in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                     "text_offset")}

    async def stream(self, streams: list[RequestStream], include_usage: bool,
                     continuous_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        model = self.s.info.name

        def chunk(choices, use=None):
            return sse(envelope(self.request_id, obj, self.created, model, choices, use))

        try:
            if self.chat:   # the role first, for every choice, as OpenAI streams it
                yield chunk([chat_delta_choice(i, {"role": "assistant", "content": ""}, None, None)
                             for i in range(len(self.choices))], self._usage() if continuous_usage else None)
            async for i, out in merge(streams):
                for idx, _, c, lp in self._update(i, out):
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue        # nothing new for this choice (a stop string may be held back)
                    if self.chat:
                        choice = chat_delta_choice(idx, {"content": c.text} if c.text else {}, lp,
                                                   c.finish_reason, c.stop_reason)
                    else:
                        choice = completion_choice(idx, c.text, lp, c.finish_reason, c.stop_reason)
                    yield chunk([choice], self._usage() if continuous_usage else None)
            if include_usage:
                yield chunk([], self._usage())
            yield SSE_DONE
        except APIError as exc:          # shutdown or engine failure mid-stream: an error event, then [DONE]
            yield sse(exc.body())
            yield SSE_DONE
        finally:
            self._abort_unfinished(streams)

    def _abort_unfinished(self, streams: list[RequestStream]) -> None:
        for s in streams:
            if not s.finished:
                self.s.loop.abort(s.request_id)


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, output) pairs from several request streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except Exception as exc:
            q.put_nowait((i, exc))
        q.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def run_until_disconnect(raw: Request, work) -> Any:
    """Await ``work``; if the client leaves first, cancel it (its ``finally`` aborts the engine requests) and
    return ``None`` (nobody is left to read a response)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()

"""`tvm-anyprec serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one loaded artifact.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream``: server-sent
events, OpenAI's chunk format, ``data: [DONE]`` at the end; ``stream_options.include_usage`` adds a usage
chunk). Beyond OpenAI's fields a request may give ``bits`` (the child to run), ``max_ms_per_token`` (the
precision policy picks the highest bit-width whose measured step fits), ``draft_bits`` / ``draft_len``
(self-speculative decoding, greedy), and llama.cpp's ``top_k``, ``min_p``, ``repeat_penalty``.

One model in memory serves every request at its own precision: each request has its own KV cache, and the
requests in flight (at most ``parallel``) take turns token by token, in arrival order, on one worker thread
(the VM runs one call at a time). More requests wait in a FIFO queue of ``max_queue``; past it, 503. A client
that disconnects stops its generation at the next token. Errors are OpenAI's JSON shape: 400 for bad JSON,
unknown fields, bad values, prompts or ``max_tokens`` beyond the context; 401 without the API key when one is
set; the server keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import Request   # module level: the routes' annotations are strings (postponed evaluation)
from pydantic import BaseModel, ConfigDict, Field


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)     # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    logprobs: Optional[Union[bool, int]] = Field(None, description="not supported")
    # llama.cpp's sampling options
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    repeat_penalty: float = Field(1.0, gt=0)
    # any-precision
    bits: Optional[int] = None
    max_ms_per_token: Optional[float] = Field(None, gt=0)
    draft_bits: Optional[int] = None
    draft_len: int = Field(4, ge=1)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _error(message: str, status: int = 400, param=None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class Engine:
    """The session, the FIFO admission of requests and the token-by-token turns between them."""

    def __init__(self, artifact, bits: int | None = None, parallel: int = 4, max_queue: int = 64,
                 model_name: str | None = None):
        from .runtime import Session

        self.sess = Session(artifact)
        self.name = model_name or Path(artifact).resolve().name
        self.default_bits = bits or self.sess.bit_widths[-1]
        self.sess.check_bits(self.default_bits)
        self.max_len = self.sess.spec("decode")["max_len"]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="anyprec-vm")   # one VM call at a time
        self.slots = asyncio.Semaphore(parallel)
        self.waiting = 0
        self.max_queue = max_queue
        self.turn = asyncio.Lock()          # FIFO among the requests in flight: one token each, in turn
        self.policy_lock = threading.Lock()
        self.served = 0

    def bits_for(self, req: _Common) -> int:
        if req.max_ms_per_token is not None:
            if req.bits is not None:
                raise RequestError("give either bits or max_ms_per_token", param="bits")
            with self.policy_lock:
                return self.sess.policy(measure=True).choose(req.max_ms_per_token).bits
        return self.default_bits if req.bits is None else req.bits   # checked by Generation

    def generation(self, req: _Common, ids: list[int], max_tokens: int | None):
        from .generate import Generation
        from .sampling import SamplingParams

        if req.logprobs:
            raise RequestError("logprobs are not supported", param="logprobs")
        room = self.max_len - len(ids)
        if room <= 0:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len}", param="prompt")
        want = min(16 if max_tokens is None else max_tokens, room)
        if max_tokens is not None and max_tokens > room:
            raise RequestError(f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens exceed the context "
                               f"({self.max_len})", param="max_tokens")
        bits = self.bits_for(req)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:   # the sampling values, the bit-widths and greedy-only speculation are checked where they are used
            params = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                                    repeat_penalty=req.repeat_penalty, seed=req.seed, stop=stop,
                                    max_new_tokens=want)
            return Generation(self.sess, ids, params, bits, req.draft_bits, req.draft_len)
        except ValueError as e:
            raise RequestError(str(e)) from e

    async def on_vm(self, fn, *args):
        """Run ``fn`` on the VM's thread, in turn (the VM and the tokenizer are used from that thread only)."""
        async with self.turn:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def done(self) -> None:
        """A request finished (or was dropped): free its slot, give freed memory back to the system."""
        self.slots.release()
        self.served += 1
        if _TRIM is not None:
            self.pool.submit(_TRIM, 0)

    async def admit(self):
        if self.waiting >= self.max_queue:
            raise RequestError("the server is busy (queue full): retry later", status=503)
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1

    async def pieces(self, gen, request=None):
        """The generation's text pieces, one VM turn at a time (None marks the end)."""
        loop = asyncio.get_running_loop()
        it = iter(gen)
        while True:
            if request is not None and await request.is_disconnected():
                gen.stop()
            async with self.turn:
                piece = await loop.run_in_executor(self.pool, next, it, None)
            if piece is None:
                return
            yield piece


def _malloc_trim():
    """glibc's malloc_trim, or None: a finished request's KV cache and buffers are freed into malloc's arenas
    (the event loop's and the VM thread's), which keep the pages; trimming gives them back, so the server's
    memory stays flat across requests instead of creeping up by about a cache's touched pages each."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


_TRIM = _malloc_trim()


def _usage(gen) -> dict:
    p, c = gen.stats.prompt_tokens + gen.stats.cached_tokens, gen.stats.generated_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _extra(gen) -> dict:
    return {"bits": gen.bits, "draft_bits": gen.draft_bits, **gen.stats.to_dict()}


def create_app(engine: Engine, api_key: str | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tvm-anyprec", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc):
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errs)
        return _error(msg or "invalid request")

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc):
        return _error(str(exc), exc.status, exc.param)

    @app.exception_handler(HTTPException)
    async def _http(_request, exc):
        return _error(str(exc.detail), exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error("invalid or missing API key", 401, kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "served": engine.served, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "tvm-anyprec", "bit_widths": engine.sess.bit_widths}]}

    def _check_model(req):
        if req.model not in (None, engine.name):
            raise RequestError(f"model {req.model!r} is not served here (serving {engine.name!r})", 404, "model")

    async def _run(req, prepare, request, kind: str):
        """``prepare()`` -> (prompt ids, max_tokens), on the VM's thread (it tokenizes)."""
        _check_model(req)

        def make():
            ids, max_tokens = prepare()
            return ids, engine.generation(req, ids, max_tokens)

        ids, gen = await engine.on_vm(make)
        await engine.admit()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text, finish, delta: bool):
            if kind == "chat":
                body = {"delta": {"content": text} if text else {}} if delta else \
                    {"message": {"role": "assistant", "content": text}}
                return {"index": 0, **body, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if not req.stream:
            try:
                text = "".join([p async for p in engine.pieces(gen, request)])
            finally:
                engine.done()
            if kind == "completion" and getattr(req, "echo", False):
                text = req.prompt + text
            return {"id": rid, "object": obj, "created": created, "model": engine.name,
                    "choices": [choice(text, gen.finish_reason, False)], "usage": _usage(gen),
                    "tvm_anyprec": _extra(gen)}

        async def events():
            chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def sse(choices, **more):
                return "data: " + json.dumps({"id": rid, "object": chunk_obj, "created": created,
                                              "model": engine.name, "choices": choices, **more}) + "\n\n"
            try:
                if kind == "chat":
                    yield sse([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                "logprobs": None}])
                async for piece in engine.pieces(gen, request):
                    yield sse([choice(piece, None, True)])
                yield sse([choice("", gen.finish_reason, True)], tvm_anyprec=_extra(gen))
                if (req.stream_options or {}).get("include_usage"):
                    yield sse([], usage=_usage(gen))
                yield "data: [DONE]\n\n"
            finally:
                gen.stop()
                engine.done()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise RequestError("one prompt per request", param="prompt")
            req.prompt = req.prompt[0]

        def prepare():
            ids = engine.sess.tokenizer(req.prompt)["input_ids"]
            if not ids:
                raise RequestError("the prompt is empty", param="prompt")
            return ids, req.max_tokens

        return await _run(req, prepare, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        from .generate import chat_ids

        def prepare():
            try:
                ids = chat_ids(engine.sess.tokenizer, [m.model_dump(exclude_none=True, exclude={"name"})
                                                       for m in req.messages])
            except ValueError as e:
                raise RequestError(str(e), param="messages") from e
            mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            return ids, mt

        return await _run(req, prepare, request, "chat")

    return app


def run_server(artifact, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               bits: int | None = None, model_name: str | None = None, max_queue: int = 64,
               parallel: int = 4) -> int:
    import uvicorn

    async def main():
        engine = Engine(artifact, bits, parallel, max_queue, model_name)
        app = create_app(engine, api_key)
        print(f"tvm-anyprec serve: {engine.name} ({', '.join(map(str, engine.sess.bit_widths))} bits) on "
              f"http://{host}:{port}/v1" + (" (API key required)" if api_key else ""), flush=True)
        await uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).serve()

    asyncio.run(main())
    return 0


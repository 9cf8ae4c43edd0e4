"""The OpenAI-compatible HTTP server over the C engine: GET /v1/models, POST /v1/completions and
/v1/chat/completions (whole, or streamed token by token as server-sent events), GET /health, and at / a web
page (static/: plain HTML, JS and CSS, no build step, nothing fetched from elsewhere) that talks to them.

Why this shape: the event loop (aiohttp) only parses, validates and streams. Prompts are tokenized in one
worker thread and all model work happens in the scheduler's thread, so neither blocks the loop, and the
loop never waits on a model. Bad input is answered with OpenAI's error object and a 4xx status before it
reaches the scheduler, so it cannot disturb the requests being served. The official `openai` client works
unchanged with base_url http://HOST:PORT/v1.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from llama2zh.chat import check_messages
from llama2zh.engine import CModel, CTokenizer
from llama2zh.errors import UserError
from llama2zh.serve.scheduler import Request, Scheduler

MAX_BODY = 1 << 20  # bytes; a bigger request body gets 413
WAITING_PER_SLOT = 16  # requests that may wait for a slot, per slot; past them: 503
SHUTDOWN_S = 3.0  # how long in-flight responses get to end once the server stops
NUMBER = (int, float)
STATIC = Path(__file__).parent / "static"  # the web page's files


def reply(data: dict, **kwargs) -> web.Response:
    """A JSON response with Chinese as it is (as the stream sends it), not as \\u escapes."""
    return web.json_response(data, dumps=lambda o: json.dumps(o, ensure_ascii=False), **kwargs)


class APIError(Exception):
    """A refused request: its HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> web.Response:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return reply({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                "code": self.code}}, status=self.status, headers=headers)


def field(body: dict, name: str, kinds: tuple, default, ok=lambda value: True, what: str = ""):
    """body[name] (absent or null: default), refused unless of one of kinds (a bool is no number) and ok."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds) or not ok(value):
        raise APIError(400, f"{name} must be {what}", name, "invalid_value")
    return value


def sampling(body: dict) -> dict:
    """The Request fields of OpenAI's sampling parameters. No seed: a random one, as OpenAI draws."""
    field(body, "n", (int,), 1, lambda n: n == 1, "1 (one choice per request)")
    stop = field(body, "stop", (str, list), [], lambda s: isinstance(s, str) or (
        len(s) <= 4 and all(isinstance(x, str) for x in s)), "a string or a list of at most 4 strings")
    return dict(
        temperature=float(field(body, "temperature", NUMBER, 1.0, lambda t: 0 <= t <= 2, "a number in [0, 2]")),
        top_p=float(field(body, "top_p", NUMBER, 1.0, lambda p: 0 < p <= 1, "a number in (0, 1]")),
        seed=field(body, "seed", (int,), random.getrandbits(64), what="an integer") % 2**64,
        presence=float(field(body, "presence_penalty", NUMBER, 0.0, lambda p: -2 <= p <= 2, "a number in [-2, 2]")),
        frequency=float(field(body, "frequency_penalty", NUMBER, 0.0, lambda p: -2 <= p <= 2,
                              "a number in [-2, 2]")),
        stop=[s for s in ([stop] if isinstance(stop, str) else stop) if s])


async def read_json(request: web.Request) -> dict:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"the request body is over {MAX_BODY} bytes", code="body_too_large") from None
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8", code="invalid_utf8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


class API:
    """The routes over one model: a Scheduler for its generation, a CTokenizer (in its own thread) for its
    prompts, its name, and the key requests need (None: none)."""

    def __init__(self, scheduler: Scheduler, name: str, api_key: str | None = None):
        self.scheduler, self.tokenizer, self.name = scheduler, scheduler.tokenizer, name
        self.seq_len = scheduler.model.config["seq_len"]
        self.api_key = api_key
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llama2zh-tokenize")  # one tokenizer, one thread

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self.errors])
        app.router.add_get("/", self.page)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    @web.middleware
    async def errors(self, request: web.Request, handler):
        """The key check, and every refusal as OpenAI's error object (aiohttp's own too: 404, 405)."""
        try:
            if self.api_key and request.path.startswith("/v1/"):
                given = request.headers.get("Authorization", "").removeprefix("Bearer ")
                if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key.encode()):
                    raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                   code="invalid_api_key")
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return APIError(e.status, e.reason).response()

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def health(self, request: web.Request) -> web.Response:
        """The load, and what the page needs: whether the model chats, and its context."""
        return reply({"status": "ok", "model": self.name, "chat": self.tokenizer.chat_ids is not None,
                      "context": self.seq_len, **self.scheduler.load()})

    async def models(self, request: web.Request) -> web.Response:
        return reply({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "llama2zh"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, chat=True)

    async def complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_json(request)
        model = field(body, "model", (str,), self.name, what="a string")
        if model != self.name:
            raise APIError(404, f"model {model!r} does not exist (this server has {self.name!r})", "model",
                           "model_not_found")
        settings = sampling(body)
        stream = field(body, "stream", (bool,), False, what="true or false")
        options = field(body, "stream_options", (dict,), {}, what="an object")
        t = self.tokenizer
        if chat:
            if t.chat_ids is None:
                raise APIError(400, "this model's tokenizer.bin has no chat template: use /v1/completions",
                               "messages")
            try:
                messages = check_messages(body.get("messages"))
            except UserError as e:
                raise APIError(400, str(e), "messages") from None
            ids = await self.tokenize(lambda: t.render_chat(messages, add_generation_prompt=True), "messages")
            stop_ids = (t.chat_ids[1], t.eos_id, t.bos_id)
            limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        else:
            ids = await self.tokenize(self.prompt(body.get("prompt")), "prompt")
            stop_ids, limit = (t.bos_id, t.eos_id), "max_tokens"
        # l2_generate's context: a prompt of up to seq_len tokens, then tokens until one lands at seq_len
        room = self.seq_len + 1 - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context holds {self.seq_len}",
                           "messages" if chat else "prompt", "context_length_exceeded")
        max_tokens = field(body, limit, (int,), room, lambda n: 0 < n <= room,
                           f"a positive integer, at most {room} (the context left after the prompt)")

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        r = Request(ids, max_tokens, stop_ids, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                    **settings)
        if not self.scheduler.submit(r):
            raise APIError(503, "the server is shutting down" if self.scheduler.closed else
                           "every slot is busy and the queue is full: retry later", code="server_busy",
                           kind="server_error")
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        try:
            if stream:
                return await self.stream(request, events, chat, head, len(ids), options.get("include_usage"))
            return await self.whole(events, chat, head, len(ids))
        finally:  # a client that left (the handler cancelled) or a failed write: free the slot now
            self.scheduler.cancel(r)

    def prompt(self, prompt):
        """The work that tokenizes a completion's prompt: a string (BOS first, as ./run), or token ids as they
        are; one prompt per request."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return lambda: self.tokenizer.encode(prompt, bos=True)
        if isinstance(prompt, list) and prompt and all(
                type(i) is int and 0 <= i < self.tokenizer.vocab_size for i in prompt):
            return lambda: prompt
        raise APIError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)",
                       "prompt")

    async def tokenize(self, work, param: str) -> list[int]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work)
        except UnicodeEncodeError:
            raise APIError(400, "the text is not valid UTF-8 (a lone surrogate)", param, "invalid_utf8") from None
        except UserError as e:
            raise APIError(400, str(e), param) from None

    async def whole(self, events: asyncio.Queue, chat: bool, head: dict, n_prompt: int) -> web.Response:
        parts = []
        while (event := await events.get())[0] == "text":
            parts.append(event[1])
        if event[0] == "error":
            raise APIError(503, event[1], kind="server_error")
        text = "".join(parts)
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return reply({**head, "object": "chat.completion" if chat else "text_completion",
                      "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": event[1]}],
                      "usage": usage(n_prompt, event[2])})

    async def stream(self, request: web.Request, events: asyncio.Queue, chat: bool, head: dict, n_prompt: int,
                     include_usage: bool) -> web.StreamResponse:
        """Server-sent events: a chunk per piece of text (whole UTF-8 characters), one with the finish reason,
        optionally one with the usage, then [DONE]; an error after the start comes as an error event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        async def send(data: dict | str) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await response.write(f"data: {text}\n\n".encode())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            choice = {"delta": delta} if chat else {"text": delta.get("content", "")}
            return {**head, "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}]}

        try:
            if chat:
                await send(chunk({"role": "assistant", "content": ""}))
            while (event := await events.get())[0] == "text":
                await send(chunk({"content": event[1]}))
            if event[0] == "error":
                await send(APIError(503, event[1], kind="server_error").response().text)
            else:
                await send(chunk({}, event[1]))
                if include_usage:
                    await send({**head, "choices": [], "usage": usage(n_prompt, event[2])})
            await send("[DONE]")
        except ConnectionResetError:  # the client left mid-reply; complete()'s finally stops the generation
            pass
        return response


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build(target: Path, tokenizer: Path | None, slots: int, api_key: str | None,
          max_waiting: int | None = None) -> API:
    """The API over a run directory (model.bin + tokenizer.bin) or a model.bin (+ tokenizer, a tokenizer.bin),
    named after the directory or the file."""
    target = Path(target)
    if not target.exists():
        raise UserError(f"{target} does not exist")
    model_path = target / "model.bin" if target.is_dir() else target
    tokenizer = tokenizer or (target / "tokenizer.bin" if target.is_dir() else None)
    if tokenizer is None:
        raise UserError(f"serving {target} (a model.bin) needs --tokenizer FILE, its tokenizer.bin")
    for path in (model_path, tokenizer):
        if not Path(path).is_file():
            raise UserError(f"{path} does not exist (export the run first: llama2zh export {target})"
                            if path == model_path and target.is_dir() else f"{path} does not exist")
    model = CModel(model_path)
    scheduler = Scheduler(model, CTokenizer(tokenizer, model.vocab_size), slots,
                          WAITING_PER_SLOT * slots if max_waiting is None else max_waiting)
    return API(scheduler, target.resolve().name if target.is_dir() else target.stem, api_key)


async def start(api: API, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listening on host:port (0: any free port) and generating; returns the runner and the port."""
    # handler_cancellation: a client that disconnects cancels its handler, which frees its slot
    runner = web.AppRunner(api.app(), handler_cancellation=True, shutdown_timeout=SHUTDOWN_S, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    api.scheduler.start()
    return runner, runner.addresses[0][1]


async def stop(runner: web.AppRunner, api: API) -> None:
    """Stops accepting, ends the requests in flight (each gets an error, at once), closes the connections."""
    for site in list(runner.sites):
        await site.stop()
    await asyncio.get_running_loop().run_in_executor(None, api.scheduler.close)
    await runner.cleanup()
    api.pool.shutdown()


def serve(target: Path, tokenizer: Path | None, host: str, port: int, slots: int, api_key: str | None) -> int:
    """`llama2zh serve`: serves until Ctrl-C or SIGTERM, then exits 0."""
    api = build(target, tokenizer, slots, api_key)

    async def main() -> None:
        runner, bound = await start(api, host, port)
        print(f"llama2zh serve: {api.name} at http://{host}:{bound}/ (the web page; the API under /v1), {slots} slots; "
              "Ctrl-C stops",
              file=sys.stderr, flush=True)
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await stop(runner, api)

    asyncio.run(main())
    return 0

"""llama2zh serve: the official openai client against a live server on 127.0.0.1, whose greedy and seeded
replies equal CModel.generate_ids run alone; stop strings; every bad request answered with OpenAI's error
object and its 4xx while others are served; a full queue (503); a client that leaves frees its slot; 64
concurrent requests on 4 slots; SIGTERM.

The models are test_chat_engine's tiny random ones ("endless" never says a stop id, "stopping" ends its first
reply with <|im_end|>), run by the portable kernel, whose batched steps give the very bits of a lone sequence.
A Gate on the batch's step holds the scheduler where a test needs it, so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

import numpy as np  # noqa: E402

from llama2zh.engine import CDecoder, CModel, CSampler, CTokenizer  # noqa: E402
from llama2zh.serve.server import MAX_BODY, build, start, stop  # noqa: E402
from tests.test_chat_engine import SYSTEM, USER_1, chat_models, small  # noqa: E402, F401 (fixtures)

PROMPTS = ["Once upon a time", "从前，有一个小女孩叫莉莉。", "She liked to play", "有一天，3只小鸟唱歌", "Hello 你好"]


@pytest.fixture(autouse=True)
def portable(monkeypatch):
    monkeypatch.setenv("LLAMA2ZH_KERNEL", "portable")


@pytest.fixture(scope="module")
def files(small, chat_models):  # noqa: F811 (the imported fixtures)
    return small["chat"][1], chat_models["endless"][0], chat_models["stopping"][0]


@contextmanager
def live(model, tokenizer, slots=2, max_waiting=None, api_key=None):
    """(the API, its base URL) of a server on a free port of 127.0.0.1, its event loop in a thread."""
    api = build(model, tokenizer, slots, api_key, max_waiting)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, port = asyncio.run_coroutine_threadsafe(start(api, "127.0.0.1", 0), loop).result()
    try:
        yield api, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(stop(runner, api), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class Gate:
    """In place of a CBatch's step: each step waits for a permit, and is counted."""

    def __init__(self, batch):
        self.step, self.permits, self.steps = batch.step, threading.Semaphore(0), 0
        batch.step = self

    def __call__(self, *args):
        self.permits.acquire()
        self.steps += 1
        return self.step(*args)

    def open(self):
        self.permits.release(1 << 20)


def client(url, key="none", cls=None):
    return (cls or openai.OpenAI)(base_url=f"{url}/v1", api_key=key, max_retries=0)


def alone(model, tokenizer, chat, prompt, max_tokens, **sampling) -> tuple[str, int]:
    """(text, tokens) CModel.generate_ids gives the request alone: the single-sequence path."""
    ct = CTokenizer(tokenizer)
    if chat:
        ids, stop = ct.render_chat(prompt, add_generation_prompt=True), (ct.chat_ids[1], ct.eos_id, ct.bos_id)
    else:
        ids, stop = ct.encode(prompt), (ct.bos_id, ct.eos_id)
    sampler = CSampler(ct.vocab_size, **sampling) if sampling else None
    out, _ = CModel(model).generate_ids(ids, max_new=max_tokens, stop=stop, sampler=sampler)
    return ct.decode(out), len(out)


def ask(c, chat, prompt, max_tokens, stream, **extra) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of one request through the openai client."""
    make = c.chat.completions.create if chat else c.completions.create
    what = dict(messages=prompt) if chat else dict(prompt=prompt)
    if not stream:
        reply = make(**what, max_tokens=max_tokens, **extra)
        choice = reply.choices[0]
        return (choice.message.content if chat else choice.text), choice.finish_reason, reply.usage.model_dump()
    parts, finish, usage = [], None, None
    for chunk in make(**what, max_tokens=max_tokens, stream=True,
                      stream_options={"include_usage": True}, **extra):
        if chunk.usage:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            parts.append((choice.delta.content or "") if chat else choice.text)
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


def messages(user, system=SYSTEM):
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_streamed_text_is_whole_characters(small):  # noqa: F811
    sp, _, ct = small["chat"]
    ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "莉".encode()]
    decoder = CDecoder(ct)
    assert [decoder.step(i) for i in ids] == ["", "", "莉"] and decoder.finish() == ""
    assert decoder.step(ids[0]) == "" and decoder.finish() == "\ufffd"


def test_sampler_sample_keeps_the_logits(small):  # noqa: F811
    logits = np.random.default_rng(0).standard_normal(small["chat"][2].vocab_size).astype(np.float32)
    before = logits.copy()
    sampler = CSampler(len(logits), temperature=1.0, seed=3, frequency=0.5)
    assert CSampler(len(logits)).sample(logits) == logits.argmax()
    assert 0 <= sampler.sample(logits) < len(logits) and np.array_equal(logits, before)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_greedy_replies_equal_the_single_sequence_path(files, stream):
    tokenizer, endless, stopping = files
    with live(stopping, tokenizer) as (api, url):
        c = client(url)
        assert [m.id for m in c.models.list()] == ["stopping"]
        for chat, prompt, max_tokens in [(True, messages(USER_1), 30), (False, PROMPTS[1], 17),
                                         (True, [{"role": "user", "content": PROMPTS[2]}], 1)]:
            text, n = alone(stopping, tokenizer, chat, prompt, max_tokens)
            got = ask(c, chat, prompt, max_tokens, stream, model="stopping", temperature=0)
            n_prompt = len(CTokenizer(tokenizer).render_chat(prompt) if chat else CTokenizer(tokenizer).encode(prompt))
            assert got == (text, "stop" if n < max_tokens else "length",
                           {**got[2], "prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
        # the chat reply of "stopping" ends at <|im_end|>, before max_tokens
        assert alone(stopping, tokenizer, True, messages(USER_1), 30)[1] < 30


def test_seeded_sampling_with_penalties_equals_the_single_sequence_path(files):
    tokenizer, endless, _ = files
    settings = dict(temperature=0.8, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.3)
    text, _ = alone(endless, tokenizer, False, PROMPTS[0], 40, temperature=0.8, topp=0.9, seed=7, presence=0.5,
                    frequency=0.3)
    with live(endless, tokenizer) as (api, url):
        for stream in (False, True):
            assert ask(client(url), False, PROMPTS[0], 40, stream, model="endless", **settings)[:2] == (text, "length")


def test_stop_strings_cut_the_text_before_them(files):
    tokenizer, endless, _ = files
    text, _ = alone(endless, tokenizer, False, PROMPTS[3], 60)
    cut = text[len(text) // 2:len(text) // 2 + 2]
    with live(endless, tokenizer) as (api, url):
        for stream in (False, True):
            got = ask(client(url), False, PROMPTS[3], 60, stream, model="endless", temperature=0,
                      stop=["never said", cut])
            assert got[:2] == (text[:text.find(cut)], "stop")


def request(url, method, path, body: bytes | None = None, headers=None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a raw HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.headers), json.loads(data)


BAD = [  # path, body, status, code or param
    ("/v1/completions", b'{"model": ', 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "invalid_utf8"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "invalid_utf8"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "invalid_utf8"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": [[1, 2]]}).encode(), 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": "3"}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": -2}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 500}).encode(), 400, "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "a", "temperature": True}).encode(), 400, "temperature"),
    ("/v1/completions", json.dumps({"prompt": "a", "top_p": 0}).encode(), 400, "top_p"),
    ("/v1/completions", json.dumps({"prompt": "a", "stop": [1]}).encode(), 400, "stop"),
    ("/v1/completions", json.dumps({"prompt": "a", "stream": "yes"}).encode(), 400, "stream"),
    ("/v1/completions", json.dumps({"prompt": "a", "n": 2}).encode(), 400, "n"),
    ("/v1/completions", json.dumps({"prompt": "a", "presence_penalty": 3}).encode(), 400, "presence_penalty"),
    ("/v1/completions", json.dumps({"prompt": "once upon " * 300}).encode(), 400, "context_length_exceeded"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
     "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a\0b"}]}).encode(), 400,
     "messages"),
    ("/v1/completions", json.dumps({"model": "gpt-4o", "prompt": "a"}).encode(), 404, "model_not_found"),
    ("/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY + b'"}', 413, "body_too_large"),
    ("/v1/nothing", b"{}", 404, None),
]


def test_bad_requests_get_openai_errors_and_disturb_no_one(files):
    tokenizer, endless, _ = files
    text, _ = alone(endless, tokenizer, False, PROMPTS[0], 150)
    with live(endless, tokenizer, slots=1) as (api, url):
        gate = Gate(api.scheduler.batch)
        c = client(url)
        # a reply in flight, held at its first step while the bad requests come in
        reply = c.completions.create(model="endless", prompt=PROMPTS[0], max_tokens=150, temperature=0, stream=True)
        for path, body, status, what in BAD:
            got, _, error = request(url, "POST", path, body)
            assert (got, set(error["error"])) == (status, {"message", "type", "param", "code"}), (path, body[:80])
            assert what in (error["error"]["code"], error["error"]["param"]), (path, body[:80], error)
        assert request(url, "GET", "/health")[2]["active"] == 1
        gate.open()
        assert "".join(chunk.choices[0].text for chunk in reply if chunk.choices) == text
        assert ask(c, False, PROMPTS[0], 150, False, model="endless", temperature=0)[0] == text


def test_api_key(files):
    tokenizer, endless, _ = files
    with live(endless, tokenizer, api_key="sesame") as (api, url):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame!"}):
            status, _, error = request(url, "GET", "/v1/models", None, headers)
            assert (status, error["error"]["code"]) == (401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert ask(client(url, "sesame"), False, "a", 3, True, model="endless", temperature=0)[1] == "length"
        assert request(url, "GET", "/health")[0] == 200  # for load balancers: no key


def test_full_queue_gets_503_with_retry_after(files):
    tokenizer, endless, _ = files
    text, _ = alone(endless, tokenizer, False, PROMPTS[1], 20)
    with live(endless, tokenizer, slots=1, max_waiting=1) as (api, url):
        gate, c = Gate(api.scheduler.batch), client(url)
        first, second = (c.completions.create(model="endless", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                              stream=True) for _ in range(2))
        status, headers, error = request(url, "POST", "/v1/completions", json.dumps({"prompt": "a"}).encode())
        assert (status, headers["Retry-After"], error["error"]["type"]) == (503, "1", "server_error")
        gate.open()
        for reply in (first, second):
            assert "".join(chunk.choices[0].text for chunk in reply if chunk.choices) == text


def test_a_client_that_leaves_frees_its_slot(files):
    tokenizer, endless, _ = files
    with live(endless, tokenizer, slots=1) as (api, url):
        gate, c, left = Gate(api.scheduler.batch), client(url), threading.Event()
        cancel = api.scheduler.cancel
        api.scheduler.cancel = lambda r: (cancel(r), left.set())
        reply = c.completions.create(model="endless", prompt=PROMPTS[0], max_tokens=150, temperature=0, stream=True)
        reply.close()  # mid-reply: one token out, its first step held
        assert left.wait(60)
        gate.open()
        assert ask(c, False, PROMPTS[2], 5, False, model="endless", temperature=0)[:2] == \
            alone(endless, tokenizer, False, PROMPTS[2], 5)[0:1] + ("length",)
        health = request(url, "GET", "/health")[2]
        # the first request stopped at its first step at the latest (not after its 149), then the second's 4
        assert (health["active"], health["cancelled"]) == (0, 1) and gate.steps <= 5


def test_64_concurrent_requests_on_4_slots(files):
    tokenizer, endless, stopping = files
    jobs = [(i % 2 == 0, messages(f"{PROMPTS[i % 5]} {i}") if i % 2 == 0 else f"{PROMPTS[i % 5]} {i}",
             1 + i * 7 % 24, i % 3 == 0) for i in range(64)]
    expected = [alone(stopping, tokenizer, chat, prompt, n)[0] for chat, prompt, n, _ in jobs]
    with live(stopping, tokenizer, slots=4) as (api, url):
        gate, c = Gate(api.scheduler.batch), client(url, cls=openai.AsyncOpenAI)

        async def run_all():
            tasks = [asyncio.create_task(ask_async(c, *job)) for job in jobs]
            for _ in range(6000):  # until all 64 are in
                health = (await asyncio.to_thread(request, url, "GET", "/health"))[2]
                if health["requests"] + health["active"] + health["waiting"] == 64:
                    break
                await asyncio.sleep(0.01)
            gate.open()  # all 64 in: 4 in slots (or done without a step), the rest waiting
            return await asyncio.gather(*tasks)

        assert asyncio.run(run_all()) == expected
        health = request(url, "GET", "/health")[2]
        assert (health["requests"], health["active"], health["waiting"]) == (64, 0, 0)
        assert gate.steps < health["tokens"] - 64  # steps were shared


async def ask_async(c, chat, prompt, max_tokens, stream):
    make = c.chat.completions.create if chat else c.completions.create
    what = dict(messages=prompt) if chat else dict(prompt=prompt)
    reply = await make(**what, model="stopping", max_tokens=max_tokens, temperature=0, stream=stream)
    if not stream:
        return reply.choices[0].message.content if chat else reply.choices[0].text
    parts = []
    async for chunk in reply:
        parts += [(choice.delta.content or "") if chat else choice.text for choice in chunk.choices]
    return "".join(parts)


def test_sigterm_stops_the_server_and_exits_0(files):
    tokenizer, endless, _ = files
    server = subprocess.Popen([sys.executable, "-m", "llama2zh", "serve", str(endless), "--tokenizer",
                               str(tokenizer), "--port", "0", "--slots", "2"], stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        url = "http://127.0.0.1:" + re.search(r"127\.0\.0\.1:(\d+)/", line).group(1)
        assert request(url, "GET", "/health")[2]["status"] == "ok"
        reply = client(url).completions.create(model="endless", prompt="a", max_tokens=100, stream=True)
        server.send_signal(signal.SIGTERM)
        try:
            list(reply)  # the stream ends: finished, or cancelled with an error event
        except openai.APIError as e:
            assert "shutting down" in str(e)
        assert server.wait(60) == 0
        assert server.stderr.read() == ""
    finally:
        server.kill()
        server.wait()


def test_a_long_prompt_is_fed_in_chunks_between_the_steps_of_others(files, monkeypatch):
    tokenizer, endless, _ = files
    monkeypatch.setattr("llama2zh.serve.scheduler.CHUNK", 8)
    long = " ".join(PROMPTS * 4)
    assert len(CTokenizer(tokenizer).encode(long)) > 5 * 8
    with live(endless, tokenizer, slots=2) as (api, url):
        gate, c, calls = Gate(api.scheduler.batch), client(url), []

        def recorded(kind, call):  # call, logged with its third argument (a prefill's position)
            return lambda *args: (calls.append((kind, args[2])), call(*args))[1]

        api.scheduler.batch.prefill, gate.step = recorded("prefill", api.scheduler.batch.prefill), \
            recorded("step", gate.step)
        short = c.completions.create(model="endless", prompt="a", max_tokens=100, temperature=0, stream=True)
        chunked = c.completions.create(model="endless", prompt=long, max_tokens=10, temperature=0, stream=True)
        gate.open()
        for reply, prompt, n in ((short, "a", 100), (chunked, long, 10)):
            assert "".join(chunk.choices[0].text for chunk in reply if chunk.choices) == \
                alone(endless, tokenizer, False, prompt, n)[0]
    # from its second chunk on (the first two may come before the short one's first step), each chunk of the long
    # prompt comes after a step of the short reply, not after the previous chunk
    chunks = [i for i, (kind, pos) in enumerate(calls) if kind == "prefill" and pos > 0]
    assert len(chunks) > 4 and all(calls[i - 1][0] == "step" for i in chunks[1:])

"""llama2zh serve's web page at /, driven in headless Chromium by Playwright against a live server: story mode
streams the greedy reply of the single-sequence path, piece by piece (the scheduler held after the first token,
the page shows a part of it); chat mode sends the whole conversation with its system prompt; the stop button
frees the server's slot; the English switch; the server's errors and the API key; a model without a chat
template. Screenshots go to $LLAMA2ZH_ARTIFACTS or tests/artifacts/.

Playwright's own browser downloads are not needed: the tests drive an installed Chromium ($LLAMA2ZH_CHROMIUM,
else chromium, chromium-browser or google-chrome on PATH), and are skipped without one.

`python -m tests.test_serve_page out/RUN docs/serve-page.png` takes the README's screenshot: the page in chat
mode, in Chinese, talking to out/RUN.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="the web page's tests need playwright (dev extra)")

from tests.test_chat_engine import SYSTEM, USER_1, USER_2, chat_models, small  # noqa: E402, F401 (fixtures)
from tests.test_serve import PROMPTS, Gate, alone, files, live, portable, request  # noqa: E402, F401 (fixtures)

VIEWPORT = {"width": 1100, "height": 750}
ARTIFACTS = Path(os.environ.get("LLAMA2ZH_ARTIFACTS") or Path(__file__).parent / "artifacts")
TIMEOUT_MS = 30_000  # generous: a wait past it is a failure, not a slow machine


def chromium() -> str | None:
    """The Chromium to drive: $LLAMA2ZH_CHROMIUM, else the first of chromium, chromium-browser, google-chrome."""
    if os.environ.get("LLAMA2ZH_CHROMIUM"):
        return shutil.which(os.environ["LLAMA2ZH_CHROMIUM"])
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@contextmanager
def launched():
    path = chromium()
    if path is None:
        given = os.environ.get("LLAMA2ZH_CHROMIUM")
        pytest.skip(f"LLAMA2ZH_CHROMIUM={given!r} is not an executable" if given else
                    "no Chromium: no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium, "
                    "or set LLAMA2ZH_CHROMIUM)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser():
    with launched() as b:
        yield b


@pytest.fixture
def open_page(browser):
    """open_page(url): a page on url (a fresh browser profile each time, unless context is given), loaded; the
    test fails on a JavaScript error in it."""
    contexts, errors = [], []

    def open_(url, context=None):
        if context is None:
            context = browser.new_context(viewport=VIEWPORT)
            contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == []


@pytest.fixture(scope="module")
def served(files):  # noqa: F811 (the imported fixture)
    """(tokenizer.bin, model.bin) of test_serve's "endless" model, which never says a stop id."""
    return files[0], files[1]


def screenshot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def settings(page, temperature=None, max_tokens=None, system=None):
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    if system is not None:
        page.fill("#system", system)


def send(page, text):
    page.fill("#input", text)
    page.click("#send")


def finished(page) -> str:
    """The state line's state once the request in flight ended: done, length or stopped ("" after an error)."""
    page.wait_for_selector("#send:not([hidden])")
    return page.get_attribute("#state", "data-state")


def text_of(page, selector) -> str:
    return page.eval_on_selector(selector, "el => el.textContent")


def stats(page) -> tuple[int, float]:
    """(tokens, tokens/s) the page shows for the last reply."""
    return int(page.get_attribute("#stats", "data-tokens")), float(page.get_attribute("#stats", "data-tps"))


def test_story_mode_streams_the_greedy_reply(served, open_page):
    tokenizer, endless = served
    text, n = alone(endless, tokenizer, False, PROMPTS[0], 40)
    with live(endless, tokenizer) as (api, url):
        gate = Gate(api.scheduler.batch)
        page = open_page(url)
        assert page.get_attribute("html", "lang") == "zh-CN" and page.inner_text("#model-name") == "endless"
        settings(page, temperature=0, max_tokens=40)
        send(page, PROMPTS[0])
        # held at its first step: the page shows the first token's text while the rest is yet to come
        page.wait_for_function("document.querySelector('#story-reply')?.textContent")
        first = text_of(page, "#story-reply")
        assert text.startswith(first) and len(first) < len(text)
        assert page.is_visible("#stop") and page.get_attribute("#state", "data-state") == "generating"
        gate.open()
        assert finished(page) == "length"
        assert text_of(page, "#story-reply") == text and text_of(page, "#story-out .prompt") == PROMPTS[0]
        tokens, tps = stats(page)
        assert tokens == n == 40 and tps > 0
        assert re.search(r"40 个 token · [0-9.]+ token/秒", page.inner_text("#stats"))
        screenshot(page, "serve-page-story.png")


def test_chat_mode_sends_the_whole_conversation(served, open_page):
    tokenizer, endless = served
    system = {"role": "system", "content": SYSTEM}
    first, _ = alone(endless, tokenizer, True, [system, {"role": "user", "content": USER_1}], 30)
    conversation = [system, {"role": "user", "content": USER_1}, {"role": "assistant", "content": first},
                    {"role": "user", "content": USER_2}]
    second, _ = alone(endless, tokenizer, True, conversation, 30)
    assert second != alone(endless, tokenizer, True, [system, conversation[-1]], 30)[0]  # the first turn matters
    with live(endless, tokenizer) as (api, url):
        page = open_page(url)
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else 0)
        page.click("#mode-chat")
        assert page.is_visible("#system") and page.inner_text("#send") == "发送"
        settings(page, temperature=0, max_tokens=30, system=SYSTEM)
        send(page, USER_1)
        assert finished(page) == "length"
        send(page, USER_2)
        assert finished(page) == "length"
        replies = page.eval_on_selector_all(".message .content", "els => els.map(el => el.textContent)")
        assert replies == [USER_1, first, USER_2, second]
        assert [body["messages"] for body in sent] == [conversation[:2], conversation]
        assert sent[1]["stream"] is True and sent[1]["stream_options"] == {"include_usage": True}
        assert stats(page)[1] > 0
        screenshot(page, "serve-page-chat.png")
        page.click("#clear")  # a new conversation
        assert page.query_selector_all(".message") == []


def test_the_stop_button_frees_the_slot(served, open_page):
    tokenizer, endless = served
    text, _ = alone(endless, tokenizer, False, PROMPTS[0], 180)
    with live(endless, tokenizer, slots=1) as (api, url):
        gate, left = Gate(api.scheduler.batch), threading.Event()
        cancel = api.scheduler.cancel
        api.scheduler.cancel = lambda r: (cancel(r), left.set())
        page = open_page(url)
        settings(page, temperature=0)  # no max tokens: the rest of the context
        send(page, PROMPTS[0])
        page.wait_for_function("document.querySelector('#story-reply')?.textContent")
        assert request(url, "GET", "/health")[2]["active"] == 1
        page.click("#stop")
        assert finished(page) == "stopped"
        assert left.wait(TIMEOUT_MS / 1000)  # the server saw the client leave
        gate.open()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while (health := request(url, "GET", "/health")[2])["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (health["active"], health["waiting"], health["cancelled"], health["requests"]) == (0, 0, 1, 0)
        assert text.startswith(text_of(page, "#story-reply")) and page.inner_text("#state") == "已停止"
        # the slot serves the next request
        send(page, PROMPTS[2])
        assert finished(page) == "length" and request(url, "GET", "/health")[2]["requests"] == 1


def test_the_english_switch_is_remembered(served, open_page):
    tokenizer, endless = served
    with live(endless, tokenizer) as (api, url):
        page = open_page(url)
        ui = ("#mode-story", "#mode-chat", "#send", "#clear", "#lang")
        assert [page.inner_text(s) for s in ui] == ["故事", "对话", "续写", "清空", "English"]
        page.click("#lang")
        english = ["Story", "Chat", "Continue", "Clear", "中文"]
        assert [page.inner_text(s) for s in ui] == english and page.get_attribute("html", "lang") == "en"
        page.click("#mode-chat")
        assert page.inner_text("#send") == "Send" and page.inner_text("#clear") == "New chat"
        # every string of the page in English: no Chinese left but the switch back
        visible = page.evaluate("document.body.innerText").replace("中文", "")
        assert not re.search(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]", visible), visible
        screenshot(page, "serve-page-en.png")
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert page.inner_text("#lang") == "中文" and page.inner_text("#mode-chat") == "Chat"
        page.click("#lang")
        assert page.inner_text("#mode-chat") == "对话"


def test_server_errors_and_the_api_key(served, open_page):
    tokenizer, endless = served
    text, _ = alone(endless, tokenizer, False, PROMPTS[1], 3)
    with live(endless, tokenizer, api_key="sesame") as (api, url):
        page = open_page(url)  # / and its files need no key
        settings(page, temperature=0, max_tokens=3)
        send(page, PROMPTS[1])
        assert finished(page) == ""
        assert "401" in page.inner_text("#error") and "missing or wrong API key" in page.inner_text("#error")
        assert page.input_value("#input") == PROMPTS[1]  # the prompt, back for another try
        page.fill("#api-key", "sesame")
        settings(page, max_tokens=10000)
        page.click("#send")
        assert finished(page) == ""
        assert re.search(r"400: max_tokens must be a positive integer, at most \d+", page.inner_text("#error"))
        screenshot(page, "serve-page-error.png")
        settings(page, max_tokens=3)
        page.click("#send")
        assert finished(page) == "length" and page.is_hidden("#error") and text_of(page, "#story-reply") == text
        again = open_page(url, page.context)  # the key is kept in the browser
        assert again.input_value("#api-key") == "sesame"


def test_a_model_without_a_chat_template_has_story_mode_only(served, open_page):
    tokenizer, endless = served
    with live(endless, tokenizer) as (api, url):
        api.tokenizer.chat_ids = None
        assert request(url, "GET", "/health")[2]["chat"] is False
        page = open_page(url)
        assert page.is_disabled("#mode-chat") and "没有对话模板" in page.get_attribute("#mode-chat", "title")
        assert page.is_visible("#story") and page.is_hidden("#chat")


def readme_screenshot(run: Path, out: Path) -> None:
    """The page in chat mode, in Chinese, after three turns with run's model."""
    turns = ["讲一个小猫咪咪在公园里的故事吧！", "故事的主人公是谁？", "这个故事是怎么结束的？"]
    with live(run, None, slots=1) as (api, url), launched() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        page.click("#mode-chat")
        settings(page, temperature=0.6, system="你是一个会讲故事的助手。")
        for turn in turns:
            send(page, turn)
            finished(page)
        page.screenshot(path=str(out))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.test_serve_page out/RUN OUT.png")
    readme_screenshot(Path(sys.argv[1]), Path(sys.argv[2]))

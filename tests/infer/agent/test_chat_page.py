"""The chat page (infer/agent/page/) in a real headless browser: Debian's chromium driven by Playwright,
against the real server (create_app with the agent mounted, the tiny checkpoint's engine, a SQLite
store) on a loopback port. What a person does: give the API key when asked, send a message and watch
the reply stream in, reload and find the session and its messages, rename and delete it, read an
answer that holds markup (it shows as text, nothing of it runs or becomes an element)."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from tests.infer.server_helpers import API_KEY, auth, shared_agent_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian's chromium is not installed (.ci/run installs it)")
MARKUP = ('Before <script>alert(1)</script> and <b>bold</b> <img src=x onerror="alert(2)">\n'
          "```html\n<script>alert(3)</script><b>in code</b>\n```\nafter")


@pytest.fixture(scope="module")
def server():
    """The in-process server with the agent (tiny checkpoint, SQLite store), shared with the chat tests."""
    srv = shared_agent_server()
    srv.store = srv.agent.store
    return srv


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    """A fresh browser context (empty localStorage) on the page; dialogs, page errors and the console
    are recorded, and none may have happened by the end of the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    pg.dialogs, pg.errors = [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    # (a 401 or 400 answer is logged by the browser as a failed resource: expected, the page shows it)
    pg.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
          and pg.errors.append(m.text))
    yield pg
    context.close()
    assert pg.dialogs == [] and pg.errors == []


def give_key(pg, base: str) -> None:
    """Open the page; the server answers 401, the page asks for the key, the key is kept."""
    pg.goto(base + "/")
    pg.get_by_label("API key").wait_for(state="visible")
    assert "API key" in pg.locator("#error").inner_text()
    pg.get_by_label("API key").fill(API_KEY)
    pg.get_by_role("button", name="Use key").click()
    pg.locator("#error").wait_for(state="hidden")
    assert pg.evaluate("localStorage.getItem('jaxlm.apiKey')") == API_KEY


# What the page shows while a reply streams, in order: each new text of the assistant bubble marked as
# streaming, and whether the Stop button was showing then. With `stopAfter`, Stop is clicked as soon as
# that many partial texts were shown (from the page itself: the tiny model writes 900 tokens in about a
# second, faster than a round trip of the test's clicks).
RECORD_STREAM = """(stopAfter) => {
  window.streamStates = [];
  const stop = document.getElementById('stop');
  new MutationObserver(() => {
    for (const b of document.querySelectorAll('.message.assistant.streaming .content')) {
      const last = window.streamStates[window.streamStates.length - 1];
      if (!last || last.text !== b.textContent) window.streamStates.push({text: b.textContent, stop: !stop.hidden});
      if (stopAfter && !window.stopClicked && window.streamStates.filter(s => s.text).length >= stopAfter) {
        window.stopClicked = true;
        stop.click();
      }
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_send_stream_reload_rename_delete(page, server):
    before = {s["id"] for s in server.store.list()}
    give_key(page, server.base)
    page.evaluate(RECORD_STREAM, 0)
    page.get_by_label("Temperature").fill("0")  # greedy: the same reply every run
    box = page.get_by_label("Message")
    box.fill("first line")
    box.press("Shift+Enter")  # a newline, not a send
    box.press_sequentially("second line")
    assert page.locator(".message").count() == 0
    box.press("Enter")
    done = page.locator(".message.assistant:not(.streaming)")
    done.wait_for()
    assert page.get_by_role("button", name="Send").is_visible()
    assert not page.get_by_role("button", name="Stop").is_visible()

    sessions = httpx.get(server.base + "/v1/agent/sessions", headers=auth()).json()["data"]
    new = [s for s in sessions if s["id"] not in before]
    assert len(new) == 1 and sessions[0] == new[0]  # one new session, the newest
    sid = new[0]["id"]
    stored = httpx.get(f"{server.base}/v1/agent/sessions/{sid}", headers=auth()).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "first line\nsecond line"
    reply = stored[1]["content"]
    assert page.locator(".message.user .content").inner_text() == "first line\nsecond line"
    assert done.locator(".content").text_content() == reply
    # streamed: while marked as streaming (with the Stop button showing), the bubble showed growing
    # partial replies before the whole one
    states = page.evaluate("window.streamStates")
    partial = [s["text"] for s in states if s["text"] and s["text"] != reply]
    assert len(partial) >= 2 and all(reply.startswith(t) for t in partial), states
    assert all(s["stop"] for s in states)
    # which model answered and why
    assert done.locator(".meta-model .meta-value").inner_text() == "tiny"
    assert done.locator(".meta-route .meta-value").inner_text() == stored[1]["meta"]["reason"] != ""

    # a reload reopens the session from the URL; the list holds it, with both messages
    page.reload()
    item = page.locator(f'#sessions li[data-id="{sid}"]')
    item.wait_for()
    assert item.locator(".session-open").inner_text() == "first line"
    page.locator(".message.assistant").wait_for()
    assert page.locator(".message.user .content").inner_text() == "first line\nsecond line"
    assert page.locator(".message.assistant .content").text_content() == reply

    # rename: inline field, Enter saves; the server has the new title
    item.get_by_role("button", name="Rename first line").click()
    field = item.get_by_label("New title")
    field.fill("Renamed <i>chat</i>")
    field.press("Enter")
    page.locator(f'#sessions li[data-id="{sid}"] .session-open').filter(has_text="Renamed").wait_for()
    assert httpx.get(f"{server.base}/v1/agent/sessions/{sid}", headers=auth()).json()["title"] == "Renamed <i>chat</i>"
    assert page.locator("#sessions i").count() == 0
    assert page.get_by_role("heading", level=1).inner_text() == "Renamed <i>chat</i>"  # the open session's title

    # delete takes a confirming second click; the session is gone from the page and the server
    delete = page.locator(f'#sessions li[data-id="{sid}"] .session-delete')
    delete.click()
    assert delete.inner_text() == "Confirm delete"
    delete.click()
    page.locator(f'#sessions li[data-id="{sid}"]').wait_for(state="detached")
    assert page.locator(".message").count() == 0
    assert httpx.get(f"{server.base}/v1/agent/sessions/{sid}", headers=auth()).status_code == 404


def test_markup_in_an_answer_shows_as_text(page, server):
    session = server.store.create(title="markup <b>title</b>", system="Answer in <b>HTML</b>.")
    server.store.append(session["id"], "user", "show me markup")
    server.store.append(session["id"], "assistant", MARKUP, {"backend": "tiny", "reason": "<b>why</b>"})
    give_key(page, server.base)
    page.goto(f"{server.base}/#session={session['id']}")
    page.reload()  # the hash alone does not reload
    bubble = page.locator(".message.assistant .content")
    bubble.wait_for()
    messages = page.locator("#messages")
    # no element came from the text: the only elements are the page's own (text blocks, code box)
    assert messages.locator("script, b, img, i").count() == 0
    assert page.locator("#sessions b").count() == 0
    assert bubble.text_content().startswith('Before <script>alert(1)</script> and <b>bold</b> <img src=x')
    assert bubble.locator("pre code").text_content() == "<script>alert(3)</script><b>in code</b>"
    assert bubble.locator(".code-lang").inner_text() == "html"
    assert page.get_by_text("<b>bold</b>", exact=False).is_visible()
    assert page.locator(".message.system .content").text_content() == "Answer in <b>HTML</b>."
    assert page.locator(".message.assistant .meta-route .meta-value").inner_text() == "<b>why</b>"
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # the page's own app.js


def test_refusals_show_in_the_page(page, server):
    give_key(page, server.base)
    box = page.get_by_label("Message")
    box.fill("\u200b\u200d\u2060")  # nothing visible: the sanitizer's 400
    box.press("Enter")
    error = page.locator("#error")
    error.wait_for()
    assert "content" in error.inner_text()
    assert box.input_value() == "\u200b\u200d\u2060"  # given back to edit
    assert page.locator(".message").count() == 0


def until(condition, timeout: float = 30.0) -> None:
    """Wait for `condition()` (polled; the page's CSP forbids the eval behind Playwright's wait_for_function)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_stop_ends_the_stream_and_frees_the_slot(page, server):
    give_key(page, server.base)
    page.evaluate(RECORD_STREAM, 2)  # Stop once two partial replies were shown
    page.get_by_label("Max tokens").fill("900")  # long enough to be stopped mid-way
    box = page.get_by_label("Message")
    box.fill("a long answer please")
    box.press("Enter")
    bubble = page.locator(".message.assistant")
    bubble.locator(".meta-finished .meta-value").filter(has_text="stopped").wait_for()
    assert page.get_by_role("button", name="Send").is_visible()
    shown = bubble.locator(".content").text_content()
    # the server saw the disconnect: the partial answer is stored as cancelled and the engine's slot is free
    sid = page.evaluate("decodeURIComponent(location.hash.split('=')[1])")
    until(lambda: [m["meta"].get("finish_reason") for m in server.store.messages(sid)] == [None, "cancelled"])
    assert server.store.messages(sid)[1]["content"].startswith(shown)
    until(lambda: server.engine.stats()["running"] == 0)

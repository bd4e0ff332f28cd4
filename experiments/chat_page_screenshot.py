"""Screenshot of a real conversation in the chat page (experiments/chat_page.png).

    python -m infer serve --run runs/chat_quickstart --port 18472 --memory /tmp/chat_page.sqlite &
    python experiments/chat_page_screenshot.py http://127.0.0.1:18472 experiments/chat_page.png

The session (with the recipe's system prompt) is created through the agent API; both turns are typed
into the page in Debian's chromium and streamed from the model (temperature: the agent's default 0.7).
"""
import sys

import httpx
from playwright.sync_api import sync_playwright

base, out = sys.argv[1], sys.argv[2]
system = "You are a Python programming assistant. Answer with Python code."
session = httpx.post(base + "/v1/agent/sessions", json={"title": "Python helper", "system": system}).json()
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium")
    page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    page.set_default_timeout(120_000)
    page.goto(f"{base}/#session={session['id']}")
    page.locator("#session-title").filter(has_text="Python helper").wait_for()
    page.get_by_label("Max tokens").fill("80")
    for i, text in enumerate(["Write a function `add(a, b)` that returns the sum of a and b.",
                              "Now a function that reverses a string."]):
        page.get_by_label("Message").fill(text)
        page.get_by_label("Message").press("Enter")
        page.locator(".message.assistant:not(.streaming)").nth(i).wait_for()
    page.get_by_label("Message").fill("")
    page.screenshot(path=out)
    browser.close()

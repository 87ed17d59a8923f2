"""A real browser (headless Debian chromium via Playwright) against the app on the tiny engine.

Types a message, watches the answer stream and the panel move, presses Stop mid-answer, checks that a
second browser session does not see the first one's conversation, and saves a screenshot under
test-artifacts/ (the path is printed).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

playwright_api = pytest.importorskip("playwright.sync_api")

from mixoff_app.config import CacheConfig, EngineConfig, QuantConfig  # noqa: E402
from mixoff_app.engine import Engine  # noqa: E402
from mixoff_app.ui import build_ui, launch_kwargs, panel  # noqa: E402

CHROMIUM = os.environ.get("MIXOFF_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                                 reason=f"no chromium at {CHROMIUM} (apt-get install -y chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, max_new_tokens: int):
    # The reference kernel path: the CPU kernels decode the tiny model so fast that a long answer can end
    # between the page seeing it stream and the Stop click landing (the test then races the answer's end).
    engine = Engine.load(EngineConfig(model=model, device="cpu", quant=QuantConfig.from_bits(4, 2),
                                      cache=CacheConfig(sizes=(3,)), kernel="torch"))
    demo = build_ui(engine, max_new_tokens=max_new_tokens)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app_url(tiny_dir):
    """The random-weights tiny model: its greedy answers run to the token limit, so there is time to watch
    them stream and to press Stop in the middle."""
    demo, url = serve(str(tiny_dir), 96)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def chat_url():
    """``--model tiny``: the trained demo model when it ships in assets/, else the random one."""
    demo, url = serve("tiny", 128)
    yield url
    demo.close()


def launch_browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def figures(page) -> dict:
    """What the panel shows, read from the page."""
    panel = page.locator("#mx-panel")
    cards = {name: panel.locator(".mx-card", has_text=name).first.inner_text()
             for name in ("Hit rate", "Speed", "Memory", "Transfers")}
    grid = panel.locator(".mx-grid")
    return {
        **cards,
        "cells": grid.locator("i.mx-c").count(),
        "events": grid.locator("i.mx-hit, i.mx-miss, i.mx-prefetch").count(),
        "html": panel.inner_html(),
    }


def bot_messages(page):
    return page.locator('#mx-chat [data-testid="bot"]')


def status(page) -> str:
    return page.locator("#mx-status").inner_text()


def set_number(page, elem_id: str, value: str) -> None:
    """Type a slider's value and wait until the slider itself shows it. A value typed while the slider is
    still mounting (just after its accordion opens) can be reset by the mount, and the next request would
    then go out with the old value (this is how the greedy Retry check used to fail: it ran at 0.7)."""
    box = page.locator(f"{elem_id} input[type='number']")
    for _ in range(5):
        box.fill(value)
        box.press("Tab")
        try:
            page.wait_for_function(
                "([id, v]) => { const r = document.querySelector(id + ' input[type=range]');"
                " const n = document.querySelector(id + ' input[type=number]');"
                " return r && n && Number(r.value) === Number(v) && Number(n.value) === Number(v); }",
                arg=[elem_id, value], timeout=2_000)
            page.wait_for_timeout(300)           # and still shows it once the mount has settled
            if float(box.input_value()) == float(value):
                return
        except playwright_api.Error:
            pass
    raise AssertionError(f"{elem_id} did not take the value {value}")


# Samples, every 25 ms in the page itself, the last answer's length and the panel's figures.
RECORDER = """() => { window.__mxRec = []; const t0 = performance.now();
  window.__mxIv = setInterval(() => {
    const bots = document.querySelectorAll('#mx-chat [data-testid="bot"]');
    const panel = document.querySelector('#mx-panel');
    window.__mxRec.push([Math.round(performance.now() - t0),
                         bots.length ? bots[bots.length - 1].innerText.length : 0,
                         panel ? panel.innerText : '']);
  }, 25); }"""


def send(page, text: str) -> None:
    page.locator("#mx-input textarea").fill(text)
    page.locator("#mx-send").click()


def test_chat_streams_panel_moves_stop_and_screenshot(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1050})
            page.goto(app_url, wait_until="load")
            page.wait_for_selector("#mx-panel .mx-grid", timeout=60_000)
            assert "No GPU" in page.locator("#mx-panel").inner_text()
            start = figures(page)
            assert start["cells"] == 4 * 8                 # tiny: 4 layers x 8 experts
            assert start["events"] == 0 and "0.0%" in start["Hit rate"]

            # 1. a long greedy answer streams token by token and the panel moves; Stop ends it mid-answer
            page.get_by_text("Generation settings").click()
            set_number(page, "#mx-temperature", "0")
            set_number(page, "#mx-max-new", "1500")
            page.evaluate(RECORDER)
            send(page, "What is a tuple in Python?")
            # watch it stream until the text has grown in three steps and the panel has moved three times
            page.wait_for_function(
                "() => { const s = window.__mxRec.filter(r => r[1] > 0);"
                " return new Set(s.map(r => r[1])).size >= 3 && new Set(s.map(r => r[2])).size >= 3; }",
                timeout=90_000)
            clicked = time.time()
            page.locator("#mx-stop").click(force=True)    # no waiting for the streaming page to be still
            click_s = time.time() - clicked
            page.wait_for_function("() => document.querySelector('#mx-status').innerText.startsWith('stopped')",
                                   timeout=30_000)
            print(f"\nStop: {status(page)!r}, seen {time.time() - clicked:.2f} s after the click began "
                  f"(the click itself took {click_s:.2f} s)")
            rec = page.evaluate("() => { clearInterval(window.__mxIv); return window.__mxRec; }")
            lengths = sorted({n for _, n, _ in rec if n > 0})
            assert len(lengths) >= 3, f"the answer streamed in steps: {lengths}"
            bot = bot_messages(page)
            kept = bot.last.inner_text()
            tokens = int(re.search(r"(\d+) tokens", status(page)).group(1))
            assert kept and 0 < tokens < 1500, status(page)
            time.sleep(1.0)
            assert bot.last.inner_text() == kept, "nothing is written after Stop, and what was written stays"
            assert bot_messages(page).count() == 1

            # 2. another browser session has its own conversation
            other = browser.new_context().new_page()
            other.goto(app_url, wait_until="load")
            other.wait_for_selector("#mx-panel .mx-grid", timeout=60_000)
            assert bot_messages(other).count() == 0
            send(other, "zebra banana forty-two")
            other.wait_for_function(
                "() => document.querySelector('#mx-status').innerText.match(/^(finished|reached)/)", timeout=90_000)
            assert "zebra banana" in other.locator("#mx-chat").inner_text()
            assert "tuple" not in other.locator("#mx-chat").inner_text()
            assert "zebra banana" not in page.locator("#mx-chat").inner_text()
            other.close()

            # 3. a second turn runs to its end; the panel's figures are filled in and have changed
            set_number(page, "#mx-max-new", "64")
            send(page, "And what is a list?")
            page.wait_for_function(
                "() => document.querySelector('#mx-status').innerText.match(/^(finished|reached)/)", timeout=90_000)
            assert bot_messages(page).count() == 2
            page.wait_for_timeout(1000)                    # a few more panel ticks after the end
            end = figures(page)
            assert end["events"] > 0, "the grid marks this token's hits and misses"
            assert end["Hit rate"] != start["Hit rate"] and re.search(r"\d+\.\d%", end["Hit rate"])
            assert re.search(r"\d+(\.\d)? tok/s", end["Speed"]) and re.search(r"\d+ ms|\d\.\d+ s", end["Speed"])
            assert end["Speed"] != start["Speed"]
            assert "No GPU" in end["Memory"] and re.search(r"System RAM\s*[\d.]+ GB / [\d.]+ GB", end["Memory"])
            assert re.search(r"Process RAM \(RSS\)\s*[\d.]+ [MG]B", end["Memory"])
            assert end["Transfers"] != start["Transfers"] and re.search(r"[\d.]+ [KMG]B/s", end["Transfers"])
            assert page.locator("#mx-panel img.mx-routing").count() == 1

            page.wait_for_timeout(800)
            shot = ARTIFACTS / "browser-stop.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
            assert shot.stat().st_size > 20_000

            # 4. Retry answers the last question again (greedy: the same text); Clear empties the chat
            answer = bot.last.inner_text()
            page.locator("#mx-retry").click()
            page.wait_for_function(
                "() => document.querySelector('#mx-status').innerText.match(/^generating/)", timeout=30_000)
            page.wait_for_function(
                "() => document.querySelector('#mx-status').innerText.match(/^(finished|reached)/)", timeout=90_000)
            # Retry replaces the last answer rather than adding one, and (greedy) with the same text: the engine
            # re-runs the prompt's last prefill chunk as it ran the first time, so the logits are bit for bit
            # the same (tests/test_generate.py::test_retry_is_bit_for_bit_the_first_answer).
            assert bot_messages(page).count() == 2
            assert answer.strip() and bot.last.inner_text() == answer
            page.locator("#mx-clear").click()
            page.wait_for_function(
                "() => document.querySelectorAll('#mx-chat [data-testid=\"bot\"]').length === 0", timeout=30_000)

            # 5. Clear in the middle of an answer: the answer stops and does not come back
            set_number(page, "#mx-max-new", "1500")
            send(page, "One more long answer, please.")
            page.wait_for_function(
                "() => { const b = document.querySelectorAll('#mx-chat [data-testid=\"bot\"]');"
                " return b.length === 1 && b[0].innerText.length > 10; }", timeout=60_000)
            page.locator("#mx-clear").click(force=True)
            page.wait_for_timeout(1500)
            assert page.locator("#mx-chat [data-testid='user']").count() == 0
            assert bot_messages(page).count() == 0
        finally:
            browser.close()


def test_tiny_chat_answers_and_the_panel_fills(chat_url):
    """The page as `python app.py --model tiny` serves it: a question, its streamed answer, the filled
    panel; the screenshot is the one to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(chat_url, wait_until="load")
            page.wait_for_selector("#mx-panel .mx-grid", timeout=60_000)
            page.evaluate(RECORDER)
            for question in ("What does len do?", "What does sorted do?"):
                n = bot_messages(page).count()
                send(page, question)
                page.wait_for_function(
                    "(n) => document.querySelectorAll('#mx-chat [data-testid=\"bot\"]').length > n && "
                    "document.querySelector('#mx-status').innerText.match(/^(finished|reached)/)",
                    arg=n, timeout=90_000)
            rec = page.evaluate("() => { clearInterval(window.__mxIv); return window.__mxRec; }")
            assert len({n for _, n, _ in rec if n > 0}) >= 3, "the answers streamed"
            assert bot_messages(page).count() == 2 and all(len(t) > 0 for t in bot_messages(page).all_inner_texts())
            page.wait_for_timeout(1000)
            end = figures(page)
            assert end["events"] > 0 and re.search(r"\d+\.\d%", end["Hit rate"]) and "tok/s" in end["Speed"]
            assert "No GPU" in end["Memory"]
            assert "Why this model" in page.locator("#mx-info").inner_text()
            shot = ARTIFACTS / "browser.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}")
        finally:
            browser.close()


@pytest.fixture(scope="module")
def many_url(tiny_dir, tmp_path_factory):
    """A tiny Qwen3-MoE with Qwen3-30B-A3B's panel shape: 48 expert layers x 128 experts, top-8."""
    from mixoff_app.tiny import make_family_checkpoint
    folder = make_family_checkpoint(
        tmp_path_factory.mktemp("many") / "qwen3", "qwen3_moe", tiny_dir, seed=0, hidden_size=32,
        num_hidden_layers=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=16, intermediate_size=32, norm_topk_prob=True,
        max_position_embeddings=512)
    engine = Engine.load(EngineConfig(model=str(folder), device="cpu", quant=QuantConfig.from_bits(None, None),
                                      cache=CacheConfig(sizes=(16,))))
    demo = build_ui(engine, max_new_tokens=24)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_many_expert_panel_is_images_with_a_hover(many_url):
    """128 experts x 48 layers: the grid and the routing heat map are single images (no per-cell elements), and
    the hover names layer, expert and state (the grid) or how often it was chosen (the heat map); the screenshot
    is saved to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1300})
            page.goto(many_url, wait_until="load")
            page.wait_for_selector("#mx-panel img.mx-gridimg", timeout=60_000)
            assert "48 layers × 128 experts, top-8" in page.locator("#mx-info").inner_text()
            send(page, "What is a dictionary?")
            page.wait_for_function(
                "() => document.querySelector('#mx-status').innerText.match(/^(finished|reached)/)", timeout=120_000)
            page.wait_for_timeout(1200)                      # a few panel ticks after the end
            panel_el = page.locator("#mx-panel")
            assert panel_el.locator(".mx-grid-card i.mx-c").count() == len(panel.LEGEND)   # legend keys only
            assert panel_el.locator("*").count() < 400      # not 6,144 cells
            grid = panel_el.locator("img[data-mx=grid]")
            box = grid.bounding_box()
            assert box["width"] > 300 and box["height"] > 100
            # hover the cell of layer 10, expert 100 (centre of the cell)
            page.mouse.move(box["x"] + box["width"] * (100.5 / 128), box["y"] + box["height"] * (10.5 / 48))
            tip = page.locator("#mx-tip")
            tip.wait_for(state="visible", timeout=5_000)
            assert re.fullmatch(r"layer 10 · expert 100 · (empty|resident|hit|miss|prefetch|evicted)",
                                tip.inner_text()), tip.inner_text()
            heat = panel_el.locator("img[data-mx=heat]")         # routing: how often each expert was chosen
            hb = heat.bounding_box()
            assert hb["width"] > 300 and hb["height"] > 100
            n = [int(x) for x in heat.get_attribute("data-n").split(",")]
            tokens = int(heat.get_attribute("data-tokens"))
            e = max(range(128), key=lambda i: n[3 * 128 + i])   # layer 3's most chosen expert
            page.mouse.move(hb["x"] + hb["width"] * ((e + 0.5) / 128), hb["y"] + hb["height"] * (3.5 / 48))
            try:
                page.wait_for_function(
                    "() => /chosen for \\d+ of/.test(document.querySelector('#mx-tip').innerText)", timeout=5_000)
            except playwright_api.TimeoutError:
                raise AssertionError(f"routing hover says {page.locator('#mx-tip').inner_text()!r}") from None
            said = page.locator("#mx-tip").inner_text()
            html = panel_el.inner_html()
            assert said.startswith(f"layer 3 · expert {e} · chosen for {n[3 * 128 + e]} of {tokens} tokens"), said
            assert n[3 * 128 + e] > 0 and sum(n) == tokens * 48 * 8     # top-8 in each of 48 layers per token
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            shot = ARTIFACTS / "browser-many-experts.png"
            panel_el.screenshot(path=str(shot))
            print(f"\nscreenshot: {shot}")
            assert shot.stat().st_size > 20_000 and "data-mx=\"heat\"" in html
        finally:
            browser.close()

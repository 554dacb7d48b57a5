"""The chat page (GET /) in a real headless Chromium against a live server: replies stream in and equal the
API's, Stop keeps the partial reply and frees the server, New conversation clears it, the image button only
for models that take images (and recordings for Gemma 4 that hears), errors shown in the conversation, the API key asked for on a 401, and a base model
(no chat template, like the default model) continuing text through /v1/completions.

MLXGEMMA_SCREENSHOT=1 also saves docs/chat-page.png (the README's picture of the page)."""

import base64
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from reference import hf_model, save_checkpoint
from server_util import chat_checkpoint, serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHORT, LONG = 12, 4000  # the two servers' --max-tokens: replies done at once, replies that run until stopped
WAIT = 15_000  # ms, for every wait in the browser
NAME = "tiny-gemma3"
SCREENSHOT = Path(__file__).parent.parent / "docs" / "chat-page.png"
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return chat_checkpoint("gemma3", tmp_path_factory.mktemp("page") / NAME)


@pytest.fixture(scope="module")
def server(checkpoint):
    served = serve(checkpoint, "--max-tokens", str(SHORT))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the chat page tests need Playwright: pip install -e ".[test]" (or pip install playwright)')
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the chat page tests need Chromium, not found at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=WAIT)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    yield page
    context.close()


def expect(locator):
    from playwright.sync_api import expect
    return expect(locator)


def say(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def settled(page) -> None:
    """The reply under way is over (the page's Send is enabled again)."""
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT)


def api_reply(server, messages) -> str:
    body = {"messages": messages, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def api_continuation(server, prompt) -> str:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "temperature": 0}, timeout=30)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def idle(server, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while server.engine.scheduler.busy and time.time() < deadline:
        time.sleep(0.05)
    return not server.engine.scheduler.busy


def test_replies_stream_in_and_equal_the_api(server, page):
    page.goto(server.url)
    expect(page.locator("#model-name")).to_have_text(NAME)
    replies = page.locator("#messages .message.assistant")
    say(page, "t10 t11")
    settled(page)
    expect(page.locator("#messages .message.user")).to_have_text("t10 t11")
    first = api_reply(server, [{"role": "user", "content": "t10 t11"}])
    assert replies.nth(0).text_content() == first
    assert int(replies.nth(0).get_attribute("data-chunks")) >= 2  # streamed, a piece at a time

    say(page, "t92 t78")  # the whole conversation goes each turn
    settled(page)
    second = api_reply(server, [{"role": "user", "content": "t10 t11"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "t92 t78"}])
    assert replies.nth(1).text_content() == second
    assert page.locator("#status").text_content() == "done (the reply reached the token limit)"
    if os.environ.get("MLXGEMMA_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))


def test_stop_keeps_the_partial_reply_and_frees_the_server(checkpoint, page):
    served = serve(checkpoint, "--max-tokens", str(LONG))
    try:
        page.goto(served.url)
        expect(page.locator("#model-name")).to_have_text(NAME)
        replies = page.locator("#messages .message.assistant")
        say(page, "t10 t11")
        page.wait_for_function("() => +(document.querySelector('.message.assistant')?.dataset.chunks) >= 5")
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped")
        assert idle(served), "the server still generates the stopped reply"
        partial = replies.nth(0).text_content()
        assert 5 <= len(partial.split()) < LONG
        time.sleep(0.3)
        assert replies.nth(0).text_content() == partial

        say(page, "t20 t21")  # the conversation, partial reply included, goes on
        page.wait_for_function("() => +(document.querySelectorAll('.message.assistant')[1]?.dataset.chunks) >= 2")
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped")
        expect(replies).to_have_count(2)
        assert replies.nth(0).text_content() == partial
        assert idle(served)
    finally:
        served.stop()


def test_new_conversation_clears_it(server, page):
    page.goto(server.url)
    say(page, "t30 t31")
    settled(page)
    expect(page.locator("#messages .message")).to_have_count(2)
    page.click("#new-chat")
    expect(page.locator("#messages .message")).to_have_count(0)
    say(page, "t40")  # and the next turn starts a new conversation
    settled(page)
    assert page.locator("#messages .message.assistant").text_content() == api_reply(
        server, [{"role": "user", "content": "t40"}])


def test_images_only_for_vision_models_and_errors_shown(server, page):
    page.goto(server.url)
    expect(page.locator("#model-name")).to_have_text(NAME)
    expect(page.locator("#attach")).to_be_hidden()

    # As if the model took images: the button shows, the image goes as an image_url part, the 400 shows.
    page.route("**/api/show", lambda route: route.fulfill(json={"capabilities": ["completion", "vision"]}))
    page.reload()
    expect(page.locator("#attach")).to_be_visible()
    page.set_input_files("#attach", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": PNG}])
    expect(page.locator("#attachments img")).to_have_count(1)
    say(page, "t10")
    settled(page)
    expect(page.locator("#messages .message.error")).to_have_text(f"{NAME} is a text-only model: it takes no images")
    expect(page.locator("#messages .message.user")).to_have_count(0)  # the turn is taken back, to edit
    assert page.input_value("#input") == "t10"


def test_api_key_asked_for_and_sent(checkpoint, page):
    served = serve(checkpoint, "--max-tokens", "4", "--api-key", "sesame")
    try:
        page.goto(served.url)
        expect(page.locator("#key-box")).to_be_visible()  # the 401 asks for it
        expect(page.locator("#status")).to_contain_text("API key")
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")
        expect(page.locator("#model-name")).to_have_text(NAME)
        assert page.evaluate("localStorage.getItem('mlxgemma.apiKey')") == "sesame"
        say(page, "t10 t11")
        settled(page)
        expect(page.locator("#messages .message.assistant")).not_to_have_text("")
    finally:
        served.stop()


def test_a_base_model_continues_text(tmp_path, page):
    served = serve(save_checkpoint(hf_model("gemma3", eos_token_id=1), tmp_path / "base"), "--max-tokens", str(SHORT))
    try:
        page.goto(served.url)
        expect(page.locator("#model-name")).to_have_text("base")
        expect(page.locator("#complete")).to_be_checked()  # the only mode there is, and the page says why
        expect(page.locator("#complete")).to_be_disabled()
        expect(page.locator("#status")).to_contain_text("no chat template")
        say(page, "t10 t11")
        settled(page)
        text = page.locator("#messages .message.completion")
        expect(text.locator(".prompt")).to_have_text("t10 t11")
        assert text.locator(".continuation").text_content() == api_continuation(served, "t10 t11")
        assert int(text.get_attribute("data-chunks")) >= 2  # streamed
        expect(page.locator("#messages .message.error")).to_have_count(0)
        assert "bad" not in (page.locator("#status").get_attribute("class") or "")
    finally:
        served.stop()


def test_a_chat_model_can_complete_text_too(server, page):
    page.goto(server.url)
    expect(page.locator("#model-name")).to_have_text(NAME)
    expect(page.locator("#complete")).not_to_be_checked()
    page.check("#complete")
    say(page, "t20 t21")
    settled(page)
    continuation = page.locator("#messages .message.completion .continuation").text_content()
    assert continuation and continuation == api_continuation(server, "t20 t21")
    page.uncheck("#complete")  # back to chat: a new conversation
    expect(page.locator("#messages .message")).to_have_count(0)


def test_gemma4_thoughts_collapsed_and_tool_calls_as_cards(tmp_path, page):
    """A Gemma 4 model (forced to think, answer and call a tool): the Think switch reaches the template, the
    thought is shown collapsed above the answer, the call as a card, and the next turn sends all of it back."""
    import json

    import gemma4_chat_util as g4

    served = serve(g4.save(tmp_path / "g4"))
    try:
        sent = []
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

        def add_tools(route):  # the page declares no tools: a client that does is stood in for here
            body = json.loads(route.request.post_data)
            sent.append(body)
            route.continue_(post_data=json.dumps(dict(body, tools=[tool])))

        page.route("**/v1/chat/completions", add_tools)
        g4.force(served.engine, '<|channel>thought\nThe user asks "why".<channel|>Checking. '
                                '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>')
        page.goto(served.url)
        expect(page.locator("#think-box")).to_be_visible()
        page.check("#think")
        say(page, "Weather?")
        settled(page)
        reply = page.locator("#messages .message.assistant").nth(0)
        thought = reply.locator("details.thought")
        expect(thought).to_have_count(1)
        assert thought.get_attribute("open") is None  # collapsed
        expect(thought.locator("div")).to_have_text('The user asks "why".')
        expect(reply.locator(".tool-call .name")).to_have_text("Tool call: get_weather")
        assert json.loads(reply.locator(".tool-call pre").text_content()) == {"city": "Paris"}
        assert "<|" not in reply.text_content() and "Checking. " in reply.text_content()
        assert sent[0]["chat_template_kwargs"] == {"enable_thinking": True}
        g4.force(served.engine, "Done.", end=g4.TURN_END)
        say(page, "And?")
        settled(page)
        assistant = sent[1]["messages"][1]
        assert assistant["reasoning_content"] == 'The user asks "why".' and assistant["content"] == "Checking. "
        assert assistant["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    finally:
        served.stop()


def test_gemma4_image_and_recording_attached(tmp_path, page):
    """A model that sees and hears (Gemma 4 E2B/E4B: /api/show says "vision" and "audio"): a picture and a
    recording attached go as image_url and input_audio parts, show in the turn (an image, a player), and
    the reply equals the API's for the same message."""
    import io
    import wave

    import gemma4_media_util as media

    served = serve(media.save(tmp_path / "g4media"), "--max-tokens", "6")
    try:
        page.goto(served.url)
        expect(page.locator("#attach")).to_be_visible()
        assert page.get_attribute("#attach", "accept") == "image/*,audio/*"
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
            w.writeframes((media.tone(0.5) * 32767).astype("<i2").tobytes())
        png = io.BytesIO()
        media.image(24, 40).save(png, format="PNG")
        page.set_input_files("#attach", files=[{"name": "p.png", "mimeType": "image/png", "buffer": png.getvalue()},
                                               {"name": "memo.wav", "mimeType": "audio/wav", "buffer": buf.getvalue()}])
        expect(page.locator("#attachments img")).to_have_count(1)
        expect(page.locator("#attachments audio")).to_have_count(1)
        say(page, "Hi")
        settled(page)
        expect(page.locator("#messages .message.user audio")).to_have_count(1)
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(png.getvalue()).decode()}},
                   {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(),
                                                           "format": "wav"}},
                   {"type": "text", "text": "Hi"}]
        expected = api_reply(served, [{"role": "user", "content": content}])
        assert page.locator("#messages .message.assistant").nth(0).text_content() == expected
    finally:
        served.stop()

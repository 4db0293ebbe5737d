"""The chat page at GET / in a real headless Chromium (Debian's chromium and chromedriver, driven
by Selenium) against the real API, worker and Redis: streaming, conversation, settings,
background jobs and errors. Screenshots of every test land in tests/artifacts/."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest

from tests import needs
from tests.integration.conftest import Stack, assert_no_denials
from tests.processes import ROOT, Service, start_api, start_redis, start_worker, wait_healthy

needs.module("selenium", "pip install -e '.[dev]'")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts"
# Generous: SmolLM2 on a busy two-core CI machine can take a second per token.
GENERATION_WAIT = 240
UI_WAIT = 15
TERMINAL = {"completed", "incomplete", "failed", "cancelled"}
CYRILLIC = re.compile("[А-Яа-яЁё]")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
]

T = TypeVar("T")


class Page:
    """The chat page in the browser, by the element ids the page promises."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        self.url = url

    def open(self) -> None:
        self.driver.get(self.url)
        # The script has run once the busy flag is set.
        self.wait(lambda: self.js("return document.body.dataset.busy") == "false", UI_WAIT)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def el(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """The exact textContent (Selenium's .text normalizes whitespace)."""
        return str(self.js("return document.querySelector(arguments[0]).textContent", css))

    def texts(self, css: str) -> list[str]:
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)"
        return list(self.js(script, css))

    def wait(self, condition: Callable[[], T], timeout: float, poll: float = 0.1) -> T:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=poll).until(lambda _: condition())
        except TimeoutException:
            pytest.fail(
                f"timed out after {timeout}s; status={self.text('#status')!r} error={self.text('#error')!r} "
                f"job={self.text('#job-status')!r}"
            )

    def fill(self, element_id: str, value: str) -> None:
        field = self.el(f"#{element_id}")
        field.clear()
        field.send_keys(value)

    def settings(self, **values: str) -> None:
        for name, value in values.items():
            self.fill(name.replace("_", "-"), value)

    def busy(self) -> bool:
        return bool(self.js("return document.body.dataset.busy") == "true")

    def send(self, message: str) -> None:
        self.fill("message", message)
        self.el("#send").click()

    def wait_answer(self) -> str:
        self.wait(lambda: not self.busy(), GENERATION_WAIT)
        assert self.el("#error").get_attribute("hidden") is not None, self.text("#error")
        return self.texts(".bubble.assistant")[-1]

    def error(self) -> str:
        self.wait(lambda: self.el("#error").is_displayed(), GENERATION_WAIT)
        return self.text("#error")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        needs.missing(
            "Debian's chromium and chromium-driver",
            "apt-get install chromium chromium-driver; .ci/run installs them",
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def script_errors(driver: WebDriver) -> list[str]:
    """Console errors other than the HTTP errors some tests provoke on purpose."""
    entries = driver.get_log("browser")  # reading the log empties it
    return [
        e["message"]
        for e in entries
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]


def open_page(driver: WebDriver, api_url: str, request: pytest.FixtureRequest) -> Iterator[Page]:
    script_errors(driver)  # drop what earlier tests left
    page = Page(driver, f"{api_url}/")
    page.open()
    yield page
    page.screenshot(request.node.name)
    assert script_errors(driver) == []


@pytest.fixture
def page(browser: WebDriver, stack: Stack, request: pytest.FixtureRequest) -> Iterator[Page]:
    yield from open_page(browser, stack.api_url, request)


@pytest.fixture
def capture_requests(page: Page) -> Callable[[], list[dict[str, Any]]]:
    """Records the JSON bodies the page sends (by wrapping window.fetch); returns a reader."""
    page.js(
        """window.__sent = [];
        const original = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.body) window.__sent.push(JSON.parse(init.body));
          return original(url, init);
        };"""
    )
    return lambda: list(page.js("return window.__sent"))


def test_page_is_served_as_utf8_and_self_contained(page: Page, stack: Stack) -> None:
    r = httpx.get(f"{stack.api_url}/", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta charset="utf-8">' in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]  # nothing from elsewhere
    assert page.js("return document.characterSet") == "UTF-8"
    assert page.el("#system-prompt").get_attribute("value") == "Ты полезный помощник."
    page.wait(lambda: page.text("#model") == "SmolLM2-135M-Instruct", UI_WAIT)
    loaded = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(stack.api_url) for url in loaded), loaded


def test_russian_message_streams_into_the_assistant_bubble(page: Page, client: openai.OpenAI) -> None:
    question = "Расскажи про космос кратко."
    page.settings(temperature="0", max_tokens="20")
    page.send(question)
    # Text lengths of the answer seen while its request was still open.
    seen: list[int] = []

    def finished() -> bool:
        busy, length = page.js(
            """const answers = document.querySelectorAll('.bubble.assistant');
            return [document.body.dataset.busy, answers.length ? answers[answers.length - 1].textContent.length : 0];"""
        )
        if busy == "true" and length and (not seen or seen[-1] != length):
            seen.append(length)
        return bool(busy == "false")

    page.wait(finished, GENERATION_WAIT, poll=0.02)
    assert len(seen) >= 2, f"the answer did not grow while streaming: {seen}"
    answer = page.wait_answer()
    assert len(answer) > seen[0]
    assert CYRILLIC.search(answer) and "\ufffd" not in answer, answer
    assert page.text("#status").startswith("Done")
    assert page.texts(".bubble.user") == [question]
    # Greedy decoding: the page put the streamed chunks together into the blocking answer.
    blocking = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[
            {"role": "system", "content": "Ты полезный помощник."},
            {"role": "user", "content": question},
        ],
        temperature=0,
        max_tokens=20,
    )
    assert answer == blocking.choices[0].message.content
    page.screenshot("chat-russian")


def test_follow_up_keeps_the_conversation_and_new_chat_forgets_it(
    page: Page, capture_requests: Callable[[], list[dict[str, Any]]]
) -> None:
    page.settings(temperature="0.7", top_p="0.8", max_tokens="6", system_prompt="Отвечай по-русски.")
    page.send("Привет! Как дела?")
    first = page.wait_answer()
    page.send("А что нового?")
    page.wait_answer()
    assert page.texts(".bubble.user") == ["Привет! Как дела?", "А что нового?"]
    assert len(page.texts(".bubble.assistant")) == 2
    sent = capture_requests()
    assert len(sent) == 2
    assert sent[1]["messages"] == [
        {"role": "system", "content": "Отвечай по-русски."},
        {"role": "user", "content": "Привет! Как дела?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "А что нового?"},
    ]
    assert {k: sent[1][k] for k in ("temperature", "top_p", "max_tokens", "stream")} == {
        "temperature": 0.7,
        "top_p": 0.8,
        "max_tokens": 6,
        "stream": True,
    }

    page.el("#new-chat").click()
    assert page.texts(".bubble") == []
    page.send("Новый разговор.")
    page.wait_answer()
    assert capture_requests()[2]["messages"] == [
        {"role": "system", "content": "Отвечай по-русски."},
        {"role": "user", "content": "Новый разговор."},
    ]


def test_background_job_is_watched_to_completion(page: Page) -> None:
    page.settings(max_tokens="8")
    page.fill("message", "Напиши поэму.")
    page.el("#background").click()
    page.wait(lambda: page.text("#job-id").startswith("resp_"), UI_WAIT)
    status = page.wait(
        lambda: page.text("#job-status") in TERMINAL and page.text("#job-status"), GENERATION_WAIT
    )
    assert status in {"completed", "incomplete"}
    assert page.text("#job-output").strip()
    assert page.el("#job-cancel").get_attribute("disabled") is not None
    assert page.el("#error").get_attribute("hidden") is not None


def test_chat_waits_behind_a_job_with_pings_then_streams_once_the_job_is_cancelled(page: Page) -> None:
    # One worker: a long background job holds it, so the chat request queues behind it and the
    # server sends keep-alive pings (STREAM_PING_SECONDS=1 on the test stack).
    page.settings(temperature="0", max_tokens="400")
    page.fill("message", "Напиши длинный рассказ о космосе.")
    page.el("#background").click()
    page.wait(lambda: page.text("#job-status") == "in_progress", GENERATION_WAIT)
    page.settings(max_tokens="6")
    page.send("Привет!")
    page.wait(lambda: "Queued" in page.text("#status"), GENERATION_WAIT)
    assert page.busy()
    page.el("#job-cancel").click()
    page.wait(lambda: page.text("#job-status") == "cancelled", UI_WAIT)
    assert page.wait_answer()
    assert page.text("#status").startswith("Done")


def test_invalid_setting_shows_the_400_and_gives_the_message_back(page: Page) -> None:
    page.settings(temperature="5")
    page.send("Привет!")
    error = page.error()
    assert "temperature" in error and "HTTP 400" in error and "code: invalid_value" in error
    assert "param: temperature" in error
    assert page.el("#error").get_attribute("data-code") == "invalid_value"
    assert page.el("#message").get_attribute("value") == "Привет!"  # to fix the setting and retry
    assert page.texts(".bubble.assistant") == []
    assert "failed" in (page.el(".bubble.user").get_attribute("class") or "")
    assert not page.busy()


@pytest.fixture
def workerless(
    tmp_path: Path, browser: WebDriver, request: pytest.FixtureRequest
) -> Iterator[tuple[Page, Service]]:
    """The page on an API with API keys, room for one waiting job and a 3 s queue deadline, on
    its own Redis, with one one-slot worker kept busy by a long generation: whatever the page
    queues waits, then fails with queue_timeout. (A model with no worker at all is 503
    model_unavailable, not queued.)"""
    if shutil.which("redis-server") is None:
        needs.missing("redis-server", "apt-get install redis-server; .ci/run installs it")
    redis_svc, redis_url = start_redis(tmp_path)
    services = [redis_svc]
    env = {
        "REDIS_URL": redis_url,
        "API_KEYS": "browser-key",
        "MAX_QUEUED": "1",
        "QUEUE_TIMEOUT_SECONDS": "3",
        "STREAM_PING_SECONDS": "1",
    }
    try:
        services.append(start_worker(env, tmp_path))
        api, api_url = start_api(env, tmp_path)
        services.append(api)
        wait_healthy(api, api_url, timeout=300)
        busy = openai.OpenAI(base_url=f"{api_url}/v1", api_key="browser-key").responses.create(
            input="Count to a thousand.",
            max_output_tokens=4000,
            background=True,
            extra_body={"ignore_eos": True},
        )
        poll = httpx.Client(base_url=api_url, headers={"Authorization": "Bearer browser-key"}, timeout=5)
        api.wait_until(lambda: poll.get(f"/v1/responses/{busy.id}").json()["status"] == "in_progress", 60)
        for page in open_page(browser, api_url, request):
            yield page, api
        assert_no_denials(redis_url)
    finally:
        for svc in reversed(services):
            svc.stop()


def test_errors_are_shown_as_statuses_in_band_and_network_errors(workerless: tuple[Page, Service]) -> None:
    page, api = workerless
    page.wait(lambda: page.text("#model") == "(API key needed)", UI_WAIT)
    page.send("Привет!")
    assert "code: invalid_api_key" in page.error()

    page.fill("api-key", "browser-key")
    page.el("#background").click()  # fills the queue: the only slot is busy, so the job waits
    page.wait(lambda: page.text("#job-status") == "queued", UI_WAIT)
    assert page.text("#job-prompt") == "prompt: Привет!"  # the message given back after the 401
    page.send("Ещё раз привет!")
    error = page.wait(lambda: "queue_full" in page.text("#error") and page.text("#error"), UI_WAIT)
    assert "HTTP 429" in error and "Retry-After: 2 s" in error, error
    page.screenshot("queue-full")

    # The job passes its queue deadline; the reaper (every 5 s) fails it.
    page.wait(lambda: page.text("#job-status") == "failed", 30)
    assert page.text("#job-detail").startswith("queue_timeout:")
    # A stream that opened while queued (keep-alive pings) gets its error in-band.
    page.el("#send").click()  # the message given back after the 429
    page.wait(lambda: "Queued" in page.text("#status"), UI_WAIT)
    page.wait(lambda: page.el("#error").get_attribute("data-code") == "queue_timeout", 30)
    assert "HTTP" not in page.text("#error")  # in-band: the response itself was a 200
    assert page.el("#message").get_attribute("value") == "Ещё раз привет!"

    api.stop()
    page.el("#send").click()
    page.wait(lambda: page.el("#error").get_attribute("data-code") == "network_error", UI_WAIT)
    assert page.text("#error").startswith("Network error")

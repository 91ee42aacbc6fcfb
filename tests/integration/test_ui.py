"""Status pages in a real headless Chromium (the system `chromium`, driven by Playwright): live numbers after
real traffic, the login wall, reloads and refused reloads as an operator sees them, escaping, 320 px.

pytest-aiohttp gives each test its own event loop and Playwright's async objects belong to the loop that
made them, so one browser per module runs on a thread of its own (Playwright's sync API) and each test's
loop keeps serving the proxy while it awaits the browser. Nothing waits by sleeping: reloads are awaited
through the `Reloader`, comparisons through the mirror's event, page loads through the browser.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from proxy.auth import CSRF_COOKIE
from proxy.observe.stats import STATS
from tests.conftest import Gate, ProxyHandle, backend_url

CHROMIUM = os.environ.get("SPLITSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MESSAGES = [{"role": "user", "content": "status pages"}]
# Per URL cell of the backends table: its text, how many line boxes it takes, whether it lies inside the
# visible part of its scroll box, and whether that box scrolls sideways at all.
URL_LAYOUT = """() => [...document.querySelectorAll('td[data-field="url"]')].map(cell => {
  const box = cell.closest('.scroll'), seen = box.getBoundingClientRect(), range = document.createRange();
  range.selectNodeContents(cell);
  const text = range.getBoundingClientRect();
  return {url: cell.textContent.trim(), lines: range.getClientRects().length,
          visible: text.left >= seen.left && text.right <= seen.right, scrolls: box.scrollWidth > box.clientWidth};
})"""
TOKEN = "s3cret-admin-token"
T = TypeVar("T")


class BrowserThread:
    """One Chromium for the module, owned by a single worker thread (Playwright's sync objects must stay on
    the thread that made them); tests hop onto it with `await run(...)`."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._executor.submit(self._launch).result()

    def _launch(self) -> None:
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def tab(self, width: int = 1280) -> Tab:
        """A fresh browser context (its own cookies and storage) with one page."""
        def make() -> tuple[BrowserContext, Page]:
            assert self._browser is not None
            context = self._browser.new_context(viewport={"width": width, "height": 800})
            return context, context.new_page()
        context, page = await self.run(make)
        return Tab(self, context, page)

    def close(self) -> None:
        def stop() -> None:
            if self._browser is not None:
                self._browser.close()
            if self._playwright is not None:
                self._playwright.stop()
        self._executor.submit(stop).result()
        self._executor.shutdown()


class Tab:
    """One page, every call made on the browser's thread."""

    def __init__(self, browser: BrowserThread, context: BrowserContext, page: Page) -> None:
        self.browser, self.context, self.page = browser, context, page

    async def goto(self, url: str) -> int:
        response = await self.browser.run(self.page.goto, url)
        assert response is not None
        return response.status

    async def reload(self) -> int:
        response = await self.browser.run(self.page.reload)
        assert response is not None
        return response.status

    async def submit(self, selector: str) -> int:
        """Click a submit button and wait for the page it leads to; that page's status."""
        def click() -> int:
            with self.page.expect_navigation() as navigation:
                self.page.click(selector)
            response = navigation.value
            assert response is not None
            return response.status
        return await self.browser.run(click)

    async def text(self, selector: str) -> str:
        return await self.browser.run(lambda: self.page.inner_text(selector).strip())

    async def count(self, selector: str) -> int:
        return await self.browser.run(lambda: self.page.locator(selector).count())

    async def fill(self, selector: str, value: str) -> None:
        await self.browser.run(self.page.fill, selector, value)

    async def evaluate(self, script: str) -> Any:
        return await self.browser.run(self.page.evaluate, script)

    async def html(self) -> str:
        return await self.browser.run(self.page.content)

    async def url(self) -> str:
        return await self.browser.run(lambda: self.page.url)

    async def cookies(self) -> list[Any]:
        return await self.browser.run(self.context.cookies)

    async def cell(self, row: str, field: str) -> str:
        return await self.text(f'{row} [data-field="{field}"]')

    async def close(self) -> None:
        await self.browser.run(self.context.close)


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserThread]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is not installed: run .ci/run, or apt-get install chromium")
    thread = BrowserThread()
    yield thread
    thread.close()


@pytest.fixture
async def tab(browser: BrowserThread) -> Any:
    page = await browser.tab()
    yield page
    await page.close()


def quoted(text: str) -> str:
    """A double-quoted string, the same in CSS selectors and YAML (names with quotes and markup stay literal)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def row(route: str, variant: str) -> str:
    return f"tr[data-route={quoted(route)}][data-variant={quoted(variant)}]"


def split_rules(a: TestServer, b: TestServer, weights: tuple[int, int] = (1, 1), route: str = "chat",
                variants: tuple[str, str] = ("stable", "canary"), backend_a: str = "a", kind: str = "vllm") -> str:
    return f"""
backends:
  {quoted(backend_a)}: {{url: "{backend_url(a)}", kind: {kind}}}
  b: {{url: "{backend_url(b)}", kind: vllm}}
pools:
  pool-a: {{backends: [{quoted(backend_a)}], model: sim-model}}
  pool-b: {{backends: [b], model: sim-model}}
routes:
  - name: {quoted(route)}
    match: {{model: my-model}}
    split:
      variants:
        - {{name: {quoted(variants[0])}, pool: pool-a, weight: {weights[0]}}}
        - {{name: {quoted(variants[1])}, pool: pool-b, weight: {weights[1]}}}
"""


def client(handle: ProxyHandle) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=handle.base_url, api_key="k", max_retries=0)


async def send(handle: ProxyHandle, count: int) -> Counter[str]:
    """`count` chat requests, streams and whole answers in turn, ending with a whole one; how many each
    variant served, by response header. The proxy records a whole answer before writing it, and a stream
    when its last byte is written, so once the last answer is back every request is counted."""
    served: Counter[str] = Counter()
    for i in range(count):
        stream = (count - i) % 2 == 0
        response = await client(handle).chat.completions.with_raw_response.create(
            model="my-model", messages=MESSAGES, max_tokens=3, stream=stream
        )
        served[response.headers["x-splitstream-variant"]] += 1
        if stream:
            async for _ in response.parse():  # read to its end
                pass
    return served


async def fetch(handle: ProxyHandle, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """(status, JSON or text body, headers) of a GET that does not follow redirects."""
    async with aiohttp.ClientSession() as session:
        async with session.get(handle.url(path), headers=headers or {}, allow_redirects=False) as response:
            body = await response.json() if response.content_type == "application/json" else await response.text()
            return response.status, body, response.headers


# ------------------------------------------------------------------------------------------ tests


async def test_overview_shows_both_variants_with_live_numbers(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b, weights=(3, 1)))
    handle.splitter.rng.seed(11)  # per-request draws: a fixed sequence, counted from the response headers
    served = await send(handle, 24)
    assert served["stable"] > 0 and served["canary"] > 0

    assert await tab.goto(handle.url("/ui/")) == 200
    assert await tab.cell("#generation", "generation") == "1"
    for variant in ("stable", "canary"):
        assert await tab.cell(row("chat", variant), "requests") == str(served[variant])
        assert await tab.cell(row("chat", variant), "share") == f"{served[variant] / 24 * 100:.1f} %"
        assert await tab.cell(row("chat", variant), "errors") == "0"
        assert await tab.cell(row("chat", variant), "error_rate") == "0.0 %"
        assert await tab.cell(row("chat", variant), "rps") != "–"
        assert await tab.cell(row("chat", variant), "latency_p50") != "–"
        assert await tab.cell(row("chat", variant), "ttft_p50") != "–"  # half the requests were streams
    assert await tab.cell(row("chat", "stable"), "weight") == "3 (75.0 %)"
    assert await tab.cell(row("chat", "canary"), "weight") == "1 (25.0 %)"
    assert await tab.text('[data-field="requests"]') == "24"

    status, document, _ = await fetch(handle, "/admin/overview")  # the JSON twin: the same dict
    assert status == 200
    variants = {v["name"]: v for v in document["routes"][0]["variants"]}
    assert {name: v["requests"] for name, v in variants.items()} == dict(served)
    assert variants["stable"]["weight_share"] == 0.75 and document["totals"]["requests"] == 24

    await send(handle, 2)  # more traffic, then a reload of the page shows it
    await tab.reload()
    assert await tab.text('[data-field="requests"]') == "26"


async def test_the_login_wall_holds(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b), admin_token=TOKEN, watch_rules=False)

    status, _, headers = await fetch(handle, "/ui/shadow")
    assert status == 303 and headers["Location"] == "/ui/login?next=/ui/shadow"
    assert (await fetch(handle, "/admin/overview"))[0] == 401

    assert await tab.goto(handle.url("/ui/backends")) == 200  # redirected to the form
    assert (await tab.url()).endswith("/ui/login?next=/ui/backends")
    assert await tab.count("form input[name=token]") == 1 and await tab.count("nav") == 0

    await tab.fill("#token", "wrong-token")
    assert await tab.submit("button[type=submit]") == 401
    assert await tab.text("#login-error") == "That is not the admin token."
    assert [c["name"] for c in await tab.cookies()] == [CSRF_COOKIE]  # the form's, no session

    await tab.fill("#token", TOKEN)
    assert await tab.submit("button[type=submit]") == 200
    assert (await tab.url()).endswith("/ui/backends")  # back where it was going
    assert await tab.count('tr[data-backend="a"]') == 1
    (cookie,) = await tab.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/ui")
    assert TOKEN not in cookie["value"] and hashlib.sha256(TOKEN.encode()).hexdigest() not in cookie["value"]
    assert await tab.evaluate("document.cookie") == ""  # HttpOnly: no script can read it
    assert await tab.goto(handle.url("/ui/cache")) == 200 and (await tab.url()).endswith("/ui/cache")

    # The cookie opens the pages only: the JSON twins still want the bearer header.
    session = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    assert (await fetch(handle, "/admin/overview", session))[0] == 401
    status, document, _ = await fetch(handle, "/admin/overview", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and document["generation"] == 1
    assert (await fetch(handle, "/ui/", {"Authorization": f"Bearer {TOKEN}"}))[0] == 200  # scripts may use pages
    assert (await fetch(handle, "/ui/", {"Cookie": f"{cookie['name']}=9999999999.{'0' * 64}"}))[0] == 303

    assert await tab.submit("header form button") == 200  # log out
    assert (await tab.url()).endswith("/ui/login")
    assert [c["name"] for c in await tab.cookies()] == [CSRF_COOKIE]  # the session is gone
    await tab.goto(handle.url("/ui/"))
    assert "/ui/login" in await tab.url()


async def test_without_a_token_loopback_needs_no_login(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b), watch_rules=False)
    assert await tab.goto(handle.url("/ui/login")) == 200
    assert (await tab.url()).endswith("/ui/") and await tab.count("#generation") == 1
    assert await tab.count("header form") == 0  # no logout without a login


async def test_a_rule_edit_shows_up_as_a_new_generation(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b, weights=(9, 1)))
    await tab.goto(handle.url("/ui/"))
    assert await tab.cell("#generation", "generation") == "1"
    assert await tab.cell(row("chat", "canary"), "weight") == "1 (10.0 %)"

    (handle.rules_dir / "rules.yaml").write_text(split_rules(a, b, weights=(1, 1)))
    await asyncio.wait_for(handle.reloader.wait_for_generation(2), 30)
    await tab.reload()
    assert await tab.cell("#generation", "generation") == "2"
    assert await tab.cell(row("chat", "canary"), "weight") == "1 (50.0 %)"
    assert await tab.count("#last-error") == 0


async def test_a_broken_rule_shows_its_file_and_line_escaped(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b))
    reloader = handle.reloader
    # The loader echoes the bad value into its message: markup there must come out as text.
    (handle.rules_dir / "rules.yaml").write_text(split_rules(a, b, kind="<b>vlm</b>"))
    await asyncio.wait_for(reloader.wait_until(lambda: reloader.last_error is not None), 30)
    await tab.goto(handle.url("/ui/"))
    path = handle.rules_dir / "rules.yaml"
    assert await tab.text("#last-error li") == (
        f"{path}:3: backend 'a': kind must be one of vllm, llamacpp, ollama, tgi, openai, got '<b>vlm</b>'"
    )
    assert await tab.count("#last-error b") == 0
    assert await tab.cell("#generation", "generation") == "1"  # the last good rules keep serving


async def test_names_with_markup_are_shown_as_text(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    route, variant, backend = ("<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">',
                               "<b>gpu</b>")
    handle = await proxy(split_rules(a, b, weights=(1, 0), route=route, variants=(variant, "plain"),
                                     backend_a=backend))
    await send(handle, 1)
    await tab.goto(handle.url("/ui/"))
    assert await tab.cell(row(route, variant), "requests") == "1"  # found by the literal names
    assert (await tab.text(f"h2.route[data-route={quoted(route)}]")).startswith(route)
    assert await tab.count("main img") == 0 and await tab.evaluate("window.__xss === undefined")
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in await tab.html()
    await tab.goto(handle.url("/ui/backends"))
    assert await tab.text(f"tr[data-backend={quoted(backend)}] td.name") == backend
    assert await tab.count("main b") == 0


async def test_backends_shadow_and_cache_pages(sim: Any, proxy: Any, tab: Tab, browser: BrowserThread) -> None:
    _, live = await sim()
    _, candidate = await sim()
    _, failing = await sim(fail_rate=1.0)  # answers its health probe, fails every request with a 500
    rules = f"""
backends:
  live: {{url: "{backend_url(live)}", kind: vllm}}
  candidate: {{url: "{backend_url(candidate)}", kind: vllm}}
  failing: {{url: "{backend_url(failing)}", kind: vllm}}
pools:
  main: {{backends: [live], model: sim-model}}
  next: {{backends: [candidate], model: sim-model}}
  gone: {{backends: [failing], model: sim-model}}
health: {{failures: 1, ejection: 10m}}
routes:
  - name: chat
    match: {{model: my-model}}
    pool: main
    shadow: [{{pool: next, sample: 1.0}}]
    cache: {{ttl: 10m}}
  - name: broken
    match: {{model: broken-model}}
    pool: gone
    retry: {{attempts: 1}}
"""
    handle = await proxy(rules)
    mirror = handle.shadows
    answer = await client(handle).chat.completions.with_raw_response.create(
        model="my-model", messages=MESSAGES, max_tokens=4, temperature=0
    )
    request_id = answer.headers["x-request-id"]
    text = answer.parse().choices[0].message.content
    assert text
    while not any(c.request_id == request_id for c in mirror.recent):
        await asyncio.wait_for(mirror.compared.wait(), 30)
    await handle.cache.writes_done()  # the answer is stored off the request path
    repeat = await client(handle).chat.completions.with_raw_response.create(
        model="my-model", messages=MESSAGES, max_tokens=4, temperature=0
    )
    assert repeat.headers["x-splitstream-cache"] == "hit"
    with pytest.raises(openai.APIStatusError) as failed:
        await client(handle).chat.completions.create(model="broken-model", messages=MESSAGES, max_tokens=2)
    assert failed.value.status_code == 502

    await tab.goto(handle.url("/ui/backends"))
    assert await tab.cell('tr[data-backend="live"]', "status") == "available"
    assert (await tab.cell('tr[data-backend="failing"]', "status")).startswith("ejected for")
    assert await tab.cell('tr[data-backend="failing"]', "ejections_total") == "1"
    assert await tab.cell('tr[data-backend="failing"]', "errors.status_5xx") == "status_5xx 1"
    assert (await tab.cell('tr[data-backend="live"]', "decode_tps")).endswith("tok/s")

    await tab.goto(handle.url("/ui/shadow"))
    comparison = f"tr[data-request-id={quoted(request_id)}]"
    assert await tab.cell(comparison, "status") == "200 / 200"
    assert await tab.cell(comparison, "similarity") == "100.0 %"  # same model, temperature 0
    assert await tab.cell('tr[data-route="chat"][data-pool="next"]', "compared") == "1"
    assert text not in await tab.text("main")  # numbers only, never the answer

    await tab.goto(handle.url("/ui/cache"))
    cache_row = 'tr[data-route="chat"]'
    assert (await tab.cell(cache_row, "hit"), await tab.cell(cache_row, "miss")) == ("1", "1")
    assert await tab.cell(cache_row, "hit_ratio") == "50.0 %"
    assert await tab.text('[data-field="entries"]') == "1"

    phone = await browser.tab(width=320)  # every page fits a phone: only the tables scroll, sideways
    try:
        for path in ("/ui/", "/ui/backends", "/ui/shadow", "/ui/cache", "/ui/login"):
            assert await phone.goto(handle.url(path)) == 200
            assert await phone.evaluate("document.documentElement.scrollWidth") <= 320, path
    finally:
        await phone.close()


async def test_root_redirects_to_the_status_pages(sim: Any, proxy: Any, tab: Tab) -> None:
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b), watch_rules=False)
    status, _, headers = await fetch(handle, "/")
    assert status == 302 and headers["Location"] == "/ui/"  # not permanent: browsers would keep it for good
    assert await tab.goto(handle.url("/")) == 200
    assert (await tab.url()).endswith("/ui/") and await tab.count("#generation") == 1

    guarded = await proxy(split_rules(a, b), admin_token=TOKEN, watch_rules=False)
    status, _, headers = await fetch(guarded, "/")  # the redirect itself shows nothing; the page asks to log in
    assert status == 302 and headers["Location"] == "/ui/"
    assert await tab.goto(guarded.url("/")) == 200 and (await tab.url()).endswith("/ui/login?next=/ui/")


async def test_sub_millisecond_latencies_read_in_milliseconds(sim: Any, proxy: Any, tab: Tab) -> None:
    """A cache hit or a loopback runtime answers in well under a millisecond. Real requests cannot be made to
    take a chosen time without timing thresholds, so the latencies go in through the recorder's own door
    (`RequestStats.record`, where every finished request goes), and the page reads them back pooled."""
    _, a = await sim()
    _, b = await sim()
    handle = await proxy(split_rules(a, b), watch_rules=False)
    stats = handle.server.app[STATS]
    for _ in range(4):  # all in the first bucket, [0, 1 ms]: p50 reads 0.5 ms, p95 its upper bound
        stats.record("chat", "stable", 0.0004, 0.0002, False, 5, 3)
    stats.record("chat", "canary", 0.25, 0.0421, False, 5, 3)
    await tab.goto(handle.url("/ui/"))
    stable, canary = row("chat", "stable"), row("chat", "canary")
    assert await tab.cell(stable, "requests") == "4"
    assert (await tab.cell(stable, "latency_p50"), await tab.cell(stable, "latency_p95")) == ("0.50 ms", "1.00 ms")
    assert await tab.cell(stable, "ttft_p50") == "0.50 ms"
    for field in ("latency_p50", "latency_p95", "ttft_p50", "ttft_p95"):  # 250 ms and 42 ms, read from buckets
        assert (await tab.cell(canary, field)).endswith(" ms"), field


async def test_the_shadow_page_waits_for_the_first_comparison(sim: Any, proxy: Any, tab: Tab) -> None:
    _, live = await sim()
    gate = Gate()  # the shadow runtime holds its answer until the test opens the gate
    _, candidate = await sim(pacer=gate)
    handle = await proxy(f"""
backends:
  live: {{url: "{backend_url(live)}", kind: vllm}}
  candidate: {{url: "{backend_url(candidate)}", kind: vllm}}
pools:
  main: {{backends: [live], model: sim-model}}
  next: {{backends: [candidate], model: sim-model}}
routes:
  - name: chat
    match: {{model: my-model}}
    pool: main
    shadow: [{{pool: next, sample: 1.0}}]
""", watch_rules=False)
    await tab.goto(handle.url("/ui/shadow"))  # configured, nothing sent yet
    assert await tab.count("#no-shadow") == 0 and await tab.count("#no-comparison") == 1
    assert await tab.cell('tr[data-route="chat"][data-pool="next"]', "compared") == "0"

    answer = await client(handle).chat.completions.with_raw_response.create(
        model="my-model", messages=MESSAGES, max_tokens=2
    )
    await asyncio.wait_for(gate.wait_reached(0), 30)  # the copy is at the shadow runtime, in flight
    await tab.reload()
    assert (await tab.text("#no-comparison")).startswith("No comparison finished yet")
    assert await tab.count("#no-shadow") == 0
    assert "Add " not in await tab.text("main") and "shadow: [" not in await tab.text("main")

    gate.open_all()
    request_id = answer.headers["x-request-id"]
    while not any(c.request_id == request_id for c in handle.shadows.recent):
        await asyncio.wait_for(handle.shadows.compared.wait(), 30)
        handle.shadows.compared.clear()
    await tab.reload()
    assert await tab.count("#no-comparison") == 0
    assert await tab.cell(f"tr[data-request-id={quoted(request_id)}]", "status") == "200 / 200"

    bare = await proxy(split_rules(live, candidate), watch_rules=False)  # no shadow anywhere: say how to add one
    await tab.goto(bare.url("/ui/shadow"))
    assert "shadow: [{pool: …}]" in await tab.text("#no-shadow")


async def test_backend_urls_stay_whole_and_visible_at_1280_px(sim: Any, proxy: Any, tab: Tab) -> None:
    """The widest realistic table: an ejected backend (status with its countdown), errors by reason, a
    backend in two pools. Every URL is on one line, inside the visible part of the table, which does not
    scroll at all at 1280 px."""
    _, live = await sim()
    _, failing = await sim(fail_rate=1.0)
    handle = await proxy(f"""
backends:
  gpu-node-01: {{url: "{backend_url(live)}", kind: vllm, max_inflight: 32}}
  gpu-node-02: {{url: "{backend_url(failing)}", kind: vllm}}
pools:
  llama-stable: {{backends: [gpu-node-01, gpu-node-02], model: sim-model}}
  llama-canary: {{backends: [gpu-node-01], model: sim-model}}
health: {{failures: 1, ejection: 10m, panic_threshold: 0}}
routes:
  - name: chat
    match: {{model: my-model}}
    pool: llama-stable
    balance: round_robin
    retry: {{attempts: 2}}
""", watch_rules=False)
    for _ in range(2):  # one of them lands on the failing runtime first, which is ejected; retried on the live one
        await client(handle).chat.completions.create(model="my-model", messages=MESSAGES, max_tokens=2)
    await tab.goto(handle.url("/ui/backends"))
    assert (await tab.cell('tr[data-backend="gpu-node-02"]', "status")).startswith("ejected")
    layout = await tab.evaluate(URL_LAYOUT)
    assert {cell["url"] for cell in layout} == {backend_url(live), backend_url(failing)}
    for cell in layout:
        assert cell == {"url": cell["url"], "lines": 1, "visible": True, "scrolls": False}, cell

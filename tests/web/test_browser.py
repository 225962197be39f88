"""The dashboard in a real browser, during a real run (issue #14's "done when").

Debian's ``chromium`` (``/usr/bin/chromium``, which ``.ci/run`` installs) is driven headless
through Playwright's ``executable_path``: Playwright's own browser download cannot reach the
internet. Everything runs as a user would run it, on loopback:

* the bundled fal simulator (in this process; the first three requests fail for good, so there
  are failed jobs to filter);
* ``wanbatch serve`` with ``WANBATCH_SERVE_TOKEN`` set, and ``wanbatch run MANIFEST`` (embedded),
  each as a subprocess against one fresh PostgreSQL database.

The browser logs in with the token, watches the batch's progress move (the page refreshes
itself), pauses the batch with its button (the run then stops sending and ends, as it does
for ``wanbatch pause``), filters the failed jobs, plays a video preview (its ``currentTime``
advances), resumes with its button, and sees the batch finish after ``wanbatch run BATCH``
takes it up again. Screenshots of every step are kept under ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from playwright.sync_api import Page, sync_playwright

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from tests.e2e.e2e_helpers import FAST_ENV, REPO, db_rows

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
TOKEN = "browser-token-5e8f21c0"
FAL_KEY = "browser-fal-key-90ab77d1"
JOBS = 24
FAILING = 3  # the simulator fails the first three requests for good (HTTP 400, bad_request)
WAIT_MS = 90_000
#: What no process's log may hold anywhere (each is read whole): the secrets, and a traceback
#: (or the logging module's own "--- Logging error ---" report, which carries one).
UNWANTED = {
    "the serve token": TOKEN,
    "FAL_KEY": FAL_KEY,
    "a traceback": "Traceback",
    "a logging error": "Logging error",
}

MANIFEST = f"""\
name: browser-night
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
matrix:
  seed: [{", ".join(str(s) for s in range(1, JOBS + 1))}]
items:
  - prompt: A paper boat drifting down a rainy street at night
"""


def _wanbatch(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli import main; main()", *args]


class Procs:
    """Subprocesses of the test, each with its output in a log file; all stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.running: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.log_of: dict[int, Path] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.folder / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        handle: IO[bytes] = log.open("wb")
        proc = subprocess.Popen(
            _wanbatch(*args), cwd=self.folder, env={**self.env, **(env or {})}, stdout=handle, stderr=handle
        )
        self.running.append(proc)
        self.log_of[proc.pid] = log
        return proc

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.running:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def output(self) -> str:
        """The tail of every log: what a failure's message shows."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs)

    def found(self, unwanted: dict[str, str]) -> list[str]:
        """Which of ``unwanted`` (what it is: the text) appear in which log, each read whole
        (not the tails :meth:`output` shows): ``["FAL_KEY in run-2.log"]``."""
        texts = {p.name: p.read_text(errors="replace") for p in self.logs}
        return [
            f"{what} in {name}" for name, text in texts.items() for what, it in unwanted.items() if it in text
        ]


@pytest.fixture
def procs(tmp_path: Path, new_pg_database: Callable[[], str]) -> Iterator[tuple[Procs, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANBATCH_", "AWS_")) and k != "FAL_KEY"}
    url = new_pg_database()
    env |= FAST_ENV | {
        "WANBATCH_DATABASE_URL": url,
        "WANBATCH_OUTPUT_DIR": str(tmp_path / "outputs"),
        "FAL_KEY": FAL_KEY,
        "PYTHONPATH": str(REPO),
        "COLUMNS": "120",
        # Two requests at fal at a time (the simulated account's limit): the rest wait here,
        # so a pause has jobs to hold back.
        "WANBATCH_MAX_OUTSTANDING": "2",
    }
    running = Procs(tmp_path, env)
    yield running, url
    running.stop()


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=1.0, latency_jitter=0.0, concurrency_limit=2, rng_seed=14)
    ) as handle:
        handle.set_faults(model_error={"next": FAILING, "error_type": "bad_request"})
        yield handle


def _serve(procs: Procs) -> str:
    """Start ``wanbatch serve`` on a free loopback port; its base URL once it listens."""
    server = procs.start("serve", "serve", "--port", "0", env={"WANBATCH_SERVE_TOKEN": TOKEN})
    log = procs.log_of[server.pid]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if server.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"`wanbatch serve` did not start:\n{procs.output()}", pytrace=False)


def _wait(proc: subprocess.Popen[bytes], procs: Procs, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a wanbatch command did not finish:\n{procs.output()}", pytrace=False)


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=False)


def _number(page: Page, selector: str) -> int:
    return int(page.locator(selector).first.inner_text().replace(",", "").split()[0])


def _paused_by_user(url: str, batch: str) -> bool:
    return bool(db_rows(url, f"SELECT paused_by_user FROM batches WHERE id = '{batch}'")[0][0])


def test_dashboard_during_a_run(procs: tuple[Procs, str], sim: SimulatorHandle, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: run .ci/run (it installs Debian's chromium), or "
            "`apt-get install -y chromium`; Playwright's own browser download is not used",
            pytrace=False,
        )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # the folder shows the last run only
        old.unlink()
    runner, url = procs
    runner.env |= {"WANBATCH_FAL_QUEUE_URL": sim.url, "WANBATCH_FAL_REST_URL": sim.url}
    (tmp_path / "night.yaml").write_text(MANIFEST, encoding="utf-8")
    base = _serve(runner)
    submitted = runner.start("submit", "submit", "night.yaml", "--json")
    assert _wait(submitted, runner) == 0, runner.output()
    batch: str = json.loads(runner.log_of[submitted.pid].read_text().splitlines()[-1])["batch"]

    def start_run() -> subprocess.Popen[bytes]:
        return runner.start("run", "run", "night.yaml", "--no-progress")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            _drive(page, base, batch, url, start_run, runner, sim)
        except BaseException:
            _shot(page, "99-failure")
            print(runner.output())  # shown by pytest with the failure
            raise
        finally:
            browser.close()

    rows = db_rows(url, f"SELECT state, count(*) FROM jobs WHERE batch_id = '{batch}' GROUP BY state")
    assert dict(rows) == {"succeeded": JOBS - FAILING, "failed": FAILING}, runner.output()
    unwanted = runner.found(UNWANTED)
    assert not unwanted, f"{', '.join(unwanted)}; the logs' tails:\n{runner.output()}"


def _done_at_least(n: int) -> str:
    """A page predicate: the batch page's done count is at least ``n``."""
    return f"() => Number(document.querySelector('[data-testid=done]').innerText.replace(/,/g, '')) >= {n}"


def _drive(
    page: Page,
    base: str,
    batch: str,
    url: str,
    start_run: Callable[[], subprocess.Popen[bytes]],
    runner: Procs,
    sim: SimulatorHandle,
) -> None:
    # Log in with the token: with one set, a loopback browser needs it to read as well as to act.
    page.goto(f"{base}/login?next=/")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")
    assert page.locator(".pill-ok").inner_text() == "signed in"
    page.wait_for_selector(f"#b-{batch}")
    _shot(page, "01-batches")

    # Progress moves while the page refreshes itself. The run starts only now: a browser slow
    # to start (a cold CI machine) must not let the whole batch finish before the page watches.
    page.click(f"#b-{batch} a.strong")
    page.wait_for_url(f"{base}/batches/{batch}")
    first = _number(page, "[data-testid=done]")
    run = start_run()
    page.wait_for_function(_done_at_least(first + 1))
    # Enough finished to have failures and a video to look at, but not the whole batch.
    page.wait_for_function(_done_at_least(FAILING + 2))
    moved = _number(page, "[data-testid=done]")
    assert first < moved < JOBS
    _shot(page, "02-progress")

    # Pause: the button records it; the run stops sending, lets its jobs in flight finish, ends.
    page.click("button[data-action=pause]")
    page.wait_for_selector(".flash-ok")
    assert "paused batch browser-night" in page.locator(".flash-ok").inner_text()
    assert page.locator("button[data-action=resume]").count() == 1
    assert _paused_by_user(url, batch)
    assert _wait(run, runner) != 0  # not done: it ended because its batch was paused
    assert "paused by its user" in runner.log_of[run.pid].read_text(errors="replace")
    sent_while_paused = sim.ledger()["accepted"]
    page.reload()
    _shot(page, "03-paused")

    # Filter the failed jobs: a chip per state; only failed rows remain, as many as counted.
    page.click("a.chip[data-state=failed]")
    page.wait_for_url(re.compile(r".*state=failed.*"))
    states = page.locator("#jobs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.state)")
    assert states == ["failed"] * FAILING
    assert "bad_request" in page.locator("#jobs").inner_text()
    _shot(page, "04-failed")

    # Play a preview: the video element of a succeeded job loads and its time advances.
    page.click("a.chip[data-state=succeeded]")
    page.wait_for_url(re.compile(r".*state=succeeded.*"))
    video = page.locator("#jobs video").first
    video.scroll_into_view_if_needed()
    assert video.evaluate("v => v.readyState") == 0  # nothing loaded before it is asked to play
    video.click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#jobs video');"
        " return v.readyState >= 2 && v.currentTime > 0.2; }"
    )
    ready = video.evaluate("v => [v.readyState, v.currentTime, v.error ? v.error.code : 0]")
    assert ready[0] >= 2
    assert ready[1] > 0
    assert ready[2] == 0
    video.evaluate("v => v.pause()")
    _shot(page, "05-preview")
    assert sim.ledger()["accepted"] == sent_while_paused  # nothing was sent while paused

    # Resume with the button, then let `wanbatch run BATCH` finish the batch; the page follows.
    page.goto(f"{base}/batches/{batch}")
    page.click("button[data-action=resume]")
    page.wait_for_selector(".flash-ok")
    assert "resumed batch browser-night" in page.locator(".flash-ok").inner_text()
    assert not _paused_by_user(url, batch)
    again = runner.start("run-again", "run", batch, "--no-progress")
    page.wait_for_function(_done_at_least(JOBS))
    assert _wait(again, runner) == 1  # finished, some jobs failed (the contract's exit 1)
    assert page.locator("button[data-action=rerun-failed]").count() == 1
    _shot(page, "06-finished")
    page.goto(f"{base}/")
    _shot(page, "07-batches-done")


#: Valid names without a break point: the list's cell and the batch page must hold them.
UNBROKEN_NAMES = (
    "tokyo_night_sweep_720p_81f_seed_1_to_64_lora_v3_final_final2",
    "very-long-" + "x" * 230 + "-end",
)

#: Where the name is drawn against its cell, and whether the page is wider than the window.
_LAYOUT = """name => {
    const link = [...document.querySelectorAll('td.name a')].find(a => a.textContent.trim() === name);
    const cell = link.closest('td').getBoundingClientRect();
    const page = document.documentElement;
    return {title: link.title, link_right: link.getBoundingClientRect().right, cell_right: cell.right,
            scroll: page.scrollWidth, client: page.clientWidth};
}"""


def test_names_without_break_points_stay_inside_the_layout(procs: tuple[Procs, str], tmp_path: Path) -> None:
    """A long name with no space or hyphen to break at neither overflows its list cell (drawn
    over the progress bar) nor widens the page: at 1280 px the list cuts it (its title holds it
    whole) and the batch page wraps it."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run .ci/run, or `apt-get install -y chromium`", pytrace=False)
    runner, _url = procs
    for i, name in enumerate(UNBROKEN_NAMES):
        (tmp_path / f"m{i}.yaml").write_text(
            f"name: {name}\nendpoint: fal-ai/wan-22\n"
            "items:\n  - {prompt: a name, seed: 3, resolution: 480p}\n",
            encoding="utf-8",
        )
        submitted = runner.start("submit", "submit", f"m{i}.yaml", "--json")
        assert _wait(submitted, runner) == 0, runner.output()
    base = _serve(runner)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            context = browser.new_context(viewport={"width": 1280, "height": 900}, extra_http_headers=bearer)
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{base}/")
            for name in UNBROKEN_NAMES:
                where = page.evaluate(_LAYOUT, name)
                assert where["link_right"] <= where["cell_right"], (name[:20], where)
                assert where["title"] == name  # cut with an ellipsis: the title holds it whole
                assert where["scroll"] <= where["client"], (name[:20], where)
            for name in UNBROKEN_NAMES:
                page.goto(f"{base}/batches/{name}")
                assert page.locator("h1").inner_text() == name  # wrapped, not cut
                width = page.evaluate("(e => [e.scrollWidth, e.clientWidth])(document.documentElement)")
                assert width[0] <= width[1], (name[:20], width)
        finally:
            browser.close()

"""The dashboard in a real browser: the operating system's Chromium (never a downloaded
one) driven by Playwright, against live servers started with an auth file, while a
thread sends wine's reference rows.

Each test starts its own server (rollouts change what serves) and opens the page in a
fresh browser context (its own sessionStorage). Every wait is for a condition on the
page or the server, with a deadline; none is a fixed sleep. A screenshot of each view
is saved under `$TIDEGATE_TEST_ARTEFACTS/dashboard` (default: the temporary directory's
`tidegate-artefacts/dashboard`)."""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import LiveServer, sending_wine
from tests.shipped import ShippedVersion, reference_rows
from tests.test_access import write_auth_file

CHROMIUM = "/usr/bin/chromium"
TOKENS = {
    "watcher": ("reader-secret", ["reader"]),
    "checkout": ("inference-secret", ["inference"]),
    "deployer": ("operator-secret", ["operator", "reader"]),
    "root": ("admin-secret", ["admin"]),
}
WINE = ShippedVersion("wine", 1)
# A rollout that holds at its first step: far more rows than the test sends.
HOLDING = {"version": "2", "min_rows": 10**7}
# A fast rollout of the good candidate that still dwells 2 s a step, so that a page
# reading once a second sees every step.
FAST = {
    "version": "2",
    "steps": [10, 50, 100],
    "min_rows": 100,
    "min_dwell_s": 2,
    "epoch_s": 0.2,
    "min_latency_samples": 20,
    "latency_p99_ratio": 20,
}
TIMEOUT_MS = 20_000


def artefacts() -> Path:
    base = os.environ.get("TIDEGATE_TEST_ARTEFACTS")
    root = Path(base) if base else Path(tempfile.gettempdir()) / "tidegate-artefacts"
    directory = root / "dashboard"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def live(models_dir: Path, tmp_path: Path, start_server) -> LiveServer:
    auth_file = tmp_path / "auth.toml"
    write_auth_file(auth_file, TOKENS)
    server: LiveServer = start_server(
        models_dir,
        "--state-dir",
        str(tmp_path / "state"),
        "--auth-file",
        str(auth_file),
        probe_token=TOKENS["watcher"][0],
    )
    return server


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == [], errors  # no script error on any page


def sign_in(page: Page, live: LiveServer, name: str) -> None:
    """Opens the dashboard, which asks for a token, and gives it `name`'s."""
    page.goto(f"{live.base}/dashboard")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#tabs")).to_be_hidden()
    page.fill("#token", TOKENS[name][0])
    page.click("#login button[type=submit]")
    expect(page.locator("#identity")).to_contain_text(name)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def open_view(page: Page, view: str) -> None:
    page.click(f'#tabs a[data-view="{view}"]')
    expect(page.locator(f"#view-{view}")).to_be_visible()


def screenshot(page: Page, name: str) -> None:
    page.screenshot(path=str(artefacts() / f"{name}.png"), full_page=True)


def start_rollout(live: LiveServer, settings: dict[str, object]) -> None:
    started = live.client.post("/v2/models/wine/rollout", json=settings, headers=bearer("deployer"))
    assert started.status_code == 200, started.text


def audit_actions(live: LiveServer) -> list[tuple[str, str]]:
    entries = live.client.get("/v2/audit?model=wine", headers=bearer("root")).json()["entries"]
    return [(entry["actor"], entry["action"]) for entry in entries]


def test_the_page_needs_a_reader_token_and_shows_the_server_and_its_models(
    live: LiveServer, page: Page
):
    # The page itself holds no data and loads without a token; its reads need one.
    assert live.client.get("/dashboard").status_code == 200
    assert live.client.get("/dashboard/api/summary").status_code == 401
    refused = live.client.get("/dashboard/api/summary", headers=bearer("checkout"))
    assert refused.status_code == 403
    assert "'reader'" in refused.json()["error"]
    page.goto(f"{live.base}/dashboard")
    page.fill("#token", TOKENS["checkout"][0])  # a token without the reader role
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("'reader'")
    expect(page.locator("#tabs")).to_be_hidden()

    with sending_wine([live], headers=bearer("checkout")) as statuses:
        sign_in(page, live, "watcher")
        assert page.evaluate("sessionStorage.getItem('tidegate.token')") == "reader-secret"
        assert page.evaluate("localStorage.length") == 0
        # Requests/s and latency come from successive reads of the counters.
        expect(page.locator("#rps")).not_to_have_text("-")
        page.wait_for_function(
            "() => Number(document.getElementById('rps').textContent.replaceAll(',', '')) > 0",
            timeout=TIMEOUT_MS,
        )
        expect(page.locator("#p99")).to_contain_text(" ms")
        expect(page.locator("#workers")).to_have_text("1")
        expect(page.locator("#error-rate")).to_have_text("0 %")
        expect(page.locator("#chart-rps svg path")).to_have_count(1)
        screenshot(page, "server")

        open_view(page, "models")
        wine = page.locator('#models-table tr[data-model="wine"][data-version="1"]')
        expect(wine).to_contain_text("ready")
        expect(wine).to_contain_text("stable")
        expect(wine).to_contain_text("MiB")
        for name, version in [("breast_cancer", "2"), ("digits", "1"), ("diabetes", "1")]:
            row = page.locator(f'#models-table tr[data-model="{name}"][data-version="{version}"]')
            expect(row).to_be_visible()
        expect(wine.locator("svg rect")).not_to_have_count(0)  # runs by batch size
        screenshot(page, "models")
    assert set(statuses) == {200}, statuses


def test_a_rollout_of_the_wine_demo_advances_and_ends_on_the_page(live: LiveServer, page: Page):
    with sending_wine([live], headers=bearer("checkout")) as statuses:
        sign_in(page, live, "watcher")
        open_view(page, "rollout")
        expect(page.locator("#rollout-list")).to_contain_text("No rollout")
        start_rollout(live, FAST)
        card = page.locator('.card[data-rollout="wine"]')
        expect(card.locator('[data-field="step"]')).to_contain_text("step 1 of 3 at 10 %")
        open_view(page, "traffic")
        traffic = page.locator('.card[data-traffic="wine"]')
        expect(traffic).to_contain_text("stable 1, canary 2 at 10 % (split)")
        expect(traffic).to_contain_text("weight 10 %")
        page.wait_for_function(
            "() => /canary [1-9]/.test(document.querySelector('[data-traffic=wine] .legend')"
            ".textContent)",
            timeout=TIMEOUT_MS,
        )
        screenshot(page, "traffic")
        open_view(page, "rollout")
        expect(card.locator('[data-field="step"]')).to_contain_text(
            "step 2 of 3 at 50 %", timeout=TIMEOUT_MS
        )
        expect(card.locator('tr[data-check="errors"]')).to_be_visible()
        screenshot(page, "rollout")
        expect(card).to_have_attribute("data-status", "promoted", timeout=TIMEOUT_MS)
    assert set(statuses) == {200}, statuses
    expect(card.locator('[data-field="step"]')).to_contain_text("step 3 of 3 at 100 %")
    for check in ("validity", "errors", "latency", "predictions"):
        expect(card.locator(f'tr[data-check="{check}"]')).to_contain_text("pass")
    history = card.locator("table").last
    for action in ("start", "advance", "promote"):
        expect(history).to_contain_text(action)
    expect(card.locator("button[data-action]")).to_have_count(0)  # a reader's page
    screenshot(page, "rollout-promoted")


def test_an_operator_pauses_and_resumes_from_the_page_and_both_are_audited(
    live: LiveServer, page: Page
):
    start_rollout(live, HOLDING)
    sign_in(page, live, "deployer")
    open_view(page, "rollout")
    card = page.locator('.card[data-rollout="wine"]')
    expect(card).to_have_attribute("data-status", "running")
    expect(card.locator('button[data-action="resume"]')).to_be_disabled()

    # Each action asks first: cancelling changes nothing.
    card.locator('button[data-action="pause"]').click()
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("pause the rollout of wine")
    page.click("#confirm-cancel")
    expect(page.locator("#confirm")).to_be_hidden()
    assert (
        live.client.get("/v2/models/wine/rollout", headers=bearer("watcher")).json()["status"]
        == "running"
    )

    for action, status in (("pause", "paused"), ("resume", "running")):
        card.locator(f'button[data-action="{action}"]').click()
        page.click("#confirm-ok")
        expect(card).to_have_attribute("data-status", status)
        expect(card.locator('[data-field="message"]')).to_contain_text(f"{action}: done")
        if status == "paused":
            screenshot(page, "rollout-paused")
    actions = audit_actions(live)
    assert ("deployer", "rollout.pause") in actions
    assert ("deployer", "rollout.resume") in actions
    assert actions.index(("deployer", "rollout.pause")) < actions.index(
        ("deployer", "rollout.resume")
    )

    card.locator('button[data-action="rollback"]').click()
    page.click("#confirm-ok")
    expect(card).to_have_attribute("data-status", "rolled_back")
    expect(card.locator("button[data-action]")).to_have_count(0)  # nothing left to act on
    assert ("deployer", "rollout.rollback") in audit_actions(live)


def test_a_reader_sees_no_buttons_and_the_action_endpoint_refuses_it(live: LiveServer, page: Page):
    start_rollout(live, HOLDING)
    sign_in(page, live, "watcher")
    open_view(page, "rollout")
    card = page.locator('.card[data-rollout="wine"]')
    expect(card).to_have_attribute("data-status", "running")
    expect(card.locator('[data-field="step"]')).to_contain_text("step 1 of 4 at 5 %")
    expect(card.locator("button")).to_have_count(0)
    # What a button would have sent, with the reader's token from the page's own storage.
    status = page.evaluate(
        """async () => {
            const token = sessionStorage.getItem('tidegate.token');
            const headers = {Authorization: 'Bearer ' + token};
            return (await fetch('/v2/models/wine/rollout/pause', {method: 'POST', headers})).status;
        }"""
    )
    assert status == 403
    assert (
        live.client.get("/v2/models/wine/rollout", headers=bearer("watcher")).json()["status"]
        == "running"
    )
    assert not [action for actor, action in audit_actions(live) if action == "rollout.pause"]


def test_a_drifted_feature_is_at_the_top_of_the_drift_table(live: LiveServer, page: Page):
    rows = reference_rows(WINE, 1000)["input"].copy()
    # The first feature held at its median: all rows in one or two of its bins, while
    # the model's answers (and so the outputs' distributions) barely change.
    rows[:, 0] = np.median(rows[:, 0])
    sign_in(page, live, "watcher")
    open_view(page, "drift")
    page.select_option("#drift-version", "wine/1")
    with sending_wine([live], rows=rows, headers=bearer("checkout")) as statuses:
        top = page.locator("#drift-table tbody tr").first
        expect(top).to_have_attribute("data-feature", "input[0]", timeout=TIMEOUT_MS)
        expect(top.locator(".badge.drift")).to_be_visible()  # the verdict
        expect(top.locator(".badge.major")).to_be_visible()  # the PSI band
    assert set(statuses) == {200}, statuses
    expect(page.locator("#drift-summary")).to_contain_text("wine version 1")
    # The selected feature's bins: reference and window side by side.
    expect(page.locator("#drift-histogram-title")).to_contain_text("input[0]")
    expect(page.locator("#drift-histogram svg rect")).not_to_have_count(0)
    screenshot(page, "drift")
    page.locator('#drift-table tbody tr[data-feature="input[1]"]').click()
    expect(page.locator("#drift-histogram-title")).to_contain_text("input[1]")
    expect(page.locator('#drift-table tr[data-feature="input[1]"]')).to_have_attribute(
        "aria-selected", "true"
    )

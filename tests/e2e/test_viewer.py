"""The results viewer in a real browser (Debian's Chromium through Playwright) against the
real stack processes: log in, open a completed batch, open an exam, toggle its heatmaps.
Screenshots go to tests/artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from devstack.stack import StackState
from devstack.synth import SynthOptions, generate_exams
from mammoscreen_client import Client

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: `make browser` installs Debian's package"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


def _loaded(page: Page, selector: str) -> int:
    """How many images matching `selector` finished loading with real pixels."""
    count: int = page.eval_on_selector_all(
        selector, "images => images.filter(i => i.complete && i.naturalWidth > 0).length"
    )
    return count


def test_log_in_open_a_batch_and_an_exam_and_toggle_heatmaps(
    stack: StackState, browser: Browser, tmp_path: Path
) -> None:
    # Two full-size exams, malignant, screened by the shipped trained model.
    images = generate_exams(
        tmp_path,
        exams=2,
        seed=64,
        options=SynthOptions(malignant_prevalence=1.0, benign_prevalence=0.0),
    )
    with Client.from_env(stack.env) as client:
        batch = client.create_batch("viewer batch")
        client.upload(batch["id"], [i.path for i in images])
        client.close_batch(batch["id"])
        client.wait(batch["id"], timeout=300, poll=1)
    ARTIFACTS.mkdir(exist_ok=True)
    viewer = f"{stack.env['SCREENING_RESULTS_URL']}/viewer/"

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(viewer)
    expect(page).to_have_url(f"{viewer}login")  # not logged in: sent to the login form
    page.fill("#api-key", "msk_not_a_key")
    page.click("#log-in")
    expect(page.locator("#login-error")).to_be_visible()
    page.fill("#api-key", stack.env["SCREENING_API_KEY"])
    page.click("#log-in")
    expect(page.get_by_role("link", name="viewer batch")).to_be_visible()
    expect(page.locator(f"tr[data-batch='{batch['id']}'] .status")).to_have_text("completed")
    expect(page.locator(f"tr[data-batch='{batch['id']}'] .counts")).to_have_text("8 / 8")
    page.screenshot(path=str(ARTIFACTS / "viewer-batches.png"), full_page=True)

    page.get_by_role("link", name="viewer batch").click()
    rows = page.locator("tr.exam")
    expect(rows).to_have_count(2)
    scores = [float(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(2)]
    assert scores == sorted(scores, reverse=True)  # sorted by exam score
    expect(rows.first.locator(".recall, .routine")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "viewer-exams.png"), full_page=True)

    rows.first.locator("a").click()
    expect(page.locator("figure.view")).to_have_count(4)
    expect(page.locator("#model-version")).not_to_have_text("-")
    page.wait_for_function(
        "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert _loaded(page, "img.mammogram") == 4
    assert _loaded(page, "img.heatmap") == 4
    heatmaps = page.locator("img.heatmap")
    for index in range(4):
        expect(heatmaps.nth(index)).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "viewer-exam-heatmaps-on.png"), full_page=True)

    page.uncheck("#toggle-heatmaps")
    for index in range(4):
        expect(heatmaps.nth(index)).to_be_hidden()
    page.screenshot(path=str(ARTIFACTS / "viewer-exam-heatmaps-off.png"), full_page=True)
    page.check("#toggle-heatmaps")
    expect(heatmaps.first).to_be_visible()

    page.goto(f"{viewer}logout")
    page.goto(viewer)
    expect(page).to_have_url(f"{viewer}login")
    page.close()
    for name in ("batches", "exams", "exam-heatmaps-on", "exam-heatmaps-off"):
        assert (ARTIFACTS / f"viewer-{name}.png").stat().st_size > 10_000

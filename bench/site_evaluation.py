"""`make bench-site`: the shipped model measured at two sites through the product, as a site
would: upload, screen, report outcomes, evaluate, choose an operating point.

- site 1: fresh exams of the shipped model's own domain (synthetic digital detector);
- site 2: the "second site": another vendor's processing and display curve (Style.VENDOR),
  fainter lesions (another exposure) and half the prevalence.

Each site is a tenant of its own on the local stack. The figures go to bench/site_evaluation.json;
a screenshot of site 2's evaluation in the viewer (the ROC curve with the model's threshold and
the site's own) to bench/site-evaluation-roc.png (Debian's Chromium, `make browser`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from devstack.stack import down, up
from devstack.synth import Finding, Style, SynthImage, SynthOptions, generate_exams
from mammoscreen_client import Client

CHROMIUM = Path("/usr/bin/chromium")
SITES = {
    "site 1 (the model's own domain)": SynthOptions(malignant_prevalence=0.25),
    "site 2 (another vendor, fainter lesions, lower prevalence)": SynthOptions(
        style=Style.VENDOR, malignant_prevalence=0.12, lesion_contrast=(0.06, 0.12)
    ),
}


def _outcomes(images: list[SynthImage]) -> list[dict[str, str]]:
    malignant: dict[str, bool] = {}
    for image in images:
        malignant[image.study] = malignant.get(image.study, False) or (
            image.label == Finding.MALIGNANT
        )
    return [
        {
            "study_key": study,
            "truth": "malignant" if is_malignant else "normal",
            "breast": "both",
            "source": "biopsy" if is_malignant else "follow_up",
            "date": "2026-11-02",
        }
        for study, is_malignant in malignant.items()
    ]


def _site(client: Client, images: list[SynthImage], sensitivity: float) -> dict[str, Any]:
    batch = client.create_batch("site evaluation")
    paths = [i.path for i in images]
    for start in range(0, len(paths), 16):
        client.upload(batch["id"], paths[start : start + 16])
    client.close_batch(batch["id"])
    client.wait(batch["id"], timeout=3600)
    client.import_outcomes(_outcomes(images))
    evaluation = client.wait_evaluation(client.evaluate(batch_ids=[batch["id"]], seed=1)["id"])
    assert evaluation["status"] == "completed", evaluation["error"]
    (version,) = evaluation["figures"]["versions"]
    point = client.set_operating_point(
        version["model_version"]["id"],
        evaluation_id=evaluation["id"],
        target="sensitivity",
        value=sensitivity,
    )
    return {
        "evaluation_id": evaluation["id"],
        "exams": version["exams"],
        "malignant_exams": version["malignant_exams"],
        "exam_auc": version["exam_auc"],
        "exam_auc_ci95": version["exam_auc_ci95"],
        "at_model_threshold": version["at_model_threshold"],
        "at_site_threshold": {"target_sensitivity": sensitivity, **point},
        "calibration_error": version["calibration"]["error"],
        "by": version["by"],
    }


def _screenshot(results_url: str, api_key: str, evaluation_id: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{results_url}/viewer/login")
        page.fill("#api-key", api_key)
        page.click("#log-in")
        page.goto(f"{results_url}/viewer/evaluations/{evaluation_id}")
        page.locator("#roc-plot").wait_for()
        page.screenshot(path=str(out), full_page=False)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exams", type=int, default=80, help="per site")
    parser.add_argument("--sensitivity", type=float, default=0.9, help="the sites' target")
    parser.add_argument("--out", type=Path, default=Path("bench/site_evaluation.json"))
    parser.add_argument("--screenshot", type=Path, default=Path("bench/site-evaluation-roc.png"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-site-"))
    state = up(work / "stack", environ=dict(os.environ))
    figures: dict[str, Any] = {}
    try:
        from shared.config import settings_from_environ
        from shared.db.base import session_scope
        from shared.tenants import create_tenant, issue_api_key

        settings = settings_from_environ(state.service_env)
        for n, (name, options) in enumerate(SITES.items()):
            images = generate_exams(
                work / f"site{n}", exams=args.exams, seed=500 + n, options=options
            )
            with session_scope(settings.database_url) as session:
                tenant = create_tenant(session=session, name=f"bench site {n + 1}")
                key = issue_api_key(session=session, tenant=tenant).secret
                session.commit()
            with Client.from_env({**state.env, "SCREENING_API_KEY": key}, timeout=600) as client:
                figures[name] = _site(client, images, args.sensitivity)
            print(json.dumps({name: figures[name]}, indent=2), flush=True)
            if n == len(SITES) - 1 and CHROMIUM.exists():
                _screenshot(
                    state.env["SCREENING_RESULTS_URL"],
                    key,
                    figures[name]["evaluation_id"],
                    args.screenshot,
                )
    finally:
        down(work / "stack")
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.out}" + (f" and {args.screenshot}" if CHROMIUM.exists() else ""))


if __name__ == "__main__":
    main()

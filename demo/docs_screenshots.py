"""The README's screenshots, taken from a running demo (`make demo`) in headless Chromium.

    python -m demo.docs_screenshots --out docs/

With no model yet, it first labels 5 bent-tailed galaxies and 20 others through the API (from
the demo's truth.csv) and waits for the first training cycle. Then it saves:

- `dashboard.png`: the backend's dashboard of the project;
- `queue.png` / `queue_grid.png`: Label Studio's "Most anomalous first" tab in list and grid
  view;
- `more_like_this.png`: the "More like <task>" tab for the top-ranked bent-tailed galaxy;
- `labeling.png` / `labeling_low.png`: the labelling page of the top-ranked task and of
  the one in the middle of the queue.

The login comes from the demo's credentials file, never from the command line. Needs Debian's
`chromium` and `chromium-driver` and `selenium` (`pip install -e '.[docs]'`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import requests

from demo.screenshot import (
    DEFAULT_CREDENTIALS,
    PAGE_TIMEOUT_S,
    SETTLE_S,
    logged_in_browser,
    login_for_screenshots,
)

logger = logging.getLogger("demo.docs_screenshots")

N_ANOMALIES, N_NORMALS = 5, 20
TRAINING_TIMEOUT_S = 1200.0


def label_if_untrained(backend: str, sdk: Any, project: int, truth: Path) -> str:
    """The project's serving version; with none, label a first set and wait for a cycle."""
    version = _serving(backend, project)
    if version != "untrained":
        return version
    classes = {row["id"]: row["label"] for row in csv.DictReader(truth.open())}
    tasks = [t.dict() for t in sdk.tasks.list(project=project, page_size=1000)]
    by_class: dict[str, list[int]] = {"anomaly": [], "normal": []}
    for task in tasks:
        by_class[classes.get(task["data"].get("cutout_id"), "normal")].append(int(task["id"]))
    chosen = ([(t, "anomaly") for t in by_class["anomaly"][:N_ANOMALIES]]
              + [(t, "normal") for t in by_class["normal"][::25][:N_NORMALS]])
    for task_id, value in chosen:
        sdk.annotations.create(id=task_id, result=[
            {"from_name": "label", "to_name": "image", "type": "choices",
             "value": {"choices": [value]}}])
    logger.info("labelled %d tasks; waiting for the first training cycle", len(chosen))
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while time.monotonic() < deadline:
        queue = requests.get(f"{backend}/metrics", timeout=10).json()["projects"].get(
            str(project), {}).get("queue", {})
        if queue.get("jobs_total") and not queue.get("running") and not queue.get("queued"):
            return _serving(backend, project)
        time.sleep(5)
    raise TimeoutError(f"no training cycle finished within {TRAINING_TIMEOUT_S:.0f} s")


def _serving(backend: str, project: int) -> str:
    projects = requests.get(f"{backend}/metrics", timeout=10).json()["projects"]
    return str(projects.get(str(project), {}).get("model_version", "untrained"))


def shoot(driver: Any, page: str, out: Path, images: int = 1,
          size: tuple[int, int] = (1400, 1000)) -> Path:
    """Open `page` in a window of `size` (CSS pixels), wait for `images` decoded images and
    the page to settle, save a PNG."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(*size)
    driver.get(page)
    WebDriverWait(driver, PAGE_TIMEOUT_S).until(lambda d: d.execute_script(
        "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
        ".length") >= images)
    time.sleep(SETTLE_S)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(out)):
        raise RuntimeError(f"chromium could not write {out}")
    logger.info("wrote %s", out)
    return out


def shoot_grid(driver: Any, out: Path, images: int = 8) -> Path:
    """The open Data Manager tab switched to grid view, saved as PNG, then back to list view
    (Label Studio keeps a tab's view type)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, '[aria-label="Switch to grid view"]').click()
    try:
        WebDriverWait(driver, PAGE_TIMEOUT_S).until(lambda d: d.execute_script(
            "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
            ".length") >= images)
        time.sleep(SETTLE_S)
        if not driver.save_screenshot(str(out)):
            raise RuntimeError(f"chromium could not write {out}")
    finally:
        driver.find_element(By.CSS_SELECTOR, '[aria-label="Switch to list view"]').click()
        time.sleep(SETTLE_S)
    logger.info("wrote %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.docs_screenshots",
                                description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="Label Studio base URL")
    p.add_argument("--backend", default="http://127.0.0.1:9090", help="backend base URL")
    p.add_argument("--credentials", type=Path, default=DEFAULT_CREDENTIALS)
    p.add_argument("--project", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from label_studio_sdk import LabelStudio

    login = login_for_screenshots("demo.docs_screenshots", args.credentials)
    if login is None:
        return 2
    username, password = login
    token = json.loads(args.credentials.read_text(encoding="utf-8")).get("token")
    if not token:
        print(f"demo.docs_screenshots: {args.credentials} has no API token", file=sys.stderr)
        return 2
    url, backend = args.url.rstrip("/"), args.backend.rstrip("/")
    sdk = LabelStudio(base_url=url, api_key=token)
    truth = args.credentials.parent / "truth.csv"
    version = label_if_untrained(backend, sdk, args.project, truth)
    logger.info("serving version %s", version)
    views = {(v.data or {}).get("title"): int(v.id) for v in sdk.views.list(project=args.project)}
    queue = [t.dict() for t in sdk.tasks.list(project=args.project, view=views[
        "Most anomalous first"], page_size=1000)]
    rare = {row["id"] for row in csv.DictReader(truth.open()) if row["label"] == "anomaly"}
    top_rare = next(t["id"] for t in queue if t["data"].get("cutout_id") in rare)
    tab = requests.post(f"{backend}/similar/view", timeout=60, json={
        "project": args.project, "tasks": [top_rare], "top": 20}).json()
    project_data = f"{url}/projects/{args.project}/data"
    with logged_in_browser(url, username, password) as driver:
        shoot(driver, f"{backend}/dashboard/{args.project}", args.out / "dashboard.png", 8,
              size=(1300, 1700))
        shoot(driver, f"{project_data}?tab={views['Most anomalous first']}",
              args.out / "queue.png", 5)
        shoot_grid(driver, args.out / "queue_grid.png")
        shoot(driver, f"{project_data}?tab={tab['view']}", args.out / "more_like_this.png", 5)
        shoot(driver, f"{project_data}?tab={views['Most anomalous first']}&task={queue[0]['id']}",
              args.out / "labeling.png")
        shoot(driver, f"{project_data}?tab={views['Most anomalous first']}"
              f"&task={queue[len(queue) // 2]['id']}", args.out / "labeling_low.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

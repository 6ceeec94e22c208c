"""Screenshot of one task's labelling page in a running Label Studio, for the docs.

    python -m demo.screenshot --url http://127.0.0.1:8080 --project 1 --task 66 --out task.png

The login is read from the demo's credentials file (`--credentials`, default
demo-data/credentials.json, which `make demo` writes), never from the command line.
Needs Debian's `chromium` and `chromium-driver` and `selenium` (`pip install -e '.[docs]'`).
Chromium runs
headless in a fresh temporary profile, logs in through the login form, opens the task in
the Data Manager (where the prediction of the project's model version is shown) and waits
until the cutout image has loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger("demo.screenshot")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic")
PAGE_TIMEOUT_S = 90.0
# The labelling UI animates in after the image loads; a short pause gives a settled frame.
SETTLE_S = 3.0


@contextmanager
def logged_in_browser(url: str, username: str, password: str,
                      size: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """Headless Chromium in a fresh temporary profile, logged in to Label Studio at `url`
    through its login form; `size` is the window in CSS pixels (width, height)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="amls-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                     f"--window-size={size[0]},{size[1]}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
            driver.get(f"{url}/user/login/")
            wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(username)
            driver.find_element(By.NAME, "password").send_keys(password)
            driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            wait.until(lambda d: "/user/login" not in d.current_url)
            yield driver
        finally:
            driver.quit()


def take_screenshot(url: str, username: str, password: str, project: int, task: int,
                    out: Path, tab: int | None = None,
                    size: tuple[int, int] = (1400, 1000)) -> Path:
    """Log in, open `task` of `project` (in Data Manager tab `tab`), save the window as PNG.

    `size` is the window in CSS pixels (width, height); returns `out`.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    with logged_in_browser(url, username, password, size) as driver:
        view = f"tab={tab}&" if tab is not None else ""
        driver.get(f"{url}/projects/{project}/data?{view}task={task}")
        WebDriverWait(driver, PAGE_TIMEOUT_S).until(_image_loaded)
        time.sleep(SETTLE_S)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out)):
            raise RuntimeError(f"chromium could not write {out}")
    logger.info("wrote %s", out)
    return out


def _image_loaded(driver) -> bool:
    """True once an <img> of the task (a local-files URL) has decoded pixels."""
    return bool(driver.execute_script(
        "return Array.from(document.images).some("
        "i => i.src.includes('local-files') && i.complete && i.naturalWidth > 0);"))


DEFAULT_CREDENTIALS = Path(__file__).resolve().parent.parent / "demo-data" / "credentials.json"


def read_login(path: Path) -> tuple[str, str]:
    """(username, password) from a demo credentials file; ValueError naming what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data["username"]), str(data["password"])
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: run `make demo` first, or pass "
                         "--credentials") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a demo credentials file with a username and "
                         f"password ({type(err).__name__}: {err})") from None


def login_for_screenshots(prog: str, credentials: Path) -> tuple[str, str] | None:
    """(username, password) when selenium is installed and the credentials file reads; else
    None, with the reason printed for `prog`'s user."""
    try:
        import selenium  # noqa: F401 - checked here for a clear message
    except ImportError:
        print(f"{prog} needs selenium: pip install -e '.[docs]'", file=sys.stderr)
        return None
    try:
        return read_login(credentials)
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.screenshot",
                                description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="Label Studio base URL")
    p.add_argument("--credentials", type=Path, default=DEFAULT_CREDENTIALS,
                   help="JSON file with username and password (default: the demo's)")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--task", type=int, required=True)
    p.add_argument("--tab", type=int, help="Data Manager tab (view) id to open the task in")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    login = login_for_screenshots("demo.screenshot", args.credentials)
    if login is None:
        return 2
    username, password = login
    take_screenshot(args.url.rstrip("/"), username, password, args.project, args.task,
                    args.out, tab=args.tab)
    return 0


if __name__ == "__main__":
    sys.exit(main())

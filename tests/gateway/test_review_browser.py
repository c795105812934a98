"""The review pages in a real headless browser (Debian's chromium and chromedriver).

A compliance officer signs in, finds a candidate, opens a message, exports
the candidate's mail, erases the candidate and finds each step in the audit
log. A screenshot of every page is saved (to $ATSMAIL_SCREENSHOTS when set)
so the pages can be looked at.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_peer
from tests.gateway.conftest import CORA, RITA, Api
from tests.gateway.test_review import html_mail

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def browser(downloads: Path) -> Iterator[webdriver.Chrome]:
    require_peer(CHROMIUM is not None and CHROMEDRIVER is not None,
                 "no chromium and chromedriver here (Debian: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--disable-gpu"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, name: str, fallback: Path) -> None:
    folder = Path(os.environ.get("ATSMAIL_SCREENSHOTS") or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))


def arrived(folder: Path, name: str, seconds: float = 10) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (folder / name).exists():
            return folder / name
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded; found {sorted(folder.iterdir())}")


def review_as_compliance(driver: webdriver.Chrome, base: str, token: str,
                         downloads: Path, shots: Path) -> None:
    driver.get(f"{base}/review/candidates")
    assert driver.current_url.startswith(f"{base}/review/login")
    screenshot(driver, "1-login", shots)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()

    search = driver.find_element(By.NAME, "q")
    search.send_keys("ada")
    search.submit()
    rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_element(By.TAG_NAME, "a").text for r in rows] == ["Ada Applicant"]
    screenshot(driver, "2-candidates", shots)
    driver.find_element(By.LINK_TEXT, "Ada Applicant").click()

    assert "Ada Applicant" in driver.find_element(By.TAG_NAME, "h1").text
    screenshot(driver, "3-candidate", shots)
    driver.find_element(By.LINK_TEXT, "Application with CV").click()
    screenshot(driver, "4-thread", shots)
    driver.find_element(By.CSS_SELECTOR, ".message a").click()
    assert "Plain words." in driver.find_element(By.CSS_SELECTOR, "pre.body").text
    assert driver.find_element(By.LINK_TEXT, "cv.pdf")
    frame = driver.find_element(By.CSS_SELECTOR, "iframe.mail-html")
    driver.execute_script("arguments[0].scrollIntoView()", frame)
    screenshot(driver, "5-message", shots)
    driver.switch_to.frame(frame)
    assert driver.find_element(By.TAG_NAME, "b").text == "Rita"
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.find_elements(By.TAG_NAME, "script") == []
    driver.switch_to.default_content()

    driver.get(f"{base}/review/candidates/C-1")
    driver.find_element(By.LINK_TEXT, "Export mbox").click()
    exported = arrived(downloads, "candidate-C-1.mbox")
    assert b"Subject: Application with CV" in exported.read_bytes()

    driver.find_element(By.LINK_TEXT, "Erase…").click()
    screenshot(driver, "6-erase", shots)
    driver.find_element(By.ID, "confirm").send_keys("C-1")
    driver.find_element(By.CSS_SELECTOR, "button.danger").click()
    assert "C-1 and their mail were erased" in driver.find_element(By.CLASS_NAME, "notice").text
    assert driver.find_elements(By.LINK_TEXT, "Ada Applicant") == []

    driver.find_element(By.LINK_TEXT, "Audit log").click()
    screenshot(driver, "7-audit", shots)
    steps = [tuple(cell.text for cell in row.find_elements(By.TAG_NAME, "td")[1:4])
             for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")]
    for step in [(CORA, "login", "review"), (CORA, "view", "candidate:C-1"),
                 (CORA, "export", "candidate:C-1"), (CORA, "erase", "candidate:C-1")]:
        assert step in steps, (step, steps)
    assert any(who == CORA and action == "view" and target.startswith("message:")
               for who, action, target in steps)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_compliance_officer_reviews_exports_and_erases_in_a_browser(
        api: Api, browser: webdriver.Chrome, downloads: Path, tmp_path: Path) -> None:
    await api.relay(html_mail("Application with CV"), "ada@applicant.test", [RITA])
    base = str(api.client.base_url).rstrip("/")
    # The browser blocks; the gateway answers it from this test's event loop.
    await asyncio.to_thread(review_as_compliance, browser, base, api.tokens[CORA], downloads,
                            tmp_path / "screenshots")

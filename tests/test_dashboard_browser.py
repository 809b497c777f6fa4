"""The dashboard in a real browser: headless Chromium opens the page from disk, offline.

Needs Debian's ``chromium`` and ``chromium-driver`` (the README's test command installs them when
it runs as root), or ``WRITESAE_CHROMIUM`` / ``WRITESAE_CHROMEDRIVER`` pointing at a Chrome or
Chromium and its chromedriver. Without them this test fails: it never skips. Screenshots are kept
in ``test-artifacts/`` (or ``$WRITESAE_TEST_ARTIFACTS``) and the test prints where.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from dashboard_helpers import small_dashboard
from test_dashboard import reference_codes

ARTIFACTS = Path(os.environ.get("WRITESAE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000")


def chromium(tmp_path):
    browser = os.environ.get("WRITESAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("WRITESAE_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail(
            "the dashboard's browser test needs headless Chromium and chromedriver, and found "
            f"{'no browser' if not browser else 'no chromedriver'}. As root on Debian/Ubuntu: "
            "apt-get install chromium chromium-driver (the README's test command does it); otherwise ask an "
            "administrator to, or set WRITESAE_CHROMIUM and WRITESAE_CHROMEDRIVER to a Chrome/Chromium and "
            "its matching chromedriver.",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for flag in FLAGS + (f"--user-data-dir={tmp_path / 'profile'}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages and uncaught errors
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def shown_number(text):
    return float(re.sub(r"[^0-9eE.+-]", "", text))


def test_dashboard_in_headless_chromium(tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)  # first: a machine without Chromium fails at once
    try:
        model, sae, tokens, data, out = small_dashboard()
        codes = reference_codes(model, sae, tokens).flatten(0, 1)  # [positions, d_sae], an independent pass
        count, peak = (codes > 0).sum(0), codes.max(0).values
        frequency = count / data.meta["n_positions"]
        alive = count.nonzero()[:, 0]

        def view(name):
            WebDriverWait(driver, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-view") == name)

        def rows():
            return driver.find_elements(By.CSS_SELECTOR, "#wsd-list tbody tr")

        driver.get((out / "index.html").resolve().as_uri())
        view("list")
        assert len(rows()) == len(alive)
        first = rows()[0]  # most frequent first
        assert int(first.get_attribute("data-atom")) == int(alive[frequency[alive].argmax()])
        shown = shown_number(first.find_elements(By.TAG_NAME, "td")[1].text) / 100
        assert shown == pytest.approx(float(frequency[alive].max()), rel=5e-3)

        header = driver.find_element(By.CSS_SELECTOR, 'th[data-key="max"]')
        header.click()  # largest first
        strongest = int(alive[peak[alive].argmax()])
        assert int(rows()[0].get_attribute("data-atom")) == strongest
        header.click()  # smallest first
        assert int(rows()[0].get_attribute("data-atom")) == int(alive[peak[alive].argmin()])
        header.click()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-list.png"))

        rows()[0].find_elements(By.TAG_NAME, "td")[1].click()  # a row opens its atom
        view(f"atom-{strongest}")
        stats = {
            dt.text: dd.text
            for dt, dd in zip(driver.find_elements(By.CSS_SELECTOR, ".wsd-atom > .wsd-stats dt"),
                              driver.find_elements(By.CSS_SELECTOR, ".wsd-atom > .wsd-stats dd"))
        }
        assert int(stats["firings"]) == int(count[strongest])
        assert shown_number(stats["max activation"]) == pytest.approx(float(peak[strongest]), rel=5e-4)
        values = [shown_number(v.text) for v in driver.find_elements(By.CSS_SELECTOR, ".wsd-ctx .wsd-val")]
        expected = codes[:, strongest].topk(data.meta["config"]["contexts"]).values
        assert values[: len(expected)] == pytest.approx(expected[expected > 0].tolist(), rel=5e-4)
        first_context = driver.find_element(By.CSS_SELECTOR, ".wsd-ctx i.c")
        assert first_context.text.replace("↵", "\n") == data.atom(strongest).contexts[0].tokens[data.atom(strongest).contexts[0].center]
        driver.save_screenshot(str(ARTIFACTS / f"dashboard-atom-{strongest}.png"))

        silent = sorted(set(range(data.meta["d_sae"])) - set(alive.tolist())) or [data.meta["d_sae"]]
        driver.get((out / "index.html").resolve().as_uri() + f"#atom-{silent[0]}")
        view(f"atom-{silent[0]}")
        assert "did not fire" in driver.find_element(By.ID, "wsd-atom").text

        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert errors == [], errors
    finally:
        driver.quit()
    with capsys.disabled():
        print(f"\n  dashboard screenshots in {ARTIFACTS}/")

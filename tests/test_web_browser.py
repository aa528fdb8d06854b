"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver through selenium) on
the local cluster (real API, scheduler and agents): log in, see a submitted job appear, follow its
log (new lines arrive without a reload), stop it. Screenshots of each step go to
test-artifacts/web/ (the path is printed). Skipped, with the reason, without Chromium or its driver."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from _hai import cluster_file_factory
from _waits import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "scripts/sysdeps.sh installs them", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")

#: a job that prints a numbered line every 0.2 s until it is stopped
TICKER = "import itertools, time\nfor i in itertools.count():\n    print(f'tick {i}', flush=True)\n    time.sleep(0.2)\n"


@pytest.fixture(scope="module")
def cluster():
    """The platform's services on the local cluster, in a directory jobs' accounts can pass through."""
    from deploy.local import LocalCluster, pass_for_jobs
    from haiplatform.client import HaiClient

    pass_for_jobs(sys.executable, Path(__file__).resolve().parent.parent / "pyproject.toml")
    d = Path(tempfile.mkdtemp(prefix="fireflyer-web-"))
    d.chmod(0o711)
    lc = LocalCluster(cluster_file_factory(d)(), d / "run", ports="auto")
    try:
        lc.up()
        addr, port = lc.cluster.endpoint("haiplatform.api")
        url = f"http://{addr}:{port}"
        admin = HaiClient(url, (lc.run_dir / "hai" / "admin.token").read_text().strip(), timeout=30)
        wait_until(lambda: any(n["state"] == "up" for n in admin.nodes()), 30, "an agent registers")
        yield url, admin
        admin.close()
    finally:
        lc.down()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    # Chromium's profile and scratch files go to a directory removed afterwards (it leaves
    # org.chromium.Chromium.* in $TMPDIR otherwise)
    scratch = tempfile.mkdtemp(prefix="fireflyer-chromium-")
    opts.add_argument(f"--user-data-dir={scratch}/profile")
    # an explicit driver path: selenium must never download a browser or a driver
    service = Service(executable_path=CHROMEDRIVER, env={**os.environ, "TMPDIR": scratch})
    try:
        d = webdriver.Chrome(service=service, options=opts)
        d.set_page_load_timeout(20)
        yield d
        d.quit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_login_see_job_follow_its_log_and_stop_it(cluster, driver):
    from selenium.webdriver.common.by import By

    from haiplatform.client import HaiClient

    url, admin = cluster
    token = admin.add_user("webuser")["token"]
    user = HaiClient(url, token, timeout=30)

    def text(css: str) -> str:  # "" while the element is not there (a page still loading after a click)
        from selenium.common.exceptions import StaleElementReferenceException

        try:
            found = driver.find_elements(By.CSS_SELECTOR, css)
            return found[0].text if found else ""
        except StaleElementReferenceException:  # the page went away between finding and reading
            return ""

    # 1. log in: the dashboard sends a stranger to the form, and back after it
    driver.get(f"{url}/ui/")
    assert "/ui/login" in driver.current_url
    driver.find_element(By.ID, "token").send_keys(token)
    shot(driver, "1-login")
    driver.find_element(By.ID, "login").click()
    wait_until(lambda: driver.current_url.rstrip("/").endswith("/ui"), 10, "the jobs page after login")
    assert text(".who") == "webuser"

    # 2. a submitted job appears
    jid = user.submit({"name": "ticker", "command": [sys.executable, "-u", "-c", TICKER], "nodes": 1})["chain_id"]

    def listed():
        driver.refresh()
        return driver.find_elements(By.CSS_SELECTOR, f'tr[data-job="{jid}"]')
    wait_until(listed, 20, f"job {jid} on the jobs page")
    shot(driver, "2-job-listed")
    wait_until(lambda: user.job(jid)["status"] == "running", 30, f"job {jid} running")

    # 3. follow rank 0's log: new lines arrive while the page stays the same page
    driver.get(f"{url}/ui/jobs/{jid}")
    driver.find_element(By.ID, "log-0").click()
    wait_until(lambda: "tick" in text("#log"), 15, "the log's first lines")
    driver.execute_script("window.__same_page = true;")  # a reload would lose it
    first = text("#log").count("tick")
    wait_until(lambda: text("#log").count("tick") >= first + 5, 15, "new log lines without a reload")
    assert driver.execute_script("return window.__same_page === true;")
    assert "following" in text("#follow-state")
    shot(driver, "3-log-followed")

    # 4. stop it from its page: the status becomes stopped
    driver.get(f"{url}/ui/jobs/{jid}")
    driver.find_element(By.ID, "action-stop").click()
    # the click's POST and its redirect load after click() returns
    wait_until(lambda: "Stop requested." in text("#notice"), 10, "the stop's notice on the job's page")

    def stopped():
        driver.refresh()
        return text("#job-status") == "stopped"
    wait_until(stopped, 30, f"job {jid} shown as stopped")
    shot(driver, "4-stopped")
    assert user.job(jid)["status"] == "stopped"
    assert not driver.find_elements(By.ID, "action-stop")  # nothing left to stop
    user.close()

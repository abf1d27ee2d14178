"""The dashboard in a real headless browser (Debian's chromium + chromedriver, driven
by selenium; nothing is downloaded): log in, submit a job through the page, watch it
finish, see its report and plots."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import Server

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

RECIPE = """\
data: {name: digits}
teacher:
  kind: module
  model: {name: mlp, hidden: [32]}
  train: {epochs: 2, batch_size: 64}
student: {model: {name: mlp, hidden: [16]}}
train: {epochs: 3, batch_size: 64}
eval: {latency: false}
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and DRIVER.exists()):
        if os.environ.get("DK_TEST_BROWSER_REQUIRED"):
            pytest.fail("chromium and chromium-driver are required (apt-get install them)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 f"--user-data-dir={profile}", "--window-size=1280,1600"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("browser"), None, workers=1).start()
    yield srv
    srv.stop()


def _wait(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_dashboard_submit_and_watch_a_job(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    token = server.token("web")
    b = browser

    def find(by, value, timeout: float = 20):  # a click's page load is not awaited
        return _wait(lambda: b.find_elements(by, value), timeout, value)[0]

    b.get(server.url + "/")
    assert b.current_url.endswith("/ui/login")  # no cookie yet
    b.find_element(By.ID, "token").send_keys("dk_wrong")
    b.find_element(By.ID, "login").click()
    assert "unknown token" in find(By.ID, "error").text
    find(By.ID, "token").send_keys(token)
    b.find_element(By.ID, "login").click()
    _wait(lambda: b.current_url.endswith("/ui/jobs"), 20, "the job list")

    # a bad recipe is refused on the page, with the key named
    find(By.ID, "recipe").clear()
    b.find_element(By.ID, "recipe").send_keys(
        "data: {name: digits}\nstudent: {model: {name: os.system}}\n"
    )
    b.find_element(By.ID, "submit").click()
    assert "student.model" in find(By.ID, "error").text

    box = find(By.ID, "recipe")
    box.clear()
    box.send_keys(RECIPE)
    b.find_element(By.ID, "name").send_keys("from the browser")
    b.find_element(By.ID, "submit").click()
    _wait(lambda: "/ui/jobs/" in b.current_url, 20, "the job page")
    assert "from the browser" in find(By.TAG_NAME, "h1").text

    # the page polls the API and reloads itself when the job ends
    _wait(lambda: b.find_elements(By.ID, "report"), 120, "the report on the job page")
    assert b.find_element(By.ID, "state").text == "succeeded"
    assert float(b.find_element(By.ID, "progress").get_attribute("value")) == 1.0
    rows = [r.text for r in b.find_elements(By.CSS_SELECTOR, "#report tr")][1:]
    assert [r.split()[0] for r in rows] == ["teacher", "student"]
    plots = b.find_elements(By.CSS_SELECTOR, "img.plot")
    names = sorted(img.get_attribute("alt") for img in plots)
    assert names == ["accuracy_vs_size.png", "curves.png", "reliability.png"], names
    for img in plots:  # the plots really loaded (through the cookie-authenticated API)
        _wait(lambda img=img: b.execute_script("return arguments[0].complete", img), 10, "plot")
        assert b.execute_script("return arguments[0].naturalWidth", img) > 100
    assert b.find_elements(By.CSS_SELECTOR, "table.metrics")
    b.save_screenshot(str(tmp_path / "job.png"))

    b.find_element(By.LINK_TEXT, "darkknowledge").click()
    listing = find(By.ID, "jobs").text
    assert "from the browser" in listing and "succeeded" in listing


# Script payloads in every field a user controls that the dashboard shows: the job name
# (form), a name inside the recipe (shown in the job page's recipe), and a bad value that
# the refusal message quotes back. Each would set window.dkXss if it ran.
XSS_NAME = '<script>window.dkXss = "name"</script><img src=x onerror="window.dkXss=\'img\'">'
XSS_RECIPE = '<script>window.dkXss = "recipe"</script>'
XSS_BAD = '<img src=x onerror="window.dkXss=3">'


def test_dashboard_shows_script_payloads_as_text(server, browser):
    import httpx
    from selenium.webdriver.common.by import By

    token = server.token("xss")
    b = browser
    b.delete_all_cookies()
    b.get(server.url + "/ui/login")
    b.find_element(By.ID, "token").send_keys(token)
    b.find_element(By.ID, "login").click()
    _wait(lambda: b.current_url.endswith("/ui/jobs"), 20, "the job list")

    def find(by, value, timeout: float = 20):
        return _wait(lambda: b.find_elements(by, value), timeout, value)[0]

    def assert_inert():
        time.sleep(0.5)  # an onerror fires once the broken image has failed to load
        ran = b.execute_script("return window.dkXss === undefined ? null : window.dkXss")
        assert ran is None, f"a payload ran on {b.current_url}: window.dkXss = {ran!r}"
        added = b.find_elements(By.CSS_SELECTOR, "h1 *, #jobs script, #jobs img, pre *, .error *")
        assert not added, f"a payload added {[e.tag_name for e in added]} to {b.current_url}"

    # a refusal quotes the bad value: as text
    find(By.ID, "recipe").clear()
    b.find_element(By.ID, "recipe").send_keys(
        f"data: {{name: digits}}\nstudent: {{model: {{name: '{XSS_BAD}'}}}}\n"
    )
    b.find_element(By.ID, "submit").click()
    error = find(By.ID, "error")
    assert_inert()
    assert XSS_BAD in error.text  # quoted, as text

    # a job named with a script, whose recipe holds another
    box = find(By.ID, "recipe")
    box.clear()
    long = RECIPE.replace("epochs: 3", "epochs: 500")  # it does not end (and reload) mid-test
    box.send_keys(f"name: '{XSS_RECIPE}'\n" + long)
    b.find_element(By.ID, "name").send_keys(XSS_NAME)
    b.find_element(By.ID, "submit").click()
    _wait(lambda: "/ui/jobs/" in b.current_url, 20, "the job page")
    job_id = int(b.current_url.rsplit("/", 1)[1])
    h1 = find(By.TAG_NAME, "h1")
    assert_inert()
    assert XSS_NAME in h1.text  # shown, as text
    assert XSS_RECIPE in b.find_elements(By.TAG_NAME, "pre")[-1].text
    b.find_element(By.LINK_TEXT, "darkknowledge").click()
    listing = find(By.ID, "jobs")
    assert_inert()
    assert XSS_NAME in listing.text

    # and the served HTML holds them escaped
    with httpx.Client(base_url=server.url, cookies={"dk_token": token}, timeout=30) as web:
        for html in (web.get("/ui/jobs").text, web.get(f"/ui/jobs/{job_id}").text):
            assert "<script>window.dkXss" not in html and "<img src=x" not in html
            assert "&lt;script&gt;window.dkXss" in html
    with server.client(token) as c:  # no need to train it
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 200

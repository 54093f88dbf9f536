"""The supervisors' page in Debian's Chromium, headless, through chromedriver (Selenium).

Run by tests/dashboard_browser.rs, which started the cluster: it reads the page at
BASE_URL and talks to the test over stdin/stdout, one line each way (`JOIN`, `PAUSE`,
`KILL`, `DRAIN?`, `SAMPLES?` -> `OK` or an answer), for what happens outside the browser. Each step
saves a screenshot into SHOTS. Any failed expectation ends the script with status 1 and
the reason on stderr.
"""

import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By

BASE_URL = os.environ["BASE_URL"]
SHOTS = os.environ["SHOTS"]
ADMIN = os.environ["ADMIN_TOKEN"]
READER = os.environ["READ_TOKEN"]
INTERVAL_S = float(os.environ["HEARTBEAT_INTERVAL_S"])


def ask(line):
    print(line, flush=True)
    answer = sys.stdin.readline().strip()
    if not answer:
        fail(f"the test did not answer {line}")
    return answer


def fail(reason):
    print(reason, file=sys.stderr, flush=True)
    sys.exit(1)


def shot(browser, name):
    browser.save_screenshot(os.path.join(SHOTS, name + ".png"))


def wait_for(browser, what, check, limit):
    """Polls `check` every 50 ms; returns the seconds it took, or fails after `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # the table is being re-rendered
            pass
        time.sleep(0.05)
    shot(browser, "failed")
    fail(f"{what}: not seen within {limit} s")


def cell_text(browser, table, key, attribute, column):
    row = browser.find_element(By.CSS_SELECTOR, f"#{table} tr[data-{attribute}='{key}']")
    return row.find_elements(By.TAG_NAME, "td")[column].text


def queue_level(browser, queue):
    return browser.find_element(By.CSS_SELECTOR, f"#queues tr[data-queue='{queue}']").get_attribute("data-level")


def seconds_shown(text):
    """`12 s` or `2 min 3 s` as seconds."""
    parts = text.replace("min", "").replace("s", "").split()
    return int(parts[0]) if len(parts) == 1 else int(parts[0]) * 60 + int(parts[1])


def click(browser, what, css, limit=5):
    """Clicks the element at `css`, again if the page re-rendered it in between (the board
    is redrawn with every snapshot, twice a second)."""
    start = time.monotonic()
    while True:
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
            return
        except (StaleElementReferenceException, NoSuchElementException):
            if time.monotonic() - start > limit:
                shot(browser, "failed")
                fail(f"{what}: could not click {css} within {limit} s")
            time.sleep(0.05)


def log_in(browser, token):
    browser.get(BASE_URL + "/")
    wait_for(browser, "the login form", lambda: browser.find_element(By.ID, "token").is_displayed(), 10)
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()


def log_out(browser):
    browser.find_element(By.ID, "logout").click()
    wait_for(browser, "the login form after logout", lambda: browser.find_element(By.ID, "token").is_displayed(), 5)


def main():
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        # A wrong token is refused, on the page.
        log_in(browser, "not-a-token")
        wait_for(browser, "the refusal", lambda: "not known" in browser.find_element(By.ID, "error").text, 5)
        shot(browser, "1-wrong-token")

        # A read-only login sees the board and no button in it.
        log_in(browser, READER)
        wait_for(browser, "node pbx-b", lambda: cell_text(browser, "nodes", "pbx-b", "node", 2) == "active", 10)
        if browser.find_elements(By.CSS_SELECTOR, "main button"):
            fail("a read-only login sees buttons")
        # The node's chart draws what the store holds: one point per sample.
        samples = int(ask("SAMPLES?"))
        wait_for(browser, "the chart of pbx-b", lambda: f"· {samples} sample" in browser.find_element(By.CSS_SELECTOR, ".chart[data-node='pbx-b'] p").text, 10)
        for line in browser.find_elements(By.CSS_SELECTOR, ".chart[data-node='pbx-b'] polyline"):
            points = len(line.get_attribute("points").split())
            if points != samples:
                fail(f"a line of pbx-b's chart has {points} points, the store {samples} samples")
        shot(browser, "2-read-only")
        log_out(browser)

        # An admin: a caller joins the queue and the waiting count changes without a reload.
        log_in(browser, ADMIN)
        wait_for(browser, "queue sales", lambda: cell_text(browser, "queues", "sales", "queue", 1) == "0", 10)
        if queue_level(browser, "sales") != "normal":
            fail(f"an empty queue is {queue_level(browser, 'sales')}")
        ask("JOIN")
        took = wait_for(browser, "one caller waiting", lambda: cell_text(browser, "queues", "sales", "queue", 1) == "1", 5)
        print(f"waiting count on screen after {took:.2f} s", file=sys.stderr)
        # The queue's thresholds (warning at 1 waiting, critical at 2) colour it.
        if queue_level(browser, "sales") != "warning":
            fail(f"one caller waiting: the queue is {queue_level(browser, 'sales')}, not warning")
        shot(browser, "3-caller-waiting")
        ask("JOIN")
        wait_for(browser, "the queue critical at two callers", lambda: queue_level(browser, "sales") == "critical" and cell_text(browser, "queues", "sales", "queue", 1) == "2", 5)

        # An agent paused through the API shows paused, again without a reload.
        ask("PAUSE")
        took = wait_for(browser, "agent 1001 paused", lambda: cell_text(browser, "agents", "1001", "agent", 1).startswith("paused"), 5)
        print(f"agent state on screen after {took:.2f} s", file=sys.stderr)
        # The time in state starts at the pause and ticks without a new snapshot's help.
        first = seconds_shown(cell_text(browser, "agents", "1001", "agent", 2))
        if first > 2:
            fail(f"paused for {first} s just after the pause")
        wait_for(browser, "the time in state ticking", lambda: seconds_shown(cell_text(browser, "agents", "1001", "agent", 2)) >= first + 2, 5)
        shot(browser, "4-agent-paused")

        # The admin drains the node by clicking; the store shows it.
        click(browser, "the Drain button", "#nodes tr[data-node='pbx-b'] button")
        wait_for(browser, "the store's drain", lambda: ask("DRAIN?") == "yes", 5)
        wait_for(browser, "the Undrain button", lambda: browser.find_element(By.CSS_SELECTOR, "#nodes tr[data-node='pbx-b'] button").text == "Undrain", 5)
        shot(browser, "5-drained")

        # The node's agent is killed: the node turns stale on screen within 3 intervals.
        ask("KILL")
        took = wait_for(browser, "node pbx-b stale", lambda: cell_text(browser, "nodes", "pbx-b", "node", 6).startswith("stale"), 3 * INTERVAL_S + 2)
        print(f"stale on screen {took:.2f} s after the kill", file=sys.stderr)
        shot(browser, "6-node-stale")

        # On a phone's width the page fits; wide tables scroll inside their own box.
        browser.set_window_size(390, 844)
        time.sleep(0.5)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        if overflow > 0:
            fail(f"the page is {overflow} px wider than a phone's screen")
        shot(browser, "7-phone")
        browser.set_window_size(1400, 1000)
        log_out(browser)
        shot(browser, "8-logged-out")
    finally:
        browser.quit()
    print("DONE", flush=True)


main()

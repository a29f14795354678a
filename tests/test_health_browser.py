"""The health page in a real headless browser (Debian's chromium + chromedriver, installed by
`make test`), against a live local swarm: coverage shown, a killed peer shown within one refresh,
a draining peer shown as draining. Saves artifacts/health-*.png screenshots."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

from client import ClientConfig, DistributedModelForCausalLM
from client.launcher import LocalSwarm

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
REFRESH_S = 2.0

webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromedriver"):
        pytest.fail("chromedriver is missing: `make test` installs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def blocks(driver, model_id):
    cells = driver.find_elements("css selector", f'[id="coverage-{model_id}"] .block[data-block]')
    return {int(c.get_attribute("data-block")): c.get_attribute("class").split() for c in cells}


def wait_page(driver, url, predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while True:
        driver.get(url)
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"page never showed the expected state; page text:\n{driver.find_element('tag name', 'body').text}")
        time.sleep(0.5)


def peer_id_of(proc):
    return proc.ready_line.split("peer_id=")[1].split()[0]


def test_page_shows_coverage_then_a_killed_and_a_draining_peer(browser, tiny_model_path):
    path = tiny_model_path("llama", num_layers=4)
    model_id = path.name
    ARTIFACTS.mkdir(exist_ok=True)
    with LocalSwarm(str(path), bootstrap_args=["--health-port", "0", "--health-refresh-s", str(REFRESH_S)]) as swarm:
        first, second, third = swarm.start_peers(["0:2", "2:4", "0:4"], extra=["--drain-grace-s", "60"])
        url = swarm.health_url

        def all_covered_by_all_three():  # peers may reach the page in different crawls
            cells = blocks(browser, model_id)
            rows = browser.find_elements("css selector", "tr.peer.state-online")
            return len(cells) == 4 and all("covered" in c for c in cells.values()) and len(rows) == 3

        wait_page(browser, url, all_covered_by_all_three, 60)
        assert browser.find_element("id", f"can-run-{model_id}").text == "can run"
        browser.save_screenshot(str(ARTIFACTS / "health-covered.png"))

        second.kill(signal.SIGKILL)
        killed_at = time.monotonic()

        def second_gone_or_unreachable():
            rows = browser.find_elements("css selector", f'tr.peer[data-peer-id="{peer_id_of(second)}"]')
            return not rows or "state-unreachable" in rows[0].get_attribute("class").split()

        wait_page(browser, url, second_gone_or_unreachable, 3 * REFRESH_S + 10)
        assert time.monotonic() - killed_at < 3 * REFRESH_S + 10
        browser.save_screenshot(str(ARTIFACTS / "health-killed.png"))

        # a peer drains only while it has sessions: hold one open on the third peer, then SIGTERM it
        client = DistributedModelForCausalLM.from_pretrained(
            path, client_config=ClientConfig(initial_peers=tuple(swarm.initial_peers),
                                             blocked_peers=(peer_id_of(first), peer_id_of(second))),
        )
        try:
            with client.inference_session(max_length=32) as session:
                client.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
                assert [hop.peer_id for hop in session.route] == [peer_id_of(third)]
                third.kill(signal.SIGTERM)

                def third_draining():
                    rows = browser.find_elements("css selector", f'tr.peer[data-peer-id="{peer_id_of(third)}"]')
                    return bool(rows) and "state-draining" in rows[0].get_attribute("class").split()

                wait_page(browser, url, third_draining, 3 * REFRESH_S + 10)
                cells = blocks(browser, model_id)
                assert "draining" in cells[2] or "uncovered" in cells[2]
                browser.save_screenshot(str(ARTIFACTS / "health-draining.png"))
        finally:
            client.shutdown()


def test_page_reads_well_on_a_phone(browser, tiny_model_path):
    path = tiny_model_path("llama", num_layers=4)
    with LocalSwarm(str(path), bootstrap_args=["--health-port", "0", "--health-refresh-s", str(REFRESH_S)]) as swarm:
        swarm.start_peers(["0:4"])
        browser.set_window_size(390, 844)
        try:
            wait_page(browser, swarm.health_url, lambda: len(browser.find_elements("css selector", "tr.peer")) == 1, 60)
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390 + 1, f"the page scrolls sideways on a phone ({width} px wide)"
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "health-phone.png"))
        finally:
            browser.set_window_size(1200, 900)

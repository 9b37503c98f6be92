"""The dashboard page in a real Chromium (Debian's chromium and chromium-driver, driven by selenium): every page
loads with no console error, a wrong key shows an error rather than a blank page, a device-code login completes
from the page, a config edit is reviewed as a diff and saved to the file, and a client key is created."""
import os
import shutil

import openai
import pytest

from harness import openai_provider_config, wait_until
from fakes import Reply, openai_completion
from test_copilot_qwen_cline import Fake as FakeDeviceProviders
from test_management_api import COMMENTED, KEY, config_text

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):  # tools/test.sh installs them when run as root
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--user-data-dir=%s" % (tmp_path / "chromium")):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def wait(d, cond, timeout=20):
    return WebDriverWait(d, timeout).until(cond)


def sign_in(d, gw, key=KEY):
    d.get(gw.url + "/dashboard")
    wait(d, EC.visibility_of_element_located((By.ID, "keyinput"))).send_keys(key)
    d.find_element(By.ID, "keysubmit").click()


def errors(d):
    return [e for e in d.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def gw(gateway, upstream):
    up = upstream(lambda r: Reply(body=openai_completion("ok", usage={"prompt_tokens": 10, "completion_tokens": 5,
                                                                       "total_tokens": 15})))
    g = gateway(COMMENTED + openai_provider_config(up.url, keys=("sk-upstream-secret-9999",)))
    c = openai.OpenAI(base_url=g.url + "/v1", api_key="sk-client-alpha-0001", max_retries=0)
    for _ in range(3):
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    return g


def test_every_page_loads_without_console_errors(gw, browser):
    sign_in(browser, gw)
    wait(browser, lambda d: d.find_element(By.ID, "total-requests").text == "3")
    for page, marker in (("credentials", "creds"), ("keys", "keytable"), ("models", "page"), ("logs", "logbox"),
                         ("config", "cfg-text"), ("overview", "inflight")):
        browser.find_element(By.ID, "nav-" + page).click()
        wait(browser, EC.presence_of_element_located((By.ID, marker)))
    browser.find_element(By.ID, "nav-models").click()
    wait(browser, lambda d: "gpt-test" in d.find_element(By.ID, "page").text)
    browser.find_element(By.ID, "nav-logs").click()
    wait(browser, lambda d: "listening on" in d.find_element(By.ID, "logbox").text)
    assert not browser.find_element(By.ID, "err").is_displayed()
    assert errors(browser) == []
    assert "sk-upstream-secret-9999" not in browser.page_source


def test_a_wrong_key_shows_an_error_not_a_blank_page(gw, browser):
    sign_in(browser, gw, key="not-the-key")
    err = wait(browser, EC.visibility_of_element_located((By.ID, "err")))
    assert "invalid management key" in err.text
    assert browser.find_element(By.ID, "keyinput").is_displayed()  # asks again


def test_a_device_code_login_completes_from_the_page(gateway, browser, tmp_path):
    dev = FakeDeviceProviders()
    try:
        gw = gateway(dev.config(str(tmp_path / "auth")) + "remote-management: {secret-key: %s}\n" % KEY)
        sign_in(browser, gw)
        wait(browser, EC.presence_of_element_located((By.ID, "inflight")))
        browser.find_element(By.ID, "nav-credentials").click()
        wait(browser, EC.element_to_be_clickable((By.ID, "login-copilot"))).click()
        code = wait(browser, EC.visibility_of_element_located((By.ID, "flow-code")))
        assert code.text == "WXYZ-1234"
        assert browser.find_element(By.ID, "flow-url").get_attribute("href") == "https://github.com/login/device"
        wait(browser, lambda d: "completed" in d.find_element(By.ID, "flow-status").text, timeout=30)
        wait(browser, lambda d: "github-copilot-octocat.json" in d.find_element(By.ID, "page").text, timeout=30)
        assert os.path.exists(tmp_path / "auth" / "github-copilot-octocat.json")
        assert errors(browser) == []
    finally:
        dev.up.stop()


def test_a_config_edit_is_reviewed_and_saved_to_the_file(gw, browser):
    sign_in(browser, gw)
    wait(browser, EC.presence_of_element_located((By.ID, "inflight")))
    browser.find_element(By.ID, "nav-config").click()
    box = wait(browser, EC.presence_of_element_located((By.ID, "cfg-text")))
    wait(browser, lambda d: "request-retry" in box.get_attribute("value"))
    assert "sk-upstream-secret-9999" not in box.get_attribute("value")  # masked
    browser.execute_script("const t = arguments[0]; t.value = t.value.replace('request-retry: 3', 'request-retry: 7');"
                           "t.dispatchEvent(new Event('input'));", box)
    browser.find_element(By.ID, "cfg-review").click()
    diff = browser.find_element(By.ID, "cfg-diff").text
    assert "- request-retry: 3" in diff and "+ request-retry: 7" in diff
    browser.find_element(By.ID, "cfg-save").click()
    wait(browser, EC.visibility_of_element_located((By.ID, "cfg-saved")))
    text = config_text(gw)
    assert "request-retry: 7          # a trailing comment" in text and "sk-upstream-secret-9999" in text
    # a broken edit is refused with the line, and the file stays as it was
    box = browser.find_element(By.ID, "cfg-text")
    browser.execute_script("arguments[0].value += '\\nbroken: [';arguments[0].dispatchEvent(new Event('input'));", box)
    browser.find_element(By.ID, "cfg-review").click()
    browser.find_element(By.ID, "cfg-save").click()
    assert "unterminated" in wait(browser, EC.visibility_of_element_located((By.ID, "cfg-error"))).text
    assert config_text(gw) == text


def test_a_client_key_is_created_from_the_page(gw, browser):
    sign_in(browser, gw)
    wait(browser, EC.presence_of_element_located((By.ID, "inflight")))
    browser.find_element(By.ID, "nav-keys").click()
    wait(browser, EC.presence_of_element_located((By.ID, "nk-name"))).send_keys("browser-team")
    browser.find_element(By.ID, "nk-rpm").send_keys("10")
    browser.find_element(By.ID, "nk-create").click()
    secret = wait(browser, EC.visibility_of_element_located((By.ID, "newkey-value"))).text
    assert secret.startswith("sk-mux-") and "browser-team" in browser.find_element(By.ID, "keytable").text
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    assert c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])

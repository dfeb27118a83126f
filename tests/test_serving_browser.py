"""``/docs`` of ``privatune serve`` in a real headless browser (the audit report's Debian chromium through
selenium): Swagger UI reads the service's OpenAPI document and lists its operations, with no "Unable to render
this definition" in their place.

Skipped, saying why, where chromium, chromedriver or selenium are missing (``.ci/run`` installs them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.serving.app import HEALTH_PATH, PREDICT_PATH
from tests.test_audit_browser import coloured_pixels, documented_screenshot, driver, screenshot  # noqa: F401
from tests.test_serving import keys, make_tiny_adapter, start  # noqa: F401  (keys is a fixture)

pytestmark = pytest.mark.integration

RENDER_ERROR = "Unable to render this definition"
POST_GREEN = "#49cc90"  # Swagger UI's colour of a POST operation
LOAD_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def classifier(tiny_model_dir, tmp_path_factory):
    from shared.predict import load_classifier

    return load_classifier(make_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("run"))[0])


@pytest.fixture()
def docs_page(driver, classifier, keys) -> Iterator[str]:  # noqa: F811
    """The service's ``/docs`` loaded in the browser, once Swagger UI has drawn either operations or an error;
    yields the page's visible text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    key_file, _ = keys
    service, _ = start(classifier, key_file)
    with service as url:
        driver.get_log("browser")  # drain what an earlier page left
        driver.get(url + "/docs")
        WebDriverWait(driver, LOAD_TIMEOUT_S).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock") or RENDER_ERROR in d.page_source
        )
        yield driver.find_element(By.TAG_NAME, "body").text


def listed_operations(driver) -> set[tuple[str, str]]:  # noqa: F811
    """(method, path) of every operation Swagger UI drew."""
    from selenium.webdriver.common.by import By

    return {
        (
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.strip(),
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in driver.find_elements(By.CSS_SELECTOR, ".opblock")
    }


def test_docs_page_renders_the_definition(driver, docs_page):  # noqa: F811
    assert RENDER_ERROR not in docs_page
    assert "PrivaTune inference" in docs_page  # the document's title, drawn from /openapi.json


def test_docs_page_lists_every_operation(driver, docs_page):  # noqa: F811
    assert listed_operations(driver) == {("POST", PREDICT_PATH), ("GET", HEALTH_PATH)}


def test_docs_page_shows_the_bearer_scheme_and_logs_no_error(driver, docs_page):  # noqa: F811
    from selenium.webdriver.common.by import By

    assert driver.find_elements(By.CSS_SELECTOR, ".auth-wrapper .authorize")  # "Authorize": the API key scheme
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_the_docs_screenshot_command_draws_the_operations(classifier, keys, tmp_path):  # noqa: F811
    key_file, _ = keys
    png = tmp_path / "docs.png"
    service, _ = start(classifier, key_file)
    with service as url:
        command = documented_screenshot("serving.md", **{"/tmp/docs.png": str(png), "http://127.0.0.1:8000": url})
        image = screenshot(command, png)

    assert "--no-sandbox" in command
    assert image is not None and coloured_pixels(image, POST_GREEN, tolerance=10) > 1000  # POST /v1/predict's bar

"""The HTML report in a real headless browser (Debian ``chromium`` + ``chromium-driver`` through selenium):
it loads with no console error, and every plot is drawn (a screenshot of it has data-coloured pixels).

Needs ``apt-get install chromium chromium-driver`` and ``pip install selenium`` (``.ci/run`` does both);
skipped, saying why, where they are missing.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from shared.audit.cli import audit_main
from shared.audit.example import write_example_federation
from shared.audit.plots import PALETTE

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parents[1] / "docs"

pytestmark = pytest.mark.integration


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB/RGBA, non-interlaced PNG (what WebDriver screenshots are) as an (h, w, channels) array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32),
        )
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) % 256
        elif kind == 1:  # sub: a running sum per channel
            cur = (np.cumsum(line.reshape(width, bpp), axis=0) % 256).reshape(stride)
        else:  # average or Paeth: sequential along the row
            cur = line.copy()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b, c = prev[x], prev[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cur[x] = (cur[x] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) % 256
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)[:, :, :3]


def coloured_pixels(image: np.ndarray, colour: str, tolerance: int = 40) -> int:
    """How many pixels are close to ``colour`` (``#rrggbb``)."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image.astype(int) - target).max(axis=2) <= tolerance).sum())


def ink(image: np.ndarray) -> float:
    """Fraction of pixels that are not (near) white."""
    return float((image.min(axis=2) < 235).mean())


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    fed = write_example_federation(root, accountant="rdp", small_budget=1.7)
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    (fed.run_dirs[-1] / "canary_scores.json").write_text(
        json.dumps(
            {
                "run_id": "1001",
                "canaries": [
                    {"index": i, "site": "site-0", "included": bool(inc), "score": float(rng.normal())}
                    for i, inc in enumerate(included)
                ],
            }
        )
    )
    args = ["--sim-dir", str(fed.sim_dir), "--out", str(root / "audit"), "--no-cross-check"]
    for d in fed.run_dirs:
        args += ["--run-dir", str(d)]
    assert audit_main(args) == 0
    return root / "audit" / "report.html"


def _load(driver, path: Path) -> list[dict]:
    driver.get_log("browser")  # drain what an earlier page left
    driver.get(path.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    return driver.get_log("browser")


def test_report_loads_without_console_errors(driver, report):
    logs = _load(driver, report)

    assert [entry for entry in logs if entry["level"] == "SEVERE"] == []
    assert driver.title == "PrivaTune privacy audit"


def test_console_errors_would_be_caught(driver, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        "<script>console.error('boom')</script></body></html>"
    )

    assert any(entry["level"] == "SEVERE" and "boom" in entry["message"] for entry in _load(driver, page))


def test_every_plot_renders_with_its_data(driver, report, tmp_path):
    from selenium.webdriver.common.by import By

    _load(driver, report)
    plots = driver.find_elements(By.CSS_SELECTOR, "svg.plot")

    assert len(plots) == 4  # one epsilon plot per site (3) and the accuracy plot
    for i, plot in enumerate(plots):
        driver.execute_script("arguments[0].scrollIntoView()", plot)
        png = plot.screenshot_as_png
        (tmp_path / f"plot-{i}.png").write_bytes(png)
        image = decode_png(png)
        assert image.shape[0] >= 250 and image.shape[1] >= 600
        assert ink(image) > 0.02, f"plot {i} is blank"
        assert coloured_pixels(image, PALETTE[0]) > 100, f"plot {i} has no data line"


def test_budget_line_is_drawn_for_the_site_with_a_budget(driver, report):
    from selenium.webdriver.common.by import By

    _load(driver, report)
    small_budget_plot = driver.find_elements(By.CSS_SELECTOR, "svg.plot")[2]

    image = decode_png(small_budget_plot.screenshot_as_png)

    assert coloured_pixels(image, "#b00020") > 100


def test_a_blank_plot_fails_the_check(driver, tmp_path):
    from selenium.webdriver.common.by import By

    page = tmp_path / "blank.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<svg class="plot" width="640" height="300"><rect width="640" height="300" fill="#fff"/></svg>'
        "</body></html>"
    )
    _load(driver, page)

    image = decode_png(driver.find_element(By.CSS_SELECTOR, "svg.plot").screenshot_as_png)

    assert ink(image) < 0.02 and coloured_pixels(image, PALETTE[0]) == 0


def test_png_decoder_matches_a_known_image():
    # 2x1 RGB, filter "sub": red, then (1, 255, 0) + red = green (mod 256)
    raw = b"\x01" + bytes([255, 0, 0, 1, 255, 0])
    ihdr = struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

    assert decode_png(png).tolist() == [[[255, 0, 0], [0, 255, 0]]]


def documented_screenshot(doc: str, **replace: str) -> list[str]:
    """The ``chromium --headless ... --screenshot=...`` command of ``docs/<doc>``, its paths replaced."""
    line = next(x for x in (DOCS / doc).read_text().splitlines() if x.startswith("chromium --headless"))
    for old, new in replace.items():
        line = line.replace(old, new)
    return [CHROMIUM, *shlex.split(line)[1:]]


def screenshot(command: list[str], png: Path) -> np.ndarray | None:
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian chromium (apt-get install chromium)")
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    return decode_png(png.read_bytes()) if png.is_file() else None


def test_the_docs_screenshot_of_the_report_works_and_says_no_sandbox_for_root(report, tmp_path):
    def command(png: Path) -> list[str]:
        paths = {"/tmp/report.png": str(png), "file:///tmp/audit/report.html": report.as_uri()}
        return documented_screenshot("privacy-audit.md", **paths)

    image = screenshot(command(tmp_path / "report.png"), tmp_path / "report.png")

    assert "--no-sandbox" in command(tmp_path / "report.png")
    assert image is not None and ink(image) > 0.02
    if os.geteuid() == 0:  # why the docs say it: as root, Chromium refuses to start without it
        sandboxed = [a for a in command(tmp_path / "sandboxed.png") if a != "--no-sandbox"]
        assert screenshot(sandboxed, tmp_path / "sandboxed.png") is None

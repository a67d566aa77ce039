"""The HTML report renders in headless Chromium (no network): the table is there and every plot decodes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lm_sparse.report.cli import write_report
from test_report import make_results

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs /usr/bin/chromium (apt-get install -y chromium)")

# Appended to a copy of the page (the report itself has no script): counts images that decoded.
_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-decoded', imgs.filter(i => i.complete && i.naturalWidth > 0).length);
  document.body.setAttribute('data-images', imgs.length);
});</script></body>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    make_results(runs, "dense", acc={"task_a": 0.60, "task_b": 0.50})
    make_results(runs, "topk", 0.5, acc={"task_a": 0.58, "task_b": 0.51}, sparsity=0.5)
    make_results(runs, "teal", 0.4, acc={"task_a": 0.59, "task_b": 0.49}, sparsity=0.4, per_matrix=True)
    return write_report([runs], tmp_path_factory.mktemp("report"))


def test_dom_has_the_table_and_decoded_images(report, tmp_path: Path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.html_path.read_text().replace("</body>", _PROBE))
    done = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert '<table class="leaderboard" id="leaderboard">' in dom
    assert dom.count("<tr") == 4  # header + three runs
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    decoded = int(re.search(r'data-decoded="(\d+)"', dom).group(1))
    assert images == len(report.plots["score"]) + len(report.plots["layers"]) == 5
    assert decoded == images


def test_screenshot_is_a_rendered_page(report, tmp_path: Path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1800", report.html_path.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1800, 1400)
    assert pixels[..., :3].std() > 0.05  # not a blank page: text, table borders and plots

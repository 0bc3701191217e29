"""report.html in a real browser: headless Chromium loads it, its images decode, its tables are there.

Skips (saying why) when no Chromium is installed; ``.ci/run`` installs Debian's ``chromium``
where it can. Set ``BKBENCH_SCREENSHOT_DIR`` to keep the screenshot for a look.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bkbench.report import build_report

from test_report import passing_set

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)

# Marks every image once the page has loaded: data-loaded="1" when it decoded to real pixels.
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  for (const img of document.images) {
    img.setAttribute("data-loaded", img.complete && img.naturalWidth > 0 ? "1" : "0");
  }
  // the widest table against the page's text column: a table must wrap, not overflow
  let widest = 0;
  for (const t of document.querySelectorAll("table")) {
    widest = Math.max(widest, t.getBoundingClientRect().width);
  }
  document.body.setAttribute("data-widest-table", String(Math.ceil(widest)));
  const column = parseFloat(getComputedStyle(document.body).width);   // without the padding
  document.body.setAttribute("data-body-width", String(Math.ceil(column)));
  document.body.setAttribute("data-checked", "1");
});
</script>"""


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--disable-background-networking",
           "--hide-scrollbars", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a browser start and the report's plots: several seconds on 2 cores
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                    "chromium; .ci/run does this when it runs as root)")
def test_report_html_renders_in_chromium(tmp_path):
    results = passing_set()
    results["resnet_bk_full"].contention = {
        "contended": True, "reasons": ["threads waited for a CPU 0.90 x the timed wall time"],
        "load_start": [3.0, 2.0, 1.0], "load_mean": 3.5, "load_max": 4.0,
        "load_end": [4.0, 3.0, 2.0], "machine_cpus": 2, "cpus_available": 2,
        "torch_threads": 2, "cpu_per_wall": 0.8, "runqueue_wait_per_wall": 0.9}
    for r in results.values():
        r.save(tmp_path / f"{r.model_name}_results.json")
    page = build_report(tmp_path)["report_html"]
    text = page.read_text()
    # self-contained: nothing for the browser to fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)

    checked = tmp_path / "check.html"
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = chromium("--dump-dom", "--window-size=1600,2400", checked.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-checked="1"' in html, "the load handler did not run"
    flags = re.findall(r'<img[^>]*data-loaded="([01])"', html)
    assert flags == ["1", "1"], f"images loaded: {flags}"
    # the tables are there, and the summary comes before the setup
    assert html.count("<table") >= 8
    assert html.index(">Summary</h2>") < html.index(">Setup</h2>") < html.index(">Results")
    assert "contended, not judged" in html and 'class="untestable"' in html
    # every table fits the 1,200 px text column (issue 28: the results table was > 1,400 px)
    widest = int(re.search(r'data-widest-table="(\d+)"', html).group(1))
    body = int(re.search(r'data-body-width="(\d+)"', html).group(1))
    assert 0 < widest <= body <= 1200, (widest, body)

    shot_dir = Path(os.environ.get("BKBENCH_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "report.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1280
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page

"""index.html, the one page of an output folder, opened in a real headless browser.

Debian's ``chromium`` (installed by ``.ci/run`` where missing) renders the page: the
screenshot must not be blank and every image must have loaded. The page itself must be
offline and self-contained (no script, no remote address, relative links to files that
exist) and show the fit table, the notes and warnings and the run facts of run.json.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from builders import synthetic_deltas  # noqa: E402

from wdanalysis.plots.report import write_report  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed here (.ci/run installs Debian's package)"
)
RUN_JSON = {
    "tool": "wdanalysis compare",
    "version": "0.1.0",
    "backend": "c-kernel (fused, 2 threads)",
    "options": {"base": "models/base", "runs": ["runs/ft", "runs/lora"], "axis": "out"},
    "rows": 72,
    "python": "3.11.7",
    "torch": "2.13.0+cpu",
    "platform": "Linux-x86_64",
    "left_out": [  # as compare --skip-bad records a refused checkpoint
        {
            "run": "lora",
            "checkpoint": "runs/lora/checkpoint-20",
            "left_out": "refused",
            "reason": "unknown tensor lora_X",
        }
    ],
}


class _Links(HTMLParser):
    """Every src/href of the page, and whether it holds a script or a stylesheet link."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"])
        if "href" in values:
            self.links.append(values["href"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    (out / "run.json").write_text(json.dumps(RUN_JSON))
    spec = (("FT", -0.6), ("LoRA", 0.8))
    deltas = synthetic_deltas(spec, (10, 20, 30), 6, ("q_proj", "v_proj"), seed=0)
    deltas.loc[0, "delta_d"] = np.nan  # a warning the page must show
    with pytest.warns(UserWarning, match="dropped 1"):
        result = write_report(deltas, out, dpi=40)
    return result


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text())
    return parser


def test_page_is_offline_and_links_files_that_exist(report):
    page = _parse(report.html)
    assert "script" not in page.tags and "link" not in page.tags  # CSS is inline
    text = report.html.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text)
    for target in [*page.images, *page.links]:
        if target.startswith("#"):
            continue
        assert "/" not in target and (report.out_dir / target).is_file(), target
    figures = [p.name for paths in report.figures.values() for p in paths]
    pngs = [name for name in figures if name.endswith(".png")]
    assert sorted(page.images) == sorted(pngs) == ["figure2.png", "trajectories.png"]  # all modules
    assert {p for p in page.links if not p.startswith("#")} >= set(figures)


def test_page_shows_fits_notes_warnings_and_run_facts(report):
    text = report.html.read_text()
    pooled = report.fits[report.fits["scope"] == "pooled"]
    for _, row in pooled.iterrows():
        interval = f"[{row['pearson_r_boot_low']:+.2f}, {row['pearson_r_boot_high']:+.2f}]"
        assert interval.replace("-", "−") in text
    assert "within-step r" in text and "layer bootstrap (2000" in text
    assert "dropped 1 of" in text  # the warning
    assert "lora checkpoint-20 (refused: unknown tensor lora_X)" in text  # left out, named
    for fact in ("models/base", "runs/ft, runs/lora", "c-kernel (fused, 2 threads)", "2.13.0+cpu"):
        assert fact in text, fact
    assert "Per-step fits" in text


def _chromium(*args: str, cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=180)


@needs_chromium
def test_chromium_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    url = report.html.resolve().as_uri()
    done = _chromium(
        "--window-size=1366,900", f"--screenshot={shot}", url, cwd=tmp_path, tmp=tmp_path
    )
    assert shot.is_file(), done.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1366)
    assert pixels.std() > 0.05  # text, tables and figures, not a blank page
    assert (pixels < 0.5).mean() > 0.005  # some dark ink (text) on the page


@needs_chromium
def test_chromium_loads_every_image(report, tmp_path):
    """A copy of the page beside it, with a script that counts the decoded images."""
    probe = report.out_dir / "probe_images.html"
    script = (
        "<script>window.addEventListener('load',()=>{const all=[...document.images];"
        "const ok=all.filter(i=>i.complete&&i.naturalWidth>0).length;"
        "document.body.setAttribute('data-images',ok+'/'+all.length);"
        "const cells=[...document.querySelectorAll('.hm td.c')];const painted=cells.filter(c=>"
        "getComputedStyle(c).backgroundColor!=='rgba(0, 0, 0, 0)'&&c.offsetHeight>0).length;"
        "document.body.setAttribute('data-cells',painted+'/'+cells.length);});</script>"
    )
    probe.write_text(report.html.read_text().replace("</body>", script + "</body>"))
    try:
        done = _chromium(
            "--virtual-time-budget=15000",
            "--dump-dom",
            probe.resolve().as_uri(),
            cwd=tmp_path,
            tmp=tmp_path,
        )
    finally:
        probe.unlink()
    found = re.search(r'data-images="(\d+)/(\d+)"', done.stdout)
    assert found, done.stderr[-2000:]
    loaded, total = map(int, found.groups())
    assert total == 2 and loaded == total
    # the heatmaps: a painted cell per run, quantity, module, layer and step (2·2·2·6·3)
    painted, cells = map(int, re.search(r'data-cells="(\d+)/(\d+)"', done.stdout).groups())
    assert cells == 144 and painted == cells


def test_cli_format_pdf_only_and_a_bad_format(tmp_path, capsys):
    from wdanalysis.cli import main

    spec = (("FT", -0.6), ("LoRA", 0.8))
    synthetic_deltas(spec, (10, 20), 4, ("q_proj",)).to_csv(tmp_path / "deltas.csv", index=False)
    out = tmp_path / "out"
    argv = ["plot", str(tmp_path / "deltas.csv"), "--out", str(out), "--format", "pdf"]
    assert main([*argv, "--dpi", "30"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "figure2.pdf" in names and "index.html" in names
    assert not any(name.endswith((".png", ".svg")) for name in names)
    assert 'href="figure2.pdf"' in (out / "index.html").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["plot", str(tmp_path / "deltas.csv"), "--out", str(out), "--format", "png,gif"])
    assert stop.value.code == 2
    assert "unknown figure format(s) gif" in capsys.readouterr().err

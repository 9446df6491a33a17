"""``index.html``: one page per output folder with the fit table, every figure, the notes
and warnings, and the run facts of ``run.json``.

The page is self-contained and works offline: inline CSS, no script, no web font, no
CDN; images and downloads are relative links to the files beside it, so the folder can be
moved, zipped or opened from a file manager. Every text taken from the data is escaped.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from wdanalysis.plots.html_heatmap import HEATMAP_CSS
from wdanalysis.stats.fit_table import fit_table_legend, signs_held
from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.table.schema import IDENTITY_COLUMNS, name_column

__all__ = ["CAPTIONS", "HTML_NAME", "write_html_report"]

HTML_NAME = "index.html"
#: What each figure shows (the design is explained in docs/guides/report.md).
CAPTIONS = {
    "figure2": "Figure 2: ΔM against ΔD, a row of panels per module, a column per run; black "
    "line = least-squares fit, r in each title. Up to 12 layers colour = layer and marker = "
    "step (the paper's); beyond, colour = training step (light early, dark late).",
    "trajectories": "ΔM and ΔD against training step, a row per module, two columns per run. "
    "Up to 12 layers one line per layer; beyond, four depth groups, each a bold median line "
    "over its layers.",
    "figure2_module": "Figure 2: ΔM against ΔD, one panel per run, black line = least-squares fit. "
    "Up to 12 layers colour = layer and marker = step (the paper's); beyond, colour = "
    "training step (light early, dark late).",
    "trajectories_module": "ΔM (top) and ΔD (bottom) against training step. Up to 12 layers one "
    "line per layer; beyond, four depth groups, each a bold median line over its layers.",
    "heatmap": "Layer × step heatmap of ΔM and ΔD, one column per run, each panel on its "
    "own colour scale (grey: no value).",
}
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2327;
margin:0 auto;max-width:1280px;padding:1.2rem 1.6rem 3rem;background:#fff}
h1{font-size:1.6rem;margin:.2rem 0 .3rem}h2{font-size:1.25rem;margin:2rem 0 .6rem;
border-bottom:1px solid #d0d7de;padding-bottom:.2rem}h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
.sub{color:#57606a;margin:0 0 1rem}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:.4rem 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.legend{font-size:13px;color:#57606a;margin:.3rem 0 1rem}
figure{margin:.6rem 0 1.6rem}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:13px;color:#57606a;margin-top:.3rem}
ul.warn li{color:#9a6700}dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}
dt{font-weight:600}dd{margin:0;word-break:break-all}code{font-size:13px}
nav a{margin-right:1rem}
"""


def _num(value, spec: str) -> str:
    if value is None or value is pd.NA or not np.isfinite(float(value)):
        return "—"
    return format(float(value), spec).replace("-", "−")


def _cell(value) -> str:
    empty = value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    return "—" if empty or value == "" else escape(str(value))


def _interval(row: pd.Series, stem: str, spec: str) -> str:
    low, high = row.get(f"{stem}_boot_low"), row.get(f"{stem}_boot_high")
    if _num(low, spec) == "—" or _num(high, spec) == "—":
        return "—"
    return f"[{_num(low, spec)}, {_num(high, spec)}]"


def _fit_rows(fits: pd.DataFrame, scope: str) -> tuple[list[str], list[list[str]], list[str]]:
    keys = [c for c in (name_column(fits), "run", "module", *IDENTITY_COLUMNS) if c in fits]
    keys += ["step"] if scope == "step" else []
    head = [*keys, "n", "slope", "slope 95% CI", "r", "r 95% CI", "within-step r", "ρ"]
    pooled = scope == "pooled" and bool((fits["scope"] == "step").any())
    head += ["sign held"] if pooled else []
    rows, notes, held = [], [], signs_held(fits, keys) if pooled else {}
    for index, row in fits.loc[fits["scope"] == scope].iterrows():
        cells = [_cell(row[k]) for k in keys]
        cells += [
            _num(row["n"], ".0f"),
            _num(row["slope"], "#.3g"),
            _interval(row, "slope", "#.3g"),
            _num(row["pearson_r"], "+.2f"),
            _interval(row, "pearson_r", "+.2f"),
            _num(row.get("within_step_r"), "+.2f"),
            _num(row.get("spearman_rho"), "+.2f"),
        ]
        cells += [escape(held[index])] if pooled else []
        rows.append(cells)
        note = row.get("note")
        notes.append(escape(note) if isinstance(note, str) else "")
    return head, rows, notes


def _table(head: list[str], rows: list[list[str]], notes: list[str], numeric_from: int) -> str:
    has_notes = any(notes)
    th = "".join(f"<th>{escape(h)}</th>" for h in [*head, *(["note"] if has_notes else [])])
    body = []
    for cells, note in zip(rows, notes, strict=True):
        tds = [
            f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
            for i, c in enumerate(cells)
        ]
        tds += [f"<td>{note}</td>"] if has_notes else []
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<div class="scroll"><table><tr>{th}</tr>{"".join(body)}</table></div>'


def _fits_section(fits: pd.DataFrame) -> str:
    head, rows, notes = _fit_rows(fits, "pooled")
    keys = head.index("n")
    parts = ["<h2 id='fits'>Fits</h2>", _table(head, rows, notes, keys)]
    parts.append(f'<p class="legend">{escape(fit_table_legend(fits))}</p>')
    if (fits["scope"] == "step").any():
        head, rows, notes = _fit_rows(fits, "step")
        parts.append("<details><summary>Per-step fits</summary>")
        parts.append(_table(head, rows, notes, head.index("n")) + "</details>")
    return "\n".join(parts)


def _figure(paths: list[Path], kind: str, per_module: bool) -> str:
    by_format = {p.suffix.lstrip("."): p.name for p in paths}
    shown = by_format.get("png") or by_format.get("svg")
    links = " · ".join(
        f'<a href="{escape(name)}">{fmt.upper()}</a>' for fmt, name in by_format.items()
    )
    text = CAPTIONS.get(f"{kind}_module" if per_module else kind, CAPTIONS.get(kind, kind))
    caption = f"{escape(text)} Files: {links}"
    if shown is None:  # PDF only: a browser cannot show it inline
        return f"<figure><figcaption>{caption}</figcaption></figure>"
    alt = escape(f"{kind} ({Path(shown).stem})")
    image = f'<a href="{escape(shown)}"><img src="{escape(shown)}" alt="{alt}"></a>'
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _figures_section(figures: dict[str, list[Path]]) -> str:
    parts = ["<h2 id='figures'>Figures</h2>"]
    for module, paths in figures.items():
        if module:  # "": the overview pages of every module, first and without a heading
            parts.append(f"<h3>module: {escape(module)}</h3>")
        kinds: dict[str, list[Path]] = {}
        for path in paths:
            kinds.setdefault(path.stem.split("_", 1)[0], []).append(path)
        parts += [_figure(group, kind, bool(module)) for kind, group in kinds.items()]
    return "\n".join(parts)


def _list(title: str, items: list[str], anchor: str, css: str = "") -> str:
    if not items:
        return f"<h2 id='{anchor}'>{title}</h2><p class='sub'>none</p>"
    lis = "".join(f"<li>{escape(item)}</li>" for item in items)
    return f"<h2 id='{anchor}'>{title}</h2><ul class='{css}'>{lis}</ul>"


def _run_section(out_dir: Path) -> str:
    """The facts of ``run.json`` (inputs, backend, versions), or a line saying it is absent."""
    try:
        record = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return "<h2 id='run'>Run</h2><p class='sub'>no run.json in this folder</p>"
    options = record.get("options", {}) if isinstance(record, dict) else {}
    left = record.get("left_out") if isinstance(record, dict) else None
    facts = {
        "left out": [  # checkpoints being written, or refused under --skip-bad
            f"{i.get('run')} {Path(str(i.get('checkpoint'))).name} "
            f"({i.get('left_out')}: {' '.join(str(i.get('reason')).split())})"
            for i in left or []
            if isinstance(i, dict)
        ],
        "base": options.get("base"),
        "runs": options.get("runs"),
        "labels": options.get("labels"),
        "modules": options.get("modules"),
        "axis": options.get("axis"),
        "backend": record.get("backend"),
        "rows": record.get("rows"),
        "wdanalysis": record.get("version"),
        "python": record.get("python"),
        "torch": record.get("torch"),
        "platform": record.get("platform"),
    }
    rest = {k: v for k, v in options.items() if k not in facts}
    items = [
        f"<dt>{escape(k)}</dt><dd><code>{escape(_text(v))}</code></dd>"
        for k, v in {**facts, **rest}.items()
        if v not in (None, [], "")
    ]
    link = '<a href="run.json">run.json</a>'
    return f"<h2 id='run'>Run</h2><p class='sub'>from {link}</p><dl>{''.join(items)}</dl>"


def _text(value) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def write_html_report(
    out_dir: str | Path,
    fits: pd.DataFrame,
    figures: dict[str, list[Path]],
    notes: list[str] = (),
    warnings: list[str] = (),
    extra: str = "",
) -> Path:
    """Write ``out_dir/index.html`` (atomically) and return its path; ``extra``: HTML put
    after the figures (the heatmaps, :func:`~wdanalysis.plots.html_heatmap.heatmap_section`)."""
    out_dir = Path(out_dir)
    # named by its runs, not its folder: the report is written into a staging folder and
    # swapped in, and the same comparison gives the same page wherever it is written
    runs = ", ".join(dict.fromkeys(fits["run"].astype(str))) if "run" in fits else ""
    files = [n for n in ("deltas.csv", "fits.csv", "run.json") if (out_dir / n).exists()]
    downloads = " · ".join(f'<a href="{n}">{n}</a>' for n in files)
    body = [
        "<h1>Weight-decomposition analysis</h1>",
        f"<p class='sub'>{escape(runs)} · {downloads}</p>",
        "<nav><a href='#fits'>Fits</a><a href='#notes'>Notes</a>"
        "<a href='#figures'>Figures</a>"
        + ("<a href='#heatmaps'>Heatmaps</a>" if "id='heatmaps'" in extra else "")
        + "<a href='#run'>Run</a></nav>",
        _fits_section(fits),
        _list("Notes and warnings", [*warnings, *notes], "notes", "warn"),
        _figures_section(figures),
        extra,
        _run_section(out_dir),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>wdanalysis report: {escape(runs)}</title>"
        f"<style>{_CSS}{HEATMAP_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return write_text_atomic(out_dir / HTML_NAME, page)

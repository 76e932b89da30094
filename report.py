"""The offline HTML page of one prediction run: `<output-dir>/report.html`.

From top to bottom: the headline (as summary.json states it, with its bias warning), the
protocol, the Dice chart, and one table row per patient (sortable by any column with a
click) with a strip of up to five small overlays of the slices with the most truth or
prediction, each linking to its full-size overlay. The page needs no network: no CDN, no
external font or script; every picture is a file under the output folder referenced by a
relative path (or, for a chart elsewhere, embedded). Thumbnails are drawn by `pictures.thumbnail`
from the arrays predict.py already holds (no second pass over the input files).
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from metrics import Metric, find_metric
from pictures import thumbnail, view_box
from utils import atomic_write_bytes

REPORT_NAME = "report.html"
THUMBNAIL_DIR = "thumbnails"
THUMBNAILS_PER_PATIENT = 5
THUMBNAIL_PX = 96
CHROMIUM = "/usr/bin/chromium"  # Debian's package (`apt-get install chromium`)
HIDDEN_COLUMNS = ("models",)  # long checkpoint paths: shown in the protocol instead
STATUS_HELP = {
    "failed": "the patient could not be predicted; the error is in the last column",
    "unlabelled": "no ground-truth masks: masks written, no metrics",
    "lesion-free": "the truth is empty: Dice is 1.0 when nothing is predicted, else 0.0",
}


# ------------------------------------------------------------------------- thumbnails


def strip_slices(prediction: np.ndarray, truth: np.ndarray | None, count: int = THUMBNAILS_PER_PATIENT) -> list[int]:
    """Indices (in slice order) of the up to `count` slices with the most truth-or-prediction
    pixels; slices with neither are never chosen, ties go to the lower index.
    prediction, truth: (S, H, W) bool/0-1 (truth None for an unlabelled patient)."""
    lesion = prediction.astype(bool) if truth is None else prediction.astype(bool) | truth.astype(bool)
    area = lesion.reshape(len(lesion), -1).sum(axis=1)  # (S,) pixels per slice
    order = np.argsort(-area, kind="stable")[:count]
    return sorted(int(s) for s in order if area[s] > 0)


def save_thumbnail(rgb: np.ndarray, path: Path) -> None:
    """RGB uint8 (h, w, 3) -> a palette PNG (256 colours, Pillow's fast octree, no dithering): at most
    one byte per pixel whatever the slice looks like, so a 96-px thumbnail stays under about
    10 kB and 110 patients' strips under 6 MB."""
    from PIL import Image  # matplotlib's image library

    Image.fromarray(rgb).quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path)


def write_thumbnails(
    patient_id: str,
    images: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray | None,
    slice_numbers: Sequence[int],
    out_dir: Path,
    overlay_path: Callable[[int], str] | None = None,
) -> list[dict]:
    """Write `thumbnails/<patient>_<k>.png` (k zero-padded to 3 digits) for the slices
    `strip_slices` picks; return one dict per thumbnail for `write_report`: `slice` (k),
    `thumbnail` and `overlay` (paths relative to `out_dir`; overlay None when there is no
    full-size overlay), `truth_pixels` (None without truth), `pred_pixels`.

    images: (S, H, W, 3) native slices (pre-contrast, FLAIR, post-contrast; FLAIR shown),
    prediction: (S, H, W) bool, truth: (S, H, W) or None, slice_numbers: the S slice numbers
    k; overlay_path: k -> the full-size overlay's path relative to `out_dir`, or None. Every
    thumbnail of a patient shows the same part of the frame (`pictures.view_box`: the head).
    """
    chosen = strip_slices(prediction, truth)
    if not chosen:
        return []
    folder = out_dir / THUMBNAIL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    box = view_box(images, prediction, truth)
    pictures = []
    for s in chosen:
        number = int(slice_numbers[s])
        name = f"{THUMBNAIL_DIR}/{patient_id}_{number:03d}.png"
        rgb = thumbnail(images[s, ..., 1], prediction[s], None if truth is None else truth[s], box, THUMBNAIL_PX)
        save_thumbnail(rgb, out_dir / name)
        pictures.append(
            {
                "slice": number,
                "thumbnail": name,
                "overlay": overlay_path(number) if overlay_path else None,
                "truth_pixels": None if truth is None else int(truth[s].sum()),
                "pred_pixels": int(prediction[s].sum()),
            }
        )
    return pictures


# ------------------------------------------------------------------------------- page


def patient_status(row: dict) -> str:
    """`failed`, `unlabelled` (no truth), `lesion-free` (empty truth), or "" (a lesion)."""
    if row.get("error"):
        return "failed"
    if row.get("dice") in (None, ""):
        return "unlabelled"
    if row.get("gt_pixels") in (0, "0"):
        return "lesion-free"
    return ""


def _number(value) -> float | None:
    """A table value as a number for sorting and formatting; None when it is not one."""
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cell(value, metric: Metric | None = None) -> str:
    """One <td>: a number carries its value in `data-v` (what the sort compares) and is
    printed as its registered `metric` says (`Metric.text`: a count without decimals), or, for
    a column that is no metric, an integer as such and anything else with 3 decimals (1 from
    100 up). An undefined value (hd95 of an empty mask: NaN) shows a dash and, like an empty
    one, sorts last."""
    number = _number(value)
    if number is not None:
        if metric is not None:
            shown = metric.text(number)
        elif isinstance(value, (int, np.integer)):
            shown = str(value)
        else:
            shown = f"{number:.3f}" if abs(number) < 100 else f"{number:.1f}"
        return f'<td class="num" data-v="{number!r}">{shown}</td>'
    if isinstance(value, float) and math.isnan(value):
        return '<td class="num" data-v="" title="undefined: a mask is empty">–</td>'
    text = "" if value is None else str(value)
    return f'<td data-v="{html.escape(text.lower())}">{html.escape(text)}</td>'


def _strip(row: dict, width: int) -> str:
    """The thumbnail strip of one patient (a row of its own under its numbers, `width` columns
    wide), each thumbnail linking to its full-size overlay."""
    pictures = row.get("pictures") or []
    if not pictures:
        text = "no pictures (failed)" if patient_status(row) == "failed" else "no slice with truth or prediction"
        return f'<tr class="strip"><td class="none" colspan="{width}">{text}</td></tr>'
    parts = []
    for p in pictures:
        truth = "" if p.get("truth_pixels") is None else f"truth {p['truth_pixels']} px, "
        label = html.escape(f"slice {p['slice']}: {truth}predicted {p['pred_pixels']} px")
        image = (
            f'<img src="{quote(p["thumbnail"])}" alt="{label}" title="{label}" loading="lazy" height="{THUMBNAIL_PX}">'
        )
        target = p.get("overlay") or p["thumbnail"]
        parts.append(f'<a href="{quote(target)}">{image}</a>')
    return f'<tr class="strip"><td colspan="{width}">{"".join(parts)}</td></tr>'


def table_columns(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """The columns the table shows: `columns` in order, without `HIDDEN_COLUMNS` and without
    those no row has a value for (e.g. `error` when no patient failed)."""
    return [c for c in columns if c not in HIDDEN_COLUMNS and any(r.get(c) not in (None, "") for r in rows)]


def _table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """One <tbody> per patient (what the sort moves): its numbers, then its thumbnail strip."""
    shown = [name for name in table_columns(rows, columns) if name != "patient"]
    head = ['<th data-col="patient" data-type="text" title="click to sort">patient</th>']
    head.append('<th data-col="status" data-type="text" title="click to sort">status</th>')
    metrics = {name: find_metric(name) for name in shown}  # None for a column that is no registered metric
    for name in shown:
        kind = "number" if any(_number(r.get(name)) is not None for r in rows) else "text"
        label = html.escape(name).replace("_", "_<wbr>")  # long names may break after "_"
        about = f"{metrics[name].description}; click to sort" if metrics[name] else "click to sort"
        head.append(f'<th data-col="{html.escape(name)}" data-type="{kind}" title="{html.escape(about)}">{label}</th>')
    groups = []
    for r in rows:
        status = patient_status(r)
        cells = [f'<td data-v="{html.escape(str(r["patient"]).lower())}">{html.escape(str(r["patient"]))}</td>']
        badge = f'<span class="badge {status}" title="{STATUS_HELP[status]}">{status}</span>' if status else ""
        cells.append(f'<td data-v="{status}">{badge}</td>')
        cells += [_cell(r.get(name), metrics[name]) for name in shown]
        numbers = f'<tr class="{status}" data-patient="{html.escape(str(r["patient"]))}">{"".join(cells)}</tr>'
        groups.append(f"<tbody>{numbers}{_strip(r, len(head))}</tbody>")
    return f'<table id="patients"><thead><tr>{"".join(head)}</tr></thead>\n' + "\n".join(groups) + "\n</table>"


def _figure_text(value: float | None, digits: int = 4, metric: Metric | None = None) -> str:
    """A summary statistic: a dash when undefined, else as `metric` prints it (a count
    without decimals), else with `digits` decimals."""
    if value is None:
        return "–"
    return metric.text(value, digits) if metric is not None else f"{value:.{digits}f}"


def _statistic_row(name: str, stats: dict) -> str:
    """One metric's mean and median in the headline's table, printed as the registry says."""
    metric = find_metric(name)
    mean, median = (_figure_text(stats[key], metric=metric) for key in ("mean", "median"))
    return f"<tr><th>{html.escape(name)}</th><td>{mean}</td><td>{median}</td></tr>"


def _headline(summary: dict) -> str:
    """The headline block: Dice over test + unseen (or, with the warning, over the biased
    roles summary.json names), then every headline metric's mean and median."""
    head = summary["headline"]
    dice = head["metrics"]["dice"]
    scope = " + ".join(head["roles"])
    if dice["mean"] is None:
        text = '<p class="figure">no labelled patient scored (no Dice)</p>'
    else:
        text = (
            f'<p class="figure">Dice mean <b>{dice["mean"]:.4f}</b>, median <b>{dice["median"]:.4f}</b> '
            f"over {head['count']} patient(s) ({html.escape(scope)})</p>"
        )
    warning = f'<p class="warning"><b>WARNING:</b> {html.escape(head["note"])}</p>' if head.get("biased") else ""
    metrics = "".join(_statistic_row(name, stats) for name, stats in head["metrics"].items())
    counts = [
        f"{summary.get('patients', 0)} patient(s) predicted",
        f"{summary.get('labelled_patients', 0)} labelled",
        f"{len(summary.get('failed_patients', {}))} failed",
        f"{summary.get('empty_truth_patients', 0)} lesion-free",
        f"hd95 undefined (an empty mask) for {summary.get('hd95_undefined_patients', 0)}",
    ]
    units = summary.get("units") or {}
    if units:
        shown = [f"{name} in {units[name]}" for name in ("hd95", "volume") if name in units]
        counts.append("units: " + ", ".join(shown) + (f" ({units['note']})" if units.get("note") else ""))
    by_role = ", ".join(
        f"{html.escape(role)}: {stats['labelled']} of {stats['count']} scored, Dice mean "
        f"{_figure_text(stats['metrics']['dice']['mean'])}"
        for role, stats in summary.get("by_role", {}).items()
    )
    return (
        f'<section id="headline"><h2>Headline ({html.escape(scope)})</h2>{text}{warning}'
        f'<table class="small"><tr><th>metric</th><th>mean</th><th>median</th></tr>{metrics}</table>'
        f"<p>{'; '.join(counts)}.</p><p>By role: {by_role or 'none'}.</p></section>"
    )


def _postprocessing_text(record: dict) -> list[str]:
    """predict.py's `protocol.postprocessing` as lines: what each checkpoint's masks got (and
    what it saved), and what an average of the checkpoints got."""
    saved = record.get("saved", {})
    lines = [f"--postprocess {record.get('requested', '?')}"]
    for path, used in record.get("used_alone", {}).items():
        choice = saved.get(path)
        source = f"saved choice, made on its validation patients: {choice}" if choice else "no saved choice"
        lines.append(f"{path}: {used} ({source})")
    if "used_averaged" in record:
        lines.append(f"an average of the checkpoints: {record['used_averaged']}")
    if record.get("averaged_note"):
        lines.append(f"note: {record['averaged_note']}")
    return lines


def _protocol_value(key: str, value) -> str:
    if key == "postprocessing" and isinstance(value, dict):
        return "<br>".join(html.escape(line) for line in _postprocessing_text(value))
    if key == "splits":
        parts = []
        for i, split in enumerate(value or []):
            if not split:
                parts.append(f"checkpoint {i + 1}: no saved split")
                continue
            sizes = " / ".join(f"{len(split.get(role, []))} {role}" for role in ("train", "val", "test"))
            fold = f" (fold {split['fold']} of {split['folds']})" if split.get("folds") else ""
            parts.append(f"checkpoint {i + 1}: {sizes}{fold}")
        return "<br>".join(html.escape(p) for p in parts)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "<br>".join(html.escape(v) for v in value)
    if isinstance(value, (dict, list)):
        return f"<code>{html.escape(json.dumps(value))}</code>"
    return html.escape(str(value))


def _protocol(protocol: dict) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{_protocol_value(key, value)}</td></tr>"
        for key, value in protocol.items()
    )
    return f'<section id="protocol"><h2>Protocol</h2><table class="small">{rows}</table></section>'


def _chart(out_dir: Path, figure_path: str | Path | None) -> str:
    """The Dice chart by a relative path when it lies under `out_dir`, else embedded."""
    if figure_path is None or not Path(figure_path).is_file():
        return '<section id="chart"><h2>Dice per patient</h2><p>no labelled patient: no chart</p></section>'
    figure = Path(figure_path).resolve()
    try:
        source = quote(figure.relative_to(out_dir.resolve()).as_posix())
    except ValueError:  # --figure-path outside --output-dir: embedded, the page stays one folder
        source = "data:image/png;base64," + base64.b64encode(figure.read_bytes()).decode()
    return (
        '<section id="chart"><h2>Dice per patient</h2>'
        f'<img class="chart" src="{source}" alt="Dice per patient, sorted"></section>'
    )


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.4em; border-bottom: 1px solid #ddd; }
.figure { font-size: 1.3em; }
.warning { background: #fff3cd; border: 1px solid #e0a800; padding: 0.6em; }
table { border-collapse: collapse; }
table.small th { text-align: left; padding-right: 1em; font-weight: 600; vertical-align: top; }
table.small td { padding-right: 1em; }
#patients th { position: sticky; top: 0; background: #f4f4f4; cursor: pointer; padding: 4px 6px; }
#patients th[aria-sort="ascending"]::after { content: " \\25B2"; }
#patients th[aria-sort="descending"]::after { content: " \\25BC"; }
#patients { font-size: 0.9em; }
#patients tbody { border-top: 1px solid #d0d0d0; }
#patients td { padding: 3px 6px; vertical-align: middle; }
#patients td.num { text-align: right; font-variant-numeric: tabular-nums; }
#patients tr.failed { background: #fde2e2; }
#patients tr.unlabelled { background: #eef4fb; }
.badge { border-radius: 3px; padding: 0 4px; font-size: 0.85em; color: white; }
.badge.failed { background: #b00020; } .badge.unlabelled { background: #0072B2; }
.badge.lesion-free { background: #555; }
tr.strip td { padding-bottom: 8px; }
tr.strip img { margin-right: 3px; border: 1px solid #ccc; }
.badge { white-space: nowrap; }
tr.strip td.none { color: #777; font-size: 0.9em; }
img.chart { max-width: 100%; }
"""

SORT_SCRIPT = """
document.querySelectorAll("#patients th[data-col]").forEach(function (th) {
  th.addEventListener("click", function () {
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    document.querySelectorAll("#patients th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var column = th.cellIndex, numeric = th.dataset.type === "number";
    var table = document.getElementById("patients");
    var patients = Array.prototype.slice.call(table.tBodies);  // one <tbody> per patient
    patients.sort(function (a, b) {
      var x = a.rows[0].cells[column].dataset.v, y = b.rows[0].cells[column].dataset.v;
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // empty cells last, both ways
      var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return ascending ? order : -order;
    });
    patients.forEach(function (patient) { table.appendChild(patient); });
  });
});
"""


def render_report(
    rows: Sequence[dict], summary: dict, columns: Sequence[str], out_dir: Path, figure_path: str | Path | None = None
) -> str:
    """The page as a string. rows: predict.py's per-patient dicts (the metrics.csv columns,
    plus `pictures` from `write_thumbnails`); summary: summary.json's dict (its `headline`,
    `protocol`, counts); columns: the table's column order (metrics.csv's), of which
    `table_columns` shows those with values; figure_path: the Dice chart PNG or None."""
    title = f"Prediction report: {len(rows)} patient(s)"
    generated = time.strftime("%Y-%m-%d %H:%M")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p>Written by predict.py on {generated} into {html.escape(str(out_dir))}; the same numbers are in "
            '<a href="metrics.csv">metrics.csv</a> and <a href="summary.json">summary.json</a>.</p>',
            _headline(summary),
            _protocol(summary.get("protocol", {})),
            _chart(out_dir, figure_path),
            '<section id="table"><h2>Patients</h2><p>Click a column header to sort (again to reverse). '
            "Under each patient: the slices with the most truth or prediction (click one for its full-size "
            "overlay); agreement yellow, false positive vermillion, missed sky blue.</p>",
            _table(rows, columns),
            "</section>",
            f"<script>{SORT_SCRIPT}</script>",
            "</body></html>",
        ]
    )


def write_report(
    rows: Sequence[dict],
    summary: dict,
    out_dir: str | Path,
    columns: Sequence[str],
    figure_path: str | Path | None = None,
) -> Path:
    """Write `<out_dir>/report.html` (`render_report`) atomically; returns its path."""
    out_dir = Path(out_dir)
    path = out_dir / REPORT_NAME
    atomic_write_bytes(render_report(rows, summary, columns, out_dir, figure_path).encode("utf-8"), path)
    return path


# ------------------------------------------------------------------------- screenshot


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1600) -> Path:
    """Render `page` in headless Chromium (`CHROMIUM`, driven by the `playwright` package)
    and write the top `width` x `height` CSS pixels as a PNG to `png`; every request that
    is not a local file is refused. Raises RuntimeError naming what is missing when the
    playwright package or Chromium is not installed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise RuntimeError("the playwright package is not installed (pip install -r requirements.txt)") from error
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": width, "height": height})
            view.route(
                "**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort()
            )
            view.goto(page.resolve().as_uri(), wait_until="load")
            png.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(view.screenshot(full_page=False), png)
        finally:
            browser.close()
    return png

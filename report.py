"""The offline HTML page of one prediction run: `<output-dir>/report.html`.

Laid out for a 1,280 x 800 px first screen, without sideways scrolling: the headline (as
summary.json states it, with its bias warning) and the lowest-Dice patients beside the
Dice chart; below them one table row per patient (sortable by any column with a click)
with a strip of up to five small overlays of the slices with the most truth or prediction,
each linking to its full-size overlay; last the protocol. The table shows the overview
metrics (`Metric.overview`) and folds the others; a column that repeats another for every
patient (`Metric.repeats`: volumes without a voxel spacing) is left out. The page needs no
network: no CDN, no external font or script; every picture is a file under the output
folder referenced by a relative path (or, for a chart elsewhere, embedded), loaded
eagerly so that a print or a screenshot has it. The thumbnails are thumbnails.py's.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from urllib.parse import quote

from metrics import Metric, find_metric
from pictures import OVERLAY_REGIONS
from thumbnails import THUMBNAIL_PX
from utils import atomic_write_bytes

REPORT_NAME = "report.html"
CHROMIUM = "/usr/bin/chromium"  # Debian's package (`apt-get install chromium`)
HIDDEN_COLUMNS = ("models",)  # long checkpoint paths: shown in the protocol instead
OVERVIEW_COLUMNS = ("patient", "role", "error")  # with the overview metrics: the columns shown unfolded
WORST_COUNT = 5  # patients in the first screen's lowest-Dice list
WORST_THUMBNAIL_PX = 40
STATUS_HELP = {
    "failed": "the patient could not be predicted; the error is in the last column",
    "unlabelled": "no ground-truth masks: masks written, no metrics",
    "lesion-free": "the truth is empty: Dice is 1.0 when nothing is predicted, else 0.0",
}


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


def repeated_columns(rows: Sequence[dict], columns: Sequence[str]) -> dict[str, str]:
    """{column: the column it repeats} for each registered metric among `columns` whose
    `Metric.repeats` column is among them too and holds the same number for every row (both
    missing or undefined counts as the same): gt_volume and pred_volume when no patient has
    a voxel spacing (volumes in voxels are the voxel counts), lesionwise_dice when every
    patient has one lesion, found, and no false-positive component (it is then the Dice)."""
    repeated = {}
    for name in columns:
        metric = find_metric(name)
        if metric is None or metric.repeats not in columns:
            continue
        if all(_number(r.get(name)) == _number(r.get(metric.repeats)) for r in rows):
            repeated[name] = metric.repeats
    return repeated


def table_columns(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """The columns the table has: `columns` in order, without `HIDDEN_COLUMNS`, without
    those no row has a value for (e.g. `error` when no patient failed) and without those
    that repeat another one for every patient (`repeated_columns`)."""
    repeated = repeated_columns(rows, columns)
    return [
        c
        for c in columns
        if c not in HIDDEN_COLUMNS and c not in repeated and any(r.get(c) not in (None, "") for r in rows)
    ]


def is_overview(name: str) -> bool:
    """Whether a column (or headline metric) is shown unfolded: `OVERVIEW_COLUMNS` and the
    metrics registered with `overview=True`; the rest (slices, pred_pixels, the lesion
    counts, a new metric unless it says otherwise) wait behind a fold."""
    metric = find_metric(name)
    return name in OVERVIEW_COLUMNS or (metric is not None and metric.overview)


def _cell(value, metric: Metric | None = None, folded: bool = False) -> str:
    """One <td>: a number carries its value in `data-v` (what the sort compares) and is
    printed as its registered `metric` says (`Metric.text`: a count without decimals), or, for
    a column that is no metric, a whole number as such and anything else with 3 decimals (1
    from 100 up). An undefined value (hd95 of an empty mask: NaN) shows a dash and, like an
    empty one, sorts last. `folded`: the cell belongs to a column behind the fold."""
    fold = " more" if folded else ""
    number = _number(value)
    if number is not None:
        if metric is not None:
            shown = metric.text(number)
        elif number.is_integer():
            shown = str(int(number))
        else:
            shown = f"{number:.3f}" if abs(number) < 100 else f"{number:.1f}"
        return f'<td class="num{fold}" data-v="{number!r}">{shown}</td>'
    if isinstance(value, float) and math.isnan(value):
        return f'<td class="num{fold}" data-v="" title="undefined: a mask is empty">–</td>'
    text = "" if value is None else str(value)
    attribute = ' class="more"' if folded else ""
    return f'<td{attribute} data-v="{html.escape(text.lower())}">{html.escape(text)}</td>'


def _anchor(patient: str) -> str:
    """The id of a patient's rows in the table (what the lowest-Dice list links to)."""
    return "p-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in patient)


def _thumbnail_link(picture: dict, height: int) -> str:
    """One thumbnail, `height` px tall, linking to its full-size overlay (or to itself). No
    lazy loading: a screenshot or a print shows every thumbnail without scrolling first."""
    truth = "" if picture.get("truth_pixels") is None else f"truth {picture['truth_pixels']} px, "
    label = html.escape(f"slice {picture['slice']}: {truth}predicted {picture['pred_pixels']} px")
    image = f'<img src="{quote(picture["thumbnail"])}" alt="{label}" title="{label}" height="{height}">'
    return f'<a href="{quote(picture.get("overlay") or picture["thumbnail"])}">{image}</a>'


def _strip(row: dict, width: int) -> str:
    """The thumbnail strip of one patient (a row of its own under its numbers, `width` columns
    wide), each thumbnail linking to its full-size overlay."""
    pictures = row.get("pictures") or []
    if not pictures:
        text = "no pictures (failed)" if patient_status(row) == "failed" else "no slice with truth or prediction"
        return f'<tr class="strip"><td class="none" colspan="{width}">{text}</td></tr>'
    strip = "".join(_thumbnail_link(p, THUMBNAIL_PX) for p in pictures)
    return f'<tr class="strip"><td colspan="{width}">{strip}</td></tr>'


def _header(name: str, rows: Sequence[dict]) -> str:
    """One sortable <th>: numeric when a row has a number there; the metric's meaning as its
    tooltip; class `more` when the column is behind the fold."""
    metric = find_metric(name)
    kind = "number" if any(_number(r.get(name)) is not None for r in rows) else "text"
    label = html.escape(name).replace("_", "_<wbr>")  # long names may break after "_"
    about = f"{metric.description}; click to sort" if metric else "click to sort"
    fold = "" if is_overview(name) else ' class="more"'
    return f'<th data-col="{html.escape(name)}" data-type="{kind}"{fold} title="{html.escape(about)}">{label}</th>'


def _patient_rows(row: dict, columns: Sequence[str]) -> str:
    """One patient's <tbody> (what the sort moves): its numbers, then its thumbnail strip."""
    status, patient = patient_status(row), str(row["patient"])
    cells = [f'<td data-v="{html.escape(patient.lower())}">{html.escape(patient)}</td>']
    badge = f'<span class="badge {status}" title="{STATUS_HELP[status]}">{status}</span>' if status else ""
    cells.append(f'<td data-v="{status}">{badge}</td>')
    cells += [_cell(row.get(name), find_metric(name), not is_overview(name)) for name in columns]
    numbers = f'<tr class="{status}" data-patient="{html.escape(patient)}">{"".join(cells)}</tr>'
    return f'<tbody id="{_anchor(patient)}">{numbers}{_strip(row, len(columns) + 2)}</tbody>'


def _table(rows: Sequence[dict], shown: Sequence[str]) -> str:
    """The patient table: one <tbody> per patient; columns that are not `is_overview` carry
    the class `more`, which the stylesheet hides until the fold above the table is opened."""
    columns = [name for name in shown if name != "patient"]
    head = [
        '<th data-col="patient" data-type="text" title="click to sort">patient</th>',
        '<th data-col="status" data-type="text" title="click to sort">status</th>',
    ]
    head += [_header(name, rows) for name in columns]
    groups = "\n".join(_patient_rows(r, columns) for r in rows)
    return f'<table id="patients"><thead><tr>{"".join(head)}</tr></thead>\n{groups}\n</table>'


def _legend() -> str:
    """The thumbnails' colours (the overlays' colour-blind-safe Okabe-Ito fills) as swatches."""
    swatches = "".join(
        f'<span class="swatch" style="background:{colour}"></span>{html.escape(label)} '
        for colour, label in OVERLAY_REGIONS.values()
    )
    return f'<p class="legend">{swatches}</p>'


def _table_section(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The patients: a line on sorting and the colours, the fold that shows every column, a
    note on the columns left out as repeats, and the table (scrolling sideways inside its box
    when all columns are shown on a narrow screen, never the page)."""
    shown = table_columns(rows, columns)
    folded = [name for name in shown if name != "patient" and not is_overview(name)]
    fold = (
        f'<details id="more-columns"><summary>Show all columns: also {html.escape(", ".join(folded))}</summary>'
        "</details>"
        if folded
        else ""
    )
    repeated = repeated_columns(rows, columns)
    note = "; ".join(f"{name} (equals {other} for every patient)" for name, other in repeated.items())
    return (
        '<section id="table"><h2>Patients</h2><p>Click a column header to sort (again to reverse). Under each '
        "patient: the slices with the most truth or prediction; click one for its full-size overlay.</p>"
        f"{_legend()}{fold}"
        + (f'<p class="note">Left out as repeats: {html.escape(note)}.</p>' if note else "")
        + f'<div class="wide">{_table(rows, shown)}</div></section>'
    )


def worst_patients(rows: Sequence[dict], count: int = WORST_COUNT) -> list[dict]:
    """The up to `count` scored patients with the lowest Dice, lowest first (ties by patient
    id); failed and unlabelled patients have no Dice to rank."""
    scored = [r for r in rows if not r.get("error") and _number(r.get("dice")) is not None]
    return sorted(scored, key=lambda r: (_number(r["dice"]), str(r["patient"])))[:count]


def _worst(rows: Sequence[dict]) -> str:
    """The lowest-Dice block of the first screen: patient (a link to its table row), role,
    Dice, hd95 and the thumbnail of its slice with the most truth or prediction."""
    lines = []
    for r in worst_patients(rows):
        patient = str(r["patient"])
        pictures = r.get("pictures") or []
        largest = max(pictures, key=lambda p: (p.get("truth_pixels") or 0) + p["pred_pixels"], default=None)
        cells = [
            f'<a href="#{_anchor(patient)}">{html.escape(patient)}</a>',
            html.escape(str(r.get("role") or "")),
            _figure_text(_number(r["dice"]), 3),
            _figure_text(_number(r.get("hd95")), 3, find_metric("hd95")),
            _thumbnail_link(largest, WORST_THUMBNAIL_PX) if largest else "",
        ]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    failed = sum(1 for r in rows if patient_status(r) == "failed")
    note = f'<p class="failed">{failed} patient(s) failed: the red rows of the table.</p>' if failed else ""
    table = (
        '<table class="small"><tr><th>patient</th><th>role</th><th>Dice</th><th>hd95</th><th></th></tr>'
        + "".join(lines)
        + "</table>"
        if lines
        else "<p>no patient scored</p>"
    )
    return f'<section id="worst"><h2>Lowest Dice</h2>{note}{table}</section>'


def _figure_text(value: float | None, digits: int = 4, metric: Metric | None = None) -> str:
    """A summary statistic: a dash when undefined, else as `metric` prints it (a count
    without decimals), else with `digits` decimals."""
    if value is None:
        return "–"
    return metric.text(value, digits) if metric is not None else f"{value:.{digits}f}"


def _statistics_table(metrics: dict, names: Sequence[str]) -> str:
    """The mean and median of each of `names` (summary.json's `metrics` dict), printed as the
    registry says (a count without decimals)."""
    rows = []
    for name in names:
        metric = find_metric(name)
        mean, median = (_figure_text(metrics[name][key], metric=metric) for key in ("mean", "median"))
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{mean}</td><td>{median}</td></tr>")
    return f'<table class="small"><tr><th>metric</th><th>mean</th><th>median</th></tr>{"".join(rows)}</table>'


def _counts(summary: dict) -> str:
    """The headline's last lines: patients predicted, labelled, failed, lesion-free, with
    undefined hd95, the units, and the Dice per role."""
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
        f"{role}: {stats['labelled']} of {stats['count']} scored, Dice mean "
        f"{_figure_text(stats['metrics']['dice']['mean'])}"
        for role, stats in summary.get("by_role", {}).items()
    )
    return f'<p class="counts">{html.escape("; ".join(counts))}. By role: {html.escape(by_role or "none")}.</p>'


def _headline(summary: dict, left_out: Collection[str] = ()) -> str:
    """The headline block: Dice over test + unseen (or, with the warning, over the biased
    roles summary.json names), the overview metrics' mean and median (the others folded;
    `left_out`: metrics the table leaves out as repeats), then the counts."""
    head = summary["headline"]
    dice = head["metrics"]["dice"]
    scope = " + ".join(head["roles"])
    if dice["mean"] is None:
        text = '<p class="figure">no labelled patient scored (no Dice)</p>'
    else:
        text = (
            f'<p class="figure">Dice mean <b>{dice["mean"]:.4f}</b>, median <b>{dice["median"]:.4f}</b> '
            f"over {head['count']} patient(s)</p>"
        )
    notes = ([head["note"]] if head.get("biased") else []) + list(summary.get("warnings", []))
    warning = "".join(f'<p class="warning"><b>WARNING:</b> {html.escape(note)}</p>' for note in notes)
    names = [name for name in head["metrics"] if name not in left_out]
    rest = [name for name in names if not is_overview(name)]
    more = (
        f"<details><summary>the other metrics: {html.escape(', '.join(rest))}</summary>"
        f"{_statistics_table(head['metrics'], rest)}</details>"
        if rest
        else ""
    )
    overview = _statistics_table(head["metrics"], [name for name in names if is_overview(name)])
    return (
        f'<section id="headline"><h2>Headline ({html.escape(scope)})</h2>{text}{warning}'
        f"{overview}{more}{_counts(summary)}</section>"
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
    """The Dice chart in a box of the first screen's height (it scrolls inside when there
    are many patients; a click opens it full size). By a relative path when it lies under
    `out_dir`, else embedded."""
    if figure_path is None or not Path(figure_path).is_file():
        return '<section id="chart"><h2>Dice per patient</h2><p>no labelled patient: no chart</p></section>'
    figure = Path(figure_path).resolve()
    alt = "Dice per patient, sorted"
    try:
        source = quote(figure.relative_to(out_dir.resolve()).as_posix())
        image = f'<a href="{source}"><img class="chart" src="{source}" alt="{alt}" title="click: full size"></a>'
    except ValueError:  # --figure-path outside --output-dir: embedded, the page stays one folder
        source = "data:image/png;base64," + base64.b64encode(figure.read_bytes()).decode()
        image = f'<img class="chart" src="{source}" alt="{alt}">'
    return f'<section id="chart"><h2>Dice per patient</h2><div class="chart-box">{image}</div></section>'


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0.8em 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 0.2em; }
h2 { font-size: 1.2em; margin: 1.2em 0 0.4em; border-bottom: 1px solid #ddd; }
.intro { margin: 0 0 0.6em; font-size: 0.9em; color: #555; }
.top { display: grid; grid-template-columns: minmax(0, 470px) minmax(0, 1fr); gap: 0 1.5em; align-items: start; }
.top h2 { margin-top: 0.3em; }
@media (max-width: 900px) { .top { grid-template-columns: minmax(0, 1fr); } }
.figure { font-size: 1.15em; margin: 0.3em 0; }
.counts { font-size: 0.85em; color: #444; margin: 0.4em 0; }
.warning { background: #fff3cd; border: 1px solid #e0a800; padding: 0.4em 0.6em; margin: 0.4em 0; font-size: 0.9em; }
details summary { cursor: pointer; color: #0b5394; font-size: 0.9em; }
table { border-collapse: collapse; }
table.small { font-size: 0.9em; }
table.small th { text-align: left; padding-right: 1em; font-weight: 600; vertical-align: top; }
table.small td { padding: 1px 1em 1px 0; vertical-align: middle; }
#worst img { display: block; border: 1px solid #ccc; } #worst .failed { color: #b00020; margin: 0.2em 0; }
.chart-box { max-height: 640px; overflow-y: auto; border: 1px solid #eee; }
img.chart { display: block; width: 100%; height: auto; }
.wide { overflow-x: auto; max-width: 100%; }
.legend { font-size: 0.9em; } .note { font-size: 0.85em; color: #555; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.6em; vertical-align: -0.1em; }
#patients th { position: sticky; top: 0; background: #f4f4f4; cursor: pointer; padding: 4px 6px; }
#patients th[aria-sort="ascending"]::after { content: " \\25B2"; }
#patients th[aria-sort="descending"]::after { content: " \\25BC"; }
#patients { font-size: 0.9em; }
#patients .more { display: none; }
#more-columns[open] ~ .wide #patients .more { display: table-cell; }
#patients tbody { border-top: 1px solid #d0d0d0; }
#patients td { padding: 3px 6px; vertical-align: middle; }
#patients td.num { text-align: right; font-variant-numeric: tabular-nums; }
#patients tr.failed { background: #fde2e2; }
#patients tr.unlabelled { background: #eef4fb; }
.badge { border-radius: 3px; padding: 0 4px; font-size: 0.85em; color: white; white-space: nowrap; }
.badge.failed { background: #b00020; } .badge.unlabelled { background: #0072B2; }
.badge.lesion-free { background: #555; }
tr.strip td { padding-bottom: 8px; }
tr.strip img { margin-right: 3px; border: 1px solid #ccc; }
tr.strip td.none { color: #777; font-size: 0.9em; }
@media print { .chart-box { max-height: none; overflow: visible; } #patients tbody { break-inside: avoid; } }
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
    `table_columns` shows those with values; figure_path: the Dice chart PNG or None.

    The first screen (1,280 x 800 px) holds the headline and the lowest-Dice patients beside
    the Dice chart; below them the patient table, then the protocol."""
    title = f"Prediction report: {len(rows)} patient(s)"
    generated = time.strftime("%Y-%m-%d %H:%M")
    left_out = repeated_columns(rows, columns)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="intro">Written by predict.py on {generated} into {html.escape(str(out_dir))}; the same '
            'numbers are in <a href="metrics.csv">metrics.csv</a> and <a href="summary.json">summary.json</a>.</p>',
            f'<div class="top"><div>{_headline(summary, left_out)}{_worst(rows)}</div>',
            f"{_chart(out_dir, figure_path)}</div>",
            _table_section(rows, columns),
            _protocol(summary.get("protocol", {})),
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


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 800) -> Path:
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

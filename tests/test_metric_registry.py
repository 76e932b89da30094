"""metrics.REGISTRY is the one place a per-patient metric is declared: a metric added there
alone reaches metrics.csv, summary.json and report.html; counts print as whole numbers."""

import ast
import csv
import json
import re

import numpy as np
import pytest
from test_design import repo_sources
from test_predict import run_predict

import metrics
import predict
import report
from summary import summarize

# metrics.csv's metric columns before the registry existed: their order is part of the format
COLUMNS_BEFORE = [
    "dice",
    "precision",
    "recall",
    "hd95",
    "gt_pixels",
    "pred_pixels",
    "gt_volume",
    "pred_volume",
    "volume_error",
    "gt_lesions",
    "lesion_tp",
    "lesion_fn",
    "lesion_fp",
    "lesion_f1",
    "lesionwise_dice",
]


def cells_by_column(page: str) -> dict[str, dict[str, str]]:
    """report.html's patient table as {patient: {column: shown text}}."""
    columns = re.findall(r'<th data-col="([^"]+)"', page)
    table = {}
    for patient, cells in re.findall(r'<tr class="[^"]*" data-patient="([^"]+)">(.*?)</tr>', page):
        shown = re.findall(r"<td[^>]*>(.*?)</td>", cells)
        assert len(shown) == len(columns), patient
        table[patient] = dict(zip(columns, shown, strict=True))
    return table


def headline_cells(page: str) -> dict[str, tuple[str, str]]:
    """The headline block's metric table as {metric: (mean text, median text)}."""
    start = page.index('<section id="headline">')
    block = page[start : page.index("</section>", start)]
    return {
        name: (mean, median)
        for name, mean, median in re.findall(r"<tr><th>(\w+)</th><td>([^<]*)</td><td>([^<]*)</td></tr>", block)
    }


def test_the_registry_keeps_the_columns_and_their_order():
    assert metrics.metric_names() == COLUMNS_BEFORE
    assert predict.csv_columns() == ["patient", "slices", "role", *COLUMNS_BEFORE, "spacing", "models", "error"]
    truth = np.zeros((5, 12, 12), bool)
    truth[1:4, 3:8, 3:8] = True
    assert list(metrics.patient_metrics(np.roll(truth, 2, axis=2), truth)) == COLUMNS_BEFORE


def test_a_metric_registered_in_metrics_py_alone_reaches_csv_summary_and_report(
    trained_checkpoint, phantom_dir, tmp_path, monkeypatch
):
    def overlap(prediction, truth, **_):
        return {"toy_overlap": int(np.logical_and(prediction, truth).sum())}

    toy = metrics.Metric("toy_overlap", "count", "voxels both predicted and true (a test metric)")
    monkeypatch.setattr(metrics, "REGISTRY", (*metrics.REGISTRY, metrics.MetricGroup(overlap, (toy,))))
    summary = run_predict([trained_checkpoint], phantom_dir, tmp_path, "--no-cache", "--no-overlays")

    with (tmp_path / "metrics.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == [
        "patient",
        "slices",
        "role",
        *COLUMNS_BEFORE,
        "toy_overlap",
        "spacing",
        "models",
        "error",
    ]
    assert rows and all(r["toy_overlap"] != "" for r in rows)
    for r in rows:  # Dice = 2 overlap / (truth + prediction): the overlap, independently
        expected = float(r["dice"]) * (int(r["gt_pixels"]) + int(r["pred_pixels"])) / 2
        assert int(r["toy_overlap"]) == round(expected), r["patient"]
    values = [int(r["toy_overlap"]) for r in rows]

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))  # the returned summary is the written one
    stats = on_disk["metrics"]["toy_overlap"]
    assert stats["mean"] == pytest.approx(np.mean(values)) and stats["median"] == pytest.approx(np.median(values))
    assert on_disk["headline"]["metrics"]["toy_overlap"]["mean"] == pytest.approx(np.mean(values))  # val patients
    assert on_disk["by_role"]["val"]["metrics"]["toy_overlap"]["median"] == pytest.approx(np.median(values))
    assert list(on_disk["metrics"]) == [*COLUMNS_BEFORE, "toy_overlap"]

    page = (tmp_path / "report.html").read_text()
    assert 'data-col="toy_overlap"' in page and "voxels both predicted and true (a test metric)" in page
    table = cells_by_column(page)
    assert {p: table[p]["toy_overlap"] for p in table} == {r["patient"]: str(int(r["toy_overlap"])) for r in rows}
    assert "toy_overlap" in headline_cells(page)


def test_counts_render_without_decimals_in_the_report(tmp_path):
    as_read = {"slices": "10", "role": "test", "dice": "0.85", "precision": "0.9", "recall": "0.8", "hd95": "3.5"}
    rows = [  # one patient as metrics.csv gives it back (strings), one with float counts
        {"patient": "P_csv", **as_read, "gt_pixels": "25968", "pred_pixels": "0", "gt_volume": "25968.0"},
        {"patient": "P_float", **as_read, "gt_pixels": 25969.0, "pred_pixels": 12.0, "lesion_tp": np.int64(2)},
    ]
    summary = summarize([dict(r, dice=0.85, hd95=3.5) for r in rows], {})
    page = report.render_report(rows, summary, predict.csv_columns(), tmp_path)
    table = cells_by_column(page)
    assert table["P_csv"]["gt_pixels"] == "25968" and table["P_csv"]["pred_pixels"] == "0"
    assert table["P_float"]["gt_pixels"] == "25969" and table["P_float"]["lesion_tp"] == "2"
    assert table["P_csv"]["dice"] == "0.850" and table["P_csv"]["gt_volume"] == "25968.0"  # other kinds as before
    assert table["P_csv"]["hd95"] == "3.500"
    assert 'data-v="25968.0">25968<' in page  # the sort still compares the number
    head = headline_cells(page)
    assert head["gt_pixels"] == ("25968.5", "25968.5")  # a mean of counts keeps its half
    assert head["pred_pixels"] == ("6", "6") and head["lesion_tp"] == ("2", "2")
    assert head["dice"] == ("0.8500", "0.8500")  # scores keep 4 decimals
    assert not re.search(r">\d+\.0000<", page)


def test_a_group_must_return_what_it_registers(monkeypatch):
    wrong = metrics.MetricGroup(lambda prediction, truth, **_: {"other": 1}, (metrics.Metric("toy", "count", "-"),))
    monkeypatch.setattr(metrics, "REGISTRY", (*metrics.REGISTRY, wrong))
    with pytest.raises(ValueError, match="other.*registered as.*toy"):
        metrics.patient_metrics(np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4), bool))
    with pytest.raises(ValueError, match="kind 'percent'"):
        metrics.Metric("toy", "percent", "-")


def test_one_definition_of_the_headline_roles():
    """summary.py alone defines HEADLINE_ROLES, ROLES and BIAS (predict.py and pictures.py read
    them there), and no module but metrics.py lists metric columns."""
    defined = {}
    for module, text in repo_sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        defined.setdefault(target.id, []).append(module)
    assert {name: defined.get(name) for name in ("HEADLINE_ROLES", "ROLES", "BIAS")} == {
        "HEADLINE_ROLES": ["summary"],
        "ROLES": ["summary"],
        "BIAS": ["summary"],
    }
    assert defined.get("REGISTRY") == ["metrics"]
    for stale in ("METRIC_COLUMNS", "LESION_COLUMNS", "VOLUME_COLUMNS", "TABLE_COLUMNS"):
        assert stale not in defined, (stale, defined.get(stale))

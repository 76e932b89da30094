"""report.html: what it shows (hand-made rows), and the page in a real headless Chromium.

The browser tests need Debian's chromium (/usr/bin/chromium) and the playwright package
(`.ci/run` installs both). Without them they fail under CI (CI=true), and are skipped with
the reason elsewhere.
"""

import csv
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import browser_missing
from matplotlib.colors import to_rgb

import predict
import report
import thumbnails
from metrics import patient_metrics
from pictures import plot_dice_distribution
from summary import summarize

# ------------------------------------------------------------------------ the page


def hand_made_rows() -> list[dict]:
    lesion = {"slices": 10, "precision": 0.9, "recall": 0.8, "gt_pixels": 400, "pred_pixels": 360}
    return [
        {"patient": "P_lesion", "role": "test", "dice": 0.85, "hd95": 3.5, **lesion},
        {"patient": "P_free", "role": "test", "dice": 1.0, "hd95": float("nan"), **lesion, "gt_pixels": 0},
        {"patient": "P_zero", "role": "val", "dice": 0.0, "hd95": float("nan"), **lesion, "pred_pixels": 0},
        {"patient": "P_unlabelled", "slices": 8, "role": "unseen"},
        {"patient": "P_failed", "slices": 8, "role": "test", "error": "P_failed/P_failed_3.tif: not a TIFF <b>"},
    ]


def test_report_shows_headline_protocol_table_and_marks(tmp_path):
    rows = hand_made_rows()
    summary = summarize(rows, {"checkpoints": ["a/best_model.pt"], "threshold": 0.5, "hd95_units": "pixels"})
    text = report.render_report(rows, summary, predict.csv_columns(), tmp_path, figure_path=None)
    dice = summary["headline"]["metrics"]["dice"]
    assert f"Dice mean <b>{dice['mean']:.4f}</b>, median <b>{dice['median']:.4f}</b> over 2 patient(s)" in text
    assert "WARNING" not in text  # test patients were scored: no bias note
    assert f"units: hd95 in {summary['units']['hd95']}, volume in {summary['units']['volume']}" in text
    for key in ("checkpoints", "threshold", "hd95_units"):
        assert f"<th>{key}</th>" in text
    body = text[text.index("<tbody") : text.rindex("</tbody>")]
    marks = {patient: status for status, patient in re.findall(r'<tr class="([^"]*)" data-patient="([^"]+)">', body)}
    assert marks == {"P_lesion": "", "P_free": "lesion-free", "P_zero": "", "P_unlabelled": "unlabelled"} | {
        "P_failed": "failed"
    }
    assert "not a TIFF &lt;b&gt;" in body and "<b>" not in body  # the error shown, escaped
    assert 'data-v="0.85">0.850<' in body and 'data-v="" title="undefined: a mask is empty">–<' in body  # NaN hd95
    assert ">models<" not in text and ">error<" in text  # error column only because a patient failed
    assert not re.search(r"""(src|href)=["']?(https?:)?//|@import|url\(|<link""", text)  # nothing from the network


def test_report_warns_exactly_as_the_summary_does(tmp_path):
    rows = [dict(r, role="val") for r in hand_made_rows()[:2]]
    summary = summarize(rows, {})
    text = report.render_report(rows, summary, predict.csv_columns(), tmp_path)
    assert summary["headline"]["biased"]
    assert f"<b>WARNING:</b> {summary['headline']['note']}" in text


def scored_rows(spacing=None, lesions: int = 1) -> list[dict]:
    """Three patients scored by `patient_metrics`: each truth holds `lesions` lesions, and
    the prediction finds them all, shifted by a voxel or two (no false positive)."""
    rows = []
    for i in range(3):
        truth = np.zeros((6, 48, 32), bool)
        for k in range(lesions):  # 20 rows apart: separate lesions; of different widths
            truth[1:5, 4 + 20 * k : 10 + 20 * k + i, 4 : 10 + 6 * k] = True
        prediction = np.roll(truth, 1 + i % 2, axis=2)
        metrics = patient_metrics(prediction, truth, spacing)
        rows.append({"patient": f"P{i}", "slices": 6, "role": "test", **metrics})
    return rows


def test_volume_columns_only_when_a_voxel_spacing_makes_them_differ(tmp_path):
    """Without a spacing (TIFF) a volume is the voxel count: gt_volume and pred_volume repeat
    gt_pixels and pred_pixels and are left out, with a note; with a spacing (NIfTI) they stay."""
    without = scored_rows()
    assert report.repeated_columns(without, predict.csv_columns()) == {
        "gt_volume": "gt_pixels",
        "pred_volume": "pred_pixels",
        "lesionwise_dice": "dice",
    }
    shown = report.table_columns(without, predict.csv_columns())
    assert "gt_volume" not in shown and "pred_volume" not in shown and "gt_pixels" in shown
    page = report.render_report(without, summarize(without, {}), predict.csv_columns(), tmp_path)
    assert 'data-col="gt_volume"' not in page and "gt_volume (equals gt_pixels for every patient)" in page
    assert "<th>gt_volume</th>" not in page  # nor in the headline's statistics

    with_spacing = scored_rows(spacing=(5.0, 0.5, 0.5))  # (slice, row, col) mm: 1.25 mm3 a voxel
    shown = report.table_columns(with_spacing, predict.csv_columns())
    assert {"gt_volume", "pred_volume", "gt_pixels", "pred_pixels"} <= set(shown)
    page = report.render_report(with_spacing, summarize(with_spacing, {}), predict.csv_columns(), tmp_path)
    assert 'data-col="gt_volume"' in page and "gt_volume (equals" not in page


def test_lesionwise_dice_is_left_out_only_where_it_is_the_dice_of_every_patient():
    one_lesion = scored_rows()
    assert all(r["lesionwise_dice"] == r["dice"] for r in one_lesion)
    assert "lesionwise_dice" not in report.table_columns(one_lesion, predict.csv_columns())
    two_lesions = scored_rows(lesions=2)
    assert any(r["lesionwise_dice"] != r["dice"] for r in two_lesions)
    assert "lesionwise_dice" in report.table_columns(two_lesions, predict.csv_columns())
    one_differs = [*one_lesion[:2], two_lesions[2]]  # one patient is enough to keep the column
    assert "lesionwise_dice" in report.table_columns(one_differs, predict.csv_columns())


def test_secondary_columns_are_folded_and_the_overview_ones_are_not(tmp_path):
    rows = scored_rows(lesions=2)
    page = report.render_report(rows, summarize(rows, {}), predict.csv_columns(), tmp_path)
    folded = set(re.findall(r'<th data-col="(\w+)" data-type="\w+" class="more"', page))
    assert folded == {"slices", "pred_pixels", "gt_lesions", "lesion_tp", "lesion_fn", "lesion_fp"}
    header = re.findall(r'<th data-col="(\w+)"', page)
    assert [c for c in header if c not in folded] == [
        *("patient", "status", "role", "dice", "precision", "recall", "hd95", "gt_pixels"),
        *("volume_error", "lesion_f1", "lesionwise_dice"),
    ]
    first = re.search(r'<tr class="" data-patient="P0">(.*?)</tr>', page).group(1)
    assert len(re.findall(r'<td class="num more"', first)) == len(folded)  # every cell of a folded column too
    assert '<details id="more-columns"><summary>Show all columns: also slices, pred_pixels' in page


def test_the_lowest_dice_list_ranks_scored_patients_only():
    rows = [
        {"patient": "B", "dice": 0.5},
        {"patient": "A", "dice": 0.5},
        {"patient": "C", "dice": "0.2"},  # as metrics.csv gives it back
        {"patient": "D", "dice": 0.9},
        {"patient": "E"},  # unlabelled
        {"patient": "F", "error": "unreadable"},  # failed
    ]
    assert [r["patient"] for r in report.worst_patients(rows)] == ["C", "A", "B", "D"]
    assert [r["patient"] for r in report.worst_patients(rows, count=2)] == ["C", "A"]


def test_strip_slices_are_the_largest_truth_or_prediction_slices():
    rng = np.random.default_rng(0)
    prediction = rng.random((12, 8, 8)) > 0.9
    truth = rng.random((12, 8, 8)) > 0.85
    prediction[3], truth[3] = False, False  # an empty slice is never shown
    area = (prediction | truth).sum(axis=(1, 2))
    expected = sorted(sorted(range(12), key=lambda s: (-area[s], s))[:5])  # brute force
    assert thumbnails.strip_slices(prediction, truth) == expected
    assert thumbnails.strip_slices(prediction[:1] & False, None) == []
    only = np.zeros((4, 8, 8), bool)
    only[2, :2, :2] = True
    assert thumbnails.strip_slices(only, None) == [2]  # unlabelled: the prediction alone


def test_palette_thumbnails_keep_the_region_colours(tmp_path):
    from skimage.io import imread

    from pictures import OVERLAY_REGIONS, thumbnail

    rng = np.random.default_rng(1)
    truth, prediction = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    truth[20:44, 10:40], prediction[20:44, 25:55] = True, True
    rgb = thumbnail(rng.random((64, 64)), prediction, truth, size=64)  # noisy tissue: many colours
    thumbnails.save_thumbnail(rgb, tmp_path / "t.png")
    back = imread(tmp_path / "t.png")[..., :3].astype(int)
    assert back.shape == rgb.shape and np.abs(back - rgb).mean() < 4  # 256 colours, no dithering
    for (row, col), region in {(32, 15): "truth_only", (32, 32): "agreement", (32, 48): "prediction_only"}.items():
        hue = np.sign(np.diff(np.array(to_rgb(OVERLAY_REGIONS[region][0]))))  # which channel is larger
        patch = back[row - 2 : row + 3, col - 2 : col + 3].mean(axis=(0, 1))
        assert (np.sign(np.diff(patch)) == hue).all(), region  # still reads as its colour


# ------------------------------------------------------------------------ the browser


def browser_or_skip() -> None:
    """Skip without Chromium or playwright, except under CI, where that is a failure."""
    missing = browser_missing()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"browser test under CI: {missing}")
    if missing:
        pytest.skip(missing)


@pytest.fixture(scope="module")
def browser():
    browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=report.CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


SCREEN = {"width": 1280, "height": 800}  # the first screen of a laptop


def open_offline(browser, page_path: Path):
    """The page in a new tab of `SCREEN`'s size; every request is recorded, and any that is
    not file: refused."""
    page = browser.new_page(viewport=SCREEN)
    requests: list[str] = []

    def handle(route):
        requests.append(route.request.url)
        route.continue_() if route.request.url.startswith("file:") else route.abort()

    page.route("**/*", handle)
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    return page, requests


def column(page, index: int) -> list[str]:
    return page.eval_on_selector_all("#patients tr[data-patient]", f"rows => rows.map(r => r.cells[{index}].dataset.v)")


def header_index(page, name: str) -> int:
    return page.eval_on_selector(f'#patients th[data-col="{name}"]', "th => th.cellIndex")


def check_first_screen(page) -> None:
    """What a reader sees without scrolling at 1,280 x 800: no sideways scroll (also with every
    column shown), every thumbnail loaded (none waits to be scrolled to: a screenshot or a
    print has them), and the headline, the Dice chart and the lowest-Dice list begin on it."""
    width = "() => document.documentElement.scrollWidth"
    assert page.evaluate(width) <= SCREEN["width"], f"{page.evaluate(width)} px wide"
    table = page.eval_on_selector(".wide", "box => [box.scrollWidth, box.clientWidth]")
    assert table[0] <= table[1], f"the table needs {table[0]} px, its box has {table[1]}"  # nor inside its box
    assert page.evaluate("() => window.scrollY") == 0
    thumbnails = page.eval_on_selector_all(
        "img[src^='thumbnails/']", "images => images.map(i => i.complete && i.naturalWidth > 0)"
    )
    assert thumbnails and all(thumbnails), f"{thumbnails.count(False)} of {len(thumbnails)} thumbnails not loaded"
    for block in ("#headline", "#chart", "#worst"):
        top = page.eval_on_selector(block, "e => e.getBoundingClientRect().top")
        assert top < SCREEN["height"], f"{block} begins at {top} px"
    folded = '#patients th[data-col="lesion_fp"]'
    assert not page.is_visible(folded)
    page.click("#more-columns summary")  # every column shown: the table's box scrolls, never the page
    assert page.is_visible(folded) and page.evaluate(width) <= SCREEN["width"], f"{page.evaluate(width)} px"
    page.click("#more-columns summary")


def test_report_of_a_phantom_run_in_chromium(browser, trained_checkpoint, phantom_dir, tmp_path):
    out = tmp_path / "pred"
    arguments = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--output-dir", str(out)]
    predict.main([*arguments, "--no-cache", "--no-overlays", "--backend", "torch"])
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    page, requests = open_offline(browser, out / "report.html")
    check_first_screen(page)
    shown = page.eval_on_selector_all("#patients tr[data-patient]", "rows => rows.map(r => r.dataset.patient)")
    assert sorted(shown) == sorted(r["patient"] for r in rows) and len(rows) == 3  # the validation patients

    page.click('#patients th[data-col="dice"]')
    dice = [float(v) for v in column(page, header_index(page, "dice"))]
    assert dice == sorted(float(r["dice"]) for r in rows)
    page.click('#patients th[data-col="patient"]')
    page.click('#patients th[data-col="patient"]')  # twice: descending
    assert page.eval_on_selector_all(
        "#patients tr[data-patient]", "rows => rows.map(r => r.dataset.patient)"
    ) == sorted(shown, reverse=True)
    assert all(url.startswith("file:") for url in requests) and any("thumbnails/" in url for url in requests)
    page.close()


def page_bytes(page: Path) -> int:
    """What a browser loads to show `page` in full: the HTML plus every local file its
    `src=` attributes name (thumbnails, the chart; not the linked full-size overlays)."""
    text = page.read_text(encoding="utf-8")
    sources = {unquote(s) for s in re.findall(r'src="([^"]+)"', text) if not s.startswith("data:")}
    return len(text.encode("utf-8")) + sum(os.path.getsize(page.parent / s) for s in sources)


def synthetic_report(folder: Path, patients: int = 110) -> Path:
    """A report of `patients` patients with five 96-px thumbnails each, drawn from noise
    (the worst case for PNG compression: a real slice compresses better)."""
    images = np.random.default_rng(0).random((6, 96, 96, 3)).astype(np.float32)  # drawn 1:1
    rows = []
    for i in range(patients):
        truth = np.zeros((6, 96, 96), bool)
        truth[1:, 30 : 31 + i % 40, 20:60] = True  # five slices with a lesion of 40 to 1600 pixels
        prediction = np.roll(truth, 3, axis=2)
        patient = f"TCGA_XX_{i:04d}"
        pictures = thumbnails.write_thumbnails(patient, images, prediction, truth, range(2, 8), folder)
        rows.append({"patient": patient, "slices": 6, "role": "test", **patient_metrics(prediction, truth)})
        rows[-1]["pictures"] = pictures
    plot_dice_distribution(rows, folder / "dice_distribution.png")
    summary = summarize(rows, {"checkpoints": ["best_model.pt"]})
    return report.write_report(rows, summary, folder, predict.csv_columns(), folder / "dice_distribution.png")


PAINTED = "() => performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint').startTime"


def test_a_110_patient_report_is_small_and_opens_fast(browser, tmp_path):
    page_path = synthetic_report(tmp_path)
    weight = page_bytes(page_path)
    assert len(list((tmp_path / "thumbnails").iterdir())) == 550
    assert weight < 10 * 2**20, f"{weight / 2**20:.1f} MiB"
    start = time.perf_counter()
    page, requests = open_offline(browser, page_path)
    seconds = time.perf_counter() - start
    painted = page.evaluate(PAINTED) / 1000
    assert page.eval_on_selector_all("#patients tr[data-patient]", "rows => rows.length") == 110
    assert painted < 2.0, f"{painted:.2f} s to the first paint"
    assert seconds < 5.0, f"{seconds:.2f} s to the load event (all 550 thumbnails, each through the route check)"
    assert all(url.startswith("file:") for url in requests)
    check_first_screen(page)

    truth = [float(v) for v in column(page, header_index(page, "gt_pixels"))]
    page.click('#patients th[data-col="gt_pixels"]')
    assert [float(v) for v in column(page, header_index(page, "gt_pixels"))] == sorted(truth)
    page.click('#patients th[data-col="gt_pixels"]')  # again: descending
    assert [float(v) for v in column(page, header_index(page, "gt_pixels"))] == sorted(truth, reverse=True)
    strips = page.eval_on_selector_all(  # each strip moved with its patient's numbers
        "#patients tbody", "groups => groups.map(g => [g.rows[0].dataset.patient, g.rows[1].querySelector('img').src])"
    )
    assert all(f"/thumbnails/{patient}_" in source for patient, source in strips)
    page.close()

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
    body = text[text.index("<tbody>") : text.rindex("</tbody>")]
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


def test_strip_slices_are_the_largest_truth_or_prediction_slices():
    rng = np.random.default_rng(0)
    prediction = rng.random((12, 8, 8)) > 0.9
    truth = rng.random((12, 8, 8)) > 0.85
    prediction[3], truth[3] = False, False  # an empty slice is never shown
    area = (prediction | truth).sum(axis=(1, 2))
    expected = sorted(sorted(range(12), key=lambda s: (-area[s], s))[:5])  # brute force
    assert report.strip_slices(prediction, truth) == expected
    assert report.strip_slices(prediction[:1] & False, None) == []
    only = np.zeros((4, 8, 8), bool)
    only[2, :2, :2] = True
    assert report.strip_slices(only, None) == [2]  # unlabelled: the prediction alone


def test_palette_thumbnails_keep_the_region_colours(tmp_path):
    from skimage.io import imread

    from pictures import OVERLAY_REGIONS, thumbnail

    rng = np.random.default_rng(1)
    truth, prediction = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    truth[20:44, 10:40], prediction[20:44, 25:55] = True, True
    rgb = thumbnail(rng.random((64, 64)), prediction, truth, size=64)  # noisy tissue: many colours
    report.save_thumbnail(rgb, tmp_path / "t.png")
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


def open_offline(browser, page_path: Path):
    """The page in a new tab; every request is recorded, and any that is not file: refused."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
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


def test_report_of_a_phantom_run_in_chromium(browser, trained_checkpoint, phantom_dir, tmp_path):
    out = tmp_path / "pred"
    arguments = ["--model-path", str(trained_checkpoint), "--data-dir", str(phantom_dir), "--output-dir", str(out)]
    predict.main([*arguments, "--no-cache", "--no-overlays", "--backend", "torch"])
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    page, requests = open_offline(browser, out / "report.html")
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
    page.locator("#patients tr.strip img").first.scroll_into_view_if_needed()  # lazy: loaded once in view
    page.wait_for_function("() => document.querySelector('#patients tr.strip img').naturalWidth > 0", timeout=5000)
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
        pictures = report.write_thumbnails(patient, images, prediction, truth, range(2, 8), folder)
        rows.append({"patient": patient, "slices": 6, "role": "test", **patient_metrics(prediction, truth)})
        rows[-1]["pictures"] = pictures
    plot_dice_distribution(rows, folder / "dice_distribution.png")
    summary = summarize(rows, {"checkpoints": ["best_model.pt"]})
    return report.write_report(rows, summary, folder, predict.csv_columns(), folder / "dice_distribution.png")


def test_a_110_patient_report_is_small_and_opens_fast(browser, tmp_path):
    page_path = synthetic_report(tmp_path)
    weight = page_bytes(page_path)
    assert len(list((tmp_path / "thumbnails").iterdir())) == 550
    assert weight < 10 * 2**20, f"{weight / 2**20:.1f} MiB"
    start = time.perf_counter()
    page, requests = open_offline(browser, page_path)
    seconds = time.perf_counter() - start
    assert page.eval_on_selector_all("#patients tr[data-patient]", "rows => rows.length") == 110
    assert seconds < 2.0, f"{seconds:.2f} s to the load event"
    assert all(url.startswith("file:") for url in requests)
    page.close()

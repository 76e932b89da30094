"""predict.OverlayWriters: overlays drawn in worker processes are the in-line ones, a worker's
failure lands in its patient's row, and the workers end with the run."""

from __future__ import annotations

import argparse

import numpy as np

import predict
from dataset import discover_inputs, read_volume


def overlay_job(patient, out_dir):
    images, truth = read_volume(patient)
    prediction = np.roll(truth, 2, axis=2)  # a prediction that differs from the truth
    return patient, images, prediction, truth, out_dir, 0.5


def test_workers_write_the_in_line_overlays_and_report_a_failure(small_phantom, tmp_path):
    patients = [p for p in discover_inputs(small_phantom)]
    in_line, forked = tmp_path / "in_line", tmp_path / "forked"
    writers = predict.OverlayWriters(0)
    for patient in patients:
        writers.submit({}, *overlay_job(patient, in_line))
    assert writers.close() is False

    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    rows = [{"patient": p.patient_id, "role": "test", "dice": 0.5} for p in patients]
    writers = predict.OverlayWriters(2, max_pending=1)  # max_pending 1: submit waits for the previous one
    for row, patient in zip(rows, patients):
        writers.submit(row, *overlay_job(patient, blocked if row is rows[1] else forked))
    workers = list(writers.pool._processes.values())
    assert writers.close() is True
    assert all(not worker.is_alive() for worker in workers)  # shut down with the run

    assert "error" not in rows[0] and "error" not in rows[2]
    assert rows[1] == {"patient": patients[1].patient_id, "role": "test", "error": rows[1]["error"]}
    assert rows[1]["error"].startswith("overlays: NotADirectoryError")  # not scored, as a failure in line
    expected = sorted(p.name for p in (in_line / "overlays").glob(f"{patients[0].patient_id}_*.png"))
    expected += sorted(p.name for p in (in_line / "overlays").glob(f"{patients[2].patient_id}_*.png"))
    written = sorted(p.name for p in (forked / "overlays").glob("*.png"))
    assert written == sorted(expected) and written
    for name in written:
        assert (forked / "overlays" / name).read_bytes() == (in_line / "overlays" / name).read_bytes()


def test_no_workers_without_overlays():
    assert predict.overlay_workers(argparse.Namespace(no_overlays=True)) == 0
    assert 1 <= predict.overlay_workers(argparse.Namespace(no_overlays=False)) <= 4

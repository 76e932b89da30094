"""The post-processing choice: candidates on hand-made masks against scipy, the
choice on validation patients only, its record in the checkpoint, and its use by predict.py
and the hub pipeline."""

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import inference
import postprocessing
import postprocessing_choice
import predict
import study_postprocessing
import train
from checkpoint import CheckpointError, save_checkpoint
from dataset import discover_patients
from metrics import dice_score, label_components
from postprocessing import (
    LCC,
    NO_FILTER,
    candidate_dice,
    choose_postprocessing,
    largest_connected_component,
    postprocess,
)

SIZE, SLICES = 32, 8  # native grid of the hand-written patients = the trained checkpoint's image size


def blob(shape, slices, rows, cols):
    mask = np.zeros(shape, bool)
    mask[slices[0] : slices[1], rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


SHAPE = (SLICES - 2, SIZE, SIZE)  # the kept slices
BIG = blob(SHAPE, (1, 5), (2, 10), (2, 10))  # 4 x 8 x 8 = 256 voxels
SMALL = blob(SHAPE, (2, 4), (22, 28), (22, 28))  # 2 x 6 x 6 = 72 voxels, 28 % of BIG, far from it
SPECK = blob(SHAPE, (2, 4), (28, 30), (28, 30))  # 2 x 2 x 2 = 8 voxels, 3 % of BIG


def independent_filter(mask, share):
    """scipy.ndimage.label (26-connected) by hand: components of >= share of the largest."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.array([(labels == i).sum() for i in range(1, count + 1)])
    return np.isin(labels, 1 + np.flatnonzero(sizes >= share * sizes.max()))


# ---------------------------------------------------------------- candidates, hand-made


def test_candidates_match_scipy_and_the_seed_lcc():
    rng = np.random.default_rng(0)
    for _ in range(4):
        mask = rng.random((5, 16, 16)) > 0.7
        assert postprocess(mask, LCC).tolist() == largest_connected_component(mask).tolist()
        assert postprocess(mask, NO_FILTER).tolist() == mask.tolist()
        for share in postprocessing.MIN_SHARES:
            expected = independent_filter(mask, share)
            np.testing.assert_array_equal(postprocess(mask, {"method": "min_share", "share": share}), expected)
    assert not postprocess(np.zeros((2, 4, 4), bool), {"method": "min_share", "share": 0.1}).any()
    names = [postprocessing.postprocessing_name(c) for c in postprocessing.POSTPROCESSING_CANDIDATES]
    assert names == ["lcc", "min_share 50%", "min_share 25%", "min_share 10%", "min_share 5%", "none"]


def test_two_far_apart_lesions_choose_a_filter_that_keeps_both():
    truth = BIG | SMALL
    probabilities = np.where(truth, 0.9, 0.1).astype(np.float32)  # a perfect prediction of both lesions
    scores = {f"patient{i}": candidate_dice(probabilities, truth) for i in range(3)}
    assert scores["patient0"]["lcc"] == pytest.approx(2 * 256 / (256 + 328))  # lcc deletes SMALL
    assert scores["patient0"]["none"] == 1.0 and scores["patient0"]["min_share 50%"] < 1.0
    record, table = choose_postprocessing(scores)
    assert record != LCC and record["method"] == "min_share" and record["share"] <= 72 / 256
    np.testing.assert_array_equal(postprocess(probabilities >= 0.5, record), truth)
    assert [row["candidate"] for row in table][0] == "lcc" and len(table) == len(
        postprocessing.POSTPROCESSING_CANDIDATES
    )
    lcc_row = table[0]
    assert lcc_row["mean"] == pytest.approx(dice_score(largest_connected_component(truth), truth))


def test_a_far_speck_of_false_positive_is_removed_and_ties_go_to_lcc():
    probabilities = np.where(BIG | SPECK, 0.8, 0.2).astype(np.float32)
    scores = {"a": candidate_dice(probabilities, BIG), "b": candidate_dice(np.where(BIG, 0.8, 0.2), BIG)}
    assert scores["a"]["none"] == pytest.approx(2 * 256 / (264 + 256))
    record, table = choose_postprocessing(scores)
    assert record == LCC  # lcc and every min_share remove the speck and tie at 1.0: the tie goes to lcc
    assert not (postprocess(probabilities >= 0.5, record) & SPECK).any()
    means = {row["candidate"]: row["mean"] for row in table}
    assert means["none"] == pytest.approx((2 * 256 / 520 + 1) / 2) and means["lcc"] == 1.0
    with pytest.raises(ValueError):
        choose_postprocessing({})


def test_label_components_numbers_by_first_voxel_and_counts_sizes():
    mask = np.zeros((3, 6, 6), bool)
    mask[0, 0, 5] = True  # a lone corner voxel: starts first in (slice, row, column) order
    mask[1, 0:4, 0] = mask[1, 3, 0:3] = True  # an L of 6 voxels: starts second
    mask[2, 4, 4] = mask[2, 5, 5] = True  # two voxels that touch by an edge only: the third component
    labels, sizes = label_components(mask)
    assert sizes.tolist() == [0, 1, 6, 2] and labels[0, 0, 5] == 1 and labels[1, 3, 2] == 2
    assert labels[2, 5, 5] == labels[2, 4, 4] == 3
    faces, face_sizes = label_components(mask, connectivity=1)  # faces only: the edge pair splits
    assert face_sizes.tolist() == [0, 1, 6, 1, 1] and faces[2, 4, 4] != faces[2, 5, 5]
    empty_labels, empty_sizes = label_components(np.zeros((2, 3, 3), bool))
    assert not empty_labels.any() and empty_sizes.tolist() == [0]
    plane = np.eye(4, dtype=bool)  # 2-D: a diagonal is one 8-connected component, four 4-connected ones
    assert len(label_components(plane)[1]) == 2 and len(label_components(plane, connectivity=1)[1]) == 5
    with pytest.raises(ValueError, match="connectivity 4"):
        label_components(mask, connectivity=4)


def test_largest_component_tie_keeps_the_one_that_starts_first():
    later_rows = blob(SHAPE, (2, 4), (0, 2), (0, 2))  # 2 x 2 x 2, starts at slice 2
    earlier_slice = blob(SHAPE, (1, 3), (20, 22), (20, 22))  # 2 x 2 x 2, starts at slice 1: first in C order
    tie = later_rows | earlier_slice
    np.testing.assert_array_equal(largest_connected_component(tie), earlier_slice)
    np.testing.assert_array_equal(postprocess(tie, LCC), earlier_slice)
    same_slice = blob(SHAPE, (2, 4), (20, 22), (20, 22))  # the same start slice: the earlier row wins
    np.testing.assert_array_equal(largest_connected_component(later_rows | same_slice), later_rows)
    for share in postprocessing.MIN_SHARES:  # a share keeps components of equal size together
        np.testing.assert_array_equal(postprocess(tie, {"method": "min_share", "share": share}), tie)


def test_lesion_count_is_the_number_of_26_connected_components():
    assert study_postprocessing.lesion_count(BIG | SMALL | SPECK) == 2  # SMALL and SPECK touch
    assert study_postprocessing.lesion_count(BIG | SPECK) == 2 and study_postprocessing.lesion_count(BIG) == 1
    corner = np.zeros((2, 2, 2), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touch by a corner only
    assert study_postprocessing.lesion_count(corner) == 1 and study_postprocessing.lesion_count(0 * corner) == 0


@pytest.mark.parametrize(
    "record",
    [{"method": "largest"}, {"method": "min_share"}, {"method": "min_share", "share": 0}, {"method": "lcc", "x": 1}],
)
def test_bad_records_are_refused_with_the_file_name(record):
    with pytest.raises(CheckpointError, match="model.pt: 'postprocessing'"):
        postprocessing.check_postprocessing(record, "model.pt")


# -------------------------------------------------------- hand-written patients, a stand-in model


class BrightFlair(torch.nn.Module):
    """Probability 1 where the normalised FLAIR is bright, 0 elsewhere: a stand-in network."""

    def forward(self, x):
        return (x[:, 1:2] > 1.0).float()  # (B, 3, H, W) -> (B, 1, H, W)


def write_patient(root, pid, lesions, truth):
    """SLICES slices of SIZE x SIZE: a uniform head (80) with bright voxels (250) at `lesions`
    in every channel (the kept slices; the first and last are empty), masks from `truth`."""
    folder = root / pid
    folder.mkdir(parents=True)
    bright = np.zeros((SLICES, SIZE, SIZE), bool)
    bright[1:-1] = lesions
    masks = np.zeros_like(bright)
    masks[1:-1] = truth
    for k in range(SLICES):
        image = np.where(bright[k, ..., None], 250, 80).astype(np.uint8).repeat(3, axis=-1)
        tifffile.imwrite(folder / f"{pid}_{k + 1}.tif", image, photometric="rgb")
        tifffile.imwrite(folder / f"{pid}_{k + 1}_mask.tif", masks[k].astype(np.uint8) * 255)


@pytest.fixture
def hand_made(trained_checkpoint, tmp_path, monkeypatch):
    """Two validation patients with one lesion and a false-positive speck, a test patient with
    two true lesions far apart (decisive: with it the choice would keep both), a training
    patient; a copy of the trained checkpoint with that split, predicting with BrightFlair."""
    data = tmp_path / "data"
    write_patient(data, "val_a", BIG | SPECK, BIG)
    write_patient(data, "val_b", BIG | SPECK, BIG)
    write_patient(data, "test_a", BIG | SMALL, BIG | SMALL)
    write_patient(data, "train_a", BIG, BIG)
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint.pop("postprocessing", None)
    checkpoint["split"] = {**checkpoint["split"], "train": ["train_a"], "val": ["val_a", "val_b"], "test": ["test_a"]}
    path = tmp_path / "run" / "best_model.pt"
    path.parent.mkdir()
    save_checkpoint(checkpoint, path)
    (path.parent / "args.json").write_text(json.dumps({"epochs": 2}))
    real = inference.load_model

    def stand_in(path, device):
        loaded = real(path, device)  # the file's split and post-processing record, another network
        loaded.model = BrightFlair()
        return loaded

    for module in (postprocessing_choice, predict):
        monkeypatch.setattr(module, "load_model", stand_in)
    return path, data


def test_the_choice_reads_validation_patients_only(hand_made, monkeypatch, capsys):
    path, data = hand_made
    read = []
    for name in ("read_volume", "load_volume"):
        original = getattr(postprocessing_choice, name)
        monkeypatch.setattr(
            postprocessing_choice,
            name,
            lambda patient, *a, f=original: read.append(patient.patient_id) or f(patient, *a),
        )
    selection = postprocessing_choice.record_postprocessing_choice(path, data, torch.device("cpu"), None)
    assert set(read) == {"val_a", "val_b"}
    assert selection["chosen"] == "lcc" and selection["patients"] == ["val_a", "val_b"]
    out = capsys.readouterr().out
    assert "chosen on its 2 validation patient(s)" in out and "chosen: lcc" in out

    # the test patient is decisive: had it taken part, a filter keeping both of its lesions would win
    loaded = postprocessing_choice.load_model(path, torch.device("cpu"))
    test_patient = [p for p in discover_patients(data) if p.patient_id == "test_a"]
    leaked = {
        **selection["dice"],
        **postprocessing_choice.score_postprocessing(loaded, test_patient, torch.device("cpu")),
    }
    assert choose_postprocessing(leaked)[0]["method"] == "min_share"

    # ... and it is never read: unreadable test and training patients change nothing
    for tif in [*(data / "test_a").glob("*.tif"), *(data / "train_a").glob("*.tif")]:
        tif.write_bytes(b"not a TIFF")
    again = postprocessing_choice.record_postprocessing_choice(path, data, torch.device("cpu"), None)
    assert again["table"] == selection["table"]

    saved = torch.load(path, weights_only=True)
    assert saved["postprocessing"] == LCC and saved["postprocessing_selection"]["patients"] == ["val_a", "val_b"]
    assert json.loads((path.parent / "args.json").read_text())["postprocessing"] == LCC


def test_choose_postprocessing_command_and_its_errors(hand_made, tmp_path, capsys):
    path, data = hand_made
    flags = ["--data-dir", str(data), "--no-cache", "--device", "cpu"]
    selection = train.main(["--choose-postprocessing", str(path), *flags])
    assert torch.load(path, weights_only=True)["postprocessing"] == selection["table"][0]["record"] == LCC
    for argv, message in [
        (["--choose-postprocessing", str(tmp_path / "nope.pt"), *flags], "nope.pt: checkpoint not found"),
        (["--choose-postprocessing", str(path), *flags, "--overwrite"], "drop --overwrite"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
        assert str(exit_info.value.code).startswith("error: ") and message in str(exit_info.value.code)
    shutil.rmtree(data / "val_b")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--choose-postprocessing", str(path), *flags])
    assert "1 of its 2 validation patients are not in --data-dir" in str(exit_info.value.code)
    assert "val_b" in str(exit_info.value.code)


def run_predict(path, data, out, *extra):
    return predict.main(
        ["--model-path", str(path), "--data-dir", str(data), "--output-dir", str(out), "--patients", "test_a"]
        + ["--no-cache", "--no-overlays", "--backend", "torch", "--save-probabilities", *extra]
    )


def predicted(out):
    return np.stack([tifffile.imread(out / "masks" / "test_a" / f"test_a_{k}_mask.tif") > 0 for k in range(2, 8)])


def test_predict_applies_the_saved_choice_and_lcc_restores_the_seed(hand_made, tmp_path):
    path, data = hand_made
    seed = run_predict(path, data, tmp_path / "seed")  # no record in the checkpoint: lcc, as before
    np.testing.assert_array_equal(predicted(tmp_path / "seed"), BIG)
    probabilities = np.load(tmp_path / "seed" / "probabilities" / "test_a.npy")[1:-1]
    np.testing.assert_array_equal(predicted(tmp_path / "seed"), largest_connected_component(probabilities >= 0.5))
    assert seed["protocol"]["postprocessing"]["saved"] == {str(path): None} and seed["protocol"]["lcc"]

    checkpoint = torch.load(path, weights_only=True)
    checkpoint["postprocessing"] = {"method": "min_share", "share": 0.25}
    save_checkpoint(checkpoint, path)
    chosen = run_predict(path, data, tmp_path / "chosen")
    np.testing.assert_array_equal(predicted(tmp_path / "chosen"), BIG | SMALL)  # both lesions kept
    assert chosen["protocol"]["postprocessing"]["used_alone"] == {str(path): "min_share 25%"}
    assert chosen["metrics"]["dice"]["mean"] == 1.0 and not chosen["protocol"]["lcc"]
    page = (tmp_path / "chosen" / "report.html").read_text()  # the report names it per checkpoint
    assert f"{path}: min_share 25% (saved choice, made on its validation patients: min_share 25%)" in page

    overridden = run_predict(path, data, tmp_path / "lcc", "--postprocess", "lcc")
    assert (tmp_path / "lcc" / "metrics.csv").read_text() == (tmp_path / "seed" / "metrics.csv").read_text()
    np.testing.assert_array_equal(predicted(tmp_path / "lcc"), predicted(tmp_path / "seed"))
    assert overridden["protocol"]["postprocessing"]["requested"] == "lcc"
    run_predict(path, data, tmp_path / "none", "--no-lcc")
    np.testing.assert_array_equal(predicted(tmp_path / "none"), BIG | SMALL)


def test_an_ensemble_that_disagrees_falls_back_to_lcc_with_a_warning(hand_made, tmp_path, capsys):
    path, data = hand_made
    other = tmp_path / "other.pt"
    checkpoint = torch.load(path, weights_only=True)
    save_checkpoint({**checkpoint, "postprocessing": NO_FILTER}, other)
    run_predict(other, data, tmp_path / "alone")
    assert "WARNING" not in capsys.readouterr().out  # one checkpoint: its own choice, no warning
    np.testing.assert_array_equal(predicted(tmp_path / "alone"), BIG | SMALL)
    summary = predict.main(
        ["--model-path", str(path), str(other), "--data-dir", str(data), "--output-dir", str(tmp_path / "ens")]
        + ["--patients", "test_a", "--no-cache", "--no-overlays", "--backend", "torch"]
    )
    assert "WARNING: the averaged checkpoints chose different post-processing" in capsys.readouterr().out
    assert summary["protocol"]["postprocessing"]["used_averaged"] == "lcc"
    np.testing.assert_array_equal(predicted(tmp_path / "ens"), BIG)


def test_a_finished_run_records_its_choice_from_its_validation_patients(trained_checkpoint, phantom_dir):
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    selection = checkpoint["postprocessing_selection"]
    assert selection["patients"] == checkpoint["split"]["val"] and selection["role"] == "val"
    assert checkpoint["postprocessing"] == postprocessing.check_postprocessing(checkpoint["postprocessing"])
    assert selection["epoch"] == checkpoint["epoch"]
    # the table, recomputed independently: predict.py's native probabilities, scipy's components
    loaded = inference.load_model(trained_checkpoint, torch.device("cpu"))
    patients = {p.patient_id: p for p in discover_patients(phantom_dir)}
    for pid in selection["patients"]:
        from dataset import load_volume, read_volume

        volume = load_volume(patients[pid], loaded.image_size, None)
        probs = inference.predict_volume(  # in the precision predict.py runs by default, as the choice does
            loaded.model, volume.images, amp_dtype=inference.inference_dtype(torch.device("cpu"))
        )
        mask = inference.to_native(probs, volume.geometry, 0.5, lcc=False)[0].astype(bool)
        truth = read_volume(patients[pid])[1]
        assert selection["dice"][pid]["lcc"] == pytest.approx(dice_score(largest_connected_component(mask), truth))
        assert selection["dice"][pid]["none"] == pytest.approx(dice_score(mask, truth))
        assert selection["dice"][pid]["min_share 10%"] == pytest.approx(
            dice_score(independent_filter(mask, 0.1), truth)
        )
    best = max(row["mean"] for row in selection["table"])
    assert selection["chosen"] == next(r["candidate"] for r in selection["table"] if r["mean"] >= best - 1e-9)
    args = json.loads((trained_checkpoint.parent / "args.json").read_text())
    assert args["postprocessing"] == checkpoint["postprocessing"]
    assert "postprocessing" not in torch.load(trained_checkpoint.parent / "last.pt", weights_only=True)


def test_hub_pipeline_uses_the_checkpoint_choice_unless_lcc_is_given(hand_made, tmp_path):
    from test_hub import hub_load

    path, _ = hand_made
    checkpoint = torch.load(path, weights_only=True)
    with_record = tmp_path / "chosen.pt"
    save_checkpoint({**checkpoint, "postprocessing": NO_FILTER}, with_record)
    volume = np.zeros((SLICES - 2, SIZE, SIZE, 3), np.uint8) + 80
    volume[BIG | SMALL] = 250
    for weights, lcc, expected, record in [
        (with_record, None, BIG | SMALL, NO_FILTER),
        (with_record, True, BIG, LCC),
        (path, None, BIG, LCC),  # no record: the largest component (LCC)
        (path, False, BIG | SMALL, NO_FILTER),
    ]:
        segment = hub_load("segmentation_pipeline", weights_path=str(weights), device="cpu", lcc=lcc)
        assert segment.postprocessing == record
        segment.model = BrightFlair()
        masks, _ = segment(volume)
        np.testing.assert_array_equal(masks.astype(bool), expected)


def test_bench_postprocessing_scores_test_patients_that_did_not_choose(tmp_path, monkeypatch):
    import bench

    monkeypatch.chdir(tmp_path)
    argv = ["postprocessing", "--quick", "--phantoms", "hard", "--patients", "4", "--test-patients", "2"]
    argv += ["--work-dir", str(tmp_path / "w"), "--output", str(tmp_path / "page.md")]
    (result,) = bench.main(argv)
    test_ids = {p.patient_id for p in discover_patients(tmp_path / "w" / "hard_test_2x48")}
    assert set(result["test"]) == set(result["perfect"]) == test_ids
    assert not test_ids & set(result["selection"]["patients"]) and len(result["selection"]["patients"]) == 2
    text = (tmp_path / "page.md").read_text()
    assert text.startswith("<!-- generated by `python bench.py postprocessing --quick --phantoms hard")
    assert f"Chosen on 2 validation patients: **{result['selection']['chosen']}**" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "candidate" not in line]
    assert len(rows) == len(postprocessing.POSTPROCESSING_CANDIDATES) and sum("(chosen)" in r for r in rows) == 1
    none_row = next(r for r in rows if r.startswith("| none") or r.startswith("| **none**"))
    mean = np.mean([scores["none"] for scores in result["test"].values()])
    assert f"| {mean:.3f} / " in none_row and none_row.endswith("| 1.000 |")  # nothing removed from the truth
    again = bench.main(argv)  # the same --work-dir: the trained run is read back
    assert again[0]["reused"] and again[0]["test"] == result["test"]

"""What a new user reads: --help of every CLI, the first errors (no data, no checkpoint),
and output that stays clean when it goes to a file."""

import argparse

import pytest
from conftest import tiny_train_args

import bench
import dataset
import export
import predict
import train
from dataset import discover_patients
from patients import DataError
from utils import SHARED_FLAGS

CLIS = [
    (predict, ["--help"]),
    (export, ["--help"]),
    (bench, ["--help"]),
    (bench, ["ablation", "--help"]),
    (dataset, ["--help"]),
    (dataset, ["synthesize", "--help"]),
    (dataset, ["preprocess", "--help"]),
]


def help_text(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module, argv", CLIS, ids=lambda x: x.__name__ if hasattr(x, "__name__") else " ".join(x))
def test_help_shows_real_defaults_only(module, argv, capsys):
    text = " ".join(help_text(module, argv, capsys).split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: [" not in text  # lists are shown as on the command line


@pytest.mark.parametrize("module", [predict, export, bench, dataset])
def test_help_keeps_the_docstring_line_breaks(module, capsys):
    lines = [line.strip() for line in help_text(module, ["--help"], capsys).splitlines()]
    examples = [line.strip() for line in module.__doc__.splitlines() if line.strip().startswith("python ")]
    assert examples and all(example in lines for example in examples)


def test_predict_help_is_for_users(capsys):
    text = help_text(predict, ["--help"], capsys)
    assert "Also the one implementation" not in text and "predict_volume" not in text
    assert "(default: ./checkpoints/best_model.pt)" in " ".join(text.split())


MISSING_DATA = [
    "data directory not found: ",
    "run `python train.py --demo`",
    "`kaggle datasets download -d mateuszbuda/lgg-mri-segmentation`, unzip lgg-mri-segmentation.zip",
]


def test_missing_data_dir_suggests_the_demo_and_the_kaggle_download(tmp_path):
    missing = tmp_path / "kaggle_3m"
    with pytest.raises(DataError) as error:
        discover_patients(missing)
    assert str(error.value).startswith(f"data directory not found: {missing}; ")
    for command in (train, dataset):
        argv = tiny_train_args(missing, tmp_path, "--epochs", "1") if command is train else ["preprocess"]
        if command is dataset:
            argv += ["--data-dir", str(missing), "--no-cache"]
        with pytest.raises(SystemExit) as exit_info:
            command.main(argv)
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message
        assert all(part in message for part in MISSING_DATA), message


def test_missing_checkpoint_hint_fits_the_situation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (predict, export):
        with pytest.raises(SystemExit) as exit_info:
            command.main([])
        data = "./kaggle_3m" if command is predict else "kaggle_3m"  # predict.py's default --data-dir
        assert str(exit_info.value.code) == (
            "error: checkpoint not found: ./checkpoints/best_model.pt; train one first: python train.py "
            f"--data-dir {data} (or python train.py --demo on phantom data)"
        )
    (tmp_path / "demo_checkpoints").mkdir()
    (tmp_path / "demo_checkpoints" / "best_model.pt").write_bytes(b"written by train.py --demo")
    (tmp_path / "demo_3m").mkdir()
    # the demo's model only with the demo's data: export.py takes no data, predict.py's must be demo_3m
    for command, flags in ((predict, ["--data-dir", "demo_3m"]), (export, [])):
        with pytest.raises(SystemExit) as exit_info:
            command.main(flags)
        assert str(exit_info.value.code) == (
            "error: checkpoint not found: ./checkpoints/best_model.pt; the demo's model is "
            f"demo_checkpoints/best_model.pt: pass --model-path demo_checkpoints/best_model.pt{' ' * bool(flags)}"
            + " ".join(flags)
        )
    with pytest.raises(SystemExit, match=r"train one first: python train.py --data-dir kaggle_3m \(or"):
        predict.main(["--data-dir", "kaggle_3m"])  # real data: never the phantom-trained demo model
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"an interrupted run")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--data-dir", "kaggle_3m"])
    message = str(exit_info.value.code)
    assert "checkpoints holds last.pt of a run that has not finished: continue it with python train.py " in message
    assert "--checkpoint-dir checkpoints --resume auto" in message and "\n" not in message


def test_no_progress_bar_junk_when_output_is_not_a_terminal(phantom_dir, tmp_path, capsys):
    """capsys gives a non-terminal stderr, like `python train.py > log 2>&1`."""
    train.main(tiny_train_args(phantom_dir, tmp_path, "--epochs", "1", "--steps-per-epoch", "2"))
    predict.main(
        [
            *["--model-path", str(tmp_path / "ckpt" / "best_model.pt"), "--data-dir", str(phantom_dir)],
            *["--output-dir", str(tmp_path / "out"), "--figure-path", str(tmp_path / "dice.png")],
            *["--cache-dir", str(tmp_path / "cache"), "--no-overlays", "--backend", "torch"],
        ]
    )
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "\r" not in text and "\x1b" not in text
    assert not [line for line in text.splitlines() if line.startswith(("epoch 1:", "preprocess:", "predict:"))]
    assert not [line for line in text.splitlines() if line and not line.strip()]  # no cleared-bar lines
    assert "1/1 " in captured.out  # the epoch row itself is printed


def _parsers():
    """Every CLI parser and sub-command parser, by name."""
    parsers = {"train.py": train.get_args_parser(), "predict.py": predict.get_args_parser()}
    for module in (dataset, bench):
        (commands,) = [a for a in module.get_args_parser()._actions if isinstance(a, argparse._SubParsersAction)]
        parsers |= {f"{module.__name__}.py {name}": sub for name, sub in commands.choices.items()}
    return parsers


def test_shared_flags_have_one_definition_in_every_cli():
    """A flag of utils.SHARED_FLAGS is never defined again by a CLI: wherever it appears its
    type, default and action are the shared ones (a CLI may only change the help text, and
    for --no-cache and --no-lcc only append a note to it)."""
    seen = {flag: [] for flag in SHARED_FLAGS}
    for name, parser in _parsers().items():
        for action in parser._actions:
            for flag in set(action.option_strings) & set(SHARED_FLAGS):
                shared = SHARED_FLAGS[flag]
                expected = argparse.ArgumentParser().add_argument(flag, **{**shared, "help": None})
                assert (type(action), action.type, action.default, action.nargs) == (
                    type(expected),
                    expected.type,
                    expected.default,
                    expected.nargs,
                ), f"{name} {flag}"
                if flag in ("--no-cache", "--no-lcc"):  # one meaning everywhere: at most a note appended
                    assert action.help.startswith(shared["help"]), f"{name} {flag}"
                seen[flag].append(name)
    assert len(seen["--image-size"]) == 5 and len(seen["--no-cache"]) == 3 and len(seen["--no-lcc"]) == 2, seen
    assert "predict.py" not in seen["--num-workers"]  # predict.py preprocesses in the calling thread


def test_train_help_groups_the_shared_flags_by_the_resume_contract(capsys):
    text = help_text(train, ["--help"], capsys)
    defining = text.split("flags that define the run")[1].split("flags that say how to run")[0]
    how_to_run = text.split("flags that say how to run")[1]
    assert "--image-size IMAGE_SIZE" in defining and "--no-lcc" in defining and "--no-cache" not in defining
    assert "--no-cache" in how_to_run and "--image-size IMAGE_SIZE" not in how_to_run

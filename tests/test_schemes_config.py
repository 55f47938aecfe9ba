"""The `scheme:` block of the config: selection, defaults, validation messages."""

import pytest
import yaml

from kdistill.config import dump_config, parse_config
from kdistill.errors import ConfigError

STUDENT = {"name": "mlp", "kwargs": {"hidden": [16]}}
TEACHER = {"name": "cnn1d", "kwargs": {"channels": 8, "depth": 3}}


def parse(**fields):
    return parse_config({"student": STUDENT, **fields})


def test_default_scheme_is_offline_and_needs_a_teacher():
    assert parse(teacher=TEACHER).scheme.name == "offline"
    with pytest.raises(ConfigError, match="scheme 'offline' needs a 'teacher'"):
        parse()


def test_scheme_by_name_or_block_and_round_trip():
    assert parse(scheme="mutual").scheme.peers == 2
    cfg = parse(scheme={"name": "born_again", "generations": 2})
    assert (cfg.scheme.name, cfg.scheme.generations) == ("born_again", 2)
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again.scheme == cfg.scheme


@pytest.mark.parametrize("scheme", [
    {"name": "mutual", "peers": [STUDENT, {"name": "mlp", "kwargs": {"hidden": [32]}}]},
    {"name": "byot", "exits": {"early": "2"}},
    {"name": "snapshot", "alpha": 0.5},
    {"name": "multi_teacher", "teachers": [TEACHER, STUDENT], "combine": "weights", "weights": [2, 1]},
    {"name": "lifelong", "old_classes": [0, 1], "new_classes": [2, 3]},
])
def test_teacherless_schemes_parse(scheme):
    assert parse(scheme=scheme).scheme.name == scheme["name"]


@pytest.mark.parametrize("scheme", [
    {"name": "specialists", "num_specialists": 2}, {"name": "assistant", "num_assistants": 2},
    {"name": "cross_modal", "student_view": "downsample:2+noise:0.1"},
    {"name": "selective", "schedule": "linear", "threshold": 0.5, "threshold_end": 0.0},
])
def test_teacher_schemes_parse(scheme):
    assert parse(teacher=TEACHER, scheme=scheme).scheme.name == scheme["name"]


@pytest.mark.parametrize("fields, message", [
    ({"scheme": {"name": "nope"}}, "scheme: unknown name 'nope'; allowed: 'offline', 'mutual'"),
    ({"scheme": {"peers": 2}}, "scheme: the 'name' field is missing"),
    ({"scheme": {"name": "mutual", "peers": 1}}, "scheme.peers: mutual learning needs at least 2 peers"),
    ({"scheme": {"name": "mutual", "temperture": 2}}, "scheme.temperture: unknown field"),
    ({"scheme": "mutual", "teacher": TEACHER}, "scheme 'mutual' does not use 'teacher'"),
    ({"scheme": "assistant"}, "scheme 'assistant' needs a 'teacher'"),
    ({"scheme": {"name": "lifelong", "old_classes": [0, 1], "new_classes": [1, 2]}}, "disjoint (shared: [1])"),
    ({"scheme": {"name": "multi_teacher", "teachers": [TEACHER, STUDENT], "combine": "weights"}},
     "needs 2 non-negative weights"),
    ({"scheme": {"name": "multi_teacher", "teachers": [TEACHER, STUDENT], "weights": [1, 1]}},
     "only used with combine: weights"),
    ({"scheme": {"name": "byot"}}, "scheme.exits: required field is missing"),
    ({"scheme": "mutual", "data": {"augment": {"max_shift": 2}}}, "data.augment is only supported by scheme 'offline'"),
    ({"scheme": "selective", "teacher": {**TEACHER, "cache": {}}}, "teacher.cache is only supported by scheme"),
])
def test_scheme_errors_are_one_line_with_the_field(fields, message):
    with pytest.raises(ConfigError) as err:
        parse(**fields)
    text = str(err.value)
    assert message in text and "\n" not in text

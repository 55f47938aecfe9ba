"""Students from the teacher: built-in families scaled by width/depth, the config section, HF encoder students."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdistill.errors import KDError
from kdistill.models import build_model, count_params
from kdistill.models.builders import (hf_student_kwargs, resolve_student, resolved_student_config, round_channels,
                                      student_from_teacher)
from kdistill.schemes.sections import FromTeacher, StudentConfig, TeacherConfig

IMAGE = (3, 16, 16)


def layer_params(model):
    """Parameters of the conv and linear layers (the part that scales with width^2)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
               for p in m.parameters())


@pytest.mark.parametrize("name,kwargs,shape,lo,hi", [
    ("cnn2d", {}, IMAGE, 0.2, 0.32),
    ("resnet", {"depth": 14, "width": 16}, IMAGE, 0.2, 0.32),
    ("cnn1d", {"channels": 32, "depth": 3}, (40,), 0.15, 0.4),
    ("mlp", {"hidden": [128, 128]}, (20,), 0.2, 0.4),  # the input layer only halves
])
def test_width_half_quarters_params(name, kwargs, shape, lo, hi):
    s_name, s_kwargs = student_from_teacher(name, kwargs, width=0.5)
    assert s_name == name
    teacher = build_model(name, kwargs, input_shape=shape, num_classes=10)
    student = build_model(s_name, s_kwargs, input_shape=shape, num_classes=10)
    ratio = layer_params(student) / layer_params(teacher)
    print(f"{name} width 0.5: {s_kwargs}, conv/linear params x{ratio:.3f}")
    assert lo <= ratio <= hi
    assert student(torch.randn(2, *shape)).shape == (2, 10)


def test_families_defaults_and_depth():
    assert student_from_teacher("cnn2d", {}, width=0.5) == ("cnn2d", {"channels": [16, 32, 64]})  # zoo defaults
    assert student_from_teacher("cnn2d", {"channels": [32, 64, 128]}, depth=0.5)[1]["channels"] == [32, 128]
    assert student_from_teacher("cnn2d", {}, depth=0.2)[1]["channels"] == [128]
    assert student_from_teacher("mlp", {"hidden": [256, 128, 64], "dropout": 0.1}, width=0.5, depth=0.67)[1] == \
        {"hidden": [128, 32], "dropout": 0.1}
    assert student_from_teacher("mlp", {"hidden": [10]}, width=0.3)[1]["hidden"] == [3]
    assert student_from_teacher("mlp", {"hidden": [10, 6, 2]}, depth=0.7)[1]["hidden"] == [10, 2]  # widths as given
    assert student_from_teacher("cnn1d", {"kernel_size": 3}, width=0.25, depth=0.5)[1] == \
        {"channels": 16, "depth": 2, "kernel_size": 3}
    assert student_from_teacher("resnet", {"depth": 20}, depth=0.5)[1] == {"depth": 14, "width": 16}
    assert student_from_teacher("resnet", {"depth": 56, "width": 16}, width=0.3, depth=0.1)[1] == \
        {"depth": 8, "width": 4}
    assert student_from_teacher("resnet", {}, depth=2.0)[1]["depth"] == 38  # deeper is allowed
    assert [round_channels(x) for x in (0.4, 2.6, 5.9, 6.1, 17.0)] == [1, 3, 4, 8, 16]
    teacher = build_model("resnet", {"depth": 20}, input_shape=IMAGE, num_classes=10)
    student = build_model(*student_from_teacher("resnet", {"depth": 20}, depth=0.5), input_shape=IMAGE,
                          num_classes=10)
    assert count_params(student) < count_params(teacher)


@pytest.mark.parametrize("width,depth", [(0, None), (-1, None), (1.5, None), (None, None), (None, 0), (True, None)])
def test_bad_factors(width, depth):
    with pytest.raises(KDError) as err:
        student_from_teacher("cnn2d", {}, width=width, depth=depth)
    assert "student.from_teacher" in str(err.value) and ":" in str(err.value)


def test_unknown_family():
    with pytest.raises(KDError, match="not a built-in family.*student.from_teacher.*give student.name"):
        student_from_teacher("mypkg.models:big", {}, width=0.5)


def test_config_section_and_resolution():
    teacher = TeacherConfig(name="cnn2d", kwargs={"channels": [32, 64]})
    student = StudentConfig(from_teacher={"width": 0.5})
    assert student.name is None
    assert resolve_student(student, teacher) == ("cnn2d", {"channels": [16, 32]})
    own = StudentConfig(name="cnn2d", kwargs={"channels": [8, 8]}, from_teacher={"depth": 0.5})
    assert resolve_student(own, teacher) == ("cnn2d", {"channels": [8, 8]})  # the student's kwargs win
    resolved = resolved_student_config(student, teacher)
    assert (resolved.name, resolved.kwargs) == ("cnn2d", {"channels": [16, 32]})
    again = resolved_student_config(StudentConfig.model_validate(resolved.model_dump()), teacher)
    assert (again.name, again.kwargs) == (resolved.name, resolved.kwargs)  # idempotent (a saved config re-read)
    plain = StudentConfig(name="mlp", kwargs={"hidden": [16]})
    assert resolve_student(plain, teacher) == ("mlp", {"hidden": [16]})
    assert resolved_student_config(plain, None) is plain
    with pytest.raises(KDError, match="needs the run's teacher"):
        resolve_student(student, None)
    with pytest.raises(KDError, match="differs from the teacher"):
        resolve_student(StudentConfig(name="mlp", from_teacher={"width": 0.5}), teacher)
    for bad in ({}, {"from_teacher": {}}, {"from_teacher": {"width": 1.5}}, {"from_teacher": {"depth": 0}},
                {"from_teacher": {"width": 0.5, "typo": 1}}):
        with pytest.raises(ValidationError):
            StudentConfig.model_validate(bad)
    with pytest.raises(ValidationError):  # the teacher cannot be derived from itself
        TeacherConfig.model_validate({"name": "cnn2d", "from_teacher": {"width": 0.5}})
    assert FromTeacher(depth=2).depth == 2.0


def test_hf_student_kwargs_and_build():
    transformers = pytest.importorskip("transformers")
    from kdistill.encoders.student import build_student

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    teacher = transformers.BertModel(config).eval()
    kwargs = hf_student_kwargs(0.5, 0.5, config)
    assert kwargs == {"num_layers": 2, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32}
    student = build_student(teacher, **kwargs).eval()
    ids = torch.randint(0, 100, (2, 8))
    assert student(input_ids=ids).last_hidden_state.shape == (2, 8, 16)
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 32
    layer = lambda m: sum(p.numel() for p in m.encoder.layer[0].parameters())  # noqa: E731
    print(f"bert width 0.5: layer params x{layer(student) / layer(teacher):.3f}")
    assert 0.2 < layer(student) / layer(teacher) < 0.3
    assert hf_student_kwargs(None, 0.5, config) == {"num_layers": 2}
    same = build_student(teacher, **hf_student_kwargs(None, 0.5, config))  # same width: teacher layers copied
    assert same.config.hidden_size == 32 and len(same.encoder.layer) == 2
    assert hf_student_kwargs(0.1, None, config) == {"hidden_size": 8, "num_heads": 1, "intermediate_size": 16}
    with pytest.raises(KDError):
        hf_student_kwargs(None, None, config)

"""Student initialisation from teacher layers, and tokenizer checks."""

import pytest
import torch
from helpers import save_tiny_model, write_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer

from codir_ds.models.loading import (
    build_student,
    check_same_tokenizer,
    has_mlm_head,
    load_teacher,
    plan_models,
    read_model_config,
    student_model_config,
)
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.runtime.config import StudentConfig, TeacherConfig
from codir_ds.runtime.errors import CodirError


def test_student_copies_exactly_the_mapped_teacher_layers(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher), AutoModelForMaskedLM)
    config = read_model_config(str(tiny_teacher), "teacher")
    student = build_student(
        StudentConfig(num_layers=2), str(tiny_teacher), student_model_config(StudentConfig(num_layers=2), config), layer_map=[1, 4]
    )
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for i, teacher_layer in enumerate([1, 4]):
        t_layer = {k.split(f"encoder.layer.{teacher_layer - 1}.")[1]: v for k, v in t_state.items() if f"encoder.layer.{teacher_layer - 1}." in k}
        s_layer = {k.split(f"encoder.layer.{i}.")[1]: v for k, v in s_state.items() if f"encoder.layer.{i}." in k}
        assert t_layer.keys() == s_layer.keys()
        assert len(s_layer) == 16
        for name in s_layer:
            assert torch.equal(s_layer[name], t_layer[name]), name
        other = {k.split(f"encoder.layer.{teacher_layer % 4}.")[1]: v for k, v in t_state.items() if f"encoder.layer.{teacher_layer % 4}." in k}
        assert not torch.equal(s_layer["attention.self.query.weight"], other["attention.self.query.weight"])
    for name in [k for k in s_state if "embeddings" in k or k.startswith("cls.")]:
        assert torch.equal(s_state[name], t_state[name]), name
    assert student.config.num_hidden_layers == 2


def test_headless_teacher_gives_body_but_fresh_head(headless_teacher):
    assert not has_mlm_head(str(headless_teacher))
    config = read_model_config(str(headless_teacher), "teacher")
    student = build_student(
        StudentConfig(num_layers=2), str(headless_teacher), student_model_config(StudentConfig(num_layers=2), config), layer_map=[2, 4]
    )
    stored = load_file(str(headless_teacher / "model.safetensors"))
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight, stored["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(student.bert.encoder.layer[1].output.dense.weight, stored["encoder.layer.3.output.dense.weight"])


def test_corrupt_teacher_weights_are_named(tmp_path):
    folder = save_tiny_model(tmp_path / "t", layers=2)
    (folder / "model.safetensors").write_bytes(b"garbage")
    config = read_model_config(str(folder), "teacher")
    with pytest.raises(CodirError, match="corrupt weight file .*model.safetensors"):
        build_student(StudentConfig(num_layers=1), str(folder), student_model_config(StudentConfig(num_layers=1), config), layer_map=[2])


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, tiny_teacher):
    other = tmp_path / "student"
    save_tiny_model(other, layers=2)
    write_tokenizer(other, words=["zebra"] * 1 + ["apple", "pear"])
    with pytest.raises(CodirError, match="tokenizer of .* differs from the teacher's"):
        check_same_tokenizer(str(tiny_teacher), str(other))
    check_same_tokenizer(str(tiny_teacher), str(tiny_teacher))  # same vocabulary: no error


def test_a_tokenizer_reaching_past_the_teachers_embedding_rows_is_refused_before_weights_load(tmp_path, tiny_teacher):
    teacher = save_tiny_model(tmp_path / "teacher", layers=2)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert len(tokenizer) == read_model_config(str(teacher), "teacher").vocab_size  # fits: planned without error
    plan_models(PretrainConfig(teacher=TeacherConfig(path=str(teacher))))
    tokenizer.add_tokens(["newword"])  # added, but the embeddings were not resized
    tokenizer.save_pretrained(teacher)
    (teacher / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(CodirError) as err:
        plan_models(PretrainConfig(teacher=TeacherConfig(path=str(teacher))))
    assert str(err.value).startswith(f"teacher.path: the tokenizer of {str(teacher)!r} has ids up to 30, past the teacher's 30 embedding rows;")

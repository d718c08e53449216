"""Each class of bad configuration gives a one-line CodirError naming the key, before any model loads."""

import json
from pathlib import Path

import pytest
from helpers import tiny_bert_config

from codir_ds.finetune.config import FinetuneConfig
from codir_ds.models.ds_config import chosen_ds_config, load_ds_config
from codir_ds.models.loading import plan_models
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.runs.run_folder import first_start_setting
from codir_ds.runtime.config import load_config
from codir_ds.runtime.errors import CodirError


def base(tmp_path, teacher, **sections):
    raw = {"teacher": {"path": str(teacher)}, "data": {"files": ["corpus.txt"]}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    return path


def error_of(call) -> str:
    with pytest.raises(CodirError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_yaml_file_and_dotted_overrides(tmp_path, tiny_teacher):
    path = tmp_path / "run.yaml"
    path.write_text(f"teacher:\n  path: {tiny_teacher}\ndata:\n  files: corpus.txt\ncodir:\n  temperature: 0.1\n")
    cfg = load_config(PretrainConfig, str(path), {"codir.temperature": 0.05, "train.max_steps": 7, "codir.layer_map": [2, 4]})
    assert cfg.codir.temperature == 0.05
    assert cfg.train.max_steps == 7
    assert cfg.codir.layer_map == [2, 4]
    assert cfg.data.files == ["corpus.txt"]
    assert cfg.codir.queue_length == 4096


def test_a_bracketed_list_from_the_command_line_is_a_list(tmp_path, tiny_teacher):
    # fire hands `--data.files=[/data/a.jsonl,/data/b.jsonl]` over as one string: paths are not Python literals
    cfg = load_config(PretrainConfig, None, {"teacher.path": str(tiny_teacher), "data.files": "[/data/a.jsonl, '/data/b.jsonl']"})
    assert cfg.data.files == ["/data/a.jsonl", "/data/b.jsonl"]


def test_unknown_key_names_the_closest_valid_key(tmp_path, tiny_teacher):
    message = error_of(lambda: load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"codir.temprature": 0.1}))
    assert message == "unknown config key 'codir.temprature'; did you mean 'codir.temperature'?"
    message = error_of(lambda: load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"trian.lr": 0.1}))
    assert "'trian'" in message
    assert "'train'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"codir.queue_length": "big"}, "codir.queue_length: expected int, got str 'big'"),
        ({"codir.pooling": "max"}, "codir.pooling: 'max' is not one of 'mean', 'cls'"),
        ({"codir.layer_map": [1, "x"]}, "codir.layer_map: expected int, got str 'x'"),
        ({"data.num_workers": True}, "data.num_workers: expected int, got bool True"),
        (
            {"data.streaming": True},
            "config key 'data.streaming' is no more: removed: prepare large corpora once with `codir-ds prepare` and set data.prepared",
        ),
        (
            {"logging.progress_bar": False},
            "config key 'logging.progress_bar' is no more: removed: codir-ds prints one plain line every logging.every steps",
        ),
        ({"codir": 5}, "codir: expected a section (mapping), got 5"),
        ({"teacher.zero3": "maybe"}, "teacher.zero3: 'maybe' is neither auto nor bool"),
    ],
)
def test_wrong_types(tmp_path, tiny_teacher, override, expected):
    assert error_of(lambda: load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), override)) == expected


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"codir.queue_length": -1}, "codir.queue_length: -1 is below the minimum 0"),
        ({"codir.temperature": 0}, "codir.temperature: 0.0 must be > 0"),
        ({"data.mlm_probability": 1.5}, "data.mlm_probability: 1.5 is not in (0, 1)"),
        ({"train.max_steps": 0}, "train.max_steps: 0 is below the minimum 1"),
        ({"codir.layer_map": [0, 2]}, "codir.layer_map: 0 is below the minimum 1"),
        ({"teacher.path": ""}, "teacher.path: must name the teacher model folder"),
        ({"data.eval_blocks": -1}, "data.eval_blocks: -1 is below the minimum 0"),
        ({"eval.batch_size": 0}, "eval.batch_size: 0 is below the minimum 1"),
    ],
)
def test_impossible_values(tmp_path, tiny_teacher, override, expected):
    assert error_of(lambda: load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), override)) == expected


def test_layer_map_past_teacher_depth_is_rejected_from_the_config_alone(tmp_path, tiny_teacher):
    cfg = load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"codir.layer_map": [2, 9]})
    message = error_of(lambda: plan_models(cfg))
    assert message == "codir.layer_map: teacher layer(s) [9] outside 1..4 (the teacher's depth)"
    cfg = load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"codir.layer_map": [2, 4], "student.num_layers": 3})
    assert "has 2 entries but the student has 3 layers" in error_of(lambda: plan_models(cfg))


def test_plan_defaults_to_half_depth_uniform_map(tmp_path, tiny_teacher, headless_teacher):
    plan = plan_models(load_config(PretrainConfig, str(base(tmp_path, tiny_teacher))))
    assert plan.layer_map == [2, 4]
    assert plan.student_config.num_hidden_layers == 2
    assert plan.teacher_has_mlm_head
    plan = plan_models(load_config(PretrainConfig, str(base(tmp_path, headless_teacher)), {"codir.layer_map": [1, 3, 4]}))
    assert plan.student_config.num_hidden_layers == 3
    assert not plan.teacher_has_mlm_head


def test_missing_paths_and_unparsable_files(tmp_path, tiny_teacher):
    assert error_of(lambda: load_config(PretrainConfig, str(tmp_path / "nope.yaml"))).startswith("config file not found")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "does not parse" in error_of(lambda: load_config(PretrainConfig, str(bad)))
    cfg = load_config(PretrainConfig, str(base(tmp_path, tmp_path / "no_teacher")))
    assert "teacher.path: no config.json in" in error_of(lambda: plan_models(cfg))


def test_student_with_other_vocabulary_is_rejected(tmp_path, tiny_teacher):
    other = tiny_bert_config(layers=2, vocab=99)
    other.save_pretrained(tmp_path / "small")
    cfg = load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"student.init": "config", "student.config_path": str(tmp_path / "small")})
    assert "student vocabulary size 99 differs from the teacher's" in error_of(lambda: plan_models(cfg))


def test_error_line_reports_empty_and_multiline_messages():
    from codir_ds.runtime.errors import error_line

    assert error_line(KeyError()) == "KeyError"  # str() is empty: no IndexError
    assert error_line(ValueError("\n  first  \nsecond")) == "first"
    assert error_line(RuntimeError("head:\n\tMissing key(s): x"), index=1) == "Missing key(s): x"
    assert error_line(RuntimeError("only"), index=1) == "only"
    assert error_line(OSError("x" * 500), limit=200) == "x" * 200


@pytest.mark.parametrize(
    "old, new",
    [("loss.kd", "renamed loss.alpha (the KD mix)"), ("loss.codir", "renamed loss.beta (the intermediate-loss weight)")],
)
def test_old_stage2_loss_weight_names_point_to_the_new_ones(old, new):
    message = error_of(lambda: load_config(FinetuneConfig, None, {"teacher.path": "t", old: 0.5}))
    assert message == f"config key '{old}' is no more: {new}"


def test_stage1_needs_exactly_one_corpus_source(tmp_path, tiny_teacher):
    path = base(tmp_path, tiny_teacher, data={"prepared": "/data/prepared"})
    assert error_of(lambda: load_config(PretrainConfig, str(path))) == (
        "data: give exactly one of data.prepared (a `codir-ds prepare` folder), data.files or data.dataset; got data.prepared and data.files"
    )


def test_layer_map_odd_takes_the_teachers_odd_layers_for_a_half_depth_student(tmp_path, tiny_teacher):
    assert plan_models(load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"codir.layer_map": "odd"})).layer_map == [1, 3]
    three = load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"codir.layer_map": "odd", "student.num_layers": 3})
    assert error_of(lambda: plan_models(three)) == (
        "codir.layer_map: odd maps the teacher's 2 odd layers, one per student layer, but the student has 3; "
        "set student.num_layers=2 or list the layers"
    )
    assert error_of(lambda: load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), {"codir.layer_map": "even"})) == (
        "codir.layer_map: 'even' is neither list[int] nor odd"
    )


@pytest.mark.parametrize("given, expected", [(None, "auto"), ("auto", "auto"), ("true", True), (False, False)])
def test_teacher_zero3_takes_auto_or_a_boolean(tmp_path, tiny_teacher, given, expected):
    overrides = {} if given is None else {"teacher.zero3": given}
    assert load_config(PretrainConfig, str(base(tmp_path, tiny_teacher)), overrides).teacher.zero3 == expected


def test_deepspeed_config_auto_picks_by_world_size_and_a_resume_keeps_the_first_choice(tmp_path, tiny_teacher, capsys):
    cfg = load_config(PretrainConfig, str(base(tmp_path, tiny_teacher, output={"dir": str(tmp_path / "out")})))
    assert cfg.train.deepspeed_config == "auto"
    one, two = (Path(chosen_ds_config(cfg.train, ranks).deepspeed_config) for ranks in (1, 2))
    assert (one.name, two.name) == ("cpu_zero0.json", "cpu_small.json")  # the fastest measured on one CPU rank; ZeRO-2 on several
    assert load_ds_config(cfg.train, 1)["zero_optimization"]["stage"] == 0
    assert "train.deepspeed_config auto: " in capsys.readouterr().out

    assert first_start_setting(cfg, "train", "deepspeed_config") is None  # nothing to resume
    (cfg.checkpoint_dir / "step_3").mkdir(parents=True)
    (cfg.checkpoint_dir / "step_3/rank_0.json").write_text("{}")
    (cfg.checkpoint_dir / "run.json").write_text(json.dumps({"config": {"train": {"deepspeed_config": str(two)}}}))
    kept = chosen_ds_config(cfg.train, 1, first_start_setting(cfg, "train", "deepspeed_config"))
    assert kept.deepspeed_config == str(two)  # 2 ranks -> 1: the run keeps its ZeRO stage
    assert f"{two} (as the run's first start chose)" in capsys.readouterr().out

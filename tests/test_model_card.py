"""The model card every export carries: hub-readable YAML metadata (with evaluation results when there are any)
and the Markdown body, rendered from plain data."""

from huggingface_hub import ModelCard

from codir_ds import __version__
from codir_ds.runs.model_card import CardFacts, render_card


def facts(**changes) -> CardFacts:
    base = dict(
        name="student",
        stage=2,
        teacher="/models/bert-base-sst2",
        family="bert",
        datasets=["sst2"],
        made={"student layers": "6, initialised from checkpoint", "precision": "bf16", "ranks": "8"},
        student_params=66_000_000,
        teacher_params=110_000_000,
        metrics={"dev": {"accuracy": 0.9123, "f1": 0.9}, "test": {"accuracy": 0.88}},
        metrics_from="best dev/accuracy, step 40",
        run_digest="0123456789ab",
    )
    return CardFacts(**{**base, **changes})


def test_the_hub_reads_metadata_and_eval_results(tmp_path):
    (tmp_path / "README.md").write_text(render_card(facts()))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "/models/bert-base-sst2"
    assert card.data.tags == ["distillation", "codir", "bert"]
    assert card.data.datasets == ["sst2"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("dev", "accuracy"): 0.9123, ("dev", "f1"): 0.9, ("test", "accuracy"): 0.88}
    assert {r.task_type for r in card.data.eval_results} == {"text-classification"}
    body = card.text
    assert "| test | 0.8800 |  |" in body  # a metric a split lacks is left empty
    assert "| precision | bf16 |" in body
    assert "The student has 60% of the teacher's parameters." in body
    assert 'AutoModelForSequenceClassification.from_pretrained("path/to/student")' in body
    assert f"Made with codir-ds {__version__}; run digest `0123456789ab`" in body


def test_without_metrics_or_teacher_size_the_card_says_less(tmp_path):
    (tmp_path / "README.md").write_text(render_card(facts(stage=1, metrics=None, teacher_params=None, datasets=["wiki.jsonl", "news.txt"])))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None
    assert card.data.datasets == ["wiki.jsonl", "news.txt"]
    assert card.data.pipeline_tag == "fill-mask"
    assert "## Evaluation" not in card.text
    assert "| teacher |" not in card.text
    assert "AutoModelForMaskedLM" in card.text

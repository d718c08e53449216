"""Each encoder family end to end, in one process: stage 1 with logit KD from its masked-LM teacher, a student
initialised from teacher layers, a resume equal to the uninterrupted run, the export loaded by plain transformers,
then stage 2 from that export. The fixtures are tiny real models with tokenizers trained on the embedded corpus (tests/families.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from families import FAMILIES, TINY, news_corpus, save_family, save_task_teacher
from helpers import REPO, read_json, run_deepspeed, write_run_config, write_task, write_task_config
from safetensors import safe_open
from transformers import AlbertConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config

from codir_ds.finetune.config import FinetuneConfig
from codir_ds.finetune.run import FinetuneStage, run_finetuning
from codir_ds.method.negatives import NegativeQueue
from codir_ds.method.objective import CodirObjective
from codir_ds.models.loading import build_student, plan_models
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.modules import LossWeights, StudentWithHeads, TeacherFeatures, masked_lm_logits
from codir_ds.pretrain.run import PretrainStage, run_pretraining
from codir_ds.runtime.config import load_config
from codir_ds.runtime.errors import CodirError


@pytest.fixture(scope="session")
def family_teachers(tmp_path_factory) -> dict:
    """Every family's masked-LM teacher folder, built once per test run."""
    root = tmp_path_factory.mktemp("families")
    return {name: save_family(name, root / name, news_corpus()) for name in FAMILIES}


@pytest.fixture(scope="session")
def news_sample(tmp_path_factory):
    """The first 40 documents of the embedded corpus: the stage-1 training text."""
    path = tmp_path_factory.mktemp("news") / "news.txt"
    path.write_text("\n".join(news_corpus().read_text(errors="replace").splitlines()[:40]) + "\n")
    return path


def stage1_config(folder, teacher, corpus, **sections):
    sections = {"student": {"num_layers": 2}, "loss": {"kd": 0.5}, "data": {"num_workers": 0}, "checkpoint": {"every": 2}, **sections}
    return load_config(PretrainConfig, str(write_run_config(folder, teacher, corpus, train={"max_steps": 3}, **sections)), {})


def assert_copied_from_teacher(name, teacher, cfg):
    """Student layer i holds teacher layer m(i); embeddings and the masked-LM head are the teacher's."""
    plan = plan_models(cfg)
    assert plan.teacher_has_mlm_head
    student = build_student(cfg.student, str(teacher), plan.student_config, plan.layer_map)
    stored = safe_open(str(teacher / "model.safetensors"), "pt")
    layers = plan.layout.layers
    mapped = {f"{layers}.{i}.": f"{layers}.{m - 1}." for i, m in enumerate(plan.layer_map)}
    checked = 0
    for key, value in student.state_dict().items():
        source = next((key.replace(s, t) for s, t in mapped.items() if s in key), key)
        if source in stored.keys():
            torch.testing.assert_close(value, stored.get_tensor(source), rtol=0, atol=0, msg=f"{name}: {key} <- {source}")
            checked += 1
    assert checked >= len(stored.keys()) - 2 * 16, name  # everything but two teacher layers' tensors (fewer per layer in any family)
    assert set(plan.layout.head_tensors) <= set(stored.keys())
    if name == "modernbert":  # each copied layer keeps the teacher layer's attention kind
        assert plan.student_config.layer_types == [plan.teacher_config.layer_types[m - 1] for m in plan.layer_map]


@dataclass
class FamilyRuns:
    """One family through both stages: stage 1 for 3 steps, stage 1 again from its step-2 checkpoint, then stage 2."""

    whole: PretrainStage
    resumed: PretrainStage
    stage2: FinetuneStage
    folder: Path

    @property
    def exports(self) -> tuple[Path, Path]:
        return self.folder / "out/student", self.folder / "stage2/out/student"


def distil(teacher: Path, corpus: Path, folder: Path) -> FamilyRuns:
    whole = run_pretraining(stage1_config(folder, teacher, corpus))
    resumed = run_pretraining(stage1_config(folder, teacher, corpus, checkpoint={"every": 2, "resume": "step_2"}))  # step 3 again
    train, dev = write_task(folder / "train.csv", 48), write_task(folder / "dev.csv", 16, seed=1)
    task_teacher = save_task_teacher(teacher, folder / "task_teacher")
    student = {"init": "checkpoint", "checkpoint": str(folder / "out/student")}
    task_config = write_task_config(folder / "stage2", task_teacher, train, dev, student=student, train={"max_steps": 3})
    return FamilyRuns(whole, resumed, run_finetuning(load_config(FinetuneConfig, str(task_config), {})), folder)


@pytest.fixture(scope="session")
def family_runs(family_teachers, news_sample, tmp_path_factory):
    """`family_runs(name)`: the family's `FamilyRuns`, run on first use and kept for the session."""
    done: dict[str, FamilyRuns] = {}

    def runs(name: str) -> FamilyRuns:
        if name not in done:
            done[name] = distil(family_teachers[name], news_sample, tmp_path_factory.mktemp(name))
        return done[name]

    return runs


@pytest.mark.parametrize("name", FAMILIES)
def test_family_end_to_end(name, family_teachers, family_runs, news_sample, tmp_path):
    teacher = family_teachers[name]
    assert_copied_from_teacher(name, teacher, stage1_config(tmp_path, teacher, news_sample))

    runs = family_runs(name)
    assert runs.whole.plan.layer_map == [2, 4]
    assert len(runs.whole.history) == 3
    for step in runs.whole.history:
        assert {"mlm", "kd", "codir"} <= step.keys()
        assert all(math.isfinite(step[term]) for term in ("total", "mlm", "kd", "codir")), step
    assert runs.whole.history[2]["kd"] > -1e-6  # a KL divergence, 0 up to rounding where a tiny head predicts near-uniformly (ModernBERT)
    assert runs.resumed.history == runs.whole.history[2:]  # the resumed step equals the uninterrupted one, bit for bit

    export, stage2_export = runs.exports
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(teacher).get_vocab()
    probe = tokenizer(["The fire spread towards Sydney.", "A second, longer sentence about the bush fires."], padding=True, return_tensors="pt")
    exported = AutoModelForMaskedLM.from_pretrained(export).eval()
    trained = runs.resumed.student.module.student.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in probe.items() if k != "token_type_ids"}
        torch.testing.assert_close(exported(**inputs).logits, trained(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert type(exported).__name__ == type(trained).__name__

    assert len(runs.stage2.history) == 3
    assert all(math.isfinite(step[term]) for step in runs.stage2.history for term in ("total", "ce", "kd", "codir"))
    classifier = AutoModelForSequenceClassification.from_pretrained(stage2_export)
    assert classifier.config.num_hidden_layers == 2
    assert classifier.config.id2label == {0: "neg", 1: "pos"}


def test_exports_load_where_codir_ds_cannot_be_imported(family_runs):
    """In one process without codir_ds: every family's stage-1 export predicts a masked token and its stage-2
    export classifies, through the Auto classes and its own tokenizer."""
    script = [
        "import sys, torch; sys.modules['codir_ds'] = None",
        "from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer",
    ]
    for name in FAMILIES:
        stage1, stage2 = family_runs(name).exports
        script += [
            f"tok = AutoTokenizer.from_pretrained('{stage1}')",
            "enc = tok('The fire ' + tok.mask_token + ' towards Sydney.', return_tensors='pt')",
            f"mlm = AutoModelForMaskedLM.from_pretrained('{stage1}').eval()",
            f"clf = AutoModelForSequenceClassification.from_pretrained('{stage2}').eval()",
            "shaped = mlm(**enc).logits.shape[1:] == (enc['input_ids'].shape[1], mlm.config.vocab_size)",
            f"print('{name}', type(mlm).__name__, shaped, clf.config.id2label[clf(**enc).logits.argmax(-1).item()])",
        ]
    loaded = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    lines = [line.split() for line in loaded.stdout.splitlines() if line.split()[:1] and line.split()[0] in FAMILIES]
    assert [line[0] for line in lines] == list(FAMILIES)
    assert all(line[2] == "True" and line[3] in ("neg", "pos") for line in lines), lines


def test_layer_init_from_a_model_that_shares_its_layers_is_refused_before_any_weights_load(news_sample, tmp_path):
    albert = tmp_path / "albert"
    AlbertConfig(**TINY, embedding_size=16).save_pretrained(albert)  # a config and no weights: none may be needed
    with pytest.raises(CodirError, match=r"^student.init: teacher_layers needs one set of weights per layer, but albert .* shares its weights"):
        plan_models(stage1_config(tmp_path, albert, news_sample))


def test_a_model_type_without_a_masked_lm_encoder_is_one_line(tmp_path, news_sample):
    GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CodirError, match=r"^teacher.path: model type 'gpt2' has no masked-LM encoder in transformers"):
        plan_models(stage1_config(tmp_path, tmp_path / "gpt2", news_sample))


def test_roberta_positions_after_the_padding_offset_bound_the_sequence_length(family_teachers, news_sample, tmp_path):
    """66 position embeddings, ids counted from padding_idx + 1 = 2: 64 usable positions."""
    cfg = stage1_config(tmp_path, family_teachers["roberta"], news_sample, data={"max_seq_length": 65, "num_workers": 0})
    with pytest.raises(CodirError, match=r"^data.max_seq_length: 65 exceeds the 64 positions of the roberta teacher; set data.max_seq_length=64$"):
        run_pretraining(cfg)


def masked_batch(tokenizer, generator):
    """Two sentences with three positions per row masked, as the masking leaves them: ids, attention mask, labels
    [2, seq] (-100 elsewhere) and the positions [2, 3], ascending."""
    batch = tokenizer(["The fire spread towards Sydney overnight.", "Rain is expected in the west on Sunday."], padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    positions = torch.rand(len(ids), 5, generator=generator).argsort(dim=1)[:, :3].sort(dim=1).values + 1  # among the first words
    labels = torch.full_like(ids, -100).scatter(1, positions, ids.gather(1, positions))
    return ids, batch["attention_mask"], labels, positions


@pytest.mark.parametrize("name, options", [*((name, {}) for name in FAMILIES), ("deberta-v3", {"legacy": False})])  # DeBERTa's newer head
def test_masked_lm_head_at_masked_positions_equals_the_models_own_logits(name, options, family_teachers):
    teacher = family_teachers[name]
    model = AutoModelForMaskedLM.from_pretrained(teacher, **options).eval()
    input_ids, attention_mask, labels, positions = masked_batch(AutoTokenizer.from_pretrained(teacher), torch.Generator().manual_seed(0))
    with torch.no_grad():
        body = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ours = masked_lm_logits(model, body, positions)
        reference = model(input_ids=input_ids, attention_mask=attention_mask).logits[labels.ne(-100)]
    assert ours.shape == (positions.numel(), model.config.vocab_size)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_stage1_kd_is_taken_at_masked_positions_only(family_teachers):
    """KD from TeacherFeatures' logits into StudentWithHeads equals T^2 KL(teacher || student) written out
    from both models' full logits, averaged over the masked positions (and differs from all positions)."""
    teacher_dir, temperature = family_teachers["roberta"], 2.0
    torch.manual_seed(0)
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForMaskedLM.from_pretrained(teacher_dir, num_hidden_layers=2).eval()
    with torch.no_grad():  # away from the near-uniform predictions of a fresh initialisation
        for parameter in [*teacher.parameters(), *student.parameters()]:
            parameter.add_(0.3 * torch.randn_like(parameter))
    input_ids, attention_mask, labels, positions = masked_batch(AutoTokenizer.from_pretrained(teacher_dir), torch.Generator().manual_seed(1))
    features, teacher_logits = TeacherFeatures(teacher, [2, 4], "mean", with_logits=True)(input_ids, attention_mask, positions)
    weights = LossWeights(mlm=1.0, kd=0.5, kd_temperature=temperature, codir=1.0)
    objective = CodirObjective(2 * student.config.hidden_size, features.shape[1], 8, 0.07, queue=NegativeQueue(0, features.shape[1]))
    module = StudentWithHeads(student, objective, "mean", weights).eval()
    with torch.no_grad():
        terms, _ = module(input_ids, attention_mask, labels, positions, features, teacher_logits)

        def kd(rows):
            t = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[rows].double() / temperature
            s = student(input_ids=input_ids, attention_mask=attention_mask).logits[rows].double() / temperature
            p_t = t.softmax(-1)
            return (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean() * temperature**2

        masked, everywhere = kd(labels.ne(-100)), kd(attention_mask.bool())
    assert terms["kd"].item() == pytest.approx(masked.item(), rel=1e-5)
    assert abs(masked.item() - everywhere.item()) > 1e-3 * masked.item()


@pytest.mark.multirank
def test_every_family_distils_with_kd_on_two_ranks_through_a_zero3_teacher(family_teachers, news_sample, tmp_path):
    """2 real ranks, KD on, a ZeRO-3 teacher: every family trains with finite losses, and DeBERTa-v3, whose head reads
    the word embeddings outside their module's forward, gives exactly the replicated teacher's losses: ZeRO-3 gathers them."""
    configs = []
    for name in FAMILIES:
        (tmp_path / name).mkdir()
        sections = {"student": {"num_layers": 2}, "loss": {"kd": 0.5}, "data": {"num_workers": 0}, "checkpoint": {"every": 0}}
        configs.append(str(write_run_config(tmp_path / name, family_teachers[name], news_sample, train={"max_steps": 2}, **sections)))
    deberta = configs[list(FAMILIES).index("deberta-v3")]
    arguments = [f"--configs={','.join(configs)}", f"--out={tmp_path / 'facts.json'}", f"--replicated_too={deberta}"]
    result = run_deepspeed(REPO / "tests/workers/families_worker.py", arguments)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    facts = read_json(tmp_path / "facts.json")
    for name, config in zip(FAMILIES, configs):
        partitioned = facts[f"{config} zero3=True"]
        assert partitioned["teacher_here"] < 0.6 * partitioned["teacher_total"], name  # rank 0 holds about half
        assert len(partitioned["losses"]) == 2, name
        assert all(math.isfinite(value) for step in partitioned["losses"] for value in step.values()), name  # KD ~0 for tiny ModernBERT
    replicated = facts[f"{deberta} zero3=False"]
    assert replicated["teacher_here"] == replicated["teacher_total"]
    for got, want in zip(facts[f"{deberta} zero3=True"]["losses"], replicated["losses"], strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert got["kd"] > 0

"""Stage-1 data path throughput: `prepare`, the masked micro-batch loader, and resuming, side by side.

    python bench/data_throughput.py [--corpus=FILE --teacher=DIR] [--repeats=5] [--batches=1000] [--sections=abc]

(a) prepare MB/s and tokens/s with 1 and 2 processes against the tokenizer's own single-process rate
    (one batched fast-tokenizer call over the same documents), and the 2-process speed-up; 2 processes also on
    the documents shuffled (the pool's batches hold about equal bytes, so the order should not matter);
(b) loader tokens/s per worker for masked 32 x 128 micro-batches (DataLoader with 1 and 2 workers), the
    in-process rate, and what the training process did before prepared corpora (tokenise, pack and mask with
    transformers' collator inside the step) on the same corpus;
(c) seconds from creating the reader to the first batch, at sample 0 and at the end of a 10-million-block
    corpus (a sparse tokens.bin).
`--sections` picks which of (a), (b), (c) to run. Without --corpus the demo corpus (Wikipedia articles + news,
documents from a few words to 117k characters) and MiniLM teacher are used. Tokenizers run one thread per
process (TOKENIZERS_PARALLELISM=false). Medians of `repeats`, variants interleaved. Prints a Markdown table.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per process: per-process rates

import json
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import fire
import yaml
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from codir_ds.demo import minilm_path, prepare_demo
from codir_ds.pretrain.data import MicroBatches, PreparedCorpus, micro_batch_loader
from codir_ds.pretrain.prepare import prepare_corpus

BATCH, SEQ = 32, 128


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def tokenizer_rate(tokenizer, documents: list[str]) -> float:
    return timed(lambda: tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False))


def cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def loader_rate(batches: MicroBatches, workers: int, count: int) -> tuple[float, float, float]:
    """Over `count` batches after the first: wall tokens/s, tokens per worker CPU second, main-process CPU
    microseconds per batch."""
    workers_before = cpu_seconds(resource.RUSAGE_CHILDREN)
    iterator = iter(micro_batch_loader(batches, 0, num_workers=workers))
    next(iterator)  # starts the workers
    main_before, start = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(count):
        next(iterator)
    seconds, main = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - main_before
    del iterator  # workers exit and are reaped: their CPU time shows in RUSAGE_CHILDREN
    worker_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - workers_before
    tokens = count * BATCH * SEQ
    return tokens / seconds, tokens / worker_cpu if workers else float("nan"), main / count * 1e6


def first_batch_seconds(folder: Path, start_sample: int, workers: int) -> float:
    def first():
        batches = MicroBatches(PreparedCorpus(str(folder)), BATCH, seed=0)
        iterator = iter(micro_batch_loader(batches, start_sample // BATCH, num_workers=workers))
        next(iterator)
        return iterator

    start = time.perf_counter()
    iterator = first()
    seconds = time.perf_counter() - start
    del iterator
    return seconds


def sparse_corpus(template: Path, folder: Path, blocks: int) -> Path:
    """A prepared folder of `blocks` all-zero blocks (a sparse file) with the template part's meta."""
    meta = json.loads((template / "meta.json").read_text())
    part = folder / "part-00000-of-00001"
    part.mkdir(parents=True)
    with (part / "tokens.bin").open("wb") as handle:
        handle.truncate(blocks * meta["block_length"] * 2)
    meta["counts"] = {**meta["counts"], "blocks": blocks}
    (part / "meta.json").write_text(json.dumps(meta))
    return folder


def main(corpus: str = "", teacher: str = "", repeats: int = 5, batches: int = 1000, blocks: int = 10_000_000, sections: str = "abc") -> None:
    work, load = Path(tempfile.mkdtemp(prefix="data_bench_")), os.getloadavg()[0]  # other work skews every figure
    if not corpus:
        config = yaml.safe_load(Path(prepare_demo(str(work / "demo"))).read_text())
        corpus, teacher = config["data"]["files"][0], config["teacher"]["path"]
    teacher = teacher or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    documents = [json.loads(line)["text"] for line in Path(corpus).open()] if corpus.endswith(".jsonl") else Path(corpus).read_text().splitlines()
    lengths = sorted(len(d) for d in documents)
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    prepared = work / "prepared"
    prepare_corpus([corpus], teacher, str(prepared))  # also fills the datasets cache: timings exclude parsing the file
    tokens = PreparedCorpus(str(prepared)).meta["counts"]["tokens"]
    rows, summary = [], []
    if "a" in sections:
        rows += prepare_rows(corpus, teacher, tokenizer, documents, megabytes, tokens, work, repeats, summary)
    if "b" in sections:
        rows += loader_rows(PreparedCorpus(str(prepared)), tokenizer, documents, batches, repeats, summary)
    if "c" in sections:
        rows += resume_rows(PreparedCorpus(str(prepared)), work, blocks, repeats, summary)
    print(
        f"\ncorpus {corpus}: {megabytes:.1f} MB, {len(documents)} documents of {lengths[0]:,} to {lengths[-1]:,} characters "
        f"(median {lengths[len(lengths) // 2]:,}), {tokens:,} tokens; teacher {teacher}; {os.cpu_count()} CPUs; median of {repeats}; "
        f"1-minute load average at the start {load:.2f}\n"
    )
    print("| measurement | rate | comparison |")
    print("| --- | --- | --- |")
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows))
    print("\n" + "; ".join(summary))
    shutil.rmtree(work, ignore_errors=True)


def prepare_rows(corpus: str, teacher: str, tokenizer, documents: list[str], megabytes: float, tokens: int, work: Path, repeats: int, summary):
    """(a) prepare with 1 and 2 processes (and on the documents shuffled) against the tokenizer alone."""
    shuffled = work / "shuffled.jsonl"
    random.Random(0).shuffle(order := list(documents))
    shuffled.write_text("".join(json.dumps({"text": d}) + "\n" for d in order))
    prepare_corpus([str(shuffled)], teacher, str(work / "shuffled"))
    variants = {"1 process": (corpus, 1), "2 processes": (corpus, 2), "2 processes, documents shuffled": (str(shuffled), 2)}
    times = {"tokenizer": [], **{v: [] for v in variants}}
    for _ in range(repeats):
        times["tokenizer"].append(tokenizer_rate(tokenizer, documents))
        for variant, (source, procs) in variants.items():
            shutil.rmtree(work / "timed", ignore_errors=True)
            times[variant].append(timed(lambda: prepare_corpus([source], teacher, str(work / "timed"), num_proc=procs)))
    seconds = {k: statistics.median(v) for k, v in times.items()}
    reference = megabytes / seconds["tokenizer"]
    summary += [
        f"prepare {megabytes / seconds['1 process']:.2f} MB/s per process",
        f"2-process speed-up {seconds['1 process'] / seconds['2 processes']:.2f}x",
        f"load average after (a) {os.getloadavg()[0]:.2f}",
    ]
    return [
        ("(a) tokenizer alone, 1 process, batched call", f"{reference:.2f} MB/s, {tokens / seconds['tokenizer']:,.0f} tokens/s", "reference"),
        *[
            (
                f"(a) prepare, {v}",
                f"{megabytes / seconds[v]:.2f} MB/s, {tokens / seconds[v]:,.0f} tokens/s",
                f"per process {megabytes / seconds[v] / procs / reference:.0%} of the tokenizer"
                + (f"; {seconds['1 process'] / seconds[v]:.2f}x 1 process" if procs > 1 else ""),
            )
            for v, (_, procs) in variants.items()
        ],
    ]


def loader_rows(reader: PreparedCorpus, tokenizer, documents: list[str], batches: int, repeats: int, summary):
    """(b) the masked micro-batch loader against the old in-step stream."""
    micro = MicroBatches(reader, BATCH, seed=0)
    rates = {w: [loader_rate(micro, w, batches) for _ in range(repeats)] for w in (0, 1, 2)}
    old = statistics.median(in_step_rate(tokenizer, documents, batches // 4) for _ in range(repeats))
    wall = {w: statistics.median(r[0] for r in rates[w]) for w in rates}
    cpu = {w: statistics.median(r[1] for r in rates[w]) for w in (1, 2)}
    main_cpu = {w: statistics.median(r[2] for r in rates[w]) for w in (1, 2)}
    summary.append(f"loader {wall[2] / 2:.0f} tokens/s per worker")
    return [
        ("(b) tokenise + pack + collate inside the step (the old stream's work)", f"{old:,.0f} tokens/s", "reference"),
        ("(b) MicroBatches, in process", f"{wall[0]:,.0f} tokens/s", f"{wall[0] / old:.1f}x old stream"),
        *[
            (
                f"(b) DataLoader, {w} worker{'s' if w > 1 else ''}",
                f"{wall[w]:,.0f} tokens/s total, {wall[w] / w:,.0f} per worker",
                f"{cpu[w]:,.0f} tokens per worker CPU second; main process {main_cpu[w]:.0f} us CPU per batch; {wall[w] / w / old:.1f}x old stream",
            )
            for w in (1, 2)
        ],
    ]


def resume_rows(reader: PreparedCorpus, work: Path, blocks: int, repeats: int, summary):
    """(c) seconds to the first batch at the start and at the end of a large (sparse) corpus."""
    big = sparse_corpus(reader.parts[0], work / "big", blocks)
    end = blocks - BATCH
    resume = {(s, w): statistics.median(first_batch_seconds(big, s, w) for _ in range(repeats)) for s in (0, end) for w in (0, 2)}
    summary.append(f"resume at end {max(resume[end, w] for w in (0, 2)):.3f} s")
    return [
        (f"(c) first batch at sample {s:,}, {w} workers", f"{resume[s, w]:.3f} s", f"{blocks:,} blocks of {reader.block_length}")
        for s in (0, end)
        for w in (0, 2)
    ]


def in_step_rate(tokenizer, documents: list[str], batches: int) -> float:
    """Tokens/s of the pre-`prepare` data path: tokenise documents as needed, pack 126-token blocks, mask with
    transformers' `DataCollatorForLanguageModeling`, all in the training process."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    cls_id, sep_id, block = tokenizer.cls_token_id, tokenizer.sep_token_id, SEQ - 2

    def run() -> None:
        pending, docs = [], iter(documents * 100)
        for _ in range(batches):
            rows = []
            while len(rows) < BATCH:
                while len(pending) < block:
                    pending += tokenizer(next(docs), add_special_tokens=False, verbose=False)["input_ids"] + [sep_id]
                rows.append({"input_ids": [cls_id, *pending[:block], sep_id]})
                del pending[:block]
            collator(rows)

    return batches * BATCH * SEQ / timed(run)


if __name__ == "__main__":
    fire.Fire(main)

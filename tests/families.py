"""Tiny real models of each supported encoder family, built from their `transformers` config classes, with
tokenizers trained on the embedded news corpus by the `tokenizers` and `sentencepiece` libraries and saved with
`save_pretrained`, so that codir-ds loads them through `from_pretrained` exactly as a user's hub models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2Tokenizer,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraTokenizer,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaTokenizer,
)

from codir_ds.demo import NEWS, _gensim_data

VOCAB = 500
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def news_corpus() -> Path:
    """The embedded corpus (300 news documents, one per line) the demo trains on."""
    return _gensim_data(NEWS)


def _lines(corpus: Path) -> list[str]:
    return corpus.read_text(errors="replace").splitlines()


def wordpiece(folder: Path, corpus: Path, tokenizer_class=BertTokenizer):
    """A WordPiece vocabulary (BERT, ELECTRA) trained by `tokenizers`, loaded as the family's tokenizer class."""
    trainer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer.normalizer = None
    trainer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer.train_from_iterator(_lines(corpus), trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=BERT_SPECIALS))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(sorted(trainer.get_vocab(), key=trainer.get_vocab().get)) + "\n")
    return tokenizer_class(vocab=str(vocab))


def byte_level_bpe(folder: Path, corpus: Path, specials: list[str]) -> Tokenizer:
    """A byte-level BPE (RoBERTa, ModernBERT) trained by `tokenizers`; its vocab.json and merges.txt in `folder`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(_lines(corpus), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=alphabet))
    bpe.model.save(str(folder))
    return bpe


def roberta_tokenizer(folder: Path, corpus: Path):
    byte_level_bpe(folder, corpus, ROBERTA_SPECIALS)
    return RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def modernbert_tokenizer(folder: Path, corpus: Path):
    """ModernBERT ships a byte-level BPE with BERT's special tokens as a plain fast tokenizer."""
    bpe = byte_level_bpe(folder, corpus, BERT_SPECIALS)
    cls, sep = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    bpe.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    specials = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), BERT_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_input_names=["input_ids", "attention_mask"], **specials)


def unigram_sentencepiece(folder: Path, corpus: Path, file: str, tokenizer_class, **pieces):
    """A unigram sentencepiece model (XLM-R, DeBERTa-v3) trained by `sentencepiece`, loaded by the family's class."""
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / file), vocab_size=VOCAB, model_type="unigram", num_threads=1, minloglevel=2, **pieces
    )
    return tokenizer_class.from_pretrained(folder)


def xlmr_tokenizer(folder: Path, corpus: Path):
    return unigram_sentencepiece(folder, corpus, "sentencepiece.bpe", XLMRobertaTokenizer)


def deberta_v3_tokenizer(folder: Path, corpus: Path):
    pieces = dict(pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]")
    return unigram_sentencepiece(folder, corpus, "spm", DebertaV2Tokenizer, user_defined_symbols=["[MASK]"], **pieces)


def _ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def bert(tokenizer):
    return BertForMaskedLM(BertConfig(**TINY, **_ids(tokenizer), max_position_embeddings=64))


def roberta(tokenizer, config_class=RobertaConfig, model_class=RobertaForMaskedLM):
    """RoBERTa's position ids start after the padding id: 64 positions need padding_idx + 1 + 64 embeddings."""
    ids = _ids(tokenizer)
    return model_class(config_class(**TINY, **ids, max_position_embeddings=ids["pad_token_id"] + 65, type_vocab_size=1))


def xlm_roberta(tokenizer):
    return roberta(tokenizer, XLMRobertaConfig, XLMRobertaForMaskedLM)


def deberta_v3(tokenizer):
    """DeBERTa-v3's layout: relative positions only (no absolute ones), shared attention keys, no token types."""
    config = DebertaV2Config(
        **TINY,
        **_ids(tokenizer),
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=16,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        type_vocab_size=0,
    )
    return DebertaV2ForMaskedLM(config)


def modernbert(tokenizer):
    """Rotary positions; global attention on layers 1 and 4, a local window of 8 tokens on layers 2 and 3."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = dict(cls_token_id=cls, sep_token_id=sep, bos_token_id=cls, eos_token_id=sep)
    config = ModernBertConfig(**TINY, **_ids(tokenizer), **ids, max_position_embeddings=64, global_attn_every_n_layers=3, local_attention=8)
    return ModernBertForMaskedLM(config)


def electra(tokenizer):
    """An ELECTRA generator (the part with the masked-LM head), its embeddings narrower than its layers."""
    return ElectraForMaskedLM(ElectraConfig(**TINY, **_ids(tokenizer), embedding_size=24, max_position_embeddings=64))


@dataclass(frozen=True)
class Family:
    tokenizer: Callable[[Path, Path], object]  # (folder, corpus) -> tokenizer trained on the corpus
    model: Callable[[object], torch.nn.Module]  # tokenizer -> random masked-LM model


FAMILIES = {
    "bert": Family(wordpiece, bert),
    "roberta": Family(roberta_tokenizer, roberta),
    "xlm-roberta": Family(xlmr_tokenizer, xlm_roberta),
    "deberta-v3": Family(deberta_v3_tokenizer, deberta_v3),
    "modernbert": Family(modernbert_tokenizer, modernbert),
    "electra": Family(lambda folder, corpus: wordpiece(folder, corpus, ElectraTokenizer), electra),
}


def save_family(name: str, folder: Path, corpus: Path, seed: int = 0) -> Path:
    """`folder/mlm`: the family's masked-LM teacher with its tokenizer, as `save_pretrained` writes them."""
    mlm = folder / "mlm"
    mlm.mkdir(parents=True)
    family = FAMILIES[name]
    tokenizer = family.tokenizer(mlm, corpus)
    torch.manual_seed(seed)
    family.model(tokenizer).save_pretrained(mlm)
    tokenizer.save_pretrained(mlm)
    return mlm


def save_task_teacher(mlm: Path, folder: Path, num_labels: int = 2) -> Path:
    """A sequence classifier on top of the masked-LM teacher's body (its head new), as a user starts stage 2."""
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_pretrained(mlm, num_labels=num_labels).save_pretrained(folder)
    AutoTokenizer.from_pretrained(mlm).save_pretrained(folder)
    return folder

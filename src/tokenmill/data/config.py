"""The `data` config section: tokenizer, sources and mixture weights, packing, sharding (SPEC D)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_positive


@dataclass
class DataConfig:
    tokenizer: str = opt("bpe", "bpe (train on the source, cached in the run folder), byte, a tokenizer.json path "
                                "or a Hub name")
    tokenizer_vocab_size: int = opt(4096, "vocab of a BPE tokenizer trained on first use")
    tokenizer_train_chars: int = opt(50_000_000, "characters of the first source a 'bpe' tokenizer trains on; "
                                                 "0 = all")
    sources: list[str] = opt(["stdlib"], "LOCATION[:WEIGHT] entries: stdlib, a local path (txt/jsonl/parquet/"
                                         "save_to_disk/shards folder), a Hub shortcut (fineweb-edu, ...) or "
                                         "org/name[@config]; weights = share of documents (docs/data.md)")
    text_field: str = opt("text", "column holding the document text")
    eval_fraction: float = opt(0.02, "share of documents held out for eval (by a hash of the document)")
    shuffle_buffer: int = opt(1000, "windows in the shuffle buffer; 0 = no shuffling")
    num_workers: int = opt(0, "dataloader worker processes per rank")
    bos_aligned_eval: bool = opt(False, "start eval windows at document starts")

    def validate(self) -> None:
        require(len(self.sources) > 0, "data.sources", self.sources, "name at least one source, e.g. [stdlib]")
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        require_positive(self, "data", "shuffle_buffer", "num_workers", allow_zero=True)
        require_positive(self, "data", "tokenizer_vocab_size")
        require_positive(self, "data", "tokenizer_train_chars", allow_zero=True)

"""The `data` config section: tokenizer, sources and mixture weights, eval set, shuffling, packing, workers."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config.fields import opt, require, require_choice, require_positive

DEFAULT_EVAL_FRACTION = 0.02  # held-out share of the training sources when no eval set is given
FORMATS = ("text", "prompt_completion")  # the loaders of data/loader.py: pretraining documents, SFT examples


@dataclass
class DataConfig:
    tokenizer: str = opt(
        "bpe", "bpe (train on the source, cached in the run folder), byte, a tokenizer.json path or a Hub name"
    )
    tokenizer_vocab_size: int = opt(4096, "vocab of a BPE tokenizer trained on first use")
    tokenizer_train_chars: int = opt(50_000_000, "characters of the first source a 'bpe' tokenizer trains on; 0 = all")
    sources: list[str] = opt(
        ["stdlib"],
        "LOCATION[:WEIGHT] entries: stdlib, a local path (txt/jsonl/parquet/"
        "save_to_disk/shards folder), a Hub shortcut (fineweb-edu, ...) or "
        "org/name[@config]; weights = share of documents (docs/data.md)",
    )
    text_field: str = opt("text", "column holding the document text")
    format: str = opt(
        "text",
        "text (pretraining documents) or prompt_completion (supervised fine-tuning: rows with prompt/completion "
        "or messages, loss on the completions only; docs/data.md)",
    )
    chat_template: str = opt(
        "default",
        "prompt_completion: the chat template that renders messages rows and is saved with every checkpoint "
        "for serve/export: default (built in), a .jinja file, or none",
    )
    stdlib_skip_generated: bool = opt(
        False, "leave machine-generated files (codec maps, Unicode and number tables) out of stdlib (docs/data.md)"
    )
    eval_sources: list[str] = opt(
        [],
        "a dedicated eval set, same syntax as data.sources (e.g. [val.jsonl]); read "
        "whole by every eval; when set, training uses every document of data.sources",
    )
    eval_fraction: float | None = opt(
        None,
        "share of training documents held out for eval (by a hash of the "
        "text); unset = 0.02 without data.eval_sources, 0 with them",
    )
    shuffle_documents: bool = opt(
        True,
        "read documents in a new seeded order each epoch (indexed sources) or "
        "through a document buffer with shuffled file order (streaming sources)",
    )
    document_buffer: int = opt(1024, "documents per slot in the shuffle buffer of a streaming source")
    stream_local_files: bool = opt(
        False,
        "stream local txt/jsonl/parquet files instead of converting them once to "
        "an Arrow table in the datasets cache (no disk copy; buffer shuffling)",
    )
    shuffle_buffer: int = opt(1000, "windows in the shuffle buffer; 0 = no shuffling")
    num_workers: int = opt(0, "dataloader worker processes per rank")
    bos_aligned_eval: bool = opt(False, "start eval windows at document starts")

    def holdout_fraction(self) -> float:
        """The share of training documents held out by hash: explicit, else 0.02 only without an eval set."""
        if self.eval_fraction is not None:
            return float(self.eval_fraction)
        return 0.0 if self.eval_sources else DEFAULT_EVAL_FRACTION

    def validate(self) -> None:
        require_choice("data.format", self.format, FORMATS)
        require(len(self.sources) > 0, "data.sources", self.sources, "name at least one source, e.g. [stdlib]")
        if self.eval_fraction is not None:
            require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        require_positive(self, "data", "shuffle_buffer", "num_workers", "document_buffer", allow_zero=True)
        require_positive(self, "data", "tokenizer_vocab_size")
        require_positive(self, "data", "tokenizer_train_chars", allow_zero=True)

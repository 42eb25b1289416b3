"""jaxmoe's input pipeline (grain): sources, tokenizers, packing, per-host sharding, resume.

Public API:
    DataConfig, SourceConfig                      the `data:` config section
    make_dataset(cfg, split=, batch_size=, seed=, process_index=, process_count=, num_epochs=)
        -> DataIterator: next() -> {"inputs", "targets", "segment_ids", "positions"}, each
           int32 [batch_size, seq_len]; get_state() / set_state(); stats()
    make_tokenizer(cfg) -> Tokenizer; check_vocab_fits(tokenizer, model_vocab_size)
    corpus_unigram_entropy(cfg) -> nats per target token of the train split
    packing_efficiency(batch_or_batches) -> real tokens / slots
    BadRecordError                                 raised for bad records when `strict`
    DataError                                      the data files cannot serve the config
The multimodal collator lives in `input_pipeline.multimodal`.
"""

from input_pipeline.config import DataConfig, SourceConfig
from input_pipeline.pipeline import (
    BATCH_KEYS,
    DataIterator,
    PipelineStats,
    corpus_unigram_entropy,
    make_dataset,
    make_grain_dataset,
    packing_efficiency,
)
from input_pipeline.sources import BadRecordError, DataError
from input_pipeline.tokenizer import ByteTokenizer, Tokenizer, check_vocab_fits, make_tokenizer

__all__ = [
    "BATCH_KEYS",
    "BadRecordError",
    "DataError",
    "ByteTokenizer",
    "DataConfig",
    "DataIterator",
    "PipelineStats",
    "SourceConfig",
    "Tokenizer",
    "check_vocab_fits",
    "corpus_unigram_entropy",
    "make_dataset",
    "make_grain_dataset",
    "make_tokenizer",
    "packing_efficiency",
]

"""Data: loading and checking rows (`rows`: JSONL, Parquet, `datasets`; prompt/completion or
`messages`), turning them into token ids (`encoding`: chat templates, honest truncation) and
the padded `SequenceBatch` every component shares (`batch`)."""

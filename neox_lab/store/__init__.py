"""The activation store: hook activations of a whole dataset on disk, as safetensors shards.

    writer    `cache_dataset`: run a model over documents and store chosen hooks (resumable, multi-process)
    shards    `ShardWriter`: appends shards to one directory so that no kill or write error loses data
    manifest  the on-disk format: manifest layout, atomic writes, fingerprints, compatibility
    sources   the documents a store is made from (files, folders, datasets, lists, tensors, iterators)
    formats   streaming readers of corpus formats (.jsonl/.txt, .gz, .zst, Parquet, `datasets`)
    windows   documents -> context windows (truncation or packing, BOS, skipping, sampling), prefetching
    reader    `ActivationStore` (alias `CachedActivations`): a lazy, memory-mapped reader of a finished store
    stream    `ActivationStream`: a shuffled, sharded IterableDataset over a store, for training loops

Uses a hooked model only through its public methods (`resolve_hooks`, `run_with_cache`); imports
neither the model's internals nor `neox_lab.analysis`.
"""

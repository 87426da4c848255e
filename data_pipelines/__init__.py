"""Input pipelines: decoding, shards, loaders, dataset adapters."""

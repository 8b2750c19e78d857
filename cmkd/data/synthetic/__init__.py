"""cmkd's built-in, download-free dataset: ``sounds`` renders the procedural events,
``dataset`` writes them once as real shards and registers ``datasets.synthetic``."""

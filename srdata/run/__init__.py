"""The run folder: file names, manifest, shards, resume, atomic writes."""

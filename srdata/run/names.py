"""The names of a run folder's files, shared by the modules that read, write and check them.

Example:
    >>> bool(SHARD_FILE.match("shards/shard-00000.parquet"))
    True
"""

from __future__ import annotations

import re

MANIFEST_FILE = "manifest.json"
ANNOTATED_FILE = "annotated.parquet"
CURRICULUM_FILE = "curriculum.json"  # written by `srdata export` into its output folder
SHARD_FILE = re.compile(r"^shards/shard-\d{5,}\.parquet$")
PUBLISHING_KEY = "publishing"  # in curriculum.json while an export replaces its files (see srdata.curriculum.output)


class RunDirError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""

"""The click type of every path option: a URI is never turned into a local folder named ``s3:``.

``click.Path(path_type=Path)`` would turn ``s3://bucket/runs/a`` into ``s3:/bucket/runs/a``, a
relative local path. :class:`PathParam` keeps a remote URI as text where the option takes one
(``remote=True``) and refuses it, naming the option, where it does not; ``file://`` URIs become
local paths.

Example:
    >>> PathParam().convert("file:///tmp/run", None, None)
    PosixPath('/tmp/run')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from srdata.run.storage import StorageError, local_path, parse_location


class PathParam(click.ParamType):
    """A local path, or with ``remote=True`` also a remote URI (returned as its text)."""

    name = "path"

    def __init__(self, remote: bool = False) -> None:
        self.remote = remote

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        setting = (param.human_readable_name.upper() if param is not None and not param.opts[0].startswith("-")
                   else param.opts[0] if param is not None else "path")
        try:
            location = parse_location(str(value), setting)
            if location.is_remote and self.remote:
                return location.uri
            return local_path(str(value), setting)
        except StorageError as err:
            self.fail(str(err).removeprefix(f"{setting} "), param, ctx)

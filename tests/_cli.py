"""The srdata command line in process, for tests: ``invoke("rank", run, "--ties", "reference")``.

Example:
    >>> invoke("rank", "--help").exit_code
    0
"""

from __future__ import annotations

import click
from click.testing import CliRunner, Result

from srdata.cli import export_cmd, inspect_cmd, rank_cmd, report_cmd


def srdata_group() -> click.Group:
    """A click group holding srdata's commands, as the ``srdata`` executable offers them."""
    group = click.Group("srdata")
    for command in (export_cmd, rank_cmd, report_cmd, inspect_cmd):
        group.add_command(command)
    return group


def invoke(*args: object) -> Result:
    """Run ``srdata ARGS...`` in this process (each argument turned into a string); click's result."""
    return CliRunner().invoke(srdata_group(), [str(a) for a in args])

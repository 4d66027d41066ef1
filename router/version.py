"""The installed modelherd's version (the CLI's --version, the metrics' build info)."""

from __future__ import annotations


def version() -> str:
    # Imported here: router.cli imports this module, and every spawned worker imports router.cli.
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("modelherd")
    except PackageNotFoundError:  # a checkout run without installing it
        return "0+unknown"

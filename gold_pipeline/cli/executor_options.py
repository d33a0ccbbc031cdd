"""The --executor / --ray-address options, shared by `gold align` and `gold teacher-cache` (docs/scaling.md)."""

from __future__ import annotations

import typer


def executor_option(ray_unit: str):
    """--executor; `ray_unit` says what runs on Ray (e.g. "one Ray task per shard")."""
    return typer.Option("local", help=f"local (this machine's processes) | ray ({ray_unit}; needs the ray extra).")


def ray_address_option():
    return typer.Option(None, help="With --executor ray: the cluster's HOST:PORT (or ray://HOST:PORT, auto); "
                                   "default: a local Ray cluster.")

"""`brainseg cache list | clear`: the dataset caches (like `pip cache`)."""

from __future__ import annotations

from pathlib import Path

import typer

from brainseg import console as con
from brainseg.cli import options
from brainseg.cli.base import Group
from brainseg.errors import BrainsegError
from brainseg.fsutil import fmt_bytes


def register(app: typer.Typer) -> None:
    """Add ``cache`` and its subcommands to the app."""
    grp = typer.Typer(
        cls=Group,
        name="cache",
        help="Inspect or clear the dataset caches ($BRAINSEG_CACHE_DIR, default "
        "~/.cache/brainseg): uint8 arrays built once per dataset content, rebuilt on demand.",
        no_args_is_help=True,
        rich_markup_mode="rich",
    )

    @grp.command("list")
    def list_(
        json_out: bool = options.json_option("Print the list as JSON on stdout."),
    ) -> None:
        """List the dataset caches: key, the folder each was built from, slices, image size,
        disk use. A cache is keyed by content: it serves identical data wherever it lies now."""
        from brainseg.data.cache import cache_root, list_caches

        entries = list_caches()
        total = sum(e.bytes for e in entries)
        rows = [
            [
                e.key[:12],
                e.dataset if Path(e.dataset).is_dir() else f"{e.dataset} (no longer there)",
                e.slices,
                f"{e.size[0]}x{e.size[1]}",
                fmt_bytes(e.bytes),
                e.created[:16].replace("T", " "),  # to the minute; --json has it whole
            ]
            for e in entries
        ]
        con.result(
            con.table(
                f"{len(entries)} dataset cache(s) in {cache_root()}, {fmt_bytes(total)}",
                ["key", "built from", "slices", "size", "disk", "created"],
                rows,
            )
        )
        if json_out:
            con.emit_json(
                {
                    "cache_dir": str(cache_root()),
                    "bytes": total,
                    "caches": [e.as_dict() for e in entries],
                }
            )

    @grp.command("clear")
    def clear(
        key: str | None = typer.Argument(
            None, help="Key (or its first 4+ hex digits, from `brainseg cache list`) to remove."
        ),
        all_: bool = typer.Option(False, "--all", help="Remove every dataset cache."),
        json_out: bool = options.json_option("Print what was removed as JSON."),
    ) -> None:
        """Remove one dataset cache (KEY) or all of them (--all); they are rebuilt on demand."""
        from brainseg.data.cache import clear_cache, list_caches, remove_cache

        if (key is None) == (not all_):
            raise BrainsegError(
                "give a KEY or --all (not both)",
                hint="`brainseg cache list` shows the keys; `brainseg cache clear --all` "
                "removes every cache",
            )
        if all_:
            entries = list_caches()
            clear_cache()
        else:
            entries = [remove_cache(str(key))]
        freed = sum(e.bytes for e in entries)
        con.result(f"removed {len(entries)} dataset cache(s), {fmt_bytes(freed)} freed")
        if json_out:
            con.emit_json({"removed": [e.key for e in entries], "bytes": freed})

    app.add_typer(grp, name="cache")

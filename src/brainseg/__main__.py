"""Allow ``python -m brainseg`` (also what ``torchrun -m brainseg`` runs); the console script.

``main`` imports the Typer app only when called, so a venv without typer / rich (a torch-free
deployment installed with ``--no-deps`` and too few packages) gets one line naming what to
install, exit 2, instead of a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``brainseg.cli.app.main``; one line and exit 2 when the command's own packages lack."""
    try:
        from brainseg.cli.app import main as cli_main
    except ModuleNotFoundError as exc:
        from brainseg.optional import missing_package_error

        err = missing_package_error(exc)
        if err is None:
            raise
        print(f"error: {err.message}", file=sys.stderr)
        sys.exit(err.exit_code)
    cli_main()


if __name__ == "__main__":
    main()

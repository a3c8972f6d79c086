"""The ``brainseg`` command: the Typer app (``cli.app``) and one module per subcommand."""

"""The ``surgery`` command line (Typer + rich)."""

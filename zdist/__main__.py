"""``python -m zdist``: the ``zdist`` admin command."""

from zdist.cli import main

main(prog_name="zdist")

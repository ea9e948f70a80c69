"""`python -m qarjax` is the `qarjax` command."""

from qarjax.cli import run

run()

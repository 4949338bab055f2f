"""``python -m outlierfree`` runs the CLI."""

from .cli import main

main()

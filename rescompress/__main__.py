"""``python -m rescompress`` runs the command-line interface."""

from rescompress.cli.app import main

main()

"""The ``sd`` command: ``main`` parses the flags and runs one subcommand (cli/main.py); the generation commands live in
cli/generation.py, the flags several commands share in cli/options.py."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]

"""The composition root: the `userembed` CLI and the demo.

The only package that imports the trainer, the server and the refresh job together; each
module registers one area's subcommands. `python -m userembed.commands` is the CLI too (what
torchrun launches).
"""

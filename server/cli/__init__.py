"""The `transplant` console script: one module per command group.

main.py builds the parser and dispatches; offline.py holds the offline commands (zoo,
inspect, compat, analyze, eval, apply), experiment.py `experiment`, serve.py `serve`,
admin.py `admin` (a gRPC client of a running server) and generate.py `generate`;
common.py the helpers they share. Each command group imports its heavy dependencies
only when it runs, so `transplant --help` stays fast.
"""
from .main import build_parser, main

__all__ = ["build_parser", "main"]

"""Helpers every command group of the `transplant` CLI shares: the --json-or-human
output, progress bars on stderr, byte sizes, and the flags several commands take.
Imports nothing heavy, so `transplant --help` stays fast."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys


def _emit(args, doc: dict, human) -> None:
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    else:
        human(doc)


@contextlib.contextmanager
def _progress(total: int, desc: str, quiet: bool = False):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet or None, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def lowrank_flags(p, onto: str) -> None:
    """--rank / --budget, for `apply` (onto the target) and `admin plan/transplant` (the live model)."""
    p.add_argument("--rank", type=int, default=0,
                   help=f"low-rank transplant: move each selected weight by the top RANK singular directions of "
                        f"(donor - {onto}) instead of copying it whole (biases are copied; a generation journals "
                        "the factors)")
    p.add_argument("--budget", type=int, default=0, metavar="PARAMS",
                   help="low-rank transplant within PARAMS factor parameters (rank x (out + in) per module) shared "
                        "across the selected modules (instead of --rank)")


def _common(p: argparse.ArgumentParser, json_flag: bool = True, quiet: bool = True, pickle: bool = True) -> None:
    """The shared flags; a command gets only those that do something for it."""
    if json_flag:
        p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    if pickle:
        p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (pickle can run code)")


SELECTOR_CHOICES = ("lae", "lae_tf", "lae_kind", "dw", "dwx", "taylor", "swap", "loo", "greedy", "greedy_keep", "layer",
                    "layer_ends", "all")

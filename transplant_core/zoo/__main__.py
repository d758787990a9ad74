"""`python -m transplant_core.zoo [build|table|path NAME] [--root DIR] [--force] [--quiet]`."""
from __future__ import annotations

import argparse
import json
import sys

from . import ZooError, build, format_table, model_dir, summarize, zoo_root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m transplant_core.zoo", description=__doc__)
    ap.add_argument("command", nargs="?", default="build", choices=("build", "table", "path"))
    ap.add_argument("name", nargs="?")
    ap.add_argument("--root", default=None, help="zoo directory (default: $TRANSPLANT_ZOO_DIR or the user cache)")
    ap.add_argument("--force", action="store_true", help="rebuild every model")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    try:
        if a.command == "build":
            s = build(a.root, progress=not a.quiet, force=a.force, log=(lambda *x: None) if a.json else print)
            if a.json:
                print(json.dumps(s, indent=2))
            elif not s["built"]:
                print(f"zoo already built in {s['root']}\n" + format_table(s))
        elif a.command == "table":
            s = summarize(a.root)
            print(json.dumps(s, indent=2) if a.json else format_table(s))
        else:
            print(model_dir(a.name, a.root) if a.name else (a.root or zoo_root()))
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m vitops`: the main job.

  python -m vitops selfcheck   run every op on every built backend against its reference
  python -m vitops info        print build information
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("selfcheck", help="run every op against its reference and print a table")
    sub.add_parser("info", help="print build information as JSON")
    args = parser.parse_args(argv)

    import vitops

    command = args.command or "selfcheck"
    if command == "info":
        print(json.dumps(vitops.build_info(), indent=2))
        return 0
    from vitops import _selfcheck

    print(json.dumps(vitops.build_info()))
    return 0 if _selfcheck.run() else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m vitops`: the main job.

  python -m vitops [encode] [--model gemma4|llama4|gemma3] [--image PATH] [--checkpoint PATH] ...
        encode an image (the bundled demo picture by default) with a vision tower (Gemma 4 by
        default) and print the soft-token tensor's shape, a checksum and the time taken
  python -m vitops encode --images DIR_OR_GLOB --out FILE.safetensors [--model ...] ...
        batch mode: encode many images in packed batches into one safetensors file (soft tokens per
        image id), resumable; under torchrun each process encodes a shard, rank 0 merges
  python -m vitops selfcheck
        run every op on every built backend against its reference and print a table
  python -m vitops info
        print build information
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("encode", "selfcheck", "info", "-h", "--help"):
        argv.insert(0, "encode")
    parser = argparse.ArgumentParser(prog="python -m vitops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import _demo

    _demo.add_arguments(sub.add_parser("encode", help="encode an image with a vision tower (--model)"))
    sub.add_parser("selfcheck", help="run every op against its reference and print a table")
    sub.add_parser("info", help="print build information as JSON")
    args = parser.parse_args(argv)
    if args.command == "encode":
        problem = _demo.check_arguments(args)
        if problem:
            parser.exit(2, f"python -m vitops: error: {problem}\n")

    import vitops

    if args.command == "info":
        print(json.dumps(vitops.build_info(), indent=2))
        return 0
    if args.command == "selfcheck":
        from vitops import _selfcheck

        print(json.dumps(vitops.build_info()))
        return 0 if _selfcheck.run() else 1
    try:
        return _demo.run(args)
    except _demo.UserError as e:
        parser.exit(2, f"python -m vitops: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

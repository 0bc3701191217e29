"""``python -m bkbench.flags [--table] [--sweeps FILE]``: print docs/flags.md (or the README's
flag table); with ``--sweeps`` each flag's section also holds its default-settings sweep
(``flag_sweeps.json`` of ``python -m bkbench.experiments.flag_sweeps``)."""

import argparse
import sys

from .registry import flags_doc_markdown, flags_table_markdown
from .sweeps_doc import load_flag_sweeps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bkbench.flags")
    parser.add_argument("--table", action="store_true", help="the README's flag table")
    parser.add_argument("--sweeps", metavar="FILE",
                        help="flag_sweeps.json whose tables go into each flag's section")
    args = parser.parse_args(argv)
    if args.table:
        if args.sweeps:
            parser.error("--sweeps applies to docs/flags.md, not to --table")
        print(flags_table_markdown())
        return 0
    sweeps = None
    if args.sweeps:
        try:
            sweeps = load_flag_sweeps(args.sweeps)
        except (OSError, ValueError) as exc:
            print(f"bkbench.flags: error: {args.sweeps} is not a flag sweeps file: "
                  f"{str(exc).splitlines()[0]}; write it with "
                  "python -m bkbench.experiments.flag_sweeps", file=sys.stderr)
            return 2
    print(flags_doc_markdown(sweeps))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bkbench.flags [--table]``: print docs/flags.md (or the README's flag table)."""

import sys

from .registry import flags_doc_markdown, flags_table_markdown

if __name__ == "__main__":
    print(flags_table_markdown() if "--table" in sys.argv[1:] else flags_doc_markdown())

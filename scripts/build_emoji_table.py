"""Regenerate ``src/clipforge/data/builders/emoji_table.json``: Unicode's emoji-test.txt compacted (code points,
status, emoji version, CLDR name, group and subgroup of every line) with its copyright and permission notice.

    apt-get update && apt-get install -y unicode-data        # /usr/share/unicode/emoji/emoji-test.txt
    .venv/bin/python scripts/build_emoji_table.py [--emoji-test FILE] [--copyright FILE] [--check]

The table lets the ``openmoji`` builder (and ``emoji`` without unicode-data) name emoji with no apt step. The
Unicode licence allows redistribution when the copyright and permission notice go with every copy and a modified
data file says it was modified: both are inside the table (``copyright``, ``licence``, ``modified``). ``--check``
exits 1 if the packaged table differs from what the files give now (it writes nothing).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from clipforge.data.builders.emoji import (
    DEFAULT_EMOJI_TEST,
    EMOJI_TABLE_PATH,
    emoji_table_document,
    load_emoji_table,
    parse_emoji_test,
)

DEFAULT_COPYRIGHT = Path("/usr/share/doc/unicode-data/copyright")
# The permission notice in Debian's copyright file runs from this heading to the trademark paragraph's end.
NOTICE_START = "COPYRIGHT AND PERMISSION NOTICE"
NOTICE_END = "property of their respective owners."


def header_fields(text: str) -> dict[str, str]:
    """Date, version and copyright line from emoji-test.txt's comment header."""
    fields = {}
    for key, pattern in (
        ("date", r"^# Date: (.+)$"),
        ("emoji_version", r"^# Version: (.+)$"),
        ("copyright", r"^# (©.+)$"),
    ):
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise SystemExit(f"emoji-test.txt: no header line matching {pattern!r}")
        fields[key] = match.group(1).strip()
    return fields


def permission_notice(copyright_text: str) -> str:
    start, end = copyright_text.find(NOTICE_START), copyright_text.find(NOTICE_END)
    if start < 0 or end < 0:
        raise SystemExit(f"copyright file: no {NOTICE_START!r} ... {NOTICE_END!r} block")
    lines = copyright_text[start : end + len(NOTICE_END)].splitlines()
    return "\n".join(" ".join(line.split()) for line in lines).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emoji-test", type=Path, default=DEFAULT_EMOJI_TEST)
    parser.add_argument(
        "--copyright", type=Path, default=DEFAULT_COPYRIGHT, help="unicode-data's copyright file"
    )
    parser.add_argument("--out", type=Path, default=EMOJI_TABLE_PATH)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    text = args.emoji_test.read_text(encoding="utf-8")
    fields = header_fields(text)
    entries = parse_emoji_test(text, str(args.emoji_test))
    header = {
        "source": f"emoji-test.txt, Emoji {fields['emoji_version']} ({fields['date']}), from Debian unicode-data",
        "copyright": fields["copyright"],
        "terms_of_use": "https://www.unicode.org/terms_of_use.html (as stated in emoji-test.txt)",
        "licence": permission_notice(args.copyright.read_text(encoding="utf-8")),
        "modified": "This is a modified copy of the Unicode data file emoji-test.txt: comments, padding and the "
        "emoji characters themselves were removed, statuses abbreviated, groups and subgroups turned into "
        "indices (scripts/build_emoji_table.py in clipforge). The code points, statuses, emoji versions, "
        "names, groups and subgroups are unchanged.",
    }
    document = emoji_table_document(entries, header)
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == document
        print(f"{args.out}: {'up to date' if same else 'differs from ' + str(args.emoji_test)}")
        return 0 if same else 1
    args.out.write_text(document, encoding="utf-8")
    reread, _ = load_emoji_table(args.out)
    if [(e.codepoints, e.status, e.version, e.name, e.group, e.subgroup) for e in reread] != [
        (e.codepoints, e.status, e.version, e.name, e.group, e.subgroup) for e in entries
    ]:
        raise SystemExit(f"{args.out}: reading the table back does not give the file's entries")
    print(f"{args.out}: {len(entries):,} entries, {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

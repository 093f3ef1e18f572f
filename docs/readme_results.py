"""Write what `make demo` printed into the README: its tables and verdicts, from cache/report/report.md.

`make readme-results` runs it after `make demo`, so the README's numbers are the report's, regenerated and never
retyped: `python docs/readme_results.py [REPORT] [README] [--minutes M]` (M: the fresh-clone `make demo` time).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo-results:begin", "<!-- demo-results:end -->"
SECTIONS = ("Table 6", "Table 7", "Table 8", "Table 9", "Zero-shot")


def summary(report: str, minutes: float | None) -> list[str]:
    """The report's tables of SECTIONS (heading, table, verdict lines), compact."""
    out = []
    if minutes is not None:
        out += [f"A fresh clone's `make demo` took **{minutes:.1f} min** on 2 CPU cores, the install included.", ""]
    for part in re.split(r"^## ", report, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        if not title.startswith(SECTIONS):
            continue
        table = [line for line in body.splitlines() if line.startswith("|")]
        verdicts = [line for line in body.splitlines() if line.startswith(("*Finding", "Also: "))]
        out += [f"**{title.strip()}**", "", *table, "", *verdicts, ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", nargs="?", default=str(ROOT / "cache" / "report" / "report.md"))
    ap.add_argument("readme", nargs="?", default=str(ROOT / "README.md"))
    ap.add_argument("--minutes", type=float, default=None)
    args = ap.parse_args()
    readme = Path(args.readme).read_text()
    start = readme.index(BEGIN)
    head_end = readme.index("\n", start) + 1
    end = readme.index(END)
    block = summary(Path(args.report).read_text(), args.minutes)
    Path(args.readme).write_text(readme[:head_end] + "\n".join(block).rstrip() + "\n" + readme[end:])
    print(f"wrote {len(block)} lines of results into {args.readme}")


if __name__ == "__main__":
    main()

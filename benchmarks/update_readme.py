"""Copy the benchmark tables from ``benchmarks/results/*.md`` into README.md.

Each table sits in README.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
markers (NAME: export, search, distributed).  Run it after re-running a benchmark::

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _tables(text: str) -> str:
    """The markdown table lines of ``text``, blocks separated as they were."""
    blocks = [b for b in text.split("\n\n") if b.lstrip().startswith("|")]
    return "\n\n".join(b.strip() for b in blocks)


def export_section() -> str:
    text = (RESULTS / "bench_export.md").read_text(encoding="utf-8")
    targets = text[text.index("Targets:"):].strip() if "Targets:" in text else ""
    return "\n\n".join(part for part in (_tables(text), targets) if part)


def search_section() -> str:
    text = (RESULTS / "bench_search.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    head = [line for line in lines if line.startswith(("| subject |", "|---|"))][:2]
    examples = [line for line in lines if line.startswith("| MobileNetV2")]
    spread = text[text.index("Mean over landscape"):].split("\n\nRun time")[0]
    return "\n".join(head + examples) + "\n\n" + spread.strip()


def distributed_section() -> str:
    return _tables((RESULTS / "bench_distributed.md").read_text(encoding="utf-8"))


def main() -> None:
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    for name, body in (("export", export_section()), ("search", search_section()),
                       ("distributed", distributed_section())):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        pattern = re.escape(start) + r".*?" + re.escape(end)
        if not re.search(pattern, readme, flags=re.S):
            raise SystemExit(f"README.md has no {start} ... {end} section")
        readme = re.sub(pattern, lambda _m, b=body, s=start, e=end: f"{s}\n{b}\n{e}", readme, flags=re.S)
    readme_path.write_text(readme, encoding="utf-8")


if __name__ == "__main__":
    main()

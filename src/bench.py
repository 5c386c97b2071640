"""`convergent-bench`: runs the benchmarks of a source checkout (the top-level `benchmarks/`).

The benchmarks are not part of the library: this entry point finds them next to the installed
package's source (an editable install, `pip install -e '.[bench]'`) or in the working directory."""

from __future__ import annotations

import sys
from pathlib import Path


def benchmarks_root() -> Path | None:
    """The folder that holds `benchmarks/` (the repository root), or None."""
    here = Path(__file__).resolve().parent.parent  # src/.. in a checkout
    for root in (here, Path.cwd()):
        if (root / "benchmarks" / "cli.py").is_file():
            return root
    return None


def main(argv: list[str] | None = None) -> int:
    root = benchmarks_root()
    if root is None:
        print(
            "error: convergent-bench runs the benchmarks of a source checkout; clone the repository, "
            "`pip install -e '.[bench]'` there and run it from the checkout",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Sampling profiles of the benchmarked servers, so optimisation starts from a measurement.

`--profile` on a benchmark runs the named servers under py-spy (a dev dependency), which starts them
as its own children (no ptrace attach to a running process needed) and writes collapsed stacks to
`bench/profiles/<server>.txt` when the server exits. Read one with

    .venv/bin/python -m bench.profiling bench/profiles/credits.txt [--under FRAME] [--top 30]

which prints the functions with the most samples of their own, the most samples in all (themselves
and what they call), and with `--under`, the call tree below the first frame containing FRAME.
Percentages are of all samples of the process, startup included (py-spy skips idle threads).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


def profiler_argv(name: str, argv: list[str], rate: int = 250) -> list[str]:
    """`argv` run under py-spy, its samples going to bench/profiles/<name>.txt."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy (make install puts it in .venv)")
    PROFILE_DIR.mkdir(exist_ok=True)
    out = PROFILE_DIR / f"{name}.txt"
    return [spy, "record", "--rate", str(rate), "--format", "raw", "--output", str(out), "--", *argv]


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summary(stacks: list[tuple[list[str], int]], top: int) -> list[str]:
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "own samples:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "with callees:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return lines


def tree_under(
    stacks: list[tuple[list[str], int]], frame: str, depth: int, floor: float = 0.003
) -> list[str]:
    total = sum(n for _, n in stacks) or 1
    paths: Counter[tuple[str, ...]] = Counter()
    for frames, n in stacks:
        start = next((i for i, f in enumerate(frames) if frame in f), None)
        if start is None:
            continue
        below = frames[start : start + depth + 1]
        for end in range(1, len(below) + 1):
            paths[tuple(below[:end])] += n
    lines: list[str] = []

    def walk(prefix: tuple[str, ...]) -> None:
        children = [(p, n) for p, n in paths.items() if len(p) == len(prefix) + 1 and p[:-1] == prefix]
        for path, n in sorted(children, key=lambda item: -item[1]):
            if n / total >= floor:
                lines.append(f"{'  ' * len(prefix)}{n / total:6.1%}  {path[-1]}")
                walk(path)

    walk(())
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--under", help="print the call tree below the first frame containing this")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    stacks = read_stacks(args.profile)
    lines = tree_under(stacks, args.under, args.depth) if args.under else summary(stacks, args.top)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

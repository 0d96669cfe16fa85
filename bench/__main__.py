"""`python -m bench` (`make bench`): both benchmarks, one after the other, each printing its table.

1. bench.proxy_bench — the proxy's added latency over a direct call to the stand-in upstream and its
   open-loop throughput, compared with the LiteLLM proxy in the same run (installed on first use into
   bench/.litellm from PyPI; `--no-litellm` skips it).
2. bench.reservations — reserve+commit pairs per second at the credits service, through HTTP (single
   and batched commits) and through its Lua scripts alone, and a reserve's latency at concurrency 1.
3. bench.analytics — GET /v1/admin/analytics and the operator dashboard's first load over a million
   ledger rows and 100k users, all time and one month.

Both start their own processes, databases, Redis namespaces and broker names and remove them after.
Servers run with LOG_LEVEL=WARNING (INFO writes one access line per request).
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM comparison")
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    args = parser.parse_args()
    proxy = [sys.executable, "-m", "bench.proxy_bench", "--log-level", "WARNING"]
    reservations = [sys.executable, "-m", "bench.reservations"]
    analytics = [sys.executable, "-m", "bench.analytics"]
    if not args.no_litellm:
        proxy.append("--litellm")
    if args.quick:
        proxy += ["--requests", "1000", "--seconds", "3"]
        reservations += ["--seconds", "3"]
        analytics += ["--repeat", "5"]
    failed = 0
    for title, argv in (
        ("proxy: added latency and throughput", proxy),
        ("credits: reservations", reservations),
        ("credits: operator analytics", analytics),
    ):
        print(f"\n=== {title} ===\n", flush=True)
        failed |= subprocess.run(argv, check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Prints the summed state counts of the chaos run's batches; exits 0 when every batch is done.

Usage: status.py API_URL BATCH_IDS_FILE [--terminal]
With --terminal it prints `TERMINAL TOTAL` instead: jobs in a final state, and all jobs.
"""
import collections
import json
import sys
import urllib.request


def main():
    api, batch_file = sys.argv[1:3]
    counts = collections.Counter()
    terminal = total = 0
    done = True
    for batch_id in (line.strip() for line in open(batch_file)):
        if not batch_id:
            continue
        try:
            with urllib.request.urlopen(f"{api}/v1/batches/{batch_id}", timeout=10) as response:
                batch = json.loads(response.read())
        except Exception as error:  # noqa: BLE001 - the API may be briefly unavailable
            print("0 0" if "--terminal" in sys.argv[3:] else f"unavailable ({error})")
            return 1
        batch = batch.get("data", batch) if "done" not in batch else batch
        counts.update(batch.get("counts", {}))
        terminal += batch.get("terminal", 0)
        total += batch.get("total", 0)
        done = done and bool(batch.get("done"))
    if "--terminal" in sys.argv[3:]:
        print(terminal, total)
    else:
        print(" ".join(f"{state}={n}" for state, n in sorted(counts.items()) if n))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Checks a finished chaos run and prints a report ending with one JSON line.

Usage: check.py API_URL SIM_URL BATCH_IDS_FILE WEBHOOKS_JSONL EXPECTED_JOBS [EXTRA_JSON]
EXTRA_JSON (what run.sh did: redis_mode, worker_kills, primary_kills, failovers, ...) goes into
the report; with a redis_mode other than standalone, at least one primary kill must have ended
in a failover, and every one must have.
Exit status 0 when every check passes, 1 otherwise.
"""
import collections
import concurrent.futures
import hashlib
import json
import sys
import urllib.request

TERMINAL = {"succeeded", "failed", "cancelled", "dead"}
PERMANENT = {"CONTENT_POLICY_VIOLATION"}


def get_json(url, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def unwrap(value):
    return value.get("data", value) if isinstance(value, dict) and "items" not in value else value


def main():
    api, sim, batch_file, webhooks_file, expected = sys.argv[1:6]
    extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    expected = int(expected)
    batch_ids = [line.strip() for line in open(batch_file) if line.strip()]

    jobs = []
    batches_done = 0
    for batch_id in batch_ids:
        batch = unwrap(get_json(f"{api}/v1/batches/{batch_id}"))
        batches_done += bool(batch.get("done"))
        offset = 0
        while offset is not None:
            page = get_json(f"{api}/v1/batches/{batch_id}/jobs?limit=1000&offset={offset}")
            jobs.extend(page["items"])
            offset = page.get("next_offset")
    by_state = collections.Counter(job["state"] for job in jobs)
    lost = max(0, expected - len(jobs)) + sum(1 for j in jobs if j["state"] not in TERMINAL)
    succeeded = [j for j in jobs if j["state"] == "succeeded"]
    failed = [j for j in jobs if j["state"] in ("failed", "dead")]

    # The ledger: one charge per succeeded job, no run or job charged twice.
    charges = get_json(f"{sim}/__sim/charges")
    runs = {run["id"]: run for run in get_json(f"{sim}/__sim/runs", timeout=300)}
    charges_per_run = collections.Counter(c["run_id"] for c in charges)
    charged_runs_per_job = collections.defaultdict(set)
    for charge in charges:
        charged_runs_per_job[charge.get("client_ref") or charge.get("job_id")].add(charge["run_id"])
    duplicate_charges = sum(n - 1 for n in charges_per_run.values() if n > 1) + sum(
        len(r) - 1 for r in charged_runs_per_job.values() if len(r) > 1
    )
    job_ids = {j["id"] for j in jobs}
    charges_unknown_job = sum(1 for ref in charged_runs_per_job if ref not in job_ids)
    succeeded_ids = {j["id"] for j in succeeded}
    charged_not_succeeded = sorted(ref for ref in charged_runs_per_job if ref not in succeeded_ids)
    succeeded_not_charged = []
    sha_mismatches = []
    for job in succeeded:
        run_id = (job.get("provider") or {}).get("run_id")
        if run_id not in charged_runs_per_job.get(job["id"], set()):
            succeeded_not_charged.append(job["id"])
        served = (runs.get(run_id) or {}).get("video_sha256")
        if not job.get("video") or job["video"].get("sha256") != served:
            sha_mismatches.append((job["id"], "record sha256 differs from the simulator's"))

    # Every stored object, fetched through its presigned URL, hashes to the simulator's bytes.
    def fetch(job):
        try:
            with urllib.request.urlopen(job["video"]["url"], timeout=60) as response:
                digest = hashlib.sha256(response.read()).hexdigest()
        except Exception as error:  # noqa: BLE001
            return job["id"], f"fetch failed: {error}"
        served = runs.get(job["provider"]["run_id"], {}).get("video_sha256")
        return job["id"], None if digest == served else "stored bytes differ"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for job_id, problem in pool.map(fetch, [j for j in succeeded if j.get("video")]):
            if problem:
                sha_mismatches.append((job_id, problem))

    # Failures must be permanent ones the injected faults explain.
    failure_codes = collections.Counter((j.get("error") or {}).get("code", j["state"]) for j in failed)
    unexplained = [
        (j["id"], j["state"], (j.get("error") or {}).get("code"), j.get("reason"))
        for j in failed
        if j["state"] != "failed" or (j.get("error") or {}).get("code") not in PERMANENT
    ]
    moderated_runs = {
        run["client_ref"] for run in runs.values() if "moderation" in " ".join(run.get("faults", []))
    }
    unexplained += [
        (j["id"], j["state"], "CONTENT_POLICY_VIOLATION without a moderated run", None)
        for j in failed
        if (j.get("error") or {}).get("code") in PERMANENT and j["id"] not in moderated_runs
    ]

    # Webhooks: every completion event arrived with a valid signature; duplicates share an id.
    deliveries = [json.loads(line) for line in open(webhooks_file) if line.strip()]
    invalid = [d for d in deliveries if not d["valid"]]
    ids_per_event = collections.defaultdict(set)
    for d in deliveries:
        if d["valid"] and d.get("job_id"):
            ids_per_event[(d["job_id"], d["type"])].add(d["webhook_id"])
    webhooks_missing = [
        j["id"]
        for j in jobs
        if j["state"] in TERMINAL and not ids_per_event.get((j["id"], f"job.{j['state']}"))
    ]
    # A job that died in the dead letters publishes job.failed.
    webhooks_missing = [
        job_id
        for job_id in webhooks_missing
        if not ids_per_event.get((job_id, "job.failed"))
    ]
    duplicate_ids_differ = sum(1 for ids in ids_per_event.values() if len(ids) > 1)
    duplicate_deliveries = sum(
        1 for d in deliveries if d["valid"] and d.get("job_id")
    ) - len(ids_per_event)
    batch_completed = {d["batch_id"] or d.get("event_id") for d in deliveries if d["type"] == "batch.completed" and d["valid"]}
    stats = get_json(f"{sim}/__sim/stats")

    report = {
        "redis_mode": extra.get("redis_mode", "standalone"),
        "partitions": extra.get("partitions", 1),
        "failovers": extra.get("failovers", 0),
        "jobs": expected,
        "found": len(jobs),
        "batches": len(batch_ids),
        "batches_done": batches_done,
        "states": dict(by_state),
        "lost": lost,
        "succeeded": len(succeeded),
        "failed": len(failed),
        "failure_codes": dict(failure_codes),
        "charges": len(charges),
        "duplicate_charges": duplicate_charges,
        "charged_not_succeeded": len(charged_not_succeeded),
        "succeeded_not_charged": len(succeeded_not_charged),
        "charges_unknown_job": charges_unknown_job,
        "sha_mismatches": len(sha_mismatches),
        "objects_fetched": sum(1 for j in succeeded if j.get("video")),
        "unexplained_failures": len(unexplained),
        "webhook_deliveries": len(deliveries),
        "webhooks_missing": len(webhooks_missing),
        "webhook_invalid_signatures": len(invalid),
        "webhook_duplicates": duplicate_deliveries,
        "webhook_duplicate_ids_differ": duplicate_ids_differ,
        "batch_completed_webhooks": len(batch_completed),
        "sim_runs": len(runs),
        "sim_faults": stats.get("faults_injected", {}),
        "sim_callbacks": stats.get("callbacks", {}),
        **extra,
    }
    failures = []
    if not stats.get("callbacks", {}).get("delivered"):
        failures.append("no provider callback was delivered: the run did not exercise them")
    if lost:
        failures.append(f"{lost} jobs lost or not terminal")
    if duplicate_charges:
        failures.append(f"{duplicate_charges} duplicate charges")
    if charged_not_succeeded:
        failures.append(f"charged but not succeeded: {charged_not_succeeded[:10]}")
    if succeeded_not_charged:
        failures.append(f"succeeded without its run charged: {succeeded_not_charged[:10]}")
    if len(charges) != len(succeeded):
        failures.append(f"{len(charges)} charges for {len(succeeded)} succeeded jobs")
    if sha_mismatches:
        failures.append(f"sha256 mismatches: {sha_mismatches[:10]}")
    if unexplained:
        failures.append(f"failures the faults do not explain: {unexplained[:10]}")
    if webhooks_missing:
        failures.append(f"jobs without a valid webhook: {webhooks_missing[:10]}")
    if invalid:
        failures.append(f"{len(invalid)} deliveries with invalid signatures: {invalid[:3]}")
    if duplicate_ids_differ:
        failures.append(f"{duplicate_ids_differ} events delivered under different webhook-ids")
    # Cluster and Sentinel runs kill the namespace's primary at least once: each kill must have
    # ended with a replica promoted and the killed node back as an in-sync replica.
    if extra.get("redis_mode", "standalone") != "standalone":
        if extra.get("failovers", 0) < 1:
            failures.append("no primary kill ended with a replica promoted")
        if extra.get("failovers", 0) != extra.get("primary_kills", 0):
            failures.append(
                f"{extra.get('primary_kills')} primary kills but {extra.get('failovers')} promotions"
            )
        if extra.get("failover_problems", 0):
            failures.append(f"{extra['failover_problems']} failover steps missed their deadline")
    report["ok"] = not failures
    print("chaos report")
    for key, value in report.items():
        print(f"  {key}: {value}")
    for failure in failures:
        print(f"FAIL: {failure}")
    print(json.dumps(report, sort_keys=False))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

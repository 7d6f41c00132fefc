#!/usr/bin/env python3
"""Asks the chaos run's Redis nodes who is primary, through redis-cli on 127.0.0.1.

Usage:
  topology.py owner PORT KEY
      Node PORT's view of the primary serving KEY's slot: prints `SLOT OWNER_PORT REPLICA_PORTS`
      (replicas comma-separated, `-` when none). Exit 1 when no healthy primary serves it.
  topology.py primaries PORT
      Ports of the primaries that serve slots and are not marked failed, as node PORT sees them.
  topology.py promoted KEY KILLED_PORT PORT...
      Exit 0 (printing the new owner's port) when every node PORT answers `cluster_state:ok`,
      agrees that one primary other than KILLED_PORT serves KEY's slot, and that primary says
      `role:master` itself.
  topology.py synced REPLICA_PORT PRIMARY_PORT
      Exit 0 when REPLICA_PORT is a replica of PRIMARY_PORT with its link up and PRIMARY_PORT
      lists it online, i.e. WAIT on the primary can count it again.
  topology.py all-synced PORT
      Exit 0 when, as node PORT sees the cluster, every primary serving slots has a replica
      that is `synced` with it.
  topology.py sentinel-primary SENTINEL_PORT...
      The port of the primary of `mymaster` every sentinel agrees on; exit 1 when they differ.
  topology.py sentinel-promoted KILLED_PORT SENTINEL_PORT...
      Exit 0 (printing the new primary's port) when every sentinel names the same primary, it is
      not KILLED_PORT, and it says `role:master` itself.
  topology.py sentinel-ready REPLICA_PORT SENTINEL_PORT...
      Exit 0 when every sentinel sees `mymaster` up, knows the other sentinels (enough for a
      quorum of all of them) and REPLICA_PORT as a replica that is up with its link `ok`.
"""
import subprocess
import sys


def cli(port, *args, timeout=3):
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or f"redis-cli -p {port} {' '.join(args)} failed")
    return result.stdout


def info(port, section):
    fields = {}
    for line in cli(port, "info", section).splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def nodes(port):
    """`cluster nodes` as dicts: id, port, flags, master id, slot ranges."""
    out = []
    for line in cli(port, "cluster", "nodes").splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0]
        ranges = []
        for slot in parts[8:]:
            if slot.startswith("["):  # a slot being imported or migrated
                continue
            low, _, high = slot.partition("-")
            ranges.append((int(low), int(high or low)))
        out.append(
            {
                "id": parts[0],
                "port": int(address.rsplit(":", 1)[1]) if ":" in address else 0,
                "flags": set(parts[2].split(",")),
                "master": parts[3],
                "ranges": ranges,
            }
        )
    return out


def healthy_primary(node):
    return "master" in node["flags"] and not node["flags"] & {"fail", "fail?", "noaddr", "handshake"}


def owner(port, slot):
    view = nodes(port)
    for node in view:
        if healthy_primary(node) and any(low <= slot <= high for low, high in node["ranges"]):
            replicas = sorted(n["port"] for n in view if n["master"] == node["id"])
            return node["port"], replicas
    return None, []


def synced(replica, primary):
    mine = info(replica, "replication")
    if (
        mine.get("role") != "slave"
        or mine.get("master_port") != str(primary)
        or mine.get("master_link_status") != "up"
    ):
        return False
    theirs = info(primary, "replication")
    listed = [v for k, v in theirs.items() if k.startswith("slave") and k[5:].isdigit()]
    return any(f"port={replica}," in v and "state=online" in v for v in listed)


SERVICE = "mymaster"


def pairs(text):
    """A reply of alternating field and value lines (`sentinel master`) as a dict."""
    lines = text.splitlines()
    return dict(zip(lines[0::2], lines[1::2]))


def replies(text):
    """`sentinel replicas`: one flat field/value list per replica, each starting with `name`."""
    out, current = [], []
    for line in text.splitlines():
        if line == "name" and len(current) % 2 == 0 and current:
            out.append(pairs("\n".join(current)))
            current = []
        current.append(line)
    if current:
        out.append(pairs("\n".join(current)))
    return out


def sentinel_primary(sentinels):
    named = set()
    for port in sentinels:
        reply = cli(port, "sentinel", "get-master-addr-by-name", SERVICE).split()
        if len(reply) != 2:
            return None
        named.add(int(reply[1]))
    return named.pop() if len(named) == 1 else None


def keyslot(port, key):
    return int(cli(port, "cluster", "keyslot", key).strip())


def main():
    command, args = sys.argv[1], sys.argv[2:]
    try:
        if command == "owner":
            port, key = int(args[0]), args[1]
            slot = keyslot(port, key)
            primary, replicas = owner(port, slot)
            if primary is None:
                return 1
            print(slot, primary, ",".join(map(str, replicas)) or "-")
        elif command == "primaries":
            print(" ".join(str(n["port"]) for n in nodes(int(args[0])) if healthy_primary(n) and n["ranges"]))
        elif command == "promoted":
            key, killed, ports = args[0], int(args[1]), [int(p) for p in args[2:]]
            slot = keyslot(ports[0], key)
            owners = set()
            for port in ports:
                if "cluster_state:ok" not in cli(port, "cluster", "info"):
                    return 1
                owners.add(owner(port, slot)[0])
            if len(owners) != 1 or None in owners or killed in owners:
                return 1
            new = owners.pop()
            if info(new, "replication").get("role") != "master":
                return 1
            print(new)
        elif command == "synced":
            if not synced(int(args[0]), int(args[1])):
                return 1
        elif command == "all-synced":
            view = nodes(int(args[0]))
            for primary in (n for n in view if healthy_primary(n) and n["ranges"]):
                replicas = [n["port"] for n in view if n["master"] == primary["id"]]
                if not any(synced(r, primary["port"]) for r in replicas):
                    return 1
        elif command == "sentinel-primary":
            primary = sentinel_primary([int(p) for p in args])
            if primary is None:
                return 1
            print(primary)
        elif command == "sentinel-promoted":
            killed, sentinels = int(args[0]), [int(p) for p in args[1:]]
            primary = sentinel_primary(sentinels)
            if primary is None or primary == killed:
                return 1
            if info(primary, "replication").get("role") != "master":
                return 1
            print(primary)
        elif command == "sentinel-ready":
            replica, sentinels = int(args[0]), [int(p) for p in args[1:]]
            for port in sentinels:
                master = pairs(cli(port, "sentinel", "master", SERVICE))
                if master.get("flags") != "master":
                    return 1
                if int(master.get("num-other-sentinels", 0)) != len(sentinels) - 1:
                    return 1
                known = [
                    r
                    for r in replies(cli(port, "sentinel", "replicas", SERVICE))
                    if r.get("port") == str(replica)
                ]
                if not known or known[0].get("flags") != "slave" or known[0].get("master-link-status") != "ok":
                    return 1
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

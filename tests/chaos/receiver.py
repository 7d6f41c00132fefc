#!/usr/bin/env python3
"""Webhook receiver for the chaos run: verifies Standard Webhooks signatures itself (hmac,
base64) and appends every delivery to a JSON Lines file.

Usage: receiver.py PORT SECRET(whsec_...) OUT.jsonl
Each line: {"webhook_id", "type", "job_id", "batch_id", "valid", "reason", "at"}.
Answers 204 to valid deliveries and 401 to invalid ones.
"""
import base64
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECS = 300


def verify(key: bytes, headers, body: bytes):
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return False, "missing headers"
    try:
        ts = int(timestamp)
    except ValueError:
        return False, "bad timestamp"
    if abs(time.time() - ts) > TOLERANCE_SECS:
        return False, "timestamp out of tolerance"
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for candidate in signatures.split(" "):
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return True, ""
    return False, "no matching signature"


def main():
    port, secret, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    lock = threading.Lock()
    out = open(out_path, "a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            valid, reason = verify(key, self.headers, body)
            try:
                event = json.loads(body)
            except ValueError:
                event = {}
            data = event.get("data") or {}
            line = {
                "webhook_id": self.headers.get("webhook-id"),
                "type": event.get("type"),
                "event_id": event.get("id"),
                "job_id": data.get("job_id"),
                "batch_id": data.get("batch_id"),
                "valid": valid,
                "reason": reason,
                "at": time.time(),
            }
            with lock:
                out.write(json.dumps(line) + "\n")
            self.send_response(204 if valid else 401)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()

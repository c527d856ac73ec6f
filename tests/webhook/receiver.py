#!/usr/bin/env python3
"""A real webhook receiver for the tests: verifies every request with the
`standardwebhooks` library from PyPI (an implementation nobody here wrote)
and misbehaves on purpose, by path:

  /ok          200
  /fail2       500 for the first two attempts of a message, then 200
  /gone        410
  /ratelimit   429 with Retry-After: 1 on a message's first attempt, then 200
  /redirect    302 to /target
  /target      200 (a test checks it is never reached)
  /hang        never answers in time
  /flip        500 until the file FLAG exists, then 200
  /slow        200 after 300 ms (logs how many requests were in progress)

Prints its port on the first line of stdout; logs one JSON line per request.
"""
import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

parser = argparse.ArgumentParser()
parser.add_argument("--secret", required=True)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--log", required=True)
parser.add_argument("--flag", default="")
args = parser.parse_args()

wh = Webhook(args.secret)
lock = threading.Lock()
attempts = {}
active = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            wh.verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        msg_id = headers.get("webhook-id", "")
        path = self.path.split("?")[0]
        with lock:
            attempts[msg_id] = attempts.get(msg_id, 0) + 1
            k = attempts[msg_id]
        status, extra = 200, {}
        concurrent = None
        if path == "/slow":
            with lock:
                active[0] += 1
                concurrent = active[0]
            time.sleep(0.3)
            with lock:
                active[0] -= 1
        if not verified:
            status = 400
        elif path == "/fail2" and k <= 2:
            status = 500
        elif path == "/gone":
            status = 410
        elif path == "/ratelimit" and k == 1:
            status, extra = 429, {"Retry-After": "1"}
        elif path == "/redirect":
            status, extra = 302, {"Location": "/target"}
        elif path == "/hang":
            time.sleep(5)
        elif path == "/flip" and not (args.flag and os.path.exists(args.flag)):
            status = 500
        record = {
            "t": time.time(),
            "path": path,
            "query": self.path.partition("?")[2],
            "msg_id": msg_id,
            "timestamp": headers.get("webhook-timestamp"),
            "signature": headers.get("webhook-signature"),
            "api_key": headers.get("x-api-key"),
            "verified": verified,
            "status": status,
            "concurrent": concurrent,
            "body": body.decode("utf-8", "replace"),
        }
        with lock:
            with open(args.log, "a") as f:
                f.write(json.dumps(record) + "\n")
        out = b"ok" if status < 300 else b"no"
        self.send_response(status)
        for k2, v in extra.items():
            self.send_header(k2, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()

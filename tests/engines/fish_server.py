#!/usr/bin/env python3
"""A fake TTS server that keeps Fish Speech 1.5's contract (tools/api_server.py)
and misbehaves on purpose. Standard library only.

  POST /v1/tts      JSON {text, format, references: [{audio, text}], reference_id,
                    streaming, ...}; other content types -> 415; the answer is a
                    whole WAV (44.1 kHz); errors are JSON {statusCode, message, error}
  POST /v1/health   {"status": "ok"}

Like the real server it works on one request at a time: a second request
waits for the first (the model runs in one thread). Reference `audio` is
base64, decoded only when longer than 255 characters (else it is a path).
An unknown reference_id is not an error: the default voice speaks.

Misbehaviour, for the whole server (--mode) or per task (a word in `text`):
  fail / FAIL500     500 JSON error
  hang / HANG        never answers
  garbage / GARBAGE  200 with bytes that are not a WAV
  close / CLOSEMID   200, a Content-Length, then half the body and a close
  busy / BUSY503     503 with Retry-After: 1
  REJECT400          400 JSON error (a refusal)

--expect-ref FILE   400 unless every inline reference decodes to FILE's bytes
--stats FILE        JSON {requests, max_in_flight} after every request
--concurrency N     N syntheses at once instead of one (a benchmark's server)
--openai            speak the OpenAI-style /v1/audio/speech contract instead
                    (Kokoro's: `stream` defaults to true and then raw PCM
                    chunks come back; unknown `model` -> 400)
"""

import argparse
import base64
import json
import math
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = None
model = None  # one synthesis at a time (--concurrency for benchmarks)
count_lock = threading.Lock()
state = {"requests": 0, "in_flight": 0, "max_in_flight": 0}


_wav = {}


def wav(seconds=0.1, rate=44100):
    """A sine tone (made once)."""
    if (seconds, rate) in _wav:
        return _wav[(seconds, rate)]
    n = int(seconds * rate)
    data = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
        for i in range(n)
    )
    head = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
    head += struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    _wav[(seconds, rate)] = head + b"data" + struct.pack("<I", len(data)) + data
    return _wav[(seconds, rate)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def error(self, code, message, extra_headers=()):
        body = json.dumps(
            {"statusCode": code, "message": message, "error": self.responses.get(code, ("",))[0]}
        ).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with count_lock:
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            with model:
                self.handle_post(body)
        finally:
            with count_lock:
                state["in_flight"] -= 1
                state["requests"] += 1
                if args.stats:
                    with open(args.stats + ".tmp", "w") as f:
                        json.dump({k: state[k] for k in ("requests", "max_in_flight")}, f)
                    import os
                    os.replace(args.stats + ".tmp", args.stats)

    def handle_post(self, body):
        if args.api_key and self.headers.get("Authorization") != "Bearer " + args.api_key:
            return self.error(401, "Invalid token")
        if self.path == "/v1/health":
            return self.answer(b'{"status":"ok"}', "application/json")
        speech = "/v1/audio/speech" if args.openai else "/v1/tts"
        if self.path != speech:
            return self.error(404, "Not Found")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype not in ("application/json", "application/msgpack"):
            return self.error(415, "Unsupported Media Type")
        try:
            req = json.loads(body)
        except ValueError:
            return self.error(400, "Invalid JSON")
        text = req.get("input" if args.openai else "text")
        if not isinstance(text, str) or not text:
            return self.error(422, "text is required")
        if args.openai:
            if req.get("model") not in ("kokoro", "tts-1"):
                return self.error(400, "unknown model %r" % req.get("model"))
        else:
            for ref in req.get("references") or []:
                audio = ref.get("audio", "")
                if len(audio) > 255:
                    audio = base64.b64decode(audio)
                if args.expect_ref:
                    with open(args.expect_ref, "rb") as f:
                        if audio != f.read():
                            return self.error(400, "reference audio does not match")
        mode = args.mode
        for word, m in (("FAIL500", "fail"), ("HANG", "hang"), ("GARBAGE", "garbage"),
                        ("CLOSEMID", "close"), ("BUSY503", "busy"), ("REJECT400", "reject"),
                        ("HUGEERROR", "huge"), ("RETRYFOREVER", "forever")):
            if word in text:
                mode = m
        time.sleep(args.delay)
        if mode == "fail":
            return self.error(500, "CUDA error: out of memory")
        if mode == "reject":
            return self.error(400, "text too long for this model")
        if mode == "busy":
            return self.error(503, "model loading", [("Retry-After", "1")])
        if mode == "forever":
            return self.error(503, "come back in 31 years", [("Retry-After", "1000000000")])
        if mode == "huge":
            # A 1 GiB error page, made as it is sent.
            size = 1 << 30
            self.send_response(400)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(size // len(chunk)):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
            return
        if mode == "hang":
            time.sleep(3600)
            return
        if mode == "garbage":
            return self.answer(b"<html>oops</html>", "audio/wav")
        audio = wav()
        if mode == "close":
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(audio)))
            self.end_headers()
            self.wfile.write(audio[: len(audio) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if args.openai and req.get("stream", True) is not False:
            # Kokoro streams raw PCM chunks unless told not to.
            return self.answer(audio[44:], "audio/pcm")
        self.answer(audio, "audio/wav")

    def answer(self, data, ctype):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", default="")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--mode", default="ok")
    p.add_argument("--expect-ref", default="")
    p.add_argument("--stats", default="")
    p.add_argument("--openai", action="store_true")
    p.add_argument("--concurrency", type=int, default=1,
                   help="syntheses at once (1, like Fish Speech 1.5)")
    args = p.parse_args()
    global model
    model = threading.BoundedSemaphore(args.concurrency)
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    print("listening", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

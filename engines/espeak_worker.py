#!/usr/bin/env python3
"""A ttspool worker that speaks with espeak-ng: the worker protocol
(engines/README.md) end to end with real audio, on any machine.

    [engine]
    kind = "worker"
    argv = ["python3", "engines/espeak_worker.py", "--voice", "cmn"]

espeak-ng has no model to keep loaded, so this worker runs it once per task;
what it shows is the protocol: ready once, one task line in, one answer out
on fd 3, errors with `retryable`, and an exit when stdin closes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

ANSWERS = 3


def answer(obj):
    """One line on fd 3, written whole."""
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
    while data:
        n = os.write(ANSWERS, data)
        data = data[n:]


def main():
    ap = argparse.ArgumentParser(description="ttspool worker: espeak-ng")
    ap.add_argument("--voice", default="cmn", help="espeak-ng voice (default: cmn, Mandarin)")
    ap.add_argument("--speed", type=int, default=None, help="words per minute")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per task")
    args = ap.parse_args()
    os.set_inheritable(ANSWERS, False)

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        answer({"ready": False, "error": "espeak-ng is not installed (apt-get install espeak-ng)"})
        return 1
    probe = subprocess.run([espeak, "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        answer({"ready": False, "error": f"espeak-ng --version failed: {probe.stderr.strip()}"})
        return 1
    print(f"espeak_worker: {probe.stdout.strip()}, voice {args.voice}", file=sys.stderr, flush=True)
    answer({"ready": True})

    while True:
        line = sys.stdin.buffer.readline()
        if not line:
            return 0  # stdin closed: ttspool is stopping us
        if not line.strip():
            continue
        try:
            task = json.loads(line)
            tid = task["id"]
        except (ValueError, KeyError, TypeError) as e:
            answer({"id": None, "ok": False, "error": f"unreadable task line: {e}", "retryable": False})
            continue
        argv = [espeak, "-v", args.voice, "-w", task["output"]]
        if args.speed:
            argv += ["-s", str(args.speed)]
        # The text comes after "--": it can never be read as an option.
        argv += ["--", task["input_text"]]
        try:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            answer({"id": tid, "ok": False, "error": f"espeak-ng ran longer than {args.timeout} s", "retryable": True})
            continue
        if run.returncode == 0:
            answer({"id": tid, "ok": True})
        else:
            sys.stderr.write(run.stderr)
            answer({
                "id": tid,
                "ok": False,
                "error": f"espeak-ng exited with {run.returncode}: {run.stderr.strip()[-500:]}",
                "retryable": False,
            })


if __name__ == "__main__":
    sys.exit(main())

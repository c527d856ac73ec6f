#!/usr/bin/env python3
"""A contract-faithful fake of zai-org/GLM-TTS glmtts_inference.py (no torch).

Same arguments, same input (examples/NAME.jsonl relative to the working
directory) and output (<script dir>/outputs/pretrain<exp_name>/NAME/<uttid>.wav
plus text_compare.jsonl), and the same per-item behaviour: a bad item is
logged ("Error processing <uttid>: ...") and skipped, and the process still
exits 0. A malformed input file or a failed "model load" exits non-zero.

Misbehaviour on purpose, chosen per item by a keyword in syn_text:
  POISON    the item fails (logged, skipped; exit 0 at the end)
  CRASH     the process dies mid-batch (exit 1) after the items before it
  HANG      the process hangs forever at this item
  TRUNCATE  the item's WAV is left truncated (header promises more data)
and by environment:
  FAKE_GLM_LOAD      seconds to "load the models" (default 0)
  FAKE_GLM_UTT       seconds per utterance (default 0)
  FAKE_GLM_OOM_OVER  batches with more items than this die with CUDA OOM
  FAKE_GLM_FAIL_LOAD if set, the model load fails (exit 1)
  FAKE_GLM_LOG       append one JSON line per run (pid, data, items, CUDA_VISIBLE_DEVICES)
"""
import argparse
import json
import logging
import math
import os
import struct
import sys
import time
import wave

CURRENT_DIR = os.path.dirname(os.path.abspath(__file__))
logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")


def write_wav(path, text, sample_rate):
    """A real WAV: a short tone whose length depends on the text."""
    n = int(sample_rate * (0.05 + 0.01 * min(len(text), 50)))
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / sample_rate))) for i in range(n)
    )
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(frames)


def main():
    parser = argparse.ArgumentParser(description="fake GLM-TTS")
    parser.add_argument("--data", default="example_zh", type=str)
    parser.add_argument("--exp_name", default="_test", type=str)
    parser.add_argument("--use_cache", action="store_true", default=True)
    parser.add_argument("--use_phoneme", action="store_true", default=False)
    parser.add_argument("--sample_rate", type=int, default=24000)
    args = parser.parse_args()
    if args.sample_rate not in (24000, 32000):
        raise ValueError(f"Unsupported sampling_rate: {args.sample_rate}")

    jsonl_path = os.path.join("examples", args.data + ".jsonl")
    with open(jsonl_path, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]

    log = os.environ.get("FAKE_GLM_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({
                "pid": os.getpid(),
                "data": args.data,
                "items": len(items),
                "uttids": [i.get("uttid") for i in items],
                "texts": [i.get("syn_text") for i in items],
                "prompts": [i.get("prompt_speech") for i in items],
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "cwd": os.getcwd(),
                "use_phoneme": args.use_phoneme,
                "sample_rate": args.sample_rate,
            }) + "\n")

    time.sleep(float(os.environ.get("FAKE_GLM_LOAD", "0")))
    if os.environ.get("FAKE_GLM_FAIL_LOAD"):
        logging.error("failed to load models from ckpt/")
        sys.exit(1)
    oom_over = os.environ.get("FAKE_GLM_OOM_OVER")
    if oom_over and len(items) > int(oom_over):
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.exit(1)

    folder = os.path.join(CURRENT_DIR, "outputs", f"pretrain{args.exp_name}", args.data)
    os.makedirs(folder, exist_ok=True)
    logging.info(f"Output folder: {folder}")
    per_utt = float(os.environ.get("FAKE_GLM_UTT", "0"))
    with open(os.path.join(folder, "text_compare.jsonl"), "w") as out:
        for item in items:
            try:
                uttid = item["uttid"]
                text = item["syn_text"]
                prompt = item["prompt_speech"]
                logging.info(f"Processing: {uttid}, Syn_text: {text}")
                if not os.path.isfile(prompt):
                    raise FileNotFoundError(f"prompt audio not found: {prompt}")
                if "CRASH" in text:
                    logging.error(f"fatal error while processing {uttid}: segmentation fault in flow model")
                    sys.stderr.flush()
                    os._exit(1)
                if "HANG" in text:
                    while True:
                        time.sleep(1)
                if "POISON" in text:
                    raise RuntimeError("bad prompt audio: cannot extract speech tokens")
                time.sleep(per_utt)
                path = os.path.join(folder, f"{uttid}.wav")
                write_wav(path, text, args.sample_rate)
                if "TRUNCATE" in text:
                    size = os.path.getsize(path)
                    with open(path, "r+b") as f:
                        f.truncate(size // 2)
                out.write(json.dumps({"uttid": uttid, "syn_text": text}, ensure_ascii=False) + "\n")
                out.flush()
            except Exception as e:
                logging.error(f"Error processing {item.get('uttid', 'unknown')}: {e}")
                import traceback
                traceback.print_exc()


if __name__ == "__main__":
    main()

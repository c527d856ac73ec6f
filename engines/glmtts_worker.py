#!/usr/bin/env python3
"""A ttspool worker for zai-org/GLM-TTS: loads the models once, then
synthesizes task after task (the protocol is in engines/README.md).

    [engine]
    kind = "worker"
    argv = ["/opt/GLM-TTS/.venv/bin/python", "engines/glmtts_worker.py", "--root", "/opt/GLM-TTS"]

Each task is processed exactly as the body of upstream's `jsonl_generate`
(glmtts_inference.py): normalise the prompt and the text, extract the prompt's
text tokens, speech tokens, speech features and speaker embedding, start a
fresh cache, `generate_long(...)` with seed 0, `torchaudio.save`. Since
`generate_long` reseeds before every chunk, a task gives the same audio here
as in a batch. `jsonl_generate` itself cannot be called (it reads globals set
only under `__main__`), so its body is repeated here.

Differences that only save time: the prompt features of a voice are kept in a
small LRU keyed by (prompt file, size, mtime, prompt text), so a repeated
voice skips re-extraction; `torch.cuda.empty_cache()` after each task keeps
one long item from holding GPU memory for the next hundred.

Answers: a CUDA error ("CUDA error", device-side assert, cuBLAS/cuDNN) leaves
the process unusable: `fatal`, and the worker exits. CUDA out of memory is
retryable (the cache is emptied), and so is a full disk. Anything else an
item raises (a missing or unreadable prompt clip, say) is not retryable.
"""
import argparse
import collections
import errno
import json
import os
import sys
import time
import traceback

ANSWERS = 3


def answer(obj):
    """One line on fd 3, written whole."""
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
    while data:
        n = os.write(ANSWERS, data)
        data = data[n:]


def log(msg):
    print(f"glmtts_worker: {msg}", file=sys.stderr, flush=True)


FATAL_MARKS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS")


def classify(e):
    """(retryable, fatal) for an exception an item raised."""
    text = f"{type(e).__name__}: {e}"
    if any(m in text for m in FATAL_MARKS):
        return True, True
    if "out of memory" in text.lower():
        return True, False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return True, False  # the disk, not the task: worth another try
    return False, False


class PromptCache:
    """The features of the last few prompt voices."""

    def __init__(self, size):
        self.size = size
        self.items = collections.OrderedDict()

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        if self.size > 0:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="the GLM-TTS checkout (holds glmtts_inference.py, ckpt/, frontend/)")
    ap.add_argument("--sample-rate", type=int, default=24000, choices=(24000, 32000))
    ap.add_argument("--use-phoneme", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-cache", type=int, default=32, help="voices whose features are kept (0: none)")
    args = ap.parse_args()

    # Our answers go to fd 3 only; no child of a library inherits it.
    os.set_inheritable(ANSWERS, False)
    root = os.path.abspath(args.root)
    try:
        # ckpt/, frontend/ and configs/ are relative to the checkout.
        os.chdir(root)
        sys.path.insert(0, root)
        started = time.monotonic()
        import glmtts_inference as glm

        frontend, text_frontend, _speech_tokenizer, llm, flow = glm.load_models(
            use_phoneme=args.use_phoneme, sample_rate=args.sample_rate
        )
    except Exception as e:
        traceback.print_exc()
        answer({"ready": False, "error": f"cannot load GLM-TTS from {root}: {type(e).__name__}: {e}"})
        return 1
    # The torch and torchaudio the script itself imported.
    torch, torchaudio, device = glm.torch, glm.torchaudio, glm.DEVICE
    log(f"models loaded from {root} in {time.monotonic() - started:.1f} s on {device}")
    answer({"ready": True})

    prompts = PromptCache(args.prompt_cache)

    def prompt_features(path, prompt_text):
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns, prompt_text)

        def make():
            text = text_frontend.text_normalize(prompt_text)
            text_token = frontend._extract_text_token(text + " ")
            speech_token = frontend._extract_speech_token([path])
            speech_feat = frontend._extract_speech_feat(path, sample_rate=args.sample_rate)
            embedding = frontend._extract_spk_embedding(path)
            return text, text_token, speech_token.squeeze().tolist(), speech_feat, embedding

        return prompts.get(key, make)

    def synthesize(task):
        if not task.get("prompt_audio"):
            raise ValueError("GLM-TTS clones a voice: the task needs prompt_audio (and prompt_text)")
        prompt_text, prompt_text_token, speech_tokens, speech_feat, embedding = prompt_features(
            task["prompt_audio"], task.get("prompt_text") or ""
        )
        synth_text = text_frontend.text_normalize(task["input_text"])
        # A fresh cache per item, as jsonl_generate makes (generate_long
        # appends to its lists, so none of them is shared with the LRU).
        cache_speech_token = [list(speech_tokens)]
        flow_prompt_token = torch.tensor(cache_speech_token, dtype=torch.int32).to(device)
        cache = {
            "cache_text": [prompt_text],
            "cache_text_token": [prompt_text_token],
            "cache_speech_token": cache_speech_token,
            "use_cache": True,
        }
        uttid = task.get("output_name") or task.get("id")
        tts_speech, _, _, _ = glm.generate_long(
            frontend=frontend,
            text_frontend=text_frontend,
            llm=llm,
            flow=flow,
            text_info=[uttid, synth_text],
            cache=cache,
            embedding=embedding,
            seed=args.seed,
            flow_prompt_token=flow_prompt_token,
            speech_feat=speech_feat,
            device=device,
            use_phoneme=args.use_phoneme,
        )
        torchaudio.save(task["output"], tts_speech, args.sample_rate)

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
            answer({"id": None, "ok": False, "error": f"unreadable task line: {e}", "retryable": False, "fatal": False})
            continue
        began = time.monotonic()
        fatal = False
        try:
            synthesize(task)
            answer({"id": tid, "ok": True})
        except Exception as e:
            traceback.print_exc()
            retryable, fatal = classify(e)
            answer({
                "id": tid,
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "retryable": retryable,
                "fatal": fatal,
            })
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                reserved = torch.cuda.max_memory_reserved() / 2**20
                log(f"task {tid}: {time.monotonic() - began:.2f} s, max reserved {reserved:.0f} MiB")
        if fatal:
            log("a CUDA error left this process unusable; exiting")
            return 3


if __name__ == "__main__":
    sys.exit(main())

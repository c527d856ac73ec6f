#!/usr/bin/env python3
"""A contract-faithful fake of zai-org/GLM-TTS glmtts_inference.py (no torch).

Two ways in, as upstream has:

* run as a script (the `glmtts` batch engine): same arguments, same input
  (examples/NAME.jsonl relative to the working directory) and output
  (<script dir>/outputs/pretrain<exp_name>/NAME/<uttid>.wav plus
  text_compare.jsonl), and the same per-item behaviour: a bad item is logged
  ("Error processing <uttid>: ...") and skipped, and the process still exits
  0. A malformed input file or a failed "model load" exits non-zero.
* imported (a resident worker, like upstream's tools/gradio_app.py):
  `load_models(use_phoneme=False, sample_rate=24000)` returns
  `(frontend, text_frontend, speech_tokenizer, llm, token2wav)`;
  `generate_long(...)` has upstream's signature and returns
  `(tts_speech, tts_mel, token_list, text_tn_dict)`; `DEVICE`; and the
  module-level `torch` / `torchaudio` are small stand-ins with the calls a
  worker makes (`tensor(..).to(..)`, `cuda.empty_cache`,
  `cuda.max_memory_reserved`, `torchaudio.save`). Like upstream, everything
  is relative to the working directory, which must be the checkout.

Misbehaviour on purpose, chosen per item by a keyword in the text (a
worker's keyword followed by ONCE, e.g. CRASHONCE, trips only the first time
for that uttid: a marker is left in $FAKE_GLM_STATE):
  POISON    the item fails with an exception
  CRASH     the process dies (exit 1) at this item
  HANG      the process hangs forever at this item
  TRUNCATE  (batch script) the item's WAV is left truncated
  CUDAERR   "RuntimeError: CUDA error: an illegal memory access"; every
            later call fails the same way (the process is poisoned)
  JUNK      prints junk to stdout, some of it shaped like protocol lines
  FD3JUNK   a "library" writes a garbage line to file descriptor 3
  CLOSEFD3  a "library" closes file descriptor 3
and by environment:
  FAKE_GLM_LOAD      seconds to "load the models" (default 0)
  FAKE_GLM_UTT       seconds per utterance (default 0)
  FAKE_GLM_OOM_OVER  batches with more items than this die with CUDA OOM
  FAKE_GLM_FAIL_LOAD if set, the model load fails
  FAKE_GLM_STATE     folder for the ONCE markers (default outputs/state)
  FAKE_GLM_LOG       append JSON lines: one per batch run, one per model
                     load ({"event": "load"}), one per item
                     ({"event": "item"}), one per prompt's speech tokens
                     extracted ({"event": "extract"})
"""
import argparse
import array
import functools
import json
import logging
import math
import os
import sys
import time
import wave

CURRENT_DIR = os.path.dirname(os.path.abspath(__file__))
logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s")


def _log(entry):
    log = os.environ.get("FAKE_GLM_LOG")
    if log:
        entry.setdefault("pid", os.getpid())
        entry.setdefault("cuda", os.environ.get("CUDA_VISIBLE_DEVICES"))
        with open(log, "a") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


# --- torch / torchaudio stand-ins (what `import torch` gives upstream) ---


class _Tensor:
    def __init__(self, data):
        self.data = data

    @property
    def ndim(self):
        d, n = self.data, 0
        while isinstance(d, list):
            n += 1
            d = d[0] if d else None
        return n

    @property
    def shape(self):
        out, d = [], self.data
        while isinstance(d, list):
            out.append(len(d))
            d = d[0] if d else None
        return tuple(out)

    def to(self, device):
        return self

    def squeeze(self):
        d = self.data
        while isinstance(d, list) and len(d) == 1 and isinstance(d[0], list):
            d = d[0]
        return _Tensor(d)

    def tolist(self):
        return self.data

    def detach(self):
        return self

    def cpu(self):
        return self


class _Cuda:
    _poisoned = False
    empty_cache_calls = 0

    @staticmethod
    def is_available():
        return bool(os.environ.get("FAKE_GLM_CUDA"))

    @classmethod
    def empty_cache(cls):
        cls.empty_cache_calls += 1

    @staticmethod
    def max_memory_reserved():
        return 3 * 1024**3


class _Torch:
    int32 = "int32"
    float32 = "float32"
    cuda = _Cuda

    @staticmethod
    def device(name):
        return name

    @staticmethod
    def tensor(data, dtype=None):
        return _Tensor(data)

    @staticmethod
    def concat(tensors, dim=0):
        return _Tensor([sum((t.data[0] for t in tensors), [])])


class _Torchaudio:
    @staticmethod
    def save(path, wav, sample_rate):
        # torchaudio picks the format from the extension.
        if not str(path).endswith(".wav"):
            raise RuntimeError(f"cannot infer the audio format of {path}")
        samples = wav.data[0]
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(array.array("h", samples).tobytes())


torch = _Torch
torchaudio = _Torchaudio
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=64)
def _tone_of(n, sample_rate):
    return tuple(int(8000 * math.sin(2 * math.pi * 440 * i / sample_rate)) for i in range(n))


def _tone(text, sample_rate):
    """Samples of a short tone whose length depends on the text (cheap: the
    fake's own CPU time should not blur the 50 ms of an utterance)."""
    n = int(sample_rate * (0.05 + 0.01 * min(len(text), 50)))
    return list(_tone_of(n, sample_rate))


# --- the frontends and models ---


class TextFrontEnd:
    def __init__(self, use_phoneme=False):
        self.use_phoneme = use_phoneme

    def text_normalize(self, text):
        return " ".join(str(text).split())

    def split_by_len(self, text, max_len=60):
        return [text[i : i + max_len] for i in range(0, max(len(text), 1), max_len)]

    def g2p_infer(self, text):
        return text


class TTSFrontEnd:
    def __init__(self, sample_rate):
        self.sample_rate = sample_rate

    def tokenize_fn(self, text):
        return [ord(c) for c in text]

    def _extract_text_token(self, text):
        return torch.tensor([self.tokenize_fn(text)], dtype=torch.int32)

    def _extract_speech_token(self, wav_paths):
        path = wav_paths[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt audio not found: {path}")
        _log({"event": "extract", "path": path})
        return torch.tensor([[os.path.getsize(path) % 32768]], dtype=torch.int32)

    def _extract_speech_feat(self, wav_path, sample_rate=24000):
        if sample_rate != self.sample_rate:
            raise ValueError(f"speech feat at {sample_rate}, models at {self.sample_rate}")
        return torch.tensor([[0.0]])

    def _extract_spk_embedding(self, wav_path):
        return torch.tensor([[0.0] * 4])


class _Token2Wav:
    def __init__(self, sample_rate):
        self.sample_rate = sample_rate


def load_models(use_phoneme=False, sample_rate=24000):
    # Upstream opens ckpt/ and frontend/ relative to the working directory.
    if os.path.realpath(os.getcwd()) != os.path.realpath(CURRENT_DIR):
        raise FileNotFoundError("ckpt/speech_tokenizer: not found (the working directory must be the GLM-TTS checkout)")
    if sample_rate not in (24000, 32000):
        raise ValueError(f"Unsupported sampling_rate: {sample_rate}")
    print(f"Configured for {sample_rate // 1000}kHz frontend.")
    time.sleep(float(os.environ.get("FAKE_GLM_LOAD", "0")))
    if os.environ.get("FAKE_GLM_FAIL_LOAD"):
        raise RuntimeError("failed to load models from ckpt/")
    _log({"event": "load", "cwd": os.getcwd(), "sample_rate": sample_rate, "use_phoneme": use_phoneme})
    return TTSFrontEnd(sample_rate), TextFrontEnd(use_phoneme), object(), object(), _Token2Wav(sample_rate)


def _trips(word, text, uttid):
    """Whether the keyword `word` (or `word`ONCE, the first time) is in text."""
    if word + "ONCE" in text:
        state = os.environ.get("FAKE_GLM_STATE") or os.path.join(CURRENT_DIR, "outputs", "state")
        os.makedirs(state, exist_ok=True)
        try:
            os.close(os.open(os.path.join(state, f"{word}.{uttid}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
    return word in text


def generate_long(
    frontend,
    text_frontend,
    llm,
    flow,
    text_info,
    cache,
    device,
    embedding,
    seed=0,
    sample_method="ras",
    flow_prompt_token=None,
    speech_feat=None,
    local_llm_forward=None,
    local_flow_forward=None,
    use_phoneme=False,
):
    uttid, syn_text = text_info[0], text_info[1]
    if _Cuda._poisoned:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if not (cache["cache_text"] and cache["cache_text_token"] and cache["cache_speech_token"]):
        raise ValueError("cache without the prompt")
    _log({"event": "item", "uttid": uttid, "text": syn_text})
    if _trips("JUNK", syn_text, uttid):
        print('{"id": "junk", "ok": true}')
        print('{"ready": true}')
        print("\x00\xff not a protocol line")
        sys.stdout.flush()
    if _trips("FD3JUNK", syn_text, uttid):
        os.write(3, b"this library writes to fd 3\n")
    if _trips("CLOSEFD3", syn_text, uttid):
        os.close(3)
    if _trips("CRASH", syn_text, uttid):
        logging.error(f"fatal error while processing {uttid}: segmentation fault in flow model")
        sys.stderr.flush()
        os._exit(1)
    if _trips("HANG", syn_text, uttid):
        while True:
            time.sleep(1)
    if _trips("POISON", syn_text, uttid):
        raise RuntimeError("bad prompt audio: cannot extract speech tokens")
    if _trips("CUDAERR", syn_text, uttid):
        _Cuda._poisoned = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    outputs = []
    text_tn_dict = {"uttid": uttid, "syn_text": syn_text, "syn_text_tn": [], "syn_text_phoneme": []}
    for chunk in text_frontend.split_by_len(syn_text):
        tn = text_frontend.text_normalize(chunk)
        text_tn_dict["syn_text_tn"].append(tn)
        token = frontend._extract_text_token(tn)
        time.sleep(float(os.environ.get("FAKE_GLM_UTT", "0")))
        cache["cache_text"].append(tn)
        cache["cache_text_token"].append(token)
        cache["cache_speech_token"].append([1, 2, 3])
        outputs.append(torch.tensor([_tone(tn, flow.sample_rate)]))
    return torch.concat(outputs, dim=1), None, [], text_tn_dict


# --- the batch script ---


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

    _log({
        "data": args.data,
        "items": len(items),
        "uttids": [i.get("uttid") for i in items],
        "texts": [i.get("syn_text") for i in items],
        "prompts": [i.get("prompt_speech") for i in items],
        "cwd": os.getcwd(),
        "use_phoneme": args.use_phoneme,
        "sample_rate": args.sample_rate,
    })

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
                torchaudio.save(path, torch.tensor([_tone(text, args.sample_rate)]), args.sample_rate)
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

#!/usr/bin/env python3
"""A fake engine that tells what it was given: it writes its argv and its
whole environment as JSON to $DUMP_DIR/<TTSPOOL_TASK_ID>.json, then copies
$DUMP_WAV to its output (the first argument)."""
import json
import os
import shutil
import sys

task = os.environ.get("TTSPOOL_TASK_ID", "unknown")
dump = os.path.join(os.environ["DUMP_DIR"], task.replace("/", "_") + ".json")
with open(dump, "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
shutil.copyfile(os.environ["DUMP_WAV"], sys.argv[1])

#!/bin/sh
# A fake TTS engine that misbehaves on purpose, chosen by a keyword in the text.
# argv: OUTPUT TEXT ID ; env: FAKE_LOG (one "start" line per run), FAKE_WAV
# (a small valid WAV to copy).
out="$1"; text="$2"; id="$3"
echo "start $id pid=$$ slot=${TTSPOOL_SLOT:-?} cuda=${CUDA_VISIBLE_DEVICES:-none}" >> "$FAKE_LOG"
case "$text" in
  *EXIT1*)
    echo "boom: this engine fails on purpose for $id" >&2
    exit 1 ;;
  *PARTIALHANG*)
    # Half a WAV in the temp path, then hangs until released (a kill -9 of
    # the daemon leaves the temp file behind).
    printf 'RIFF\044\000' > "$out"
    while [ ! -e "$FAKE_LOG.release" ]; do sleep 0.05; done ;;
  *HANGUNTILRELEASED*)
    # Hangs until the test creates "$FAKE_LOG.release".
    while [ ! -e "$FAKE_LOG.release" ]; do sleep 0.05; done ;;
  *HANG*)
    # A grandchild that holds stdout open, and a child that never ends.
    sleep 1000 &
    echo "hanging" >&2
    sleep 1000 ;;
  *IGNORETERM*)
    trap '' TERM
    while :; do sleep 0.05; done ;;
  *NOOUTPUT*)
    exit 0 ;;
  *HALF*)
    # Half a WAV header, then "crash" with success.
    printf 'RIFF\044\000' > "$out"
    exit 0 ;;
  *NOTWAV*)
    echo "this is not audio" > "$out"
    exit 0 ;;
  *SLOW*)
    sleep 1 ;;
  *SLEEP6*)
    sleep 6 ;;
  *NAP*)
    sleep 0.2 ;;
esac
case "$text" in
  *FAILONCE*)
    # Fails on its first run only (marker file next to the log).
    if [ ! -e "$FAKE_LOG.$id.once" ]; then
      : > "$FAKE_LOG.$id.once"
      echo "first run fails" >&2
      exit 3
    fi ;;
esac
cp "$FAKE_WAV" "$out"

#!/usr/bin/env bash
# Start the voice agent in a container or on a bare pod.
#
#   runpod/start.sh [app.py flags...]   fetch the weights if missing, then serve on 0.0.0.0:$PORT
#   runpod/start.sh fetch               fetch the weights and exit (Kubernetes init container)
#
# Settings come from the environment (README.md lists them): AGENT_MODEL (default
# kyutai/moshiko-pytorch-bf16), HF_HOME (the weights cache; /workspace/hf-cache on a volume),
# PORT (7860), HF_TOKEN for gated repos, AGENT_DRAIN_SECONDS, TURN_URLS/TURN_USERNAME/TURN_CREDENTIAL.
#
# The last step execs python, so SIGTERM from the container runtime reaches the server itself,
# which drains live calls (see docs/deploy.md) instead of this shell swallowing the signal.
set -euo pipefail

SCRIPT="$(readlink -f "$0")"
cd "$(dirname "$SCRIPT")/.."   # the repository root: app.py lives here

log() { printf '%s start.sh: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

export HF_HOME="${HF_HOME:-/workspace/hf-cache}"
export AGENT_MODEL="${AGENT_MODEL:-kyutai/moshiko-pytorch-bf16}"
RUN_AS="${AGENT_RUN_AS-agent}"   # set AGENT_RUN_AS= (empty) to stay root

# A template or a UI form may leave a variable present but empty; app.py reads several of these
# with int()/float(), which an empty string breaks. Empty means "not set" here.
for name in AGENT_MAX_SESSIONS AGENT_MAX_CALLS_PER_CLIENT AGENT_MAX_CALL_MINUTES AGENT_DRAIN_SECONDS \
            AGENT_DEVICE AGENT_DTYPE AGENT_AUTH HF_TOKEN TURN_URLS TURN_USERNAME TURN_CREDENTIAL; do
    if [ -z "${!name-}" ]; then unset "$name"; fi
done

# Started as root (the image's default, because RunPod cannot be told which user to run nor who
# owns its /workspace volume): make the cache ours, then run everything else as the unprivileged
# user the image made, the way the official postgres and redis images drop privileges.
# Kubernetes starts us as that user already.
if [ "$(id -u)" -eq 0 ] && [ -n "$RUN_AS" ] && id -u "$RUN_AS" >/dev/null 2>&1; then
    uid="$(id -u "$RUN_AS")"
    gid="$(id -g "$RUN_AS")"
    mkdir -p "$HF_HOME"
    chown -R "$uid:$gid" "$HF_HOME" || log "warning: could not chown $HF_HOME to $RUN_AS"
    log "dropping root: continuing as $RUN_AS (uid $uid)"
    exec setpriv --reuid="$uid" --regid="$gid" --init-groups \
        env HOME="$(getent passwd "$RUN_AS" | cut -d: -f6)" bash "$SCRIPT" "$@"
fi

if ! mkdir -p "$HF_HOME" 2>/dev/null || [ ! -w "$HF_HOME" ]; then
    log "error: HF_HOME=$HF_HOME is not writable by uid $(id -u)."
    log "  Mount a volume there that this user can write (Kubernetes: securityContext.fsGroup),"
    log "  or start the container as root so this script can hand it to '$RUN_AS'."
    exit 1
fi

# The Python of the install: $PYTHON, else the repository's .venv (bare pod), else python3 on
# PATH (the image puts /opt/venv/bin first).
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Only a Hugging Face repo id is downloaded; tiny, moshi-7b-random and local folders are not.
needs_download() {
    local model="$1"
    case "$model" in tiny | moshi-7b-random | /* | ./* | ../* | "~"*) return 1 ;; esac
    [ ! -e "$model" ] && [[ "$model" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]]
}

# snapshot_download fetches only the files the cache lacks, so after the first start this is a
# metadata check of a few requests. If the Hub cannot be reached but the cache holds the repo,
# go on with the cache; if neither, stop with a message (the app would fail the same way later).
fetch_one() {
    local model="$1"
    log "model '$model': making sure it is in $HF_HOME (about 16 GB for Moshi 7B on the first start)"
    "$PYTHON" - "$model" <<'PY'
import os
import sys

from huggingface_hub import snapshot_download

repo = sys.argv[1]
offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
try:
    path = snapshot_download(repo, local_files_only=offline)
except Exception as exc:  # network, auth, unknown repo
    if offline:
        sys.exit(f"start.sh: {repo} is not in the cache at {os.environ['HF_HOME']} and HF_HUB_OFFLINE is set ({exc})")
    try:
        path = snapshot_download(repo, local_files_only=True)
        print(f"start.sh: the Hub could not be reached ({type(exc).__name__}); using the cached copy",
              file=sys.stderr)
    except Exception:
        sys.exit(f"start.sh: could not download {repo} and it is not cached: {type(exc).__name__}: {exc}\n"
                 "  Check the network and the repo id; gated repos need HF_TOKEN.")
print(f"start.sh: weights ready in {path}", file=sys.stderr)
PY
}

# AGENT_MODEL may name several models, comma-separated (one engine each on the same GPU).
fetch_weights() {
    local model models
    IFS=',' read -r -a models <<<"$AGENT_MODEL"
    for model in "${models[@]}"; do
        model="${model//[[:space:]]/}"
        [ -n "$model" ] || continue
        if needs_download "$model"; then
            fetch_one "$model"
        else
            log "model '$model': nothing to download"
        fi
    done
}

if [ "${1:-}" = "fetch" ]; then
    fetch_weights
    exit 0
fi

fetch_weights
port="${PORT:-${AGENT_PORT:-7860}}"
log "starting app.py on 0.0.0.0:$port (model $AGENT_MODEL)"
exec "$PYTHON" app.py --host 0.0.0.0 --port "$port" "$@"

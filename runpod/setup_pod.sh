#!/usr/bin/env bash
# Install and start the voice agent on a bare RunPod PyTorch pod (no custom image needed).
#
#   cd /workspace && git clone REPO_URL agent && cd agent && bash runpod/setup_pod.sh
#
# Run it as the pod's root user, from a checkout on the /workspace volume: the virtual
# environment (.venv) and the weights cache (/workspace/hf-cache) then survive pod restarts, and
# running the script again only starts the server. Expose port 7860 as HTTP in the pod's settings.
#
#   --with-test-tools   also install espeak-ng, sox and shellcheck (for running the tests)
#   --no-start          install only
#
# Stop the server with `kill -TERM "$(cat /workspace/agent.pid)"`: it drains live calls first.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")/.."

with_test_tools=0
start=1
for arg in "$@"; do
    case "$arg" in
        --with-test-tools) with_test_tools=1 ;;
        --no-start) start=0 ;;
        *) echo "unknown option: $arg (see the top of $0)" >&2; exit 2 ;;
    esac
done

WORKSPACE="${WORKSPACE:-/workspace}"
LOG="${AGENT_LOG:-$WORKSPACE/agent.log}"
PIDFILE="${AGENT_PIDFILE:-$WORKSPACE/agent.pid}"
export HF_HOME="${HF_HOME:-$WORKSPACE/hf-cache}"
export PORT="${PORT:-7860}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# System packages. gcc and the Python headers: Triton (torch.compile on the GPU) builds a small C
# module at run time. RunPod's PyTorch images usually have both; installing is a no-op then.
packages=(gcc python3-dev python3-venv curl ca-certificates)
if [ "$with_test_tools" -eq 1 ]; then
    packages+=(espeak-ng sox shellcheck fonts-noto-core libportaudio2)
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "Python 3.10 or newer is needed; this pod has $(python3 --version)" >&2
    exit 1
fi

# Our own venv with the pinned versions, apart from the image's PyTorch (a different version).
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt

if [ "$start" -eq 0 ]; then
    echo "Installed. Start with: bash runpod/setup_pod.sh   (or: runpod/start.sh in the foreground)"
    exit 0
fi

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "Already running (pid $(cat "$PIDFILE")); log: $LOG" >&2
    exit 0
fi

# In the background, in its own session so it outlives this SSH or web-terminal session.
# start.sh stays root here (the pod has no 'agent' user) and execs python, so the pid is the server's.
mkdir -p "$(dirname "$LOG")"
setsid nohup bash runpod/start.sh >>"$LOG" 2>&1 < /dev/null &
echo $! >"$PIDFILE"
echo "Started (pid $!). Log: tail -f $LOG   (Ctrl-C below stops the waiting, not the server)"

# Wait until it answers; the first start downloads ~16 GB of weights before listening.
for _ in $(seq 1 180); do
    if curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then
        echo "Serving. Page: https://${RUNPOD_POD_ID:-POD_ID}-$PORT.proxy.runpod.net"
        echo "WebSocket: wss://${RUNPOD_POD_ID:-POD_ID}-$PORT.proxy.runpod.net/websocket/offer"
        exit 0
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "The server stopped; last lines of $LOG:" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 10
done
echo "Still starting after 30 minutes (a slow download?); follow: tail -f $LOG"

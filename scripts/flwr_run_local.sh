#!/usr/bin/env bash
# Run this Flower app through Flower's own CLI (`flwr run . --stream`) on a local
# simulation SuperLink, offline, in the CURRENT Python environment: the SuperLink is
# started with --disable-runtime-dependency-installation, so nothing is `uv sync`ed.
#
# Usage:
#   scripts/flwr_run_local.sh [NUM_SUPERNODES] [RUN_CONFIG]
# e.g.
#   scripts/flwr_run_local.sh 4 "num-server-rounds=2 compressor='identity'"
# RUN_CONFIG is TOML: strings need quotes. `expected-clients` is set to NUM_SUPERNODES.
#
# Environment knobs (all optional):
#   VENV=<active venv>       venv whose bin/ provides flwr, flower-superlink,
#                            flower-superexec, flwr-simulation (must be on PATH)
#   CLIENT_CPUS=1            Ray client_resources num_cpus per ClientApp (int!)
#   CLIENT_GPUS=0.0          Ray client_resources num_gpus per ClientApp (float)
#   FED_CONFIG_EXTRA=''      extra `--federation-config` pairs, e.g. 'verbose=true'
#   SUPERLINK_CWD=$PWD       working dir of the SuperLink -> cwd of ServerApp AND
#                            ClientApps; relative paths in the app resolve here
#   PORT=<free port>         SuperLink HTTP port (Control+Runtime+Fleet on one port)
#   STARTUP_TIMEOUT=60       seconds to wait for SuperLink /health
#   KEEP_FLWR_HOME=0         1 = do not delete the temp FLWR_HOME (apps/, logs)
#
# Exit code: flwr run's exit code if non-zero; otherwise 0 only if the run's final
# status is `finished:completed` (flwr run --stream exits 0 even if the ServerApp
# raised), else 1. 2 = usage/startup error.
set -uo pipefail

APP_DIR="$(cd "$(dirname "$0")/.." && pwd)"
NUM_SUPERNODES="${1:-4}"
RUN_CONFIG="${2:-}"

VENV="${VENV:-$(dirname "$(dirname "$(command -v python)")")}"
export PATH="$VENV/bin:$PATH"   # superlink spawns flower-superexec / flwr-simulation by name
CLIENT_CPUS="${CLIENT_CPUS:-1}"
CLIENT_GPUS="${CLIENT_GPUS:-0.0}"
FED_CONFIG_EXTRA="${FED_CONFIG_EXTRA:-}"
SUPERLINK_CWD="${SUPERLINK_CWD:-$APP_DIR}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-60}"
PORT="${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')}"

# Isolated Flower home: config.toml, installed FABs (apps/), superlink log.
export FLWR_HOME="$(mktemp -d -t flwrhome.XXXXXX)"
export FLWR_TELEMETRY_ENABLED=0       # no telemetry calls (offline)
export FLWR_DISABLE_UPDATE_CHECK=1    # no update check thread hitting api.flower.ai
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # belt and braces, see flag below
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
unset RAY_ADDRESS                     # never attach to some other Ray cluster

cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-sim"

[superlink.local-sim]
address = "127.0.0.1:$PORT"
insecure = true
EOF

SL_LOG="$FLWR_HOME/superlink.log"
SL_PID=""

cleanup() {
    if [[ -n "$SL_PID" ]] && kill -0 "$SL_PID" 2>/dev/null; then
        kill -TERM "$SL_PID" 2>/dev/null
        for _ in $(seq 1 150); do kill -0 "$SL_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$SL_PID" 2>/dev/null; then
            echo "[flwr_run_local] SuperLink did not stop in 15s, sending SIGKILL" >&2
            kill -KILL "$SL_PID" 2>/dev/null
        fi
        wait "$SL_PID" 2>/dev/null
    fi
    if [[ "${KEEP_FLWR_HOME:-0}" == "1" ]]; then
        echo "[flwr_run_local] kept FLWR_HOME=$FLWR_HOME (superlink log: $SL_LOG)" >&2
    else
        rm -rf "$FLWR_HOME"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T0=$(date +%s.%N)
(
    cd "$SUPERLINK_CWD" || exit 2
    exec flower-superlink \
        --simulation \
        --insecure \
        --disable-runtime-dependency-installation \
        --host 127.0.0.1 \
        --port "$PORT"
) >"$SL_LOG" 2>&1 &
SL_PID=$!

# Wait for readiness: GET /health on the SuperLink HTTP port (what flwr itself polls).
ready=0
deadline=$(( $(date +%s) + STARTUP_TIMEOUT ))
while (( $(date +%s) < deadline )); do
    if ! kill -0 "$SL_PID" 2>/dev/null; then
        echo "[flwr_run_local] flower-superlink exited early; log:" >&2
        cat "$SL_LOG" >&2
        exit 2
    fi
    if python -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=0.5).status==200 else 1)" 2>/dev/null; then
        ready=1; break
    fi
    sleep 0.2
done
if [[ $ready != 1 ]]; then
    echo "[flwr_run_local] SuperLink not ready after ${STARTUP_TIMEOUT}s; log:" >&2
    cat "$SL_LOG" >&2
    exit 2
fi
T1=$(date +%s.%N)
echo "[flwr_run_local] SuperLink ready on 127.0.0.1:$PORT after $(python -c "print(round($T1-$T0,2))")s (FLWR_HOME=$FLWR_HOME)" >&2

FED_CONFIG="num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CLIENT_CPUS client-resources-num-gpus=$CLIENT_GPUS $FED_CONFIG_EXTRA"
RUN_OUT="$FLWR_HOME/flwr_run.out"
flwr run "$APP_DIR" local-sim --stream --federation-config "$FED_CONFIG" \
    --run-config "expected-clients=$NUM_SUPERNODES $RUN_CONFIG" 2>&1 | tee "$RUN_OUT"
RC=${PIPESTATUS[0]}
T2=$(date +%s.%N)
echo "[flwr_run_local] flwr run exited rc=$RC after $(python -c "print(round($T2-$T1,2))")s" >&2

if [[ $RC -eq 0 ]]; then
    RUN_ID=$(grep -o 'Successfully started run [0-9]*' "$RUN_OUT" | head -1 | awk '{print $4}')
    STATUS=$(flwr ls local-sim ${RUN_ID:+--run-id "$RUN_ID"} --format json 2>/dev/null \
        | python -c 'import sys,json; d=json.load(sys.stdin); r=d.get("runs") or [{}]; print(r[0].get("status","unknown"), "|", r[0].get("status-details",""))' 2>/dev/null)
    echo "[flwr_run_local] run ${RUN_ID:-?} status: ${STATUS:-unknown}" >&2
    case "$STATUS" in
        finished:completed*) RC=0 ;;
        *) RC=1 ;;
    esac
fi
exit $RC

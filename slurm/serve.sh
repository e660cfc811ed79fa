# A generation server on this array task's node, for the jobs that sample through an OpenAI-compatible server
# (slurm/synth.sbatch: SYNTH_*, slurm/data_array.sbatch with train.pts: DATA_*). Sourced, not run:
#
#   source "$repo/slurm/serve.sh"
#   serve_start SYNTH "$PWD/synth-server-$tag.log"   # when $SYNTH_SERVER_CMD is set; sets serve_url
#   ...; serve_stop                                    # also on EXIT (the trap is set by serve_start)
#
# <P>_SERVER_CMD is a command template with {port} (run with bash -c in its own process group, e.g.
# 'vllm serve /models/sft --port {port} --served-model-name sft --enable-prefix-caching'); <P>_SERVER_PORT (default: a
# free port the OS picks), <P>_SERVER_TIMEOUT_S (default 1800: large models load slowly) and <P>_SERVER_LOG (default
# the second argument) tune it. serve_start waits until GET http://127.0.0.1:<port>/v1/models answers 200; a server
# that exits or does not answer in time ends the task with status 4 and the log's last lines on stderr.
# Needs: say (a log function) and py (the python executable).

serve_pid=""
serve_log=""
serve_url=""

serve_stop() {
    [ -n "$serve_pid" ] || return 0
    if kill -0 "$serve_pid" 2>/dev/null; then
        say "stopping the server (pid $serve_pid)"
        kill -TERM -- "-$serve_pid" 2>/dev/null || kill -TERM "$serve_pid" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$serve_pid" 2>/dev/null || true
    fi
    serve_pid=""
}

serve_failed() {
    echo "[serve] error: $1; the last lines of $serve_log:" >&2
    tail -n 60 "$serve_log" >&2 2>/dev/null || true
    serve_stop
    exit 4
}

serve_start() {  # serve_start PREFIX DEFAULT_LOG
    local prefix="$1" cmd_var="$1_SERVER_CMD" port_var="$1_SERVER_PORT" timeout_var="$1_SERVER_TIMEOUT_S"
    local log_var="$1_SERVER_LOG" template port timeout_s cmd started status
    template="${!cmd_var:-}"
    [[ "$template" == *"{port}"* ]] || { echo "[serve] error: $cmd_var has no {port}: $template" >&2; exit 2; }
    port="${!port_var:-}"
    if [ -z "$port" ]; then
        port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
            || { echo "[serve] error: could not pick a free port (set $port_var)" >&2; exit 2; }
    fi
    timeout_s="${!timeout_var:-1800}"
    serve_log="${!log_var:-$2}"
    cmd="${template//\{port\}/$port}"
    trap serve_stop EXIT
    say "starting the server on port $port (log $serve_log): $cmd"
    echo "[$prefix $(date '+%F %T')] job ${SLURM_JOB_ID:-?}: $cmd" >> "$serve_log"
    setsid bash -c "$cmd" >> "$serve_log" 2>&1 < /dev/null &
    serve_pid=$!
    serve_url="http://127.0.0.1:$port/v1"
    started="$(date +%s)"
    until "$py" - "$serve_url/models" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    do
        if ! kill -0 "$serve_pid" 2>/dev/null; then
            status=0; wait "$serve_pid" || status=$?
            serve_failed "the server exited with status $status before answering"
        fi
        [ $(( $(date +%s) - started )) -lt "$timeout_s" ] \
            || serve_failed "the server did not answer GET $serve_url/models within ${timeout_s} s ($timeout_var)"
        sleep 2
    done
    say "server up after $(( $(date +%s) - started )) s: $serve_url"
}

# Process bookkeeping and health checks for the e2e/cluster scripts. Sourced after lib.sh.
# shellcheck shell=bash

# Components in start order; down stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy s3
            snapshot-controller csi-hostpath csi-provisioner csi-snapshotter)

pidfile() { echo "$RUN/$1.pid"; }

# pid of a component if it is alive and still the process we started (same executable), else nothing.
alive_pid() {
  local f; f=$(pidfile "$1")
  [ -s "$f" ] || return 1
  local pid exe; read -r pid exe <"$f" || true
  [ -n "$pid" ] && running "$pid" || return 1
  if [ -n "${exe:-}" ]; then
    local cur; cur=$(readlink "/proc/$pid/exe" 2>/dev/null)
    # " (deleted)": still our process, but its binary was rebuilt since (start restarts it)
    [ "${cur% (deleted)}" = "$exe" ] || return 1
  fi
  echo "$pid"
}

# start NAME CMD ARGS...: start unless already running; log to $LOGS/NAME.log; record "pid exe".
start() {
  local name=$1; shift
  if pid=$(alive_pid "$name"); then
    if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" != *" (deleted)" ]]; then
      log "$name: already running (pid $pid)"
      return 0
    fi
    log "$name: binary was rebuilt, restarting"
    stop "$name"
  fi
  local exe; exe=$(readlink -f "$(command -v "$1")")
  echo "---- $(date -Is) starting: $*" >>"$LOGS/$name.log"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  local child=$! i
  # Until the child has exec'd, /proc/PID/exe is setsid's (or the shell's), and alive_pid would call the
  # starting process gone: wait for the exec (or its end) before anyone checks.
  for i in $(seq 50); do
    [ "$(readlink "/proc/$child/exe" 2>/dev/null)" = "$exe" ] && break
    running "$child" || break
    sleep 0.1
  done
  echo "$child $exe" >"$(pidfile "$name")"
  log "$name: started (pid $child)"
}

# running PID: the process exists and is not a zombie waiting to be reaped.
running() {
  local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

# stop NAME [timeout]: SIGTERM by recorded pid, then SIGKILL.
stop() {
  local name=$1 t=${2:-15} pid
  if pid=$(alive_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    local i=0
    while running "$pid" && [ $i -lt $((t * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if running "$pid"; then
      log "$name: did not stop in ${t}s, killing"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
    log "$name: stopped (pid $pid)"
  fi
  rm -f "$(pidfile "$name")"
}

# wait_for LABEL TIMEOUT CHECK: poll CHECK until it succeeds; on timeout show the log tail and fail.
wait_for() {
  local what=$1 t=$2 check=$3 end=$(( $(date +%s) + $2 ))
  while ! "$check" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
      echo "error: $what not ready after ${t}s: $("$check" 2>&1 | tail -3)" >&2
      local l="$LOGS/$what.log"
      [ -f "$l" ] || l="$LOGS/kubelet.log"
      echo "---- tail of $l" >&2; tail -n 40 "$l" >&2 || true
      exit 1
    fi
    case "$what" in
      etcd|kube-apiserver|kube-controller-manager|kube-scheduler|containerd|kubelet|kube-proxy|s3|csi-hostpath)
        alive_pid "$what" >/dev/null || { echo "error: $what exited; tail of $LOGS/$what.log:" >&2; tail -n 40 "$LOGS/$what.log" >&2; exit 1; } ;;
    esac
    sleep 1
  done
  log "$what: ready"
}

CURL=(curl -sS --max-time 5)
check_etcd() { "${CURL[@]}" http://127.0.0.1:2379/health | grep '"health":"true"' >/dev/null; }
check_apiserver() { [ "$("${CURL[@]}" --cacert "$PKI/ca.crt" "https://$NODE_IP:6443/readyz")" = ok ]; }
check_kcm() { [ "$("${CURL[@]}" -k https://127.0.0.1:10257/healthz)" = ok ]; }
check_scheduler() { [ "$("${CURL[@]}" -k https://127.0.0.1:10259/healthz)" = ok ]; }
check_containerd() { ctr --address "$CTR_SOCK" version >/dev/null; }
check_kubelet() { [ "$("${CURL[@]}" http://127.0.0.1:10248/healthz)" = ok ]; }
check_proxy() { "${CURL[@]}" -o /dev/null -w '%{http_code}' http://127.0.0.1:10256/healthz | grep 200 >/dev/null; }
check_s3() { "${CURL[@]}" -o /dev/null -w '%{http_code}' "http://$NODE_IP:$S3_PORT/" | grep -E '^[2-4][0-9][0-9]$' >/dev/null; }
check_csi_socket() { [ -S "$CSI_SOCK" ]; }
check_node() {
  [ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>&1)" = True ] ||
    { kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}' 2>&1; return 1; }
}
check_csinode() { kc get csinode "$NODE_NAME" -o jsonpath='{.spec.drivers[*].name}' 2>&1 | grep -w "$CSI_DRIVER" >/dev/null; }
check_default_sa() { kc -n default get serviceaccount default >/dev/null 2>&1; }

#!/usr/bin/env bash
# A throw-away S3 server for tests: Ceph's RADOS Gateway (Debian 12's own packages) on a
# one-monitor, one-OSD cluster bound to 127.0.0.1, all of it in one directory.
#
#   tools/rgw/rgw.sh install        # ceph-mon, ceph-osd, radosgw (--no-install-recommends) if missing
#   tools/rgw/rgw.sh start DIR [PID] # prints AWS_ENDPOINT_URL=..., AWS_ACCESS_KEY_ID=..., ... on stdout;
#                                   # with PID, the cluster is stopped when that process is gone
#   tools/rgw/rgw.sh stop DIR       # kills the daemons started in DIR and removes DIR
#
# Facts this relies on (issue 16): paxos_propose_interval = 0.05 makes the monitor ready in
# about 2 s (11-14 s without); osd_crush_update_on_start = false avoids a start-up race (the
# OSD is put in the CRUSH map here instead); the first `ceph osd new` can fail once; memstore
# keeps objects in the OSD's RAM (SNAPCTL_RGW_MEM_BYTES, default 2 GiB). Nothing listens
# anywhere but 127.0.0.1. The cluster's own keys (cephx) are in DIR/keyring; S3 requests are
# signed with the test user's keys, printed by start.
set -euo pipefail

ACCESS_KEY=snapctltestaccess
SECRET_KEY=snapctltestsecret0123456789
REGION=us-east-1

log() { echo "rgw: $*" >&2; }
die() {
  echo "rgw: $*" >&2
  if [ "${STARTING:-0}" = 1 ]; then
    tail -n 5 "$DIR"/*.log >&2 2>/dev/null || true
    stop "$DIR"   # never leave daemons behind
  fi
  exit 1
}

install() {
  local missing=()
  command -v ceph-mon >/dev/null 2>&1 || missing+=(ceph-mon)
  command -v ceph-osd >/dev/null 2>&1 || missing+=(ceph-osd)
  command -v radosgw >/dev/null 2>&1 || missing+=(radosgw)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  log "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()' 2>/dev/null ||
    node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# Retries a command until it succeeds or `tries` x 0.2 s pass.
retry() {
  local tries=$1; shift
  local i
  for ((i = 0; i < tries; i++)); do
    if "$@" 2>>"$DIR/retry.log"; then return 0; fi
    sleep 0.2
  done
  return 1
}

start() {
  DIR=$(realpath -m "$1")
  mkdir -p "$DIR"
  [ -e "$DIR/ceph.conf" ] && die "$DIR already holds a cluster (stop it first)"
  for b in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph; do
    command -v $b >/dev/null 2>&1 || die "$b is missing: run tools/rgw/rgw.sh install (or tools/setup.sh)"
  done
  local mon_port rgw_port fsid osd_uuid
  mon_port=$(free_port)
  rgw_port=$(free_port)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$DIR/ceph.conf" <<CONF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$mon_port]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
keyring = $DIR/keyring
auth_allow_insecure_global_id_reclaim = false
run_dir = $DIR
pid_file = $DIR/\$name.pid
admin_socket = $DIR/\$name.asok
log_file = $DIR/\$name.log
crash_dir = $DIR/crash
mon_data = $DIR/mon
osd_data = $DIR/osd
paxos_propose_interval = 0.05
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_crit = 1
mon_data_avail_warn = 2
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
osd_crush_update_on_start = false
osd_objectstore = memstore
memstore_device_bytes = ${SNAPCTL_RGW_MEM_BYTES:-2147483648}
osd_max_object_size = 134217728
[client]
log_file = $DIR/client.log
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:$rgw_port
rgw_data = $DIR/rgw
rgw_dns_name = 127.0.0.1
rgw_enable_usage_log = false
rgw_thread_pool_size = 64
CONF
  local C=(-c "$DIR/ceph.conf")
  # The daemons fork away from us: a watcher stops them when the owner is gone, however it ended.
  if [ -n "${2:-}" ]; then
    setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -e "$2/ceph.conf" ]; do sleep 1; done; exec bash "$3" stop "$2"' \
      watcher "$2" "$DIR" "$(realpath "$0")" </dev/null >/dev/null 2>&1 &
  fi
  STARTING=1
  trap 'STARTING=0; echo "rgw: start failed at line $LINENO" >&2; stop "$DIR"' ERR
  mkdir -p "$DIR/mon" "$DIR/osd" "$DIR/rgw" "$DIR/crash"
  # One keyring for every daemon and client of this private cluster; the monitor imports it at mkfs.
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.rgw --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$DIR/monmap" >/dev/null
  ceph-mon "${C[@]}" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" >/dev/null 2>>"$DIR/start.log"
  ceph-mon "${C[@]}" -i a >/dev/null 2>>"$DIR/start.log"
  # The first `ceph osd new` can fail once while the monitor settles.
  retry 25 timeout 10 ceph "${C[@]}" --connect-timeout 5 osd new "$osd_uuid" 0 >"$DIR/osd-id" || die "ceph osd new failed (see $DIR)"
  local id
  id=$(tr -d '[:space:]' <"$DIR/osd-id")
  ceph-osd "${C[@]}" -i "$id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>>"$DIR/start.log"
  ceph "${C[@]}" osd crush add "osd.$id" 1.0 root=default >/dev/null 2>>"$DIR/start.log"
  ceph-osd "${C[@]}" -i "$id" >/dev/null 2>>"$DIR/start.log"
  radosgw "${C[@]}" -n client.rgw --client-mount-timeout 20 >/dev/null 2>>"$DIR/start.log"
  local i
  for ((i = 0; i < 300; i++)); do
    curl -s -o /dev/null "http://127.0.0.1:$rgw_port/" 2>/dev/null && break
    node -e 'fetch(process.argv[1]).then(()=>process.exit(0),()=>process.exit(1))' "http://127.0.0.1:$rgw_port/" 2>/dev/null && break
    sleep 0.1
  done
  [ "$i" -lt 300 ] || die "radosgw did not answer on 127.0.0.1:$rgw_port (see $DIR/*.log)"
  retry 25 timeout 20 radosgw-admin "${C[@]}" -n client.rgw user create --uid=snapctl --display-name=snapctl \
    --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null || die "radosgw-admin user create failed (see $DIR)"
  STARTING=0
  trap - ERR
  cat <<ENV | tee "$DIR/env"
AWS_ENDPOINT_URL=http://127.0.0.1:$rgw_port
AWS_ACCESS_KEY_ID=$ACCESS_KEY
AWS_SECRET_ACCESS_KEY=$SECRET_KEY
AWS_REGION=$REGION
ENV
}

stop() {
  DIR=$(realpath -m "$1")
  [ -d "$DIR" ] || return 0
  # Throw-away daemons with nothing to flush (memstore): SIGKILL, then wait until they are gone.
  local f pid pids=()
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null && pids+=("$pid")
  done
  local i
  for ((i = 0; i < 50 && ${#pids[@]} > 0; i++)); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    pids=(${alive[@]+"${alive[@]}"})
    [ ${#pids[@]} -gt 0 ] && sleep 0.05
  done
  rm -rf "$DIR"
}

case "${1:-}" in
  install) install ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR [PID]"; start "$2" "${3:-}" ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | start DIR | stop DIR" ;;
esac

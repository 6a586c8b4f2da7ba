#!/usr/bin/env bash
# actfleet startup script: the TPU VM's `startup-script` metadata, run as root by the guest agent on EVERY
# boot (and on every host of a slice). The guest agent runs it once per boot and spot TPUs are not rebooted,
# so the work itself runs in a systemd unit that retries until it succeeds. One file, three modes:
#
#   startup.sh            (guest agent) checks the metadata, installs this script and the bootstrap unit
#                         (actfleet-bootstrap.service), starts the unit and returns;
#   startup.sh bootstrap  (the unit) runs attempts until one succeeds, backing off exponentially; a bad input
#                         (exit 2) is not retried; if every attempt fails, systemd restarts the unit;
#   startup.sh attempt    one idempotent pass:
#     1. system packages, only those missing (git, curl, python3-pip), apt waiting for its lock;
#     2. the repository at the pinned commit (a branch, tag or short sha is refused; no curl | bash);
#     3. uv, at the version and hashes of bootstrap/requirements-uv.txt (pip --require-hashes);
#     4. the CPython of bootstrap/python-version, managed by uv (the images ship 3.10; actfleet needs 3.11+);
#     5. the venv from the lock bootstrap/requirements-tpu.txt (`uv pip sync --require-hashes`), then the
#        checkout itself without dependencies or build isolation;
#     6. the `actfleet` system user, the fleet config, the worker's environment file and its systemd unit;
#     7. starts (or restarts, if anything changed) `actfleet work` under systemd as that user.
#
# Overrides, so tests can run it unprivileged in a temporary root (all optional, unset on a real VM):
#   ACTFLEET_ROOT          prefix for every path written (default: /)
#   ACTFLEET_METADATA_DIR  read metadata key K from the file $ACTFLEET_METADATA_DIR/K instead of the server
#   ACTFLEET_METADATA_URL  metadata attributes URL (default: the GCE metadata server)
#   ACTFLEET_APT_GET, ACTFLEET_SYSTEMCTL, ACTFLEET_USERADD   stand-ins for those commands
#   ACTFLEET_ATTEMPTS      attempts per start of the bootstrap unit (default 8; 0 = no limit)
#   ACTFLEET_RETRY_DELAY   first backoff in seconds (default 15; doubles up to ACTFLEET_RETRY_MAX_DELAY, 600)
# Exit codes: 0 done, 1 a step failed (retried), 2 bad metadata (e.g. a moving ref: not retried).
set -euo pipefail
# Every step below is a plain command so that `set -e` stops at its first failure: bash ignores -e inside a
# function called as an `if`/`||` condition, so no step reports "changed" through its exit status.
shopt -s inherit_errexit
umask 022

ROOT="${ACTFLEET_ROOT:-}"
ROOT="${ROOT%/}"
OPT="$ROOT/opt/actfleet"
SRC="$OPT/src"
VENV="$OPT/venv"
UV_DIR="$OPT/uv"
UV="$UV_DIR/bin/uv"
ETC="$ROOT/etc/actfleet"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT_NAME="actfleet-worker.service"
BOOT_UNIT="actfleet-bootstrap.service"
SELF_COPY="$OPT/bootstrap/startup.sh"
USER_NAME="actfleet"
APT_LOCK_TIMEOUT=600  # seconds apt waits for unattended-upgrades' lock before the attempt fails and backs off
APT_GET="${ACTFLEET_APT_GET:-apt-get}"
SYSTEMCTL="${ACTFLEET_SYSTEMCTL:-systemctl}"
USERADD="${ACTFLEET_USERADD:-useradd}"
METADATA_DIR="${ACTFLEET_METADATA_DIR:-}"
METADATA_URL="${ACTFLEET_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"
# uv keeps its interpreters and cache under /opt/actfleet (readable by the worker user, written only by root).
export UV_PYTHON_INSTALL_DIR="$OPT/python" UV_CACHE_DIR="$OPT/uv-cache" UV_NO_CONFIG=1

log() { echo "actfleet-startup: $*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

# metadata KEY [DEFAULT]: one instance metadata attribute; missing without a default is an error.
metadata() {
  local key="$1"
  if [[ -n "$METADATA_DIR" ]]; then
    if [[ -f "$METADATA_DIR/$key" ]]; then cat "$METADATA_DIR/$key"; return 0; fi
  elif curl -sf --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$METADATA_URL/$key"; then
    return 0
  fi
  [[ $# -ge 2 ]] || die "instance metadata '$key' is missing (the fleet stack sets it)" 2
  printf '%s' "$2"
}

read_metadata() {
  REPO_URL="$(metadata actfleet-repo-url)"
  COMMIT="$(metadata actfleet-commit)"
  WORKER="$(metadata actfleet-worker)"
  CONFIG_URL="$(metadata actfleet-config)"
  JOB="$(metadata actfleet-job default)"
  [[ "$COMMIT" =~ ^[0-9a-f]{40}$ ]] \
    || die "actfleet-commit = '$COMMIT': not a pinned commit (a full 40-hex sha); refusing a moving ref" 2
  [[ "$WORKER" =~ ^[a-z][a-z0-9-]{0,62}$ ]] || die "actfleet-worker = '$WORKER': not a worker name" 2
}

# staged PATH: a new temporary file beside PATH (same file system, so the rename in put_file is atomic).
staged() { mkdir -p "$(dirname "$1")"; mktemp "$1.XXXXXX"; }

# put_file TMP PATH [MODE]: TMP becomes PATH unless PATH already has that content; sets CHANGED=1 if it did.
put_file() {
  local tmp="$1" path="$2" mode="${3:-0644}"
  if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 0; fi
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
  CHANGED=1
}

apt_get() {
  # DPkg::Lock::Timeout: wait for unattended-upgrades (busy on a fresh image) instead of failing at once.
  DEBIAN_FRONTEND=noninteractive "$APT_GET" -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" "$@"
}

ensure_packages() {
  local missing=()
  command -v git >/dev/null || missing+=(git)
  command -v curl >/dev/null || [[ -n "$METADATA_DIR" ]] || missing+=(curl)
  # The image's python3 (3.10) only runs pip once, to fetch the pinned uv; it never runs actfleet.
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt_get update -q
    apt_get install -yq --no-install-recommends "${missing[@]}"
  fi
}

# checkout: $SRC at exactly $COMMIT; sets CHANGED=1 unless it was already there.
checkout() {
  if [[ -d "$SRC/.git" ]] && [[ "$(git -C "$SRC" rev-parse HEAD 2>/dev/null)" == "$COMMIT" ]] \
     && git -C "$SRC" diff --quiet HEAD 2>/dev/null; then
    return 0
  fi
  log "checking out $REPO_URL at $COMMIT"
  local tmp="$SRC.partial"
  rm -rf "$tmp"
  git init -q "$tmp"
  git -C "$tmp" remote add origin "$REPO_URL"
  # Fetch just the pinned commit; servers that refuse a bare sha get a full fetch instead.
  git -C "$tmp" fetch -q --depth 1 origin "$COMMIT" 2>/dev/null || git -C "$tmp" fetch -q origin
  git -C "$tmp" -c advice.detachedHead=false checkout -q --detach "$COMMIT" \
    || die "commit $COMMIT is not in $REPO_URL"
  [[ "$(git -C "$tmp" rev-parse HEAD)" == "$COMMIT" ]] || die "checkout of $COMMIT ended elsewhere"
  rm -rf "$SRC"
  mkdir -p "$(dirname "$SRC")"
  mv "$tmp" "$SRC"
  CHANGED=1
}

# ensure_uv: $UV at the version the checkout's bootstrap/requirements-uv.txt pins, installed with its hashes.
ensure_uv() {
  local req="$SRC/bootstrap/requirements-uv.txt" want
  want="$(sed -n 's/^uv==\([0-9][0-9.]*\).*/\1/p' "$req" 2>/dev/null)" || true
  [[ -n "$want" ]] || die "$req does not pin uv (uv==X.Y.Z with hashes)" 2
  if [[ -x "$UV" ]] && [[ "$(uv_version)" == "$want" ]]; then return 0; fi
  log "installing uv $want"
  rm -rf "$UV_DIR.partial"
  python3 -m pip install -q --disable-pip-version-check --no-deps --only-binary :all: --require-hashes \
    --target "$UV_DIR.partial" -r "$req"
  rm -rf "$UV_DIR"
  mv "$UV_DIR.partial" "$UV_DIR"
  [[ "$(uv_version)" == "$want" ]] || die "$UV reports '$("$UV" --version 2>&1)', not uv $want"
}

uv_version() { "$UV" --version 2>/dev/null | awk '$1 == "uv" {print $2}'; }

# ensure_python: sets PY to the pinned uv-managed CPython, installing it if needed. Never the image's python3.
ensure_python() {
  local want
  want="$(tr -d '[:space:]' <"$SRC/bootstrap/python-version" 2>/dev/null)" || true
  [[ "$want" =~ ^3\.[0-9]+\.[0-9]+$ ]] || die "bootstrap/python-version = '$want': not an exact CPython version" 2
  if ! PY="$("$UV" python find --managed-python --no-python-downloads "$want" 2>/dev/null)"; then
    log "installing CPython $want (uv-managed)"
    "$UV" python install --no-bin "$want"
    PY="$("$UV" python find --managed-python --no-python-downloads "$want")"
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" -V 2>&1): actfleet needs Python >= 3.11"
}

# build_venv: $VENV from the lock, then actfleet itself from the checkout. The marker names the commit and
# interpreter it was built from and is written last, so an interrupted build is redone on the next attempt.
# Sets CHANGED=1 if it built.
build_venv() {
  local marker="$VENV/.actfleet-commit" want="$COMMIT $PY"
  if [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "$want" ]] && [[ -x "$VENV/bin/actfleet" ]]; then
    return 0
  fi
  log "building $VENV for $COMMIT with $PY"
  rm -rf "$VENV"
  "$UV" venv -q --python "$PY" "$VENV"
  # Exactly the locked packages, each checked against its hash: every worker runs the same bits.
  "$UV" pip sync -q --python "$VENV/bin/python" --require-hashes "$SRC/bootstrap/requirements-tpu.txt"
  # The checkout is the one package not in the lock; its build backend (setuptools) is in the lock.
  "$UV" pip install -q --python "$VENV/bin/python" --no-deps --no-build-isolation "$SRC"
  [[ -x "$VENV/bin/actfleet" ]] || die "the install did not provide $VENV/bin/actfleet"
  printf '%s\n' "$want" >"$marker"
  CHANGED=1
}

# ensure_user: the unprivileged system user the worker runs as (no login shell, no home of its own).
ensure_user() {
  grep -q "^$USER_NAME:" "$ROOT/etc/passwd" 2>/dev/null && return 0
  log "creating system user $USER_NAME"
  "$USERADD" --system --user-group --no-create-home --home-dir /var/lib/actfleet --shell /usr/sbin/nologin \
    "$USER_NAME"
}

# fetch_config: the fleet config from the bucket (or a path) to $ETC/fleet.toml; CHANGED=1 if it changed.
fetch_config() {
  local tmp
  tmp="$(staged "$ETC/fleet.toml")"
  case "$CONFIG_URL" in
    gs://*)
      "$VENV/bin/python" - "$CONFIG_URL" "$tmp" <<'PY' || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; }
import sys
from google.cloud import storage  # the worker's attached service account (no keys)
bucket, _, name = sys.argv[1][len("gs://"):].partition("/")
storage.Client().bucket(bucket).blob(name).download_to_filename(sys.argv[2])
PY
      ;;
    file://*) cp "${CONFIG_URL#file://}" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; } ;;
    /*) cp "$CONFIG_URL" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; } ;;
    *) rm -f "$tmp"; die "actfleet-config = '$CONFIG_URL': must be gs://..., file://... or an absolute path" 2 ;;
  esac
  put_file "$tmp" "$ETC/fleet.toml"
}

attempt() {
  read_metadata
  mkdir -p "$ETC"
  ensure_packages
  CHANGED=0  # anything below that changes sets it: the worker is then restarted
  checkout
  ensure_uv
  ensure_python
  build_venv
  ensure_user
  fetch_config
  local tmp
  tmp="$(staged "$ETC/worker.env")"
  printf 'ACTFLEET_WORKER=%s\nACTFLEET_CONFIG=%s\nACTFLEET_JOB=%s\n' "$WORKER" "$ETC/fleet.toml" "$JOB" >"$tmp"
  put_file "$tmp" "$ETC/worker.env"
  local restart="$CHANGED"

  # The unit comes from metadata (rendered with this script at synth time), else from the checkout.
  local unit
  unit="$(metadata actfleet-unit "")"
  [[ -n "$unit" ]] || unit="$(cat "$SRC/bootstrap/$UNIT_NAME")"
  tmp="$(staged "$UNIT_DIR/$UNIT_NAME")"
  printf '%s\n' "$unit" | sed -e "s|@ROOT@|$ROOT|g" >"$tmp"
  CHANGED=0
  put_file "$tmp" "$UNIT_DIR/$UNIT_NAME"
  if ((CHANGED)); then "$SYSTEMCTL" daemon-reload; restart=1; fi
  if ((restart)); then
    log "starting $UNIT_NAME as worker $WORKER at $COMMIT"
    "$SYSTEMCTL" enable "$UNIT_NAME"
    "$SYSTEMCTL" restart "$UNIT_NAME"
  elif ! "$SYSTEMCTL" is-active --quiet "$UNIT_NAME"; then
    log "$UNIT_NAME was not running: starting it"
    "$SYSTEMCTL" enable --now "$UNIT_NAME"
  else
    log "nothing to do: $UNIT_NAME is running worker $WORKER at $COMMIT"
  fi
}

# bootstrap: attempts until one succeeds. Each attempt is a fresh process so that `set -e` holds inside it.
bootstrap() {
  local attempts="${ACTFLEET_ATTEMPTS:-8}" delay="${ACTFLEET_RETRY_DELAY:-15}"
  local max_delay="${ACTFLEET_RETRY_MAX_DELAY:-600}" n=1 rc
  exec 9>"$OPT/startup.lock"
  flock 9  # one bootstrap at a time (a boot and a manual rerun)
  while :; do
    rc=0
    bash "${BASH_SOURCE[0]}" attempt || rc=$?
    if ((rc == 0)); then return 0; fi
    if ((rc == 2)); then die "attempt $n: bad input (exit 2): not retrying" 2; fi
    if ((attempts > 0 && n >= attempts)); then die "attempt $n failed (exit $rc): giving up; systemd restarts the unit"; fi
    log "attempt $n failed (exit $rc): retrying in ${delay}s"
    sleep "$delay"
    n=$((n + 1))
    delay=$((delay * 2 > max_delay ? max_delay : delay * 2))
  done
}

# boot_unit: the bootstrap unit. Ubuntu 22.04's systemd (249) has no RestartSteps, so the exponential backoff
# lives in `bootstrap` above; systemd restarts the whole unit if it still fails, forever, every RestartSec.
boot_unit() {
  cat <<UNIT
# actfleet bootstrap: packages, Python, pinned checkout, locked venv, then the worker unit. Written by the
# startup script (docs/infrastructure.md, "Bootstrap"); runs as root because it installs packages and users.
[Unit]
Description=actfleet bootstrap (retries until the worker is installed)
Wants=network-online.target
After=network-online.target
# Never stop retrying: a node that never starts work is replaced by reconcile after its boot timeout.
StartLimitIntervalSec=0

[Service]
Type=oneshot
# Services get no HOME; git, pip and uv look there for their configuration.
Environment=HOME=/root
ExecStart=$SELF_COPY bootstrap
Restart=on-failure
RestartSec=300
# Exit 2 is bad metadata (a moving ref, a malformed worker name): retrying cannot fix it.
RestartPreventExitStatus=2
TimeoutStartSec=infinity
StandardOutput=journal
StandardError=journal
SyslogIdentifier=actfleet-bootstrap
UNIT
}

# install: the guest agent's part. Quick, and leaves the slow, retried work to the bootstrap unit.
install() {
  read_metadata  # bad metadata fails here, before anything is written
  local tmp
  CHANGED=0
  tmp="$(staged "$SELF_COPY")"
  cat "${BASH_SOURCE[0]}" >"$tmp"
  put_file "$tmp" "$SELF_COPY" 0755
  tmp="$(staged "$UNIT_DIR/$BOOT_UNIT")"
  boot_unit >"$tmp"
  put_file "$tmp" "$UNIT_DIR/$BOOT_UNIT"
  if ((CHANGED)); then "$SYSTEMCTL" daemon-reload; fi
  # --no-block: the guest agent returns at once; the unit's progress is in `journalctl -u $BOOT_UNIT`.
  "$SYSTEMCTL" start --no-block "$BOOT_UNIT"
  log "started $BOOT_UNIT for worker $WORKER at $COMMIT"
}

case "${1:-install}" in
  install) install ;;
  bootstrap) mkdir -p "$OPT"; bootstrap ;;
  attempt) attempt ;;
  *) die "usage: startup.sh [install|bootstrap|attempt]" 2 ;;
esac

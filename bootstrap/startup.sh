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
#     1. the release of the pinned commit from the bucket (`actfleet release` published it under
#        gs://BUCKET/actfleet/releases/COMMIT/): its SHA256SUMS, then every file it lists, each checked;
#        read with the VM's service-account token from the metadata server over the storage JSON API. The VM
#        reaches only the metadata server and Google APIs: no repository, no package index, no external IP;
#     2. uv, from the release's uv wheel (the hash bootstrap/requirements-uv.txt pins), unpacked;
#     3. the CPython of the release's python-version, installed by uv from the release (uv checks its hash);
#     4. the venv from the release's wheelhouse and lock (`uv pip sync --no-index --require-hashes`), then
#        the project's wheel built from the pinned commit (also --no-index --require-hashes, no deps);
#     5. the `actfleet` system user, the fleet config, the worker's environment file and its systemd unit;
#     6. starts (or restarts, if anything changed) `actfleet work` under systemd as that user.
#
# Overrides, so tests can run it unprivileged in a temporary root (all optional, unset on a real VM):
#   ACTFLEET_ROOT          prefix for every path written (default: /)
#   ACTFLEET_METADATA_DIR  read metadata key K from the file $ACTFLEET_METADATA_DIR/K instead of the server (and
#                          the access token from $ACTFLEET_METADATA_DIR/service-accounts/default/token)
#   ACTFLEET_METADATA_URL  metadata attributes URL (default: the GCE metadata server)
#   ACTFLEET_STORAGE_URL   the storage JSON API's root; only a loopback http://127.0.0.1:PORT (a test's fake) is
#                          accepted, so no setting can send a VM's token to a foreign host
#   ACTFLEET_SYSTEMCTL, ACTFLEET_USERADD   stand-ins for those commands
#   ACTFLEET_ATTEMPTS      attempts per start of the bootstrap unit (default 8; 0 = no limit)
#   ACTFLEET_RETRY_DELAY   first backoff in seconds (default 15; doubles up to ACTFLEET_RETRY_MAX_DELAY, 600)
# Exit codes: 0 done, 1 a step failed (retried), 2 bad metadata (e.g. a moving ref: not retried).
set -euo pipefail
# Every step below is a plain command so that `set -e` stops at its first failure: bash ignores -e inside a
# function called as an `if`/`||` condition, so no step reports "changed" through its exit status.
shopt -s inherit_errexit
umask 022
export LC_ALL=C  # [[:graph:]] and sed mean ASCII, whatever the image's locale

ROOT="${ACTFLEET_ROOT:-}"
ROOT="${ROOT%/}"
OPT="$ROOT/opt/actfleet"
RELEASES="$OPT/releases"
VENV="$OPT/venv"
UV_DIR="$OPT/uv"
UV="$UV_DIR/bin/uv"
ETC="$ROOT/etc/actfleet"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT_NAME="actfleet-worker.service"
BOOT_UNIT="actfleet-bootstrap.service"
SELF_COPY="$OPT/bootstrap/startup.sh"
USER_NAME="actfleet"
SYSTEMCTL="${ACTFLEET_SYSTEMCTL:-systemctl}"
USERADD="${ACTFLEET_USERADD:-useradd}"
METADATA_DIR="${ACTFLEET_METADATA_DIR:-}"
METADATA_URL="${ACTFLEET_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"
TOKEN_URL="${METADATA_URL%/attributes}/service-accounts/default/token"
STORAGE_URL="${ACTFLEET_STORAGE_URL:-https://storage.googleapis.com}"
# uv keeps its interpreters and cache under /opt/actfleet (readable by the worker user, written only by root).
export UV_PYTHON_INSTALL_DIR="$OPT/python" UV_CACHE_DIR="$OPT/uv-cache" UV_NO_CONFIG=1

log() { echo "actfleet-startup: $*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

# The storage seam exists for tests only: anything but Google's API root or a loopback port is refused, so the
# VM's token can never be sent elsewhere.
[[ "$STORAGE_URL" == "https://storage.googleapis.com" || "$STORAGE_URL" =~ ^http://127\.0\.0\.1:[0-9]{1,5}$ ]] \
  || die "ACTFLEET_STORAGE_URL = '$STORAGE_URL': only a loopback http://127.0.0.1:PORT may replace the storage API" 2

# metadata KEY [DEFAULT]: one instance metadata attribute, a single line of printable characters (no value can
# add lines to the files it is written into); missing without a default is an error.
metadata() {
  local key="$1" value="" missing=0
  if [[ -n "$METADATA_DIR" ]]; then
    if [[ -f "$METADATA_DIR/$key" ]]; then value="$(cat "$METADATA_DIR/$key")"; else missing=1; fi
  elif ! value="$(curl -sf --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$METADATA_URL/$key")"; then
    missing=1
  fi
  if ((missing)); then
    [[ $# -ge 2 ]] || die "instance metadata '$key' is missing (the fleet stack sets it)" 2
    value="$2"
  fi
  [[ "$value" =~ ^[[:graph:]]*$ ]] \
    || die "instance metadata '$key' is not one line of printable characters (a newline or control character): refusing it" 2
  printf '%s' "$value"
}

read_metadata() {
  COMMIT="$(metadata actfleet-commit)"
  WORKER="$(metadata actfleet-worker)"
  RELEASE_URL="$(metadata actfleet-release)"
  CONFIG_URL="$(metadata actfleet-config)"
  JOB="$(metadata actfleet-job default)"
  [[ "$COMMIT" =~ ^[0-9a-f]{40}$ ]] \
    || die "actfleet-commit = '$COMMIT': not a pinned commit (a full 40-hex sha); refusing a moving ref" 2
  [[ "$WORKER" =~ ^[a-z][a-z0-9-]{0,62}$ ]] || die "actfleet-worker = '$WORKER': not a worker name" 2
  [[ "$JOB" =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]] || die "actfleet-job = '$JOB': not a job name (a-z, 0-9, ., _, -)" 2
  [[ "$RELEASE_URL" =~ ^gs://([a-z0-9][a-z0-9_.-]{1,61}[a-z0-9])/((([A-Za-z0-9._-]+/)*)releases/$COMMIT/)$ ]] \
    || die "actfleet-release = '$RELEASE_URL': not gs://BUCKET/.../releases/$COMMIT/ (the pinned commit's release)" 2
  RELEASE_BUCKET="${BASH_REMATCH[1]}"
  RELEASE_PREFIX="${BASH_REMATCH[2]}"
  RELEASE="$RELEASES/$COMMIT"
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

ensure_tools() {
  # No apt: a VM without an external IP has no route to the package mirrors. The TPU images ship all of these.
  local tool missing=()
  for tool in curl sha256sum tar python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  ((${#missing[@]} == 0)) || die "the image lacks ${missing[*]} (the TPU VM images ship them)"
}

# urlencode TEXT: an object name as one path segment of the JSON API (every byte but [A-Za-z0-9._~-] escaped).
urlencode() {
  local s="$1" out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    case "$c" in
      [A-Za-z0-9._~-]) out+="$c" ;;
      *) printf -v c '%%%02X' "'$c"; out+="$c" ;;
    esac
  done
  printf '%s' "$out"
}

# storage_token: the attached service account's access token (never logged, never in a command line).
storage_token() {
  local json
  if [[ -n "$METADATA_DIR" ]]; then
    json="$(cat "$METADATA_DIR/service-accounts/default/token")" || die "no access token in $METADATA_DIR"
  else
    json="$(curl -sf --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$TOKEN_URL")" \
      || die "the metadata server gave no access token (is a service account attached?)"
  fi
  TOKEN="$(sed -n 's/.*"access_token"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$json")"
  [[ -n "$TOKEN" ]] || die "the metadata server's token answer has no access_token"
}

# gcs_get BUCKET OBJECT DEST: one object to DEST through the storage JSON API. The header comes from a file
# descriptor so the token appears in no process's argument list.
gcs_get() {
  local url="$STORAGE_URL/storage/v1/b/$1/o/$(urlencode "$2")?alt=media"
  curl -sSf --retry 5 --retry-connrefused --retry-delay 2 -H @<(printf 'Authorization: Bearer %s\n' "$TOKEN") \
    -o "$3" "$url" || die "cannot read gs://$1/$2"
}

# fetch_release: $RELEASE holds the pinned commit's release, every file checked against its SHA256SUMS.
# The marker is written last: an interrupted fetch is redone from scratch on the next attempt.
fetch_release() {
  [[ -f "$RELEASE/.complete" ]] && return 0
  log "fetching the release of $COMMIT from $RELEASE_URL"
  local tmp="$RELEASE.partial" sum name
  rm -rf "$tmp"
  mkdir -p "$tmp"
  storage_token
  gcs_get "$RELEASE_BUCKET" "${RELEASE_PREFIX}SHA256SUMS" "$tmp/SHA256SUMS"
  # Each line: a sha256 and a relative name (no "..", no absolute path): nothing lands outside the release.
  while read -r sum name; do
    [[ "$sum" =~ ^[0-9a-f]{64}$ && "$name" =~ ^[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*$ \
       && "/$name/" != */../* ]] || die "$RELEASE_URL""SHA256SUMS has a malformed line: '$sum $name'" 2
    mkdir -p "$(dirname "$tmp/$name")"
    gcs_get "$RELEASE_BUCKET" "$RELEASE_PREFIX$name" "$tmp/$name"
  done <"$tmp/SHA256SUMS"
  (cd "$tmp" && sha256sum --check --strict --quiet SHA256SUMS) \
    || die "the release of $COMMIT does not match its SHA256SUMS (a file differs): refusing it"
  rm -rf "$RELEASE"
  mv "$tmp" "$RELEASE"
  touch "$RELEASE/.complete"
  CHANGED=1
}

# release_file GLOB: the one file of the release matching GLOB (relative), or an error naming what is missing.
release_file() {
  local found=()
  mapfile -t found < <(cd "$RELEASE" && compgen -G "$1" || true)
  ((${#found[@]} == 1)) || die "the release of $COMMIT has ${#found[@]} files matching $1 (expected one)" 2
  printf '%s' "$RELEASE/${found[0]}"
}

# ensure_uv: $UV from the release's uv wheel, whose hash the release checked against requirements-uv.txt.
ensure_uv() {
  local wheel want
  wheel="$(release_file 'uv/uv-*.whl')"
  want="$(basename "$wheel" | sed -n 's/^uv-\([0-9][0-9.]*\)-.*/\1/p')"
  [[ -n "$want" ]] || die "$wheel: not a uv wheel name" 2
  if [[ -x "$UV" ]] && [[ "$(uv_version)" == "$want" ]]; then return 0; fi
  log "installing uv $want"
  rm -rf "$UV_DIR.partial"
  mkdir -p "$UV_DIR.partial/bin"
  # A wheel is a zip; the image's python3 (3.10, stdlib only) unpacks the one binary it needs.
  python3 -c '
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".data/scripts/uv")]
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        dst.write(src.read())
' "$wheel" "$UV_DIR.partial/bin/uv"
  chmod 0755 "$UV_DIR.partial/bin/uv"
  rm -rf "$UV_DIR"
  mv "$UV_DIR.partial" "$UV_DIR"
  [[ "$(uv_version)" == "$want" ]] || die "$UV reports '$("$UV" --version 2>&1)', not uv $want"
}

uv_version() { "$UV" --version 2>/dev/null | awk '$1 == "uv" {print $2}'; }

# ensure_python: sets PY to the pinned uv-managed CPython, installed from the release's copy of the build uv
# would download (uv's file:// mirror; uv checks the archive against the hash it carries). Never the image's.
ensure_python() {
  local want
  want="$(tr -d '[:space:]' <"$RELEASE/python-version" 2>/dev/null)" || true
  [[ "$want" =~ ^3\.[0-9]+\.[0-9]+$ ]] || die "python-version = '$want': not an exact CPython version" 2
  if ! PY="$("$UV" python find --managed-python --no-python-downloads "$want" 2>/dev/null)"; then
    log "installing CPython $want (uv-managed, from the release)"
    UV_PYTHON_INSTALL_MIRROR="file://$RELEASE/python" "$UV" python install --no-bin "$want"
    PY="$("$UV" python find --managed-python --no-python-downloads "$want")"
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" -V 2>&1): actfleet needs Python >= 3.11"
}

# build_venv: $VENV from the release's wheelhouse, then actfleet's wheel, both with --no-index --require-hashes.
# The marker names the commit and interpreter it was built from and is written last, so an interrupted build is
# redone on the next attempt. Sets CHANGED=1 if it built.
build_venv() {
  local marker="$VENV/.actfleet-commit" want="$COMMIT $PY"
  if [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "$want" ]] && [[ -x "$VENV/bin/actfleet" ]]; then
    return 0
  fi
  log "building $VENV for $COMMIT with $PY"
  rm -rf "$VENV"
  "$UV" venv -q --python "$PY" "$VENV"
  # Exactly the locked packages, each checked against its hash: every worker runs the same bits.
  "$UV" pip sync -q --python "$VENV/bin/python" --no-index --find-links "$RELEASE/wheels" --require-hashes \
    "$RELEASE/requirements-tpu.txt"
  "$UV" pip install -q --python "$VENV/bin/python" --no-deps --no-index --find-links "$RELEASE/actfleet" \
    --require-hashes -r "$RELEASE/requirements-actfleet.txt"
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
  if [[ "$CONFIG_URL" =~ ^gs://([a-z0-9][a-z0-9_.-]{1,61}[a-z0-9])/(.+)$ ]]; then
    [[ -n "${TOKEN:-}" ]] || storage_token
    gcs_get "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; }
  else
    case "$CONFIG_URL" in
      file://*) cp "${CONFIG_URL#file://}" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; } ;;
      /*) cp "$CONFIG_URL" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; } ;;
      *) rm -f "$tmp"; die "actfleet-config = '$CONFIG_URL': must be gs://..., file://... or an absolute path" 2 ;;
    esac
  fi
  put_file "$tmp" "$ETC/fleet.toml"
}

attempt() {
  read_metadata
  mkdir -p "$ETC"
  ensure_tools
  CHANGED=0  # anything below that changes sets it: the worker is then restarted
  fetch_release
  ensure_uv
  ensure_python
  build_venv
  ensure_user
  fetch_config
  local tmp
  tmp="$(staged "$ETC/worker.env")"
  # Every value was checked above to be one line of a restricted alphabet: none can add a line.
  printf 'ACTFLEET_WORKER=%s\nACTFLEET_CONFIG=%s\nACTFLEET_JOB=%s\n' "$WORKER" "$ETC/fleet.toml" "$JOB" >"$tmp"
  put_file "$tmp" "$ETC/worker.env"
  local restart="$CHANGED"

  # The unit comes from metadata (rendered with this script at synth time), else from the release's package.
  local unit
  unit="$(metadata_unit)"
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

# metadata_unit: the worker unit (a multi-line attribute, so not through `metadata`), required.
metadata_unit() {
  if [[ -n "$METADATA_DIR" ]]; then
    [[ -f "$METADATA_DIR/actfleet-unit" ]] && { cat "$METADATA_DIR/actfleet-unit"; return 0; }
  elif curl -sf --retry 5 --retry-connrefused -H 'Metadata-Flavor: Google' "$METADATA_URL/actfleet-unit"; then
    return 0
  fi
  die "instance metadata 'actfleet-unit' is missing (the fleet stack sets it)" 2
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

#!/usr/bin/env bash
# actfleet startup script: the TPU VM's `startup-script` metadata, run as root by the guest agent on EVERY
# boot. It is idempotent: a boot that finds everything in place changes nothing and restarts nothing.
#
#   1. reads the instance metadata the fleet stack wrote (repo, pinned commit, worker id, config pointer);
#   2. checks out the repository at that exact commit (a branch, tag or short sha is refused);
#   3. builds a virtual environment with the TPU extras (`pip install '<checkout>[tpu]'`);
#   4. fetches the fleet config, writes the worker's environment file and the systemd unit;
#   5. starts `actfleet work` under systemd (restart on failure, logs to the journal).
#
# Overrides, so tests can run it unprivileged in a temporary root (all optional, unset on a real VM):
#   ACTFLEET_ROOT          prefix for every path written (default: /)
#   ACTFLEET_METADATA_DIR  read metadata key K from the file $ACTFLEET_METADATA_DIR/K instead of the server
#   ACTFLEET_METADATA_URL  metadata attributes URL (default: the GCE metadata server)
#   ACTFLEET_PYTHON        interpreter that creates the venv (default: python3)
#   ACTFLEET_VENV_ARGS     extra `python -m venv` arguments (e.g. --without-pip)
#   ACTFLEET_PIP           installer command, called as `$ACTFLEET_PIP install <spec>` (default: the venv's pip)
#   ACTFLEET_SYSTEMCTL     systemctl stand-in (default: systemctl)
# Exit codes: 0 done, 1 a step failed (the next boot retries), 2 bad metadata (e.g. a moving ref).
set -euo pipefail
umask 022

ROOT="${ACTFLEET_ROOT:-}"
ROOT="${ROOT%/}"
SRC="$ROOT/opt/actfleet/src"
VENV="$ROOT/opt/actfleet/venv"
ETC="$ROOT/etc/actfleet"
STATE="$ROOT/var/lib/actfleet"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT_NAME="actfleet-worker.service"
PYTHON="${ACTFLEET_PYTHON:-python3}"
SYSTEMCTL="${ACTFLEET_SYSTEMCTL:-systemctl}"
METADATA_DIR="${ACTFLEET_METADATA_DIR:-}"
METADATA_URL="${ACTFLEET_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}"

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

# write_if_changed PATH: stdin -> PATH atomically; returns 0 if PATH changed, 1 if it already had that content.
write_if_changed() {
  local path="$1" tmp
  mkdir -p "$(dirname "$path")"
  tmp="$(mktemp "$path.XXXXXX")"
  cat >"$tmp"
  if [[ -f "$path" ]] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 1; fi
  chmod 0644 "$tmp"
  mv -f "$tmp" "$path"
  return 0
}

ensure_packages() {
  local missing=()
  command -v git >/dev/null || missing+=(git)
  command -v curl >/dev/null || [[ -n "$METADATA_DIR" ]] || missing+=(curl)
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -yq "${missing[@]}"
  fi
}

# checkout: $SRC at exactly $COMMIT. Returns 0 if it changed, 1 if it was already there.
checkout() {
  if [[ -d "$SRC/.git" ]] && [[ "$(git -C "$SRC" rev-parse HEAD 2>/dev/null)" == "$COMMIT" ]] \
     && git -C "$SRC" diff --quiet HEAD 2>/dev/null; then
    return 1
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
  return 0
}

# venv: $VENV with actfleet[tpu] from the checkout. The marker names the commit it was built from and is
# written last, so an interrupted build is redone on the next boot.
build_venv() {
  local marker="$VENV/.actfleet-commit"
  if [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "$COMMIT" ]] && [[ -x "$VENV/bin/actfleet" ]]; then
    return 1
  fi
  log "building $VENV for $COMMIT"
  rm -rf "$VENV"
  # shellcheck disable=SC2086  # ACTFLEET_VENV_ARGS is a list of flags
  "$PYTHON" -m venv ${ACTFLEET_VENV_ARGS:-} "$VENV"
  local pip="${ACTFLEET_PIP:-$VENV/bin/python -m pip}"
  if [[ -z "${ACTFLEET_PIP:-}" ]]; then $pip install -q --upgrade pip; fi
  VIRTUAL_ENV="$VENV" $pip install -q "$SRC[tpu]"
  [[ -x "$VENV/bin/actfleet" ]] || die "the install did not provide $VENV/bin/actfleet"
  printf '%s\n' "$COMMIT" >"$marker"
  return 0
}

# fetch_config: the fleet config from the bucket (or a path) to $ETC/fleet.toml; 0 if it changed.
fetch_config() {
  local tmp
  tmp="$(mktemp)"
  case "$CONFIG_URL" in
    gs://*)
      "$VENV/bin/python" - "$CONFIG_URL" "$tmp" <<'EOF' || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; }
import sys
from google.cloud import storage  # the worker's attached service account (no keys)
bucket, _, name = sys.argv[1][len("gs://"):].partition("/")
storage.Client().bucket(bucket).blob(name).download_to_filename(sys.argv[2])
EOF
      ;;
    file://*) cp "${CONFIG_URL#file://}" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; } ;;
    /*) cp "$CONFIG_URL" "$tmp" || { rm -f "$tmp"; die "cannot read $CONFIG_URL"; } ;;
    *) rm -f "$tmp"; die "actfleet-config = '$CONFIG_URL': must be gs://..., file://... or an absolute path" 2 ;;
  esac
  local rc=0
  write_if_changed "$ETC/fleet.toml" <"$tmp" || rc=$?
  rm -f "$tmp"
  return $rc
}

main() {
  REPO_URL="$(metadata actfleet-repo-url)"
  COMMIT="$(metadata actfleet-commit)"
  WORKER="$(metadata actfleet-worker)"
  CONFIG_URL="$(metadata actfleet-config)"
  JOB="$(metadata actfleet-job default)"
  [[ "$COMMIT" =~ ^[0-9a-f]{40}$ ]] \
    || die "actfleet-commit = '$COMMIT': not a pinned commit (a full 40-hex sha); refusing a moving ref" 2
  [[ "$WORKER" =~ ^[a-z][a-z0-9-]{0,62}$ ]] || die "actfleet-worker = '$WORKER': not a worker name" 2

  mkdir -p "$STATE" "$ETC"
  exec 9>"$STATE/startup.lock"
  flock 9 2>/dev/null || true  # one run at a time (a boot and a manual rerun)

  ensure_packages
  local restart=0
  if checkout; then restart=1; fi
  if build_venv; then restart=1; fi
  if fetch_config; then restart=1; fi
  if printf 'ACTFLEET_WORKER=%s\nACTFLEET_CONFIG=%s\nACTFLEET_JOB=%s\n' "$WORKER" "$ETC/fleet.toml" "$JOB" \
       | write_if_changed "$ETC/worker.env"; then restart=1; fi

  local unit_changed=0
  # The unit comes from metadata (rendered with this script at synth time), else from the checkout.
  local unit
  unit="$(metadata actfleet-unit "")"
  [[ -n "$unit" ]] || unit="$(cat "$SRC/bootstrap/$UNIT_NAME")"
  if printf '%s\n' "$unit" | sed -e "s|@ROOT@|$ROOT|g" | write_if_changed "$UNIT_DIR/$UNIT_NAME"; then
    unit_changed=1; restart=1
  fi

  if ((unit_changed)); then "$SYSTEMCTL" daemon-reload; fi
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

main "$@"

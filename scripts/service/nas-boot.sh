#!/bin/sh
# Boot-time start for NAS systems without systemd units of your own:
#   - Synology DSM: Control Panel > Task Scheduler > Create > Triggered Task >
#     User-defined script, user root, event Boot-up; script: sh /volume1/ts-supervisor/scripts/service/nas-boot.sh
#   - Unraid: the User Scripts plugin, schedule "At Startup of Array";
#     script: TS_SUPERVISOR_USER=nobody sh /mnt/user/appdata/ts-supervisor/scripts/service/nas-boot.sh
# Started as root, it makes the data dir for the service user (0700), then
# drops to that user: tailscaled in userspace-networking mode needs no root.
# It uses setpriv (util-linux) where present and su otherwise (DSM's userland
# may lack util-linux). It never runs ts-supervisor as root.
#   TS_SUPERVISOR_USER  the service user (default ts-supervisor). Make it first
#                       (DSM: Control Panel > User; Unraid: use nobody). It must
#                       be able to read this directory, conf.d and the auth key
#                       files (chgrp its group KEYFILE; chmod 0640 KEYFILE).
#   TS_SUPERVISOR_DATA_DIR, TS_SUPERVISOR_CONF_DIR   default: data/, conf.d/ here
#   TS_SUPERVISOR_SETTINGS   passed as --settings; default: /etc/ts-supervisor/ts-supervisor.toml
#                       if present (else the supervisor's defaults). Keep it there, root's
#                       (root:root 0644; root:GROUP 0640 if it holds webhook URLs): the
#                       supervisor trusts a settings file only if no one else can write
#                       it, and a share such as /volume1 shows 0777 everywhere (its ACLs
#                       decide), so a settings file there is refused. In it, vouch for
#                       the share (conf.d, key files, binaries; one warning line each):
#                         trust_acl_paths = ["/volume1/ts-supervisor"]
#                       Unraid rebuilds /etc at every boot: have the user script copy
#                       the file there first, from a copy only root can write.
#                       A ts-supervisor.toml here is not read: the script stops, saying so.
# Root runs this script from the install dir: let only administrators write it.
# It uses the NAS's own tailscale package if present (set the paths below),
# and logs one line per event to $DATA/supervisor.log (0600).
set -eu
umask 077
HERE=$(cd "$(dirname "$0")/../.." && pwd)
TS_SUPERVISOR_BOOT_SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
DATA=${TS_SUPERVISOR_DATA_DIR:-$HERE/data}
CONF=${TS_SUPERVISOR_CONF_DIR:-$HERE/conf.d}
SYSTEM_SETTINGS=/etc/ts-supervisor/ts-supervisor.toml
SETTINGS=${TS_SUPERVISOR_SETTINGS:-}  # named: always passed (a missing file is the supervisor's one-line error)
if [ -z "$SETTINGS" ] && [ -e "$SYSTEM_SETTINGS" ]; then
  SETTINGS=$SYSTEM_SETTINGS
elif [ -z "$SETTINGS" ] && [ -e "$HERE/ts-supervisor.toml" ]; then
  # Older installs kept it here; running on without it would drop its settings silently.
  echo "nas-boot: error: $HERE/ts-supervisor.toml is not read (on a share others may write it): move it to $SYSTEM_SETTINGS (root's, 0644) with trust_acl_paths = [\"$HERE\"], or name it in TS_SUPERVISOR_SETTINGS" >&2
  exit 1
fi
RUN_AS=${TS_SUPERVISOR_USER:-ts-supervisor}
# The unprivileged half below (run by setpriv or su) reads these back.
export TS_SUPERVISOR_BOOT_SCRIPT TS_SUPERVISOR_DATA_DIR="$DATA" TS_SUPERVISOR_CONF_DIR="$CONF" \
  TS_SUPERVISOR_SETTINGS="$SETTINGS" TS_SUPERVISOR_USER="$RUN_AS"
# Uncomment to use the NAS package's binaries instead of the pinned copy:
# export TS_SUPERVISOR_TAILSCALE=/var/packages/Tailscale/target/bin/tailscale
# export TS_SUPERVISOR_TAILSCALED=/var/packages/Tailscale/target/bin/tailscaled

if [ "$(id -u)" = 0 ]; then
  if ! uid=$(id -u "$RUN_AS" 2>/dev/null); then
    echo "nas-boot: error: no user $RUN_AS: create it, or set TS_SUPERVISOR_USER to an unprivileged user" >&2
    exit 1
  fi
  if [ "$uid" = 0 ]; then
    echo "nas-boot: error: TS_SUPERVISOR_USER=$RUN_AS is root; ts-supervisor needs no root: name an unprivileged user" >&2
    exit 1
  fi
  gid=$(id -g "$RUN_AS")
  mkdir -p "$DATA"
  # A data dir from the days this script ran ts-supervisor as root: hand it over
  # once (-h: a symlink inside is changed itself, never what it points at).
  [ "$(stat -c %u "$DATA")" = "$uid" ] || chown -hR "$uid:$gid" "$DATA"
  chmod 0700 "$DATA"
  if command -v setpriv >/dev/null 2>&1; then
    exec setpriv --reuid="$uid" --regid="$gid" --init-groups --no-new-privs -- \
      /bin/sh "$TS_SUPERVISOR_BOOT_SCRIPT"
  fi
  # su keeps the environment without -l; the command string expands it as $RUN_AS.
  exec su -s /bin/sh -c 'exec /bin/sh "$TS_SUPERVISOR_BOOT_SCRIPT"' "$RUN_AS"
fi

# From here on: the service user (or whoever started this script without root).
mkdir -p "$DATA"
chmod 0700 "$DATA"
BIN=$HERE/.venv/bin/ts-supervisor
if "$BIN" status --data-dir "$DATA" >/dev/null 2>&1; then
  echo "ts-supervisor already running with $DATA"; exit 0
fi
set -- run --no-console --config-dir "$CONF" --data-dir "$DATA"
if [ -n "$SETTINGS" ]; then set -- "$@" --settings "$SETTINGS"; fi
nohup "$BIN" "$@" >>"$DATA/supervisor.log" 2>&1 </dev/null &
echo "ts-supervisor started as $(id -un) (pid $!), logging to $DATA/supervisor.log"

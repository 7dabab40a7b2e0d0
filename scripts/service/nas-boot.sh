#!/bin/sh
# Boot-time start for NAS systems without systemd units of your own:
#   - Synology DSM: Control Panel > Task Scheduler > Create > Triggered Task >
#     User-defined script, user root, event Boot-up; script: sh /volume1/ts-supervisor/scripts/service/nas-boot.sh
#   - Unraid: the User Scripts plugin, schedule "At Startup of Array";
#     script: sh /mnt/user/appdata/ts-supervisor/scripts/service/nas-boot.sh
# It uses the NAS's own tailscale package if present (set the paths below),
# and logs one line per event to $DATA/supervisor.log.
set -eu
HERE=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${TS_SUPERVISOR_DATA_DIR:-$HERE/data}
CONF=${TS_SUPERVISOR_CONF_DIR:-$HERE/conf.d}
# Uncomment to use the NAS package's binaries instead of the pinned copy:
# export TS_SUPERVISOR_TAILSCALE=/var/packages/Tailscale/target/bin/tailscale
# export TS_SUPERVISOR_TAILSCALED=/var/packages/Tailscale/target/bin/tailscaled
mkdir -p "$DATA"
if "$HERE/.venv/bin/ts-supervisor" status --data-dir "$DATA" >/dev/null 2>&1; then
  echo "ts-supervisor already running with $DATA"; exit 0
fi
nohup "$HERE/.venv/bin/ts-supervisor" run --no-console --config-dir "$CONF" --data-dir "$DATA" \
  >>"$DATA/supervisor.log" 2>&1 </dev/null &
echo "ts-supervisor started (pid $!), logging to $DATA/supervisor.log"

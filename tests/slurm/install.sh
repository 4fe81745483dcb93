#!/usr/bin/env bash
# Installs the Debian packages that tests/slurm/cluster.sh needs, when any is missing. Needs root.
# Starts no service: cluster.sh starts its own daemons, each with its state in a folder of its own.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} == 0 )); then
    echo "slurm test cluster: packages present"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "install.sh: root needed to install ${missing[*]}" >&2; exit 1; }

# Without an init system the packages' scripts may still try to start munge and MariaDB with the system's
# config: a policy-rc.d that denies every start (kept if one is there already) stops that.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "slurm test cluster: installed ${missing[*]}"

#!/usr/bin/env bash
# make lab: bring up the default lab (3 nodes x 2 pods), check it, and print a
# short tour from real output. Extra arguments go to `lab up` (e.g. --backend
# direct --store etcd). Re-running replaces an existing default lab.
set -euo pipefail
cd "$(dirname "$0")/.."
OC=.venv/bin/overlaycni
if [ "$(id -u)" != 0 ]; then
  echo "make lab: the lab creates network namespaces; run it as root (sudo make lab)" >&2
  exit 1
fi
name=demo
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--name" ] && name="${args[$((i + 1))]}"
done
$OC lab down --name "$name" >/dev/null
$OC lab up "$@"
$OC lab check --name "$name"
$OC lab tour --name "$name"
echo
echo "The lab stays up; poke at it (overlaycni lab --help), and remove it with: make lab-down"

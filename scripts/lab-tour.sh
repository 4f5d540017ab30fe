#!/usr/bin/env bash
# make lab: bring up the default lab, check it, and print a short tour.
set -euo pipefail
cd "$(dirname "$0")/.."
OC=.venv/bin/overlaycni
if ! $OC lab --help >/dev/null 2>&1; then
  echo "overlaycni is installed; the lab is not built yet (see the issues)." >&2
  exit 1
fi
$OC lab up "$@"
$OC lab check
$OC lab tour

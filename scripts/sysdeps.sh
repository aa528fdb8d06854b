#!/usr/bin/env bash
# System packages the tests and the demo need. Installs what is missing with apt-get when run as
# root; otherwise prints the command to run. Extra packages can be named on the command line
# (make bench adds slurm-wlm).
set -u
pkgs=(openmpi-bin libopenmpi-dev fuse3 libfuse3-dev pkg-config postgresql gcc python3-dev iproute2 chromium chromium-driver "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "sysdeps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "sysdeps: apt-get install ${missing[*]} failed" >&2; exit 1; }
else
  echo "sysdeps: missing system packages: ${missing[*]}" >&2
  echo "sysdeps: install them with: sudo apt-get install ${missing[*]}" >&2
  echo "sysdeps: (tests that need them are skipped with the reason)" >&2
fi
exit 0

#!/usr/bin/env bash
# Install what the tests need, then run them: ./test.sh [pytest args...]
#
# - the real peers of the end-to-end tests (Postfix, swaks, Prometheus, HAProxy; podman, runc
#   and debootstrap to build and run the container image) from apt, only when one is missing;
# - this package with its test extras (pip, editable).
# The exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(postfix swaks prometheus haproxy netcat-openbsd sasl2-bin libsasl2-modules
    libsasl2-modules-db libnet-ssleay-perl systemd podman runc debootstrap)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if ((${#missing[@]})); then
    echo "test.sh: installing ${APT_PACKAGES[*]} (missing: ${missing[*]})" >&2
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        sudo=(sudo)
    fi
    # No debconf dialog, and no system mail service: the tests start private instances.
    echo "postfix postfix/main_mailer_type select No configuration" |
        "${sudo[@]}" debconf-set-selections
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT_PACKAGES[@]}"
fi

PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -e '.[test]'

exec python3 -m pytest -q "$@"

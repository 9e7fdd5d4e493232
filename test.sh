#!/usr/bin/env bash
# Run the whole smtpguard test suite: unit, trio-level and end-to-end tests
# against real Postfix, swaks and Prometheus on loopback.
#
# Installs what is missing: Debian's postfix, swaks, prometheus and haproxy
# (needs root and apt), and the Python package with its test dependencies.
# Extra arguments go to pytest, e.g. ./test.sh -k smuggling
set -euo pipefail
cd "$(dirname "$0")"

need=()
for prog in /usr/sbin/postfix /usr/bin/swaks /usr/bin/prometheus /usr/bin/promtool /usr/sbin/haproxy /usr/sbin/smtp-sink /usr/bin/nc; do
  [ -x "$prog" ] || need+=("$prog")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing Debian packages (missing: ${need[*]})"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postfix swaks prometheus haproxy netcat-openbsd >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
exec python3 -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Install what the tests need, then run them: ./test.sh [pytest args...]
#
# - the real peers of the end-to-end tests (Postfix, swaks, Prometheus, HAProxy, redis-server; podman, runc
#   and debootstrap to build and run the container image) from apt, only when one is missing;
# - Exim 4 and OpenSMTPD beside Postfix, unpacked into /opt/smtpguard-peers (see below), only
#   when something of theirs is missing;
# - this package with its test extras (pip, editable).
# The exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(postfix swaks prometheus haproxy netcat-openbsd sasl2-bin libsasl2-modules
    libsasl2-modules-db libnet-ssleay-perl systemd podman runc debootstrap openssl redis-server)
missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
sudo=()
if [ "$(id -u)" != 0 ]; then
    sudo=(sudo)
fi
if ((${#missing[@]})); then
    echo "test.sh: installing ${APT_PACKAGES[*]} (missing: ${missing[*]})" >&2
    # No debconf dialog, and no system mail service: the tests start private instances.
    echo "postfix postfix/main_mailer_type select No configuration" |
        "${sudo[@]}" debconf-set-selections
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT_PACKAGES[@]}"
fi

# Exim 4 and OpenSMTPD for tests/e2e/mtas.py.  Debian's exim4-daemon-light and opensmtpd conflict
# with postfix (all three provide mail-transport-agent: installing one removes Postfix), so they
# are fetched with `apt-get download`, unpacked with `dpkg-deb -x` into $MTA_PREFIX, and only what
# they lack is added: the shared libraries ldd misses, their users, and the paths compiled into
# the binaries.
# - Exim keeps root for a `-C` config only if /etc/exim4/trusted_configs lists it.  The list holds
#   one fixed file, $MTA_PREFIX/exim4/instance.conf, that only includes OUTGOING/exim4.conf; each
#   private instance runs `exim -C instance.conf -DOUTGOING=<its temp folder>` (OUTGOING is the
#   one macro Debian's build lets -D set when Exim re-executes itself: WHITELIST_D_MACROS).
# - OpenSMTPD needs /usr/libexec/opensmtpd (here a symlink into the prefix), its chroot
#   /var/lib/opensmtpd/empty, and /var/spool/smtpd as a mount point: each instance runs in a
#   private mount namespace with its own spool and /run (control socket) bind-mounted there.
# A stamp file and a few checks make this step a no-op once everything is in place.
MTA_PREFIX=/opt/smtpguard-peers
MTA_DEBS=(exim4-daemon-light opensmtpd)
MTA_LIBS=(libidn12 libgnutls-dane0 libevent-2.1-7)
MTA_EXIM_CONF=$MTA_PREFIX/exim4/instance.conf
mta_ready() {
    local binary
    [ -e "$MTA_PREFIX/.installed" ] || return 1
    for binary in "$MTA_PREFIX/exim4/usr/sbin/exim4" "$MTA_PREFIX/opensmtpd/usr/sbin/smtpd"; do
        [ -x "$binary" ] || return 1
        if ldd "$binary" | grep -q 'not found'; then return 1; fi
    done
    getent passwd Debian-exim opensmtpd opensmtpq >/dev/null || return 1
    [ -f "$MTA_EXIM_CONF" ] || return 1
    grep -qxF "$MTA_EXIM_CONF" /etc/exim4/trusted_configs 2>/dev/null || return 1
    [ -d /var/spool/smtpd ] && [ -d /var/lib/opensmtpd/empty ] &&
        [ -x /usr/libexec/opensmtpd/mail.mda ]
}
mta_user() { # NAME HOME: a system user and group, as the Debian packages' postinst makes them
    local group=(--user-group)
    getent passwd "$1" >/dev/null && return 0
    getent group "$1" >/dev/null && group=(-g "$1")
    "${sudo[@]}" useradd --system "${group[@]}" --no-create-home --home-dir "$2" \
        --shell /usr/sbin/nologin "$1"
}
if ! mta_ready; then
    echo "test.sh: installing Exim 4 and OpenSMTPD into $MTA_PREFIX (beside Postfix)" >&2
    apt_lock=(-o DPkg::Lock::Timeout=600)
    cache=$MTA_PREFIX/debs
    "${sudo[@]}" mkdir -p "$cache"
    "${sudo[@]}" rm -f "$cache"/*.deb
    "${sudo[@]}" chown _apt "$cache" 2>/dev/null || true # else apt warns it downloads as root
    if ! (cd "$cache" && "${sudo[@]}" apt-get download -q "${MTA_DEBS[@]}"); then
        "${sudo[@]}" apt-get update -q
        (cd "$cache" && "${sudo[@]}" apt-get download -q "${MTA_DEBS[@]}")
    fi
    for deb in "${MTA_DEBS[@]}"; do
        dir=$MTA_PREFIX/${deb%%-*} # exim4-daemon-light -> exim4
        "${sudo[@]}" rm -rf "$dir.new"
        "${sudo[@]}" dpkg-deb -x "$(ls "$cache/${deb}"_*.deb | sort -V | tail -n 1)" "$dir.new"
        "${sudo[@]}" rm -rf "$dir"
        "${sudo[@]}" mv "$dir.new" "$dir"
    done
    missing=()
    for package in "${MTA_LIBS[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"
        then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]})); then
        # --no-remove: abort rather than remove anything (Postfix above all).
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-remove \
            --no-upgrade "${apt_lock[@]}" "${missing[@]}"
    fi
    mta_user Debian-exim /var/spool/exim4
    mta_user opensmtpd /var/lib/opensmtpd/empty
    mta_user opensmtpq /var/lib/opensmtpd/empty
    printf '%s\n' "# tests/e2e/mtas.py runs each private Exim as" \
        "#   exim -C $MTA_EXIM_CONF -DOUTGOING=<its folder>" \
        ".include OUTGOING/exim4.conf" | "${sudo[@]}" tee "$MTA_EXIM_CONF" >/dev/null
    "${sudo[@]}" chmod 644 "$MTA_EXIM_CONF"
    "${sudo[@]}" mkdir -p /etc/exim4
    if ! grep -qxF "$MTA_EXIM_CONF" /etc/exim4/trusted_configs 2>/dev/null; then
        echo "$MTA_EXIM_CONF" | "${sudo[@]}" tee -a /etc/exim4/trusted_configs >/dev/null
    fi
    "${sudo[@]}" chmod 644 /etc/exim4/trusted_configs
    "${sudo[@]}" mkdir -p /var/spool/smtpd /var/lib/opensmtpd/empty
    "${sudo[@]}" chmod 711 /var/spool/smtpd
    if [ -L /usr/libexec/opensmtpd ] || [ ! -e /usr/libexec/opensmtpd ]; then
        "${sudo[@]}" ln -sfn "$MTA_PREFIX/opensmtpd/usr/libexec/opensmtpd" /usr/libexec/opensmtpd
    fi
    "${sudo[@]}" touch "$MTA_PREFIX/.installed"
    if ! mta_ready; then
        echo "test.sh: Exim/OpenSMTPD are still incomplete in $MTA_PREFIX:" >&2
        ldd "$MTA_PREFIX/exim4/usr/sbin/exim4" "$MTA_PREFIX/opensmtpd/usr/sbin/smtpd" |
            grep 'not found' >&2 || true
        exit 1
    fi
fi

PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -e '.[test]'

exec python3 -m pytest -q "$@"

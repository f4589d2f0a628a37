#!/usr/bin/env bash
# gatehouse/identity-test: a directory (OpenLDAP) or a RADIUS server (FreeRADIUS 3) for the
# integration tests, chosen by the command:
#
#   slapd    dc=corp,dc=example on ldap:// 389 (StartTLS) and ldaps:// 636. TLS from
#            /certs/{cert,key,ca}.pem. Passwords of the seeded accounts (gatehouse-svc, alice,
#            bob, carol, dave) from $PASSWORD_<NAME> (e.g. PASSWORD_GATEHOUSE_SVC) or the first
#            line of $SECRETS_DIR/<name>.password (SECRETS_DIR defaults to /secrets).
#   radius   UDP 1812. Shared secret from $RADIUS_SECRET or $SECRETS_DIR/radius.secret; clients
#            are the address ranges in $RADIUS_CLIENTS (comma or space separated CIDRs; default
#            127.0.0.1/32), always plus 127.0.0.1 for the health check.
#   health   exits 0 when the server of this container answers (docker exec ... health).
#
# Both configurations are written from scratch at every start (no state survives a restart
# except what the image holds), so a start takes about a second. The server runs in the
# foreground and logs to stdout/stderr; the entrypoint prints "gatehouse-identity: <mode> ready"
# right before it becomes that server.
set -euo pipefail

share=/usr/local/share/gatehouse-identity
run=/run/gatehouse-identity
secrets_dir=${SECRETS_DIR:-/secrets}
mode_file=$run/mode

die() { printf 'gatehouse-identity: %s\n' "$*" >&2; exit 1; }
say() { printf 'gatehouse-identity: %s\n' "$*"; }

# The secret of $1 (e.g. alice): $PASSWORD_ALICE, else the first line of $secrets_dir/alice.password.
account_password() {
    local var=PASSWORD_${1^^}
    var=${var//-/_}
    if [[ -n ${!var:-} ]]; then
        printf '%s' "${!var}"
    elif [[ -r $secrets_dir/$1.password ]]; then
        head -n1 "$secrets_dir/$1.password" | tr -d '\r\n'
    else
        die "no password for $1: set $var or mount $secrets_dir/$1.password"
    fi
}

run_slapd() {
    local f name value hash seed
    for f in cert.pem key.pem ca.pem; do
        [[ -r /certs/$f ]] || die "slapd needs /certs/$f (server certificate, key and CA)"
    done
    rm -rf /etc/ldap/slapd.d /var/lib/ldap
    mkdir -p /etc/ldap/slapd.d /var/lib/ldap /run/slapd "$run"
    slapadd -q -n0 -F /etc/ldap/slapd.d -l "$share/slapd-config.ldif"

    # Hash every password into the seed (slappasswd reads it from a file, not the command line).
    seed=$(<"$share/directory.ldif")
    umask 077
    for name in gatehouse-svc alice bob carol dave; do
        value=$(account_password "$name")
        [[ -n $value ]] || die "the password of $name is empty"
        printf '%s' "$value" >"$run/pw"
        hash=$(slappasswd -h '{SSHA}' -T "$run/pw")
        name=${name^^}
        seed=${seed//@PASSWORD_${name//-/_}@/$hash}
    done
    rm -f "$run/pw"
    printf '%s\n' "$seed" >"$run/directory.ldif"

    # The data goes in through a running slapd (ldapi:// only), so the memberof overlay writes
    # memberOf as it would for any client; then slapd starts again with the network listeners.
    slapd -F /etc/ldap/slapd.d -h ldapi:/// -d 0 &
    local pid=$! tries=0
    until ldapwhoami -Q -Y EXTERNAL -H ldapi:/// >/dev/null 2>&1; do
        ((++tries < 100)) || die "slapd did not start"
        kill -0 "$pid" 2>/dev/null || die "slapd exited while seeding"
        sleep 0.05
    done
    ldapadd -Q -Y EXTERNAL -H ldapi:/// -f "$run/directory.ldif" >/dev/null
    rm -f "$run/directory.ldif"
    kill "$pid"
    wait "$pid" || true

    echo slapd >"$mode_file"
    say "slapd ready (dc=corp,dc=example on ldap:// 389 with StartTLS, ldaps:// 636)"
    exec slapd -F /etc/ldap/slapd.d -h "ldap:/// ldaps:/// ldapi:///" -d "${SLAPD_LOG_LEVEL:-stats}"
}

run_radius() {
    local secret cidr n=0
    mkdir -p "$run"
    if [[ -n ${RADIUS_SECRET:-} ]]; then
        secret=$RADIUS_SECRET
    elif [[ -r $secrets_dir/radius.secret ]]; then
        secret=$(head -n1 "$secrets_dir/radius.secret" | tr -d '\r\n')
    else
        die "no shared secret: set RADIUS_SECRET or mount $secrets_dir/radius.secret"
    fi
    [[ -n $secret ]] || die "the shared secret is empty"
    [[ $secret != *[\"\\]* ]] || die "the shared secret must not contain \" or \\"
    umask 077
    printf '%s' "$secret" >"$run/radius.secret"
    {
        for cidr in 127.0.0.1/32 ${RADIUS_CLIENTS//,/ }; do
            n=$((n + 1))
            cat <<EOF
client client$n {
	ipaddr = $cidr
	secret = "$secret"
	require_message_authenticator = yes
	nas_type = other
}
EOF
        done
    } >"$run/clients.conf"
    # Checks the configuration first: a mistake shows as one clear message, not a half start.
    freeradius -C -l stdout -d /etc/gatehouse-identity/radius || die "the FreeRADIUS configuration is invalid"
    echo radius >"$mode_file"
    say "radius ready (UDP 1812; clients ${RADIUS_CLIENTS:-127.0.0.1/32})"
    exec freeradius -f -l stdout -d /etc/gatehouse-identity/radius
}

health() {
    case $(cat "$mode_file" 2>/dev/null) in
    slapd) ldapwhoami -x -H ldap://127.0.0.1:389 >/dev/null 2>&1 ;;
    radius)
        echo 'Message-Authenticator = 0x00' |
            radclient -q -r 1 -t 1 -S "$run/radius.secret" 127.0.0.1:1812 status >/dev/null 2>&1
        ;;
    *) exit 1 ;;
    esac
}

case ${1:-} in
slapd) run_slapd ;;
radius) run_radius ;;
health) health ;;
*) die "usage: ${0##*/} slapd|radius|health" ;;
esac

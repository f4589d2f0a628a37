#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: broker
short_description: Deploy, configure and remove a Gatehouse connection broker
version_added: 0.1.0
description:
  - Writes the data directory O(data_dir) (C(docker-compose.yaml), C(data/broker.properties), C(data/broker.env),
    C(certs/)) and converges the container C(<prefix>-broker).
  - The broker keeps users, desktops, pools and entitlements in the SQLite database C(data/broker.db). It is kept
    across upgrades and by O(state=absent) unless O(purge=true).
  - With O(database_url) it keeps them in PostgreSQL instead, on a database that several brokers can share
    (C(docs/broker-ha.md) in the collection). The password (O(database_password)) is written to
    C(secrets/database.password) with mode V(0600) and mounted read-only at C(/secrets); the URL never holds it.
    Without O(database_url) the files are exactly those of the SQLite broker.
  - The admin bearer token is an option (never logged) written to C(data/broker.env) with mode V(0600); the object
    modules (M(gatehouse.access.broker_user) and friends) need the same admin token, so keep it in a vault.
  - Connection managers and agents authenticate with certificates from the deployment CA (O(client_ca_cert)); the
    broker answers the broker protocol only to role C(cm) and takes load reports only from role C(agent) for the
    addresses the certificate names. There is no agent token.
  - Every option is validated before anything is changed. Files are written atomically. The container is recreated
    only when its spec, its image or a file it reads changed; the same options twice report no change.
  - Enterprise identity - O(directories) lets the users of a domain log in with their LDAP or Active Directory
    account, O(second_factor) asks for a TOTP code or a RADIUS passcode as well. Their secrets (bind passwords, the
    RADIUS shared secret, the TOTP key) are written to C(secrets/) with mode V(0600), owned by the broker's user
    (uid 10001), and mounted read-only at C(/secrets); C(broker.properties) names only their paths.
  - Before a container whose configuration has O(directories) or RADIUS is created or replaced, the module runs
    the new image once with C(--check-identity) on the new files (staged in a temporary directory of O(data_dir))
    - it binds to every directory with the service account and sends a RADIUS Status-Server to every RADIUS
    server. If that check fails the task fails with its findings and the running broker and its files are left
    as they were. The check is skipped in check mode.
  - The guide is C(docs/identity.md) in the collection.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.deploy
  - gatehouse.access.deploy.container_limits
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff shows the configuration files before and after; the token is masked and private keys are shown
        as a hash only. Secret files (bind passwords, RADIUS shared secret, TOTP key, database password) show
        neither their value nor a hash of it, only whether they change.
  platform:
    platforms: posix
requirements:
  - docker (Python SDK) >= 5.0 on the target
  - cryptography >= 42.0 on the target
  - Docker engine >= 20.10
options:
  admin_token:
    description:
      - Bearer token of the admin API (at least 16 characters of C([A-Za-z0-9._~+/=-])). Required with
        O(state=present). Generate it once, for example with
        C(lookup('ansible.builtin.password', '/dev/null', length=40, chars=['ascii_letters', 'digits'])), and keep
        it in a vault.
    type: str
  client_ca_cert:
    description:
      - CA bundle on the target that issued the connection managers' and agents' certificates (the deployment CA),
        copied to C(certs/client-ca.pem) (C(ClientCaCert)). Required with O(client_tls_verify=true).
    type: path
  client_tls_verify:
    description:
      - Require and verify client certificates (C(ClientTlsVerify)) - role C(cm) for the broker protocol, role
        C(agent) for load reports. V(false) makes the module return a warning (test setups only).
    type: bool
    default: true
  domains:
    description: Domains offered to clients; the first one is the default.
    type: list
    elements: str
    default: [CORP]
  data_dir:
    description: The data directory.
    type: path
    default: /opt/gatehouse/broker
  https_port:
    description: Host port published for the broker's 8443 with O(network_mode=bridge).
    type: int
    default: 443
  admin_address:
    description:
      - Address of the broker's management listener (C(AdminAddress); C(/health) and C(/metrics) on port 9181, plain
        HTTP). When not set the broker keeps its default, V(127.0.0.1), reachable only from its own network
        namespace. V(0.0.0.0) lets a Prometheus on another host scrape it with O(network_mode=host) or
        V(container:<name>) (the role P(gatehouse.access.firewall#role) opens 9181 to the monitoring hosts only);
        with O(network_mode=bridge) see O(admin_host_port).
    type: str
  admin_host_port:
    description:
      - With O(network_mode=bridge), publish the management listener (C(/health), C(/metrics)) on the host's
        V(127.0.0.1) at this port, for a Prometheus on the same host; the listener then takes every address of
        the container's network (unless O(admin_address) says otherwise). V(0) publishes nothing.
      - Only with O(network_mode=bridge).
    type: int
    default: 0
  purge:
    description:
      - With O(state=absent), also delete the database and the TOTP key C(secrets/totp.key) that encrypts the
        enrolled TOTP secrets in it.
    type: bool
    default: false
  database_url:
    description:
      - Keep the broker's state in PostgreSQL - libpq's URL of the database (C(Database)), with every server of
        the cluster, for example V(postgresql://broker@db1:5432,db2:5432/broker?target_session_attrs=read-write).
        libpq tries the hosts in order and uses the first that takes writes. Other libpq parameters
        (V(sslmode), V(connect_timeout), ...) pass through.
      - Checked before anything is changed - the scheme V(postgresql://) or V(postgres://), at least one valid
        host (and port), a database name, no fragment, no C(host), C(hostaddr), C(port) or C(dbname) parameter,
        and no password (neither C(user:password@) nor a C(password) parameter - the URL is written to
        C(broker.properties) and logged; give the password in O(database_password)).
      - The database should exist with encoding UTF8, owned by the broker's role; the broker creates its tables
        (and the C(citext) extension) when it first starts.
      - When not set, the broker uses its SQLite database C(data/broker.db).
    type: str
  database_password:
    description:
      - With O(database_url), the password of its user; never logged or returned. Written to
        C(secrets/database.password) with mode V(0600) (C(DatabasePasswordFile)). Keep it in a vault.
      - Leave it out only when the server does not ask the broker for a password.
    type: str
  database_ca_cert:
    description:
      - With O(database_url), the CA bundle (PEM, a path on the target) that issued the database servers'
        certificates, copied to C(certs/database-ca.pem). The URL gets C(sslrootcert) pointing at the copy and,
        unless it sets C(sslmode), V(sslmode=verify-full); an C(sslmode) that does not verify the server
        (other than V(verify-full) or V(verify-ca)) is refused, as is an C(sslrootcert) of the URL.
    type: path
  directories:
    description:
      - LDAP or Active Directory behind domains of O(domains) (C(Domain.<D>.Source=ldap)). Users of such a domain
        log in with their directory account; their entitlements follow their directory groups (see
        M(gatehouse.access.broker_entitlement) with O(gatehouse.access.broker_entitlement#module:principal_type=directory-group)).
        Domains without a directory keep the broker's local users.
      - The certificate and the host name of every server are always verified.
    type: list
    elements: dict
    default: []
    suboptions:
      domain:
        description: The domain, spelled exactly as in O(domains).
        type: str
        required: true
      servers:
        description:
          - Directory servers in the order they are tried (the next one when one is down).
          - V(ldaps://host[:636]) is LDAPS; V(ldap://host[:389]) uses StartTLS, which is required unless
            O(directories[].allow_plain=true).
        type: list
        elements: str
        required: true
      ca_cert:
        description:
          - CA bundle (PEM, a path on the target) that issued the servers' certificates, copied to
            C(certs/ldap-<domain>.pem). Without it the image's system trust store is used.
        type: path
      bind_dn:
        description:
          - The service account the broker searches with (a DN, or C(user@domain) for Active Directory).
        type: str
        required: true
      bind_password:
        description:
          - Password of O(directories[].bind_dn); never logged. Written to C(secrets/ldap-<domain>.password) with
            mode V(0600). Keep it in a vault.
        type: str
        required: true
      base_dn:
        description: Where users are searched, like V(dc=corp,dc=example) or V(OU=Staff,DC=corp,DC=example).
        type: str
        required: true
      user_attribute:
        description:
          - The attribute that holds the login name - V(uid) (OpenLDAP), V(sAMAccountName) (Active Directory).
            A name with C(@) is also matched against C(userPrincipalName).
        type: str
        default: uid
      user_filter:
        description:
          - An LDAP filter ANDed to the user search, like V((memberOf=cn=vdi-users,ou=groups,dc=corp,dc=example)).
            The broker's default is V((objectClass=*)).
        type: str
      group_mode:
        description:
          - How the user's groups are found. V(ad-nested) - every group the user is in, also through nested
            groups (Active Directory's C(LDAP_MATCHING_RULE_IN_CHAIN)), searched under
            O(directories[].group_base_dn). V(memberof) - the user's C(memberOf) attribute (OpenLDAP's memberof
            overlay, or the direct groups in Active Directory). V(search) - groups under
            O(directories[].group_base_dn) whose C(member), C(uniqueMember) or C(memberUid) names the user.
        type: str
        choices: [ad-nested, memberof, search]
        default: memberof
      group_base_dn:
        description: Where groups are searched; defaults to O(directories[].base_dn).
        type: str
      allow_plain:
        description:
          - Allow plain LDAP (no TLS) to the V(ldap://) servers of this directory. Passwords then cross the
            network in clear text; the module returns a warning. Refused when there is no V(ldap://) server.
        type: bool
        default: false
      timeout:
        description: Seconds for the connection and for each directory operation (1 to 300).
        type: int
        default: 5
      pool_size:
        description: Directory checks of this domain at the same time (1 to 64); more logins wait.
        type: int
        default: 4
  second_factor:
    description:
      - Second-level authentication after (or, with O(second_factor.first=true), before) the password.
      - When not set, or with O(second_factor.method=none), users log in with their password only.
    type: dict
    suboptions:
      method:
        description:
          - V(totp) - a code of an authenticator app; each user enrolls with
            M(gatehouse.access.broker_user) O(gatehouse.access.broker_user#module:totp=enrolled).
          - V(radius) - a passcode checked by a RADIUS server (RSA SecurID, a one-time password server, a
            Duo or Okta proxy); Access-Challenge prompts are passed to the user.
        type: str
        choices: [none, totp, radius]
        default: none
      first:
        description:
          - Ask for the second factor first, then for the password (the order of some PCoIP deployments,
            where the RADIUS passcode opens the way to the password).
        type: bool
        default: false
      domains:
        description: Domains whose users are asked for the second factor; every domain when not set.
        type: list
        elements: str
      totp_key:
        description:
          - With V(totp) - the key that encrypts the users' TOTP secrets in the database, the base64 of 32 random
            bytes (C(openssl rand -base64 32)); never logged or returned.
          - When not set, one is generated on the target the first time and kept in C(secrets/totp.key) from
            then on. Back it up with the database - without it enrolled users must enroll again. O(purge)
            deletes it.
        type: str
      totp_issuer:
        description: With V(totp), the issuer shown in authenticator apps.
        type: str
        default: Gatehouse
      radius_servers:
        description:
          - With V(radius) (required), the RADIUS servers in the order they are tried - V(host), V(host:port),
            an IPv6 address or V([IPv6]:port); the port defaults to 1812.
        type: list
        elements: str
      radius_secret:
        description:
          - With V(radius) (required), the shared secret of the RADIUS servers; never logged. Written to
            C(secrets/radius.secret) with mode V(0600).
        type: str
      radius_timeout:
        description: With V(radius), seconds to wait for each answer (1 to 60).
        type: int
        default: 3
      radius_retries:
        description: With V(radius), how often a request is sent again to the same server before the next one (0 to 10).
        type: int
        default: 1
      radius_nas_identifier:
        description: With V(radius), the C(NAS-Identifier) sent; the broker's host name when not set.
        type: str
notes:
  - Files of an earlier configuration that the options no longer name (the CA and password of a directory that
    was removed, the RADIUS secret, the database password and CA) are deleted once the new container runs. The
    TOTP key is kept.
  - M(gatehouse.access.broker_backup) backs up and restores the database of either engine (PostgreSQL with
    C(pg_dump) and C(pg_restore)).
seealso:
  - module: gatehouse.access.cmsg
"""

EXAMPLES = r"""
- name: Broker with a certificate from the deployment CA, verifying its clients
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    domains: [CORP, LAB]
    ssl_cert: /opt/gatehouse/pki/broker.pem
    ssl_key: /opt/gatehouse/pki/broker.key
    client_ca_cert: /opt/gatehouse/pki/ca.pem

- name: Test broker with a self-signed certificate and no client verification
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    self_signed: true
    client_tls_verify: false

- name: Broker whose CORP users log in with Active Directory, then a RADIUS passcode
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    domains: [CORP]
    ssl_cert: /opt/gatehouse/pki/broker.pem
    ssl_key: /opt/gatehouse/pki/broker.key
    client_ca_cert: /opt/gatehouse/pki/ca.pem
    directories:
      - domain: CORP
        servers: [ldaps://dc1.corp.example.com, ldaps://dc2.corp.example.com]
        ca_cert: /etc/gatehouse/tls/corp-root-ca.pem
        bind_dn: CN=svc-gatehouse,OU=Service Accounts,DC=corp,DC=example,DC=com
        bind_password: "{{ vault_ldap_bind_password }}"
        base_dn: DC=corp,DC=example,DC=com
        user_attribute: sAMAccountName
        group_mode: ad-nested
    second_factor:
      method: radius
      radius_servers: [10.0.0.5, 10.0.0.6:1812]
      radius_secret: "{{ vault_radius_secret }}"

- name: Broker with OpenLDAP users and TOTP codes (the TOTP key is generated on the host once)
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    domains: [LAB]
    ssl_cert: /opt/gatehouse/pki/broker.pem
    ssl_key: /opt/gatehouse/pki/broker.key
    client_ca_cert: /opt/gatehouse/pki/ca.pem
    directories:
      - domain: LAB
        servers: [ldap://ldap.lab.example.com]
        ca_cert: /etc/gatehouse/tls/lab-ca.pem
        bind_dn: cn=gatehouse,ou=services,dc=lab,dc=example,dc=com
        bind_password: "{{ vault_ldap_bind_password }}"
        base_dn: ou=people,dc=lab,dc=example,dc=com
    second_factor:
      method: totp

- name: Broker on a PostgreSQL primary and its standby, over TLS verified with the database's CA
  gatehouse.access.broker:
    admin_token: "{{ vault_broker_admin_token }}"
    ssl_cert: /opt/gatehouse/pki/broker.pem
    ssl_key: /opt/gatehouse/pki/broker.key
    client_ca_cert: /opt/gatehouse/pki/ca.pem
    database_url: postgresql://broker@db1.example.com:5432,db2.example.com:5432/broker?target_session_attrs=read-write
    database_password: "{{ vault_broker_database_password }}"
    database_ca_cert: /opt/gatehouse/pki/database-ca.pem

- name: Remove the broker, keep the database
  gatehouse.access.broker:
    state: absent

- name: Remove the broker and its database
  gatehouse.access.broker:
    state: absent
    purge: true
"""

RETURN = r"""
changed_files:
  description:
    - Files and directories written, and files of an earlier identity configuration removed (with O(state=absent),
      those removed); in check mode, those that would be.
  returned: always
  type: list
  elements: str
containers:
  description: Containers that were (or would be) created, recreated, started or removed.
  returned: always
  type: list
  elements: dict
  sample: [{name: gatehouse-broker, action: create}]
images_loaded:
  description: Images loaded from O(bundle_path) or pulled from O(registry).
  returned: O(state=present)
  type: list
  elements: str
config:
  description: The effective configuration (no token).
  returned: O(state=present)
  type: dict
  contains:
    broker_properties:
      description: Keys and values of C(data/broker.properties).
      type: dict
    database:
      description:
        - Path of the SQLite database on the target, or with O(database_url) the URL the broker uses (never with a
          password).
      type: str
identity_check:
  description:
    - The check of the new configuration against the directories and RADIUS servers (C(--check-identity) in the
      new image), when it ran - before a container with O(directories) or RADIUS was created or replaced. Secrets
      are masked in its output.
  returned: when the check ran, also when it failed
  type: dict
  sample: {exit_code: 0, output: ["ldap CORP ldaps://dc1.corp.example.com: bind as CN=svc-gatehouse,... ok"]}
  contains:
    exit_code:
      description: Exit code of the check; V(0) when every server answered as expected, V(null) after a timeout.
      type: int
    output:
      description: Its output, one line per check or per failure.
      type: list
      elements: str
left_behind:
  description:
    - With O(state=absent), what was kept (the database and the TOTP key unless O(purge), files the module did not
      write).
  returned: O(state=absent)
  type: list
  elements: str
errors:
  description: Every problem found in the options, when the module fails.
  returned: failure
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._deploy import broker as _broker  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as deploy  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=_broker.ARGUMENT_SPEC,
        required_if=_broker.REQUIRED_IF,
        mutually_exclusive=deploy.COMMON_MUTUALLY_EXCLUSIVE,
        required_together=deploy.COMMON_REQUIRED_TOGETHER,
        supports_check_mode=True,
    )
    deploy.run_and_exit(module, _broker.run)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: cmsg
short_description: Install, configure and uninstall a connection manager and security gateway
version_added: 0.1.0
description:
  - The equivalent of C(pcoip-cmsg-setup install), C(configure) and C(uninstall) for Gatehouse. It writes the
    data directory O(data_dir) (C(docker-compose.yaml), C(data/config.properties), C(data/SecurityGateway.conf),
    C(data/cmsg.env), C(certs/)) and converges the containers C(<prefix>-cm) and C(<prefix>-sg).
  - Every option is validated before anything is changed; a bad option fails the task with a message that says
    what to do and leaves the host as it was.
  - Files are written atomically. C(cmsg.env) (the grant secret shared by CM and SG), C(certs/key.pem) and
    C(certs/identity-key.pem) have mode V(0600) and belong to the services' user (uid 10001). The grant secret is
    generated once and kept.
  - Internal TLS is verified by default - the agents with O(agent_ca_cert), the broker with O(broker_ca_cert) - and
    the connection manager presents its own C(cm) identity (O(identity_cert)). Turning a verification off is an
    explicit option and returns a warning.
  - A container is recreated only when its spec, its image or one of the files it reads changed (hash label
    C(gatehouse.spec-hash)); the same options twice report no change.
  - See the C(docs/cmsg-flags.md) page of the collection for the installer flag behind every option.
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
      - The diff shows every configuration file before and after; the grant secret is masked and private keys
        are shown as a hash only.
  platform:
    platforms: posix
requirements:
  - docker (Python SDK) >= 5.0 on the target
  - cryptography >= 42.0 on the target
  - Docker engine >= 20.10
options:
  accept_policies:
    description:
      - Accept the EULA and privacy policy (the installer's C(--accept-policies)). Must be V(true) with
        O(state=present).
    type: bool
    default: false
  broker_url:
    description:
      - URL of the broker, C(https://host:port), C(https://ip:port) or C(https://[ipv6]:port), optionally
        followed by C(/pcoip-broker/xml). Required with O(state=present), except on a forwarding security
        gateway (O(forward_to)), which runs no connection manager, and with O(tenants), where every tenant
        names its own broker.
    type: str
  broker_ca_cert:
    description: CA bundle on the target to verify the broker, copied to C(certs/broker-ca.pem). Default is the
      system store of the image.
    type: path
  broker_tls_verify:
    description:
      - Verify the broker's certificate. V(false) makes the module return a warning (test setups only).
    type: bool
    default: true
  identity_cert:
    description:
      - Certificate (PEM) on the target of the connection manager's internal identity, issued by the deployment CA
        with the URI subject alternative name C(urn:gatehouse:role:cm); copied to C(certs/identity.pem) and
        presented to the broker and the agents (C(IdentityCert)). A broker or agent that verifies its clients
        accepts the connection manager only with it.
      - Needs O(identity_key). The collection's C(playbooks/site.yml) issues it (role C(gatehouse.access.pki)).
    type: path
  identity_key:
    description: Private key (PEM) on the target of O(identity_cert), copied to C(certs/identity-key.pem) (mode V(0600)).
    type: path
  agent_ca_cert:
    description:
      - CA bundle on the target that issued the agents' certificates (the deployment CA), copied to
        C(certs/agent-ca.pem); the connection manager and the security gateway verify the agents with it
        (C(AgentCaCert)). Required with O(agent_tls_verify=true).
    type: path
  agent_tls_verify:
    description:
      - Verify the agents' certificates (and that they name the desktop's address) in the connection manager and
        the security gateway (C(AgentTlsVerify)). V(false) makes the module return a warning (test setups only).
      - With V(false) the connection manager sends no user password to an agent, so desktops with
        O(gatehouse.access.broker_desktop#module:logon=windows-password) can only be allocated when they pin their
        agent certificate (O(gatehouse.access.broker_desktop#module:agent_cert_sha256) or
        O(gatehouse.access.broker_desktop#module:agent_ca_pem)).
    type: bool
    default: true
  admin_address:
    description:
      - Address the plain-HTTP management listeners (C(/health), C(/metrics)) of the connection manager (port 9180)
        and the security gateway (port 9172) bind to (C(AdminAddress)), inside the container's network namespace.
      - With O(network_mode=bridge) these ports are published on the host's loopback only, at
        O(cm_admin_host_port) and O(sg_admin_host_port) (by default C(127.0.0.1:9180) and C(127.0.0.1:9172);
        C(playbooks/upgrade.yml) waits for a node to drain on them). The connection manager reaches the gateway's
        C(/health) over the Docker network (C(SecurityGatewayHealthUrl) = C(http://<prefix>-sg:9172/health)), so
        with the security gateway enabled the address must be V(0.0.0.0) or V(::); any other fails the task.
        With V(host) or V(container:<name>) they are on the host's addresses; the connection manager uses
        C(http://127.0.0.1:9172/health) (C(http://[::1]:9172/health) with V(::), which listens on IPv6 only;
        this address when it is a specific one), and the
        C(gatehouse.access.firewall) role opens them only to the HALB hosts and the management sources.
    type: str
    default: 0.0.0.0
  external_pcoip_ip:
    description:
      - Public address(es) of the security gateway that clients connect to on 4172; at most one IPv4 and one
        IPv6 address (IPv6 needs O(enable_ipv6)).
      - Required (with an IPv4 address) when O(enable_security_gateway=true).
    type: list
    elements: str
    default: []
  enable_security_gateway:
    description:
      - Run the security gateway. With V(false) (LAN, direct mode) clients connect straight to the agents and the
        C(<prefix>-sg) container is removed.
    type: bool
    default: true
  enable_collaboration:
    description:
      - Allow multiple PCoIP clients to collaborate on a PCoIP agent (C(EnableCollaboration)).
      - The owner of a running desktop session asks the connection manager for an invitation; another user
        logs in and joins that same session with the invitation's code, through the security gateway when it
        is enabled. A code is single use, valid five minutes, bound to the owner's session and forgotten
        when that session ends; see docs/protocol.md, "Collaboration".
      - With V(false) the connection manager refuses both invitations and joins
        (C(FAILED_COLLABORATION_DISABLED)).
    type: bool
    default: true
  enable_ipv6:
    description:
      - Enable IPv6 connections (C(EnableIpv6)), pure IPv6 or mixed with IPv4 as the seed describes.
      - The connection manager listens on IPv6 as well, the security gateway on C(::) (TCP and UDP, both families),
        and O(external_pcoip_ip) may hold an IPv6 address (alone, or with the IPv4 one).
      - With O(network_mode=bridge) the Docker network gets the IPv6 subnet O(docker_network_cidr_v6). Docker
        forwards published ports to it with the client's own address only when the daemon's C(ip6tables) is on;
        otherwise IPv6 clients reach the containers through Docker's userland proxy, from the network's gateway
        address. C(network_mode=host) keeps every client's address.
    type: bool
    default: false
  host_address:
    description: Address(es) of this host as clients know it, at most one IP address and one FQDN. Also the names of
      a self-signed certificate.
    type: list
    elements: str
    default: []
  license_server_url:
    description: Address of the license server passed to agents, like C(https://<license-server-address>:<port>).
    type: str
  docker_network_cidr:
    description:
      - Subnet of the Docker network C(<prefix>-cmsg) (only with O(network_mode=bridge)).
      - Must be inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16 and must not overlap the networks of the host's
        interfaces or of other Docker networks.
    type: str
    default: 10.101.0.0/24
  docker_network_cidr_v6:
    description:
      - IPv6 subnet of the Docker network C(<prefix>-cmsg) (only with O(network_mode=bridge) and O(enable_ipv6)).
      - A unique local network (inside fc00::/7), /48 to /112, that overlaps no other Docker network.
    type: str
    default: fd00:10:101::/64
  max_connections:
    description:
      - Client connections the security gateway holds at once, TLS handshakes included (C(MaxConnections) in
        C(SecurityGateway.conf)); beyond it a new connection is closed at accept. At most 5000 (the seed's
        maximum per gateway; deploy more nodes behind a HALB pair for more).
    type: int
    default: 5000
  workers:
    description:
      - Worker processes of the connection manager (C(Workers) in C(config.properties)) and of the security
        gateway (C(Workers) in C(SecurityGateway.conf)), each service's all serving its ports.
      - The security gateway serves each client address by one worker (its TCP and UDP together); MaxConnections
        and the once-only use of a grant hold across its workers.
      - The connection manager spreads new connections over its workers; a client session lives in the worker that
        answered its hello and is served through any of them. O(max_clients), O(max_concurrent_establishments),
        the connection caps and the per-address unauthenticated-session cap hold across its workers; each worker holds its share of
        the unauthenticated sessions (C(MaxPreAuthSessions) / workers) and evicts from it.
      - A worker that ends is started again (counted in C(gatehouse_sg_worker_restarts_total) and
        C(gatehouse_cm_worker_restarts_total)); the sessions it held end with it.
      - V(0) runs one per CPU available to the container; V(1) runs one process, as before.
      - Each worker holds about 10 MiB (SG) or 50 MiB (CM, resident, part of it shared) besides its sessions' memory,
        all within the container's memory limit (O(container_limits)); raise it on hosts with many CPUs, or set a
        count.
      - A forwarding security gateway (O(forward_to)) runs one process; leave V(0) or V(1) there.
    type: int
    default: 0
  max_concurrent_establishments:
    description: Session establishments (allocate-resource calls) the connection manager runs at the same time.
    type: int
    default: 40
  max_clients:
    description: Concurrent client sessions of the connection manager.
    type: int
    default: 400
  trusted_proxies:
    description: Networks (CIDRs) of load balancers whose C(X-Forwarded-For) header gives the client address.
    type: list
    elements: str
    default: []
  forward_to:
    description:
      - Makes this host a forwarding security gateway in the outer perimeter of a double-hop DMZ
        (C(ForwardTo) in C(SecurityGateway.conf)); see C(docs/dmz.md). Each entry is C(host:port) (C([IPv6]:port))
        of an inner security gateway; new connections go round-robin to them, the next one when one does not
        answer within 3 seconds, and a client's UDP follows its TCP.
      - The forwarder passes the clients' TLS through to the inner gateway with a PROXY v2 header naming the
        client; it runs the security gateway container only (no connection manager), holds no grant secret
        (C(cmsg.env) without it) and no certificate or key, and reaches no agent. O(ssl_cert), O(self_signed),
        O(broker_url) and O(agent_ca_cert) are not needed and not used.
      - List this host's address in O(proxy_protocol_sources) of every inner gateway, and set O(external_pcoip_ip)
        of the connection managers to this host's (or its HALB virtual server's) external address.
    type: list
    elements: str
    default: []
  listen_address:
    description:
      - With O(forward_to) only - the address the forwarder listens on (4172/tcp and udp), the VIP of a
        keepalived pair of forwarders (C(docs/dmz.md)). A socket on every address answers UDP from the host's own
        address, which a client that sent to the VIP drops; one on the VIP answers from the VIP.
      - The node that does not hold the VIP binds it too, so the host needs C(net.ipv4.ip_nonlocal_bind=1).
      - Only with O(network_mode) V(host) or C(container:<name>), where the SG shares a network namespace that
        holds the VIP. With O(network_mode=bridge) the task fails before changing anything - the VIP is on the
        host, not in the container, so the SG could not bind it; there the engine DNATs the published ports and
        the answers leave from the address the client sent to (the VIP) while the SG listens on every address.
      - Empty - every address (C(0.0.0.0), or C(::) with O(enable_ipv6)).
    type: str
    default: ""
  proxy_protocol_sources:
    description:
      - Addresses or CIDRs of the forwarding security gateways (O(forward_to)) in front of this security
        gateway (C(ProxyProtocolSources) in C(SecurityGateway.conf)). Connections and datagrams from them must
        start with a PROXY v2 header, whose client address is then the one the grant is checked against; a
        connection from them without a valid header within the request timeout is dropped. A header from any
        other address is never read (it fails the TLS handshake).
      - List the forwarders only, never a network that clients connect from.
    type: list
    elements: str
    default: []
  data_dir:
    description: The data directory (the seed's C(/opt/teradici/pcoipcm_data)).
    type: path
    default: /opt/gatehouse/cmsg
  https_port:
    description: Host port published for the connection manager's 8443 with O(network_mode=bridge).
    type: int
    default: 443
  http_port:
    description: Host port published for the redirect to https (container port 8080) with O(network_mode=bridge);
      V(0) disables the redirect.
    type: int
    default: 80
  pcoip_port:
    description: Host port (tcp and udp) published for the security gateway's 4172 with O(network_mode=bridge).
    type: int
    default: 4172
  cm_admin_host_port:
    description:
      - Port on the host's C(127.0.0.1) published for the connection manager's management listener (C(/health),
        C(/metrics); port 9180 in the container) with O(network_mode=bridge). Not used with the other network
        modes, where the listener is on port 9180 of the shared network namespace.
      - Give two deployments on one host (different O(name_prefix) and O(data_dir)) different values.
        C(playbooks/upgrade.yml) reads the node's drain state here (role variable C(cmsg_cm_admin_host_port)).
      - 1 to 65535; in bridge mode it must differ from every other published port (O(https_port), O(http_port),
        O(pcoip_port), O(sg_admin_host_port)).
    type: int
    default: 9180
  sg_admin_host_port:
    description:
      - Port on the host's C(127.0.0.1) published for the security gateway's management listener (C(/health),
        C(/metrics); port 9172 in the container) with O(network_mode=bridge) and the security gateway enabled.
        Not used with the other network modes, where the listener is on port 9172 of the shared network
        namespace.
      - The connection manager still polls the gateway's own port over the Docker network
        (C(http://<prefix>-sg:9172/health)); this option only moves the host side.
      - 1 to 65535; in bridge mode it must differ from every other published port (O(https_port), O(http_port),
        O(pcoip_port), O(cm_admin_host_port)).
    type: int
    default: 9172
  site:
    description:
      - The site of this node in a multi-site deployment (C(Site) of the connection manager and the security
        gateway), the same name as the desktops' O(gatehouse.access.broker_desktop#module:site) - 1 to 63
        lower-case letters, digits, V(-) or V(_), starting with a letter or digit. Empty (the default) is a
        single-site deployment.
      - The security gateway accepts only grants sealed for its site; the connection manager mints grants for
        its own site's desktops for its own security gateway (or sends the client straight to the desktop with
        O(enable_security_gateway=false)).
      - See the C(docs/multisite.md) page of the collection.
    type: str
    default: ""
  site_gateways:
    description:
      - Where the clients of each other site's desktops connect (C(SiteGateways)) - site name to the address of
        a security gateway of that site (its O(external_pcoip_ip) and O(pcoip_port)), C(host:port),
        C([ipv6]:port) or a host alone (port 4172); the host is an IP address or an FQDN that resolves to one
        address. A client that logs in here and is allocated a desktop of another site is sent there with a
        grant for that site, which every security gateway of that site accepts. Security gateways are not put
        behind a HALB virtual address (UDP and the grant's client address need the client to reach the
        gateway directly).
      - This node's own O(site) may be listed (every node can get the same map) and is not used. A desktop of a
        site that is neither this node's nor listed is refused.
      - Needs the same O(grant_secret) on every node of every site.
    type: dict
    default: {}
  grant_secret:
    description:
      - The grant secret (C(GATEHOUSE_GRANTSECRET) in C(cmsg.env)), 32 random bytes in base64
        (C(openssl rand -base64 32)). Without it the secret is generated once per node and kept.
      - A multi-site deployment gives every connection manager and security gateway of every site the same
        secret (from a vault); each site still gets its own grant key, derived from the secret and the site.
    type: str
  tenants:
    description:
      - Tenants sharing this connection manager and security gateway, each with its own broker (its users,
        directory and desktops) and its own public host name(s); several names may resolve to one address
        (a HALB VIP). See docs/tenants.md.
      - The client's TLS server name (SNI) and HTTP C(Host) pick the tenant; an unknown name is refused. A
        client session, a grant and an invitation are bound to their tenant. The certificate (O(ssl_cert) or
        O(self_signed)) must carry every tenant host name (SAN entries or a wildcard).
      - Written to C(data/tenants.json) and named as C(TenantsFile) in C(config.properties) and
        C(SecurityGateway.conf). Going from no tenants to some (or back) recreates the containers; adding,
        changing or removing a tenant afterwards only rewrites C(tenants.json) and signals both services
        (C(SIGHUP)), which keeps the containers and the other tenants' sessions. The sessions of a removed or
        changed tenant end.
      - A tenant's own files (O(tenants[].ssl_cert), O(tenants[].ssl_key), O(tenants[].broker_ca_cert)) are
        copied into C(certs/) atomically and covered by the same reload; those of a removed tenant are removed.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The tenant's name, 1 to 32 characters of C(a-z), C(0-9) and C(-) (in grants and logs).
        type: str
        required: true
      host_names:
        description: The tenant's public host names (FQDNs); each belongs to one tenant only.
        type: list
        elements: str
        required: true
      broker_url:
        description: The tenant's broker, C(https://host:port) as for O(broker_url), verified with O(broker_ca_cert).
        type: str
        required: true
      agent_networks:
        description:
          - Addresses or CIDRs of the tenant's desktops. When set, the connection manager refuses a desktop its
            broker allocates outside them and the security gateway refuses a grant whose agent is outside them.
        type: list
        elements: str
        default: []
      broker_ca_cert:
        description:
          - CA bundle on the target that verifies this tenant's broker instead of O(broker_ca_cert), copied to
            C(certs/tenant.<name>.broker-ca.pem) and named in the tenant's C(tenants.json) entry.
          - A changed file is taken up by the same reload as C(tenants.json) (C(SIGHUP)); the tenant's sessions
            are kept.
        type: path
      ssl_cert:
        description:
          - The tenant's own certificate (PEM) on the target, presented by the connection manager and the security
            gateway to clients that ask for one of the tenant's O(tenants[].host_names) (TLS SNI); other names
            get O(ssl_cert). Issued for the tenant's host names. Copied to C(certs/tenant.<name>.cert.pem).
          - Needs O(tenants[].ssl_key); the pair is checked like O(ssl_cert) and O(ssl_key). Adding, renewing or
            removing it is taken up by the same reload as C(tenants.json) (C(SIGHUP)); the containers and every
            session are kept.
        type: path
      ssl_key:
        description: Private key (PEM) on the target of O(tenants[].ssl_cert), copied to
          C(certs/tenant.<name>.key.pem) (mode V(0600)).
        type: path
seealso:
  - module: gatehouse.access.certificate
  - module: gatehouse.access.broker
"""

EXAMPLES = r"""
- name: WAN node with a CA-issued certificate (install and configure are the same task)
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://broker.example.com:443
    external_pcoip_ip:
      - 203.0.113.10
    host_address:
      - cmsg1.example.com
    ssl_cert: /root/certs/cmsg1.pem
    ssl_key: /root/certs/cmsg1.key
    ca_cert: /root/certs/CAcertificate.pem
    agent_ca_cert: /root/certs/deployment-ca.pem

- name: Internal identity and agent verification from the deployment CA
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://broker.example.com:443
    broker_ca_cert: /opt/gatehouse/pki/ca.pem
    external_pcoip_ip: [203.0.113.10]
    ssl_cert: /root/certs/cmsg1.pem
    ssl_key: /root/certs/cmsg1.key
    identity_cert: /opt/gatehouse/pki/cm.pem
    identity_key: /opt/gatehouse/pki/cm.key
    agent_ca_cert: /opt/gatehouse/pki/ca.pem

- name: LAN-only node (no security gateway) with a self-signed certificate (agents not verified, tests only)
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://10.0.0.5:443
    enable_security_gateway: false
    self_signed: true
    agent_tls_verify: false
    docker_network_cidr: 172.20.0.0/24

- name: Dark site, images from the bundle
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://broker.corp.internal:443
    external_pcoip_ip: [198.51.100.7, "2001:db8::7"]
    enable_ipv6: true
    self_signed: true
    agent_ca_cert: /opt/gatehouse/pki/ca.pem
    bundle_path: /root/gatehouse-bundle

- name: Double-hop DMZ, outer perimeter - a forwarding security gateway (no CM, no secret, no key)
  gatehouse.access.cmsg:
    accept_policies: true
    forward_to: ["10.20.0.11:4172", "10.20.0.12:4172"]

- name: Double-hop DMZ, second perimeter - CM and inner security gateway behind the forwarders
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://broker.corp.internal:443
    external_pcoip_ip: [203.0.113.20]  # the forwarders' HALB virtual server
    self_signed: true
    agent_ca_cert: /opt/gatehouse/pki/ca.pem
    proxy_protocol_sources: [10.10.0.11, 10.10.0.12]

- name: A second deployment on the same host (bridge mode), beside the default one
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://broker.example.com:443
    external_pcoip_ip: [203.0.113.11]
    self_signed: true
    agent_ca_cert: /opt/gatehouse/pki/ca.pem
    name_prefix: staging
    data_dir: /opt/gatehouse/staging-cmsg
    docker_network_cidr: 10.102.0.0/24
    https_port: 8443
    http_port: 0
    pcoip_port: 14172
    cm_admin_host_port: 19180
    sg_admin_host_port: 19172

- name: A node of site 1 in a multi-site deployment (clients of site 2's desktops go to site 2's HALB)
  gatehouse.access.cmsg:
    accept_policies: true
    broker_url: https://broker.example.com:443
    external_pcoip_ip: [203.0.113.10]
    ssl_cert: /root/certs/cmsg1.pem
    ssl_key: /root/certs/cmsg1.key
    agent_ca_cert: /opt/gatehouse/pki/ca.pem
    site: site1
    site_gateways:
      site1: 203.0.113.100:4172
      site2: 198.51.100.100:4172
    grant_secret: "{{ vault_gatehouse_grant_secret }}"

- name: Shared CM and security gateway for two tenants, each with its own broker and host name
  gatehouse.access.cmsg:
    accept_policies: true
    external_pcoip_ip: [203.0.113.30]
    ssl_cert: /root/certs/tenants.pem  # SANs: desktops.tenant-a.example, desktops.tenant-b.example
    ssl_key: /root/certs/tenants.key
    broker_ca_cert: /opt/gatehouse/pki/ca.pem
    agent_ca_cert: /opt/gatehouse/pki/ca.pem
    tenants:
      - name: tenant-a
        host_names: [desktops.tenant-a.example]
        broker_url: https://broker.tenant-a.internal:443
        agent_networks: [10.31.0.0/16]
      - name: tenant-b
        host_names: [desktops.tenant-b.example]
        broker_url: https://broker.tenant-b.internal:443
        agent_networks: [10.32.0.0/16]

- name: Tenant B with its own certificate and broker CA (reloaded, no container recreated)
  gatehouse.access.cmsg:
    accept_policies: true
    external_pcoip_ip: [203.0.113.30]
    ssl_cert: /root/certs/tenants.pem  # SAN: desktops.tenant-a.example
    ssl_key: /root/certs/tenants.key
    broker_ca_cert: /opt/gatehouse/pki/ca.pem
    agent_ca_cert: /opt/gatehouse/pki/ca.pem
    tenants:
      - name: tenant-a
        host_names: [desktops.tenant-a.example]
        broker_url: https://broker.tenant-a.internal:443
      - name: tenant-b
        host_names: [desktops.tenant-b.example]
        broker_url: https://broker.tenant-b.internal:443
        broker_ca_cert: /root/certs/tenant-b-ca.pem
        ssl_cert: /root/certs/tenant-b.pem
        ssl_key: /root/certs/tenant-b.key

- name: Uninstall
  gatehouse.access.cmsg:
    state: absent
"""

RETURN = r"""
changed_files:
  description: Files and directories written (or, with O(state=absent), removed); in check mode, those that would be.
  returned: always
  type: list
  elements: str
  sample: [/opt/gatehouse/cmsg/data/config.properties]
containers:
  description: Containers that were (or would be) created, recreated, started or removed.
  returned: always
  type: list
  elements: dict
  sample: [{name: gatehouse-cm, action: recreate}]
network:
  description: The Docker network C(<prefix>-cmsg) and what happened to it (none, create, recreate, removed).
  returned: always
  type: dict
  sample: {name: gatehouse-cmsg, action: none}
images_loaded:
  description: Images loaded from O(bundle_path) or pulled from O(registry).
  returned: O(state=present)
  type: list
  elements: str
config:
  description: The effective configuration (no secrets).
  returned: O(state=present)
  type: dict
  contains:
    config_properties:
      description: Keys and values of C(data/config.properties); null on a forwarding security gateway.
      type: dict
    security_gateway_conf:
      description: Keys and values of C(data/SecurityGateway.conf).
      type: dict
    images:
      description: Image references per role.
      type: dict
    management_urls:
      description:
        - Base URLs of the management listeners (C(/health), C(/metrics)) of the connection manager (C(cm)) and
          the security gateway (C(sg), null without it). With O(network_mode=bridge) the ports published on the
          host's C(127.0.0.1) (O(cm_admin_host_port), O(sg_admin_host_port)); otherwise ports 9180 and 9172 at
          O(admin_address) (C(127.0.0.1) for V(0.0.0.0), C([::1]) for V(::)) in the network namespace the services
          share (the host's, or that of the C(container:<name>)).
      type: dict
      sample: {cm: "http://127.0.0.1:9180", sg: "http://127.0.0.1:9172"}
    network:
      description: Name, subnet and (with O(enable_ipv6)) C(subnet_v6) of the Docker network, or null outside bridge mode.
      type: dict
left_behind:
  description: With O(state=absent), files in the data directory that the module did not write and kept.
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

from ansible_collections.gatehouse.access.plugins.module_utils._deploy import cmsg as _cmsg  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy import common as deploy  # noqa: E402


def main() -> None:
    module = AnsibleModule(
        argument_spec=_cmsg.ARGUMENT_SPEC,
        required_if=_cmsg.REQUIRED_IF,
        mutually_exclusive=deploy.COMMON_MUTUALLY_EXCLUSIVE,
        required_together=_cmsg.REQUIRED_TOGETHER,
        supports_check_mode=True,
    )
    deploy.run_and_exit(module, _cmsg.run)


if __name__ == "__main__":
    main()

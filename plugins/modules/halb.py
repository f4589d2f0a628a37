#!/usr/bin/python
# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: halb
short_description: HAProxy + keepalived high-availability load-balancer node (one node of a HALB pair)
version_added: 0.1.0
description:
  - Configures and runs one node of a HALB pair, the Gatehouse counterpart of the Parallels RAS HALB
    appliance - HAProxy load-balances virtual servers (VIP and port) over connection managers or
    gateways, keepalived moves the VIPs between the nodes with VRRP (unicast, version 3 by default).
  - Renders C(haproxy.cfg) and C(keepalived.conf) under O(config_dir), validates them with C(haproxy -c) and
    C(keepalived -t) in a throwaway container of the HALB image without network before anything is replaced, writes
    them atomically and then reloads - HAProxy through its master process (new workers take over the
    listening sockets, established connections finish on the old ones) and keepalived with SIGHUP. When the
    container does not exist (or its definition changed) it is created and started instead.
  - A configuration that HAProxy or keepalived refuses fails the task with their messages; the files and the
    running configuration stay untouched.
  - Changing only backend states (O(virtual_servers[].backends[].state)) applies them at once through the
    HAProxy runtime API (C(set server ... state drain|ready|maint)) and in the file, without a reload.
  - keepalived tracks HAProxy (and with O(vrrp.track_url) a health URL) - a node whose HAProxy is gone (or whose URL
    does not answer) goes to FAULT and gives the VIPs up; the container
    also stops when either daemon exits. A node that stops (SIGTERM, O(state=absent)) sends a priority 0
    advertisement so the peer takes over at once. Every node starts in BACKUP state, so a restarted node never
    holds a VIP that the other node holds.
  - See C(docs/halb.md) in the collection for the pair's behaviour, measured failover times and limits.
author:
  - Gatehouse contributors (@gatehouse)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - gatehouse.access.deploy.container_limits
  - gatehouse.access.docker
attributes:
  check_mode:
    support: full
    details:
      - Check mode renders and validates (in a throwaway container without network) but writes nothing and
        neither starts, reloads nor changes the HALB container.
  diff_mode:
    support: full
    details:
      - The diff shows the configuration files; private keys are shown as a hash only.
  platform:
    platforms: posix
requirements:
  - Docker engine on the managed host with the image present (C(make images) or the dark-site bundle)
  - docker (Python SDK) on the managed host
options:
  state:
    description:
      - V(present) renders, validates, writes and runs; V(absent) stops the container (the peer takes the VIPs
        over) and removes it and the files the module wrote.
    type: str
    choices: [present, absent]
    default: present
  config_dir:
    description:
      - Directory for C(haproxy/haproxy.cfg), C(haproxy/certs/), C(keepalived/keepalived.conf) and C(run/)
        (the HAProxy admin socket). Mounted into the container.
    type: path
    default: /opt/gatehouse/halb
  node_name:
    description:
      - Name of this node, unique in the pair; the HAProxy local peer name and the keepalived router id.
      - Required with O(state=present).
    type: str
  host_label:
    description: Value of the container label C(gatehouse.host) (the inventory host). Defaults to O(node_name).
    type: str
  image_tag:
    description: Tag of the C(gatehouse/halb) image (HAProxy and keepalived); the collection version by default.
    type: str
    default: 0.1.0
  image:
    description:
      - A complete image reference (or image id) that replaces C(gatehouse/halb:<image_tag>), for example an image
        in a private registry that was pulled beforehand.
    type: str
  container_name:
    description: Name of the HALB container.
    type: str
    default: gatehouse-halb
  network_mode:
    description:
      - V(host) (the usual choice - the VIPs go onto the host's O(vrrp.interface)), V(bridge), C(container:<name>)
        to share another container's network namespace, or the name of a user-defined Docker network.
    type: str
    default: host
  ipv4_address:
    description:
      - Static address of the container on a user-defined network given as O(network_mode).
    type: str
  maxconn:
    description:
      - HAProxy's global connection limit. By default HAProxy derives it from the container's open files limit
        (about half of it; Docker's default limit comes from the engine's C(LimitNOFILE)).
      - HAProxy needs about two file descriptors per connection and does not start when the limit is too low for
        the value given here, so raise the engine's limit (or C(default-ulimits) in C(daemon.json)) first.
    type: int
  hard_stop_after:
    description:
      - How long old HAProxy workers may keep serving established connections after a reload (HAProxy time).
    type: str
    default: 1h
  metrics_port:
    description:
      - Port of the metrics frontend on every address of the node (plain HTTP) - HAProxy's Prometheus exporter at
        C(/metrics) and the node's VRRP state (C(gatehouse_halb_vrrp_master), written by keepalived's notify
        commands) at C(/vrrp), scraped by M(gatehouse.access.monitoring). V(0) renders no metrics frontend.
      - The firewall role opens it to the monitoring hosts only.
    type: int
    default: 8405
  virtual_servers:
    description:
      - The virtual servers (a VIP and a port each), like the virtual servers of a Parallels RAS HALB.
      - Required with O(state=present). An empty list makes a keepalived-only pair - the VIPs move between the
        nodes and services on the nodes that listen on every address answer on them; HAProxy runs with no
        frontend but the metrics one, and the VRRP still tracks it, and those services only with O(vrrp.track_url).
    type: list
    elements: dict
    suboptions:
      name:
        description: Name, unique on the node (HAProxy sections are C(fe_<name>) and C(be_<name>)).
        type: str
        required: true
      vip:
        description: The address to listen on; must be one of O(vrrp.vips).
        type: str
        required: true
      port:
        description: TCP port.
        type: int
        default: 443
      mode:
        description:
          - V(tcp) passes TLS through to the backends (layer 4); the backends see the HALB's address as the
            client address.
          - V(http) terminates TLS with O(virtual_servers[].tls_cert), adds C(X-Forwarded-For) (a client-sent one is
            removed) and C(X-Forwarded-Proto), and opens TLS again to the backends (O(virtual_servers[].backend_tls)).
        type: str
        choices: [tcp, http]
        default: tcp
      tls_cert:
        description:
          - Certificate (PEM, with the chain after the leaf) on the managed host; required in mode V(http).
          - Copied with O(virtual_servers[].tls_key) into C(config_dir/haproxy/certs/<name>.pem) (mode 0600).
        type: path
      tls_key:
        description: The private key of O(virtual_servers[].tls_cert) when it is not in the same file.
        type: path
      backend_tls:
        description:
          - The backends speak TLS. In mode V(http) HAProxy opens TLS again to them (re-encryption); in mode
            V(tcp) the client's TLS passes through untouched and this only makes the health check use TLS.
        type: bool
        default: true
      backend_tls_verify:
        description:
          - Verify the backends' certificates against O(virtual_servers[].backend_ca_file) wherever the HALB speaks
            TLS to them (re-encrypted traffic in mode V(http), TLS health checks). The chain is verified, not the
            name - connection managers usually carry a certificate of the deployment CA, not of their own address.
          - V(required) needs O(virtual_servers[].backend_ca_file); the task fails without it.
          - V(none) turns verification off and the module warns - in mode V(http) the re-encrypted requests carry
            the users' passwords.
        type: str
        choices: [none, required]
        default: required
      backend_ca_file:
        description:
          - CA bundle (PEM) on the managed host that signs the backends' certificates (the deployment CA).
          - Copied into C(config_dir/haproxy/certs/<name>-ca.pem).
        type: path
      balance:
        description: Load-balancing algorithm.
        type: str
        choices: [roundrobin, leastconn, source]
        default: roundrobin
      persistence:
        description:
          - V(cookie) - sticky sessions by the C(JSESSIONID) cookie (mode V(http) only; HAProxy prefixes the
            backend's cookie with the server name). This is what the connection manager requires behind a
            load balancer.
          - V(source) - the client address sticks to a backend in a stick table that the nodes synchronise
            (O(stick_table_peers)), so it holds across a failover.
          - Default V(cookie) in mode V(http), V(source) in mode V(tcp).
        type: str
        choices: [none, source, cookie]
      persistence_timeout:
        description: Idle time after which a source persistence entry expires (HAProxy time).
        type: str
        default: 30m
      cookie_name:
        description: The session cookie for O(virtual_servers[].persistence=cookie).
        type: str
        default: JSESSIONID
      health_check:
        description: HTTP health check of the backends (one request definition per virtual server).
        type: dict
        suboptions:
          enabled:
            description: Check the backends; without checks a dead backend keeps receiving clients.
            type: bool
            default: true
          path:
            description: URL path; the check expects status 200.
            type: str
            default: /health
          host:
            description: Host header of the check. Defaults to the virtual server name.
            type: str
          tls:
            description: Run the check over TLS. Defaults to O(virtual_servers[].backend_tls).
            type: bool
          port:
            description: Check port when it differs from the traffic port (the SG answers on 9172 plain HTTP).
            type: int
          interval:
            description: Time between checks (HAProxy time).
            type: str
            default: 2s
          rise:
            description: Successful checks before a backend is up.
            type: int
            default: 2
          fall:
            description: Failed checks before a backend is down.
            type: int
            default: 2
      timeouts:
        description: HAProxy timeouts (HAProxy time format, for example V(5s), V(1m)).
        type: dict
        suboptions:
          connect:
            description: Connecting to a backend.
            type: str
            default: 5s
          client:
            description: Client inactivity.
            type: str
            default: 60s
          server:
            description: Backend inactivity.
            type: str
            default: 60s
          check:
            description: Health check answer.
            type: str
            default: 2s
          tunnel:
            description: Inactivity of an established TCP (mode V(tcp)) connection.
            type: str
            default: 1h
          http_request:
            description: Complete HTTP request (mode V(http)).
            type: str
            default: 10s
          http_keep_alive:
            description: Idle keep-alive connection (mode V(http)).
            type: str
            default: 10s
          queue:
            description: Time a request may wait for a free backend slot.
            type: str
            default: 30s
      maxconn:
        description: Connection limit of the virtual server.
        type: int
      haproxy_options:
        description:
          - Extra lines for the backend section, verbatim (for example V(http-reuse safe)). They are validated by
            C(haproxy -c) like the rest.
        type: list
        elements: str
        default: []
      backends:
        description: The servers behind the virtual server.
        type: list
        elements: dict
        required: true
        suboptions:
          name:
            description: Name, unique in the virtual server (also the persistence cookie prefix).
            type: str
            required: true
          address:
            description: IP address or host name (resolved when HAProxy starts or reloads).
            type: str
            required: true
          port:
            description: TCP port (1-65535).
            type: int
            required: true
          weight:
            description: Relative share of new sessions (1-256).
            type: int
            default: 100
          state:
            description:
              - V(enabled) - receives new sessions.
              - V(drain) - no new sessions; established connections continue and clients that are already
                sticky to it still reach it (as in an upgrade, RAS "drain mode").
              - V(disabled) - maintenance; nothing new reaches it, sticky clients go elsewhere.
              - A change of state alone is applied through the runtime API without a reload.
            type: str
            choices: [enabled, drain, disabled]
            default: enabled
          check_port:
            description: Health check port of this backend (overrides O(virtual_servers[].health_check.port)).
            type: int
  vrrp:
    description:
      - VRRP (keepalived) settings of this node. Required with O(state=present).
    type: dict
    suboptions:
      router_id:
        description: VRRP virtual router id (1-255), the same on every node of the pair and unique on the segment.
        type: int
        required: true
      priority:
        description:
          - This node's priority (1-254); the highest live node holds the VIPs. Give the nodes different
            priorities (the primary typically 150, the secondary 100).
        type: int
        required: true
      peers:
        description:
          - Unicast addresses of the other node(s). Required - multicast VRRP is unreliable on container and cloud
            networks and is not used.
        type: list
        elements: str
        required: true
      unicast_src_ip:
        description: This node's own address to send advertisements from (default - the interface's address).
        type: str
      interface:
        description: Interface that carries the VIPs and VRRP.
        type: str
        default: eth0
      version:
        description: VRRP version. Version 3 allows sub-second advertisement intervals (and IPv6).
        type: int
        choices: [2, 3]
        default: 3
      advert_int:
        description:
          - Advertisement interval in seconds. keepalived accepts 0.01-40.95 in steps of 0.01 with version 3 and
            only whole seconds with version 2.
          - A backup takes over 3 x O(vrrp.advert_int) + (256 - priority) x O(vrrp.advert_int) / 256 seconds after
            the last advertisement of a master that vanished (about 0.36 s with the default 0.1 at priority 100,
            about 3.6 s with keepalived's default of 1 s). A master that stops cleanly hands over at once.
          - The default keeps the median failover after a SIGKILL of the master under 0.5 s; it costs the two
            nodes' keepalived about 0.3 % of a core, and no false failover was measured with every core of the
            host busy. Raise it where the pair's adverts cross a slower or lossy network.
        type: float
        default: 0.1
      nopreempt:
        description:
          - A returning higher-priority node does not take the VIPs back from the node that holds them (one
            failover instead of two).
        type: bool
        default: false
      vips:
        description:
          - The virtual IP addresses with prefix length (CIDR, for example V(192.0.2.100/24)); one address family.
            A VIP with a real prefix must be on the peers' network; a host route (V(/32)) may be anywhere.
        type: list
        elements: str
        required: true
      track_haproxy:
        description: Go to FAULT (give up the VIPs) while no HAProxy process runs.
        type: bool
        default: true
      track_url:
        description:
          - Also go to FAULT (give up the VIPs) while this URL does not answer C(200) - for a keepalived-only pair
            (O(virtual_servers=[])) whose VIP serves a service on the nodes themselves, for example the C(/health) of
            a forwarding security gateway (C(docs/dmz.md)). Checked from the HALB container's network namespace
            (O(network_mode)) every 2 seconds with a 1.5 second timeout; two failures in a row give the VIPs up,
            two good answers in a row make the node eligible again.
          - Plain C(http://) with an IP address (no name to resolve), an optional port and path, for example
            V(http://127.0.0.1:9172/health). The check runs the image's C(python3) and ignores proxy settings.
          - Empty - no such check.
        type: str
        default: ""
      garp_master_refresh:
        description: Repeat gratuitous ARP every so many seconds while master (0 disables).
        type: int
        default: 60
  stick_table_peers:
    description:
      - The HAProxy peers of the pair, this node included (O(node_name) with its own address), that synchronise the
        source persistence tables. Without it the tables stay local (and still survive a reload).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The node's O(node_name).
        type: str
        required: true
      address:
        description: The node's own address (not a VIP).
        type: str
        required: true
  stick_table_peers_port:
    description: TCP port of the stick table synchronisation.
    type: int
    default: 10000
notes:
  - HAProxy binds the VIPs with the C(transparent) option, so both nodes listen at all times and a failover needs no
    reload. The HAProxy master binds as root; the workers that carry the traffic run as the C(haproxy) user.
  - The container (O(container_limits)) drops every capability except C(NET_ADMIN), C(NET_RAW), C(NET_BROADCAST)
    (keepalived, VIPs, C(transparent) binds), C(NET_BIND_SERVICE) (port 443), C(SETUID), C(SETGID) and C(KILL)
    (HAProxy starts its workers as the C(haproxy) user and signals them), runs with C(no-new-privileges) and has
    tmpfs on C(/tmp) and C(/run).
  - Every TLS bind offers the connection manager's cipher table of the seed (TLS 1.2 ECDHE-RSA-AES256-GCM-SHA384,
    ECDHE-RSA-AES128-GCM-SHA256, AES256-GCM-SHA384, AES128-GCM-SHA256 in this order of server preference; TLS 1.3
    with OpenSSL's default suites); TLS 1.0 and 1.1 are refused.
  - The validation container creates a veth pair named after O(vrrp.interface) in its own network namespace so that
    C(keepalived -t) accepts the interface; it never has a network.
seealso:
  - name: HAProxy configuration manual
    description: Server states, stick tables, peers and the runtime API.
    link: https://docs.haproxy.org/2.6/configuration.html
  - name: keepalived.conf manual
    description: VRRP instances, unicast peers and track scripts.
    link: https://www.keepalived.org/manpage.html
"""

EXAMPLES = r"""
- name: Primary node of a HALB pair in front of two connection managers (TLS terminated, JSESSIONID stickiness)
  gatehouse.access.halb:
    node_name: halb1
    vrrp:
      router_id: 51
      priority: 150
      interface: eth0
      peers: [192.0.2.12]
      vips: [192.0.2.100/24]
    stick_table_peers:
      - {name: halb1, address: 192.0.2.11}
      - {name: halb2, address: 192.0.2.12}
    virtual_servers:
      - name: cm
        vip: 192.0.2.100
        port: 443
        mode: http
        tls_cert: /etc/gatehouse/tls/halb.pem
        tls_key: /etc/gatehouse/tls/halb.key
        persistence: cookie
        backend_ca_file: /etc/gatehouse/tls/deployment-ca.pem
        health_check: {interval: 500ms, rise: 2, fall: 2}
        backends:
          - {name: cmsg1, address: 192.0.2.21, port: 443}
          - {name: cmsg2, address: 192.0.2.22, port: 443}

- name: Layer-4 virtual server with source persistence (CMs see the HALB address, see docs/halb.md)
  gatehouse.access.halb:
    node_name: halb2
    vrrp: {router_id: 51, priority: 100, peers: [192.0.2.11], vips: [192.0.2.100/24]}
    stick_table_peers:
      - {name: halb1, address: 192.0.2.11}
      - {name: halb2, address: 192.0.2.12}
    virtual_servers:
      - name: cm-tcp
        vip: 192.0.2.100
        port: 443
        mode: tcp
        persistence: source
        backend_ca_file: /etc/gatehouse/tls/deployment-ca.pem
        backends:
          - {name: cmsg1, address: 192.0.2.21, port: 443}
          - {name: cmsg2, address: 192.0.2.22, port: 443, state: drain}

- name: Take the pair down on this node (the peer takes the VIPs over)
  gatehouse.access.halb:
    state: absent
"""

RETURN = r"""
config_dir:
  description: The configuration directory.
  returned: always
  type: str
  sample: /opt/gatehouse/halb
files_changed:
  description: Files written (or that would be written in check mode) or removed.
  returned: always
  type: list
  elements: str
actions:
  description: What the module did to the running node, in order.
  returned: always
  type: list
  elements: str
  sample: ["validated", "wrote files", "runtime: set server be_cm/cmsg2 state drain"]
container:
  description: The HALB container after the run.
  returned: when O(state=present)
  type: dict
  contains:
    name:
      description: Container name.
      type: str
    id:
      description: Container id (empty in check mode when it would be created).
      type: str
    status:
      description: Docker status.
      type: str
vips_held:
  description: The VIPs this node holds right now (it is the VRRP master when the list is not empty).
  returned: when O(state=present) and the container runs
  type: list
  elements: str
  sample: [192.0.2.100]
failover_estimate:
  description: Seconds until the peer takes over if this node vanishes without a goodbye (RFC 5798 master down interval).
  returned: when O(state=present)
  type: float
  sample: 0.85
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.gatehouse.access.plugins.module_utils._common.result import finish  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._deploy.halb import run_absent, run_present  # noqa: E402
from ansible_collections.gatehouse.access.plugins.module_utils._docker.containers import (  # noqa: E402
    CONTAINER_LIMITS_OPTION,
    DOCKER_HOST_OPTION,
)
from ansible_collections.gatehouse.access.plugins.module_utils._halb.render import ADVERT_INT  # noqa: E402

TIMEOUTS = dict(
    connect=dict(type="str", default="5s"),
    client=dict(type="str", default="60s"),
    server=dict(type="str", default="60s"),
    check=dict(type="str", default="2s"),
    tunnel=dict(type="str", default="1h"),
    http_request=dict(type="str", default="10s"),
    http_keep_alive=dict(type="str", default="10s"),
    queue=dict(type="str", default="30s"),
)

ARGUMENT_SPEC = dict(
    state=dict(type="str", choices=["present", "absent"], default="present"),
    config_dir=dict(type="path", default="/opt/gatehouse/halb"),
    node_name=dict(type="str"),
    host_label=dict(type="str"),
    image_tag=dict(type="str", default="0.1.0"),
    image=dict(type="str"),
    container_name=dict(type="str", default="gatehouse-halb"),
    network_mode=dict(type="str", default="host"),
    ipv4_address=dict(type="str"),
    maxconn=dict(type="int"),
    hard_stop_after=dict(type="str", default="1h"),
    metrics_port=dict(type="int", default=8405),
    virtual_servers=dict(
        type="list",
        elements="dict",
        options=dict(
            name=dict(type="str", required=True),
            vip=dict(type="str", required=True),
            port=dict(type="int", default=443),
            mode=dict(type="str", choices=["tcp", "http"], default="tcp"),
            tls_cert=dict(type="path"),
            tls_key=dict(type="path", no_log=False),
            backend_tls=dict(type="bool", default=True),
            backend_tls_verify=dict(type="str", choices=["none", "required"], default="required"),
            backend_ca_file=dict(type="path"),
            balance=dict(type="str", choices=["roundrobin", "leastconn", "source"], default="roundrobin"),
            persistence=dict(type="str", choices=["none", "source", "cookie"]),
            persistence_timeout=dict(type="str", default="30m"),
            cookie_name=dict(type="str", default="JSESSIONID"),
            health_check=dict(
                type="dict",
                options=dict(
                    enabled=dict(type="bool", default=True),
                    path=dict(type="str", default="/health"),
                    host=dict(type="str"),
                    tls=dict(type="bool"),
                    port=dict(type="int"),
                    interval=dict(type="str", default="2s"),
                    rise=dict(type="int", default=2),
                    fall=dict(type="int", default=2),
                ),
            ),
            timeouts=dict(type="dict", options=TIMEOUTS),
            maxconn=dict(type="int"),
            haproxy_options=dict(type="list", elements="str", default=[]),
            backends=dict(
                type="list",
                elements="dict",
                required=True,
                options=dict(
                    name=dict(type="str", required=True),
                    address=dict(type="str", required=True),
                    port=dict(type="int", required=True),
                    weight=dict(type="int", default=100),
                    state=dict(type="str", choices=["enabled", "drain", "disabled"], default="enabled"),
                    check_port=dict(type="int"),
                ),
            ),
        ),
        required_if=[("mode", "http", ["tls_cert"])],
        required_by={"tls_key": "tls_cert"},
    ),
    vrrp=dict(
        type="dict",
        options=dict(
            router_id=dict(type="int", required=True),
            priority=dict(type="int", required=True),
            peers=dict(type="list", elements="str", required=True),
            unicast_src_ip=dict(type="str"),
            interface=dict(type="str", default="eth0"),
            version=dict(type="int", choices=[2, 3], default=3),
            advert_int=dict(type="float", default=ADVERT_INT),
            nopreempt=dict(type="bool", default=False),
            vips=dict(type="list", elements="str", required=True),
            track_haproxy=dict(type="bool", default=True),
            track_url=dict(type="str", default=""),
            garp_master_refresh=dict(type="int", default=60),
        ),
    ),
    stick_table_peers=dict(
        type="list",
        elements="dict",
        default=[],
        options=dict(name=dict(type="str", required=True), address=dict(type="str", required=True)),
    ),
    stick_table_peers_port=dict(type="int", default=10000),
    container_limits=CONTAINER_LIMITS_OPTION,
    docker_host=DOCKER_HOST_OPTION,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        supports_check_mode=True,
        required_if=[("state", "present", ["node_name", "virtual_servers", "vrrp"])],
    )
    if module.params["state"] == "present":
        result = run_present(module)
    else:
        result = run_absent(module)
    finish(module, result, keep_diff=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# make demo / make demo-down: the ha topology (broker, two CM/SG, a HALB pair with a VIP, two
# desktops in a pool, a demo user) on this machine's Docker engine, deployed by playbooks/site.yml
# with inventories/demo. Every host is a gatehouse/node container on the network gh-demo; the
# services run as sibling containers in the host containers' network namespaces.
#
#   hack/demo.sh up     build missing images, create the hosts, deploy, run one client session
#                       through the VIP and write .gatehouse-demo/endpoints.json (mode 0600)
#   hack/demo.sh down   remove every container, network and volume of the demo (found by label)
#                       and .gatehouse-demo/
#
# Environment: GATEHOUSE_DEMO_NET (first three octets of the demo network, default 10.230.10;
# the network is <net>.0/24 and must not overlap any other network of this machine).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version=$(gatehouse_version)
net_prefix=${GATEHOUSE_DEMO_NET:-10.230.10}
network=gh-demo
demo_dir=$REPO_ROOT/.gatehouse-demo
inventory=$REPO_ROOT/inventories/demo
venv=$REPO_ROOT/.venv/bin
label=gatehouse.demo=gatehouse-access
# inventory host -> last octet (inventories/demo/hosts.yml)
hosts=(demo-broker:10 demo-cmsg1:21 demo-cmsg2:22 demo-halb1:41 demo-halb2:42 demo-desk1:31 demo-desk2:32)

host_names() { local h; for h in "${hosts[@]}"; do echo "${h%%:*}"; done; }

down() {
    local ids h
    # Host containers carry the demo label; the services carry gatehouse.host=<inventory host>.
    ids=$(docker ps -aq --filter "label=$label")
    for h in $(host_names); do
        ids+=" $(docker ps -aq --filter "label=gatehouse.host=$h")"
    done
    ids=$(echo "$ids" | tr ' ' '\n' | sed '/^$/d' | sort -u)
    if [[ -n $ids ]]; then
        # shellcheck disable=SC2086
        docker rm -f $ids >/dev/null
        log "removed $(echo "$ids" | wc -l) container(s)"
    fi
    for id in $(docker network ls -q --filter "label=$label"); do docker network rm "$id" >/dev/null; done
    for id in $(docker volume ls -q --filter "label=$label"); do docker volume rm "$id" >/dev/null; done
    rm -rf "$demo_dir"
    log "demo removed"
}

ensure_images() {
    local missing=() name
    # The demo's hosts are gatehouse/node containers; it needs no other test image.
    for name in "${GATEHOUSE_IMAGES[@]}" node; do
        docker image inspect "gatehouse/$name:$version" >/dev/null 2>&1 || missing+=("$name")
    done
    if ((${#missing[@]})); then
        log "building the missing images: ${missing[*]}"
        IMAGES="${missing[*]}" "$REPO_ROOT/hack/build-images.sh"
    fi
}

ensure_hosts() {
    local h name octet dir
    if ! docker network inspect "$network" >/dev/null 2>&1; then
        docker network create --driver bridge --subnet "$net_prefix.0/24" --gateway "$net_prefix.1" \
            --label "$label" "$network" >/dev/null
        log "created network $network ($net_prefix.0/24)"
    fi
    for h in "${hosts[@]}"; do
        name=${h%%:*} octet=${h##*:}
        dir=$demo_dir/hosts/$name
        mkdir -p "$dir"
        if [[ $(docker inspect --format '{{.State.Running}}' "gh-$name" 2>/dev/null) == true ]]; then
            continue
        fi
        docker rm -f "gh-$name" >/dev/null 2>&1 || true
        docker run --detach --name "gh-$name" --hostname "$name" \
            --network "$network" --ip "$net_prefix.$octet" \
            --volume /var/run/docker.sock:/var/run/docker.sock \
            --volume "$dir:$dir" \
            --label "$label" --label gatehouse.role=node --label "gatehouse.host=$name" \
            --restart unless-stopped \
            "gatehouse/node:$version" >/dev/null
        log "started host container gh-$name ($net_prefix.$octet)"
    done
}

deploy() {
    mkdir -p "$REPO_ROOT/build/collections/ansible_collections/gatehouse"
    ln -sfn ../../../.. "$REPO_ROOT/build/collections/ansible_collections/gatehouse/access"
    mkdir -p "$demo_dir/secrets" && chmod 0700 "$demo_dir" "$demo_dir/secrets"
    log "deploying with playbooks/site.yml (log: .gatehouse-demo/site.log)"
    # Pipelining, and a fork per host so that no task waits for a second round of hosts.
    if ! ANSIBLE_COLLECTIONS_PATH=$REPO_ROOT/build/collections ANSIBLE_PIPELINING=true \
        ANSIBLE_FORKS=${ANSIBLE_FORKS:-${#hosts[@]}} \
        ANSIBLE_FORCE_COLOR=false ANSIBLE_NOCOLOR=true \
        "$venv/ansible-playbook" -i "$inventory" "$REPO_ROOT/playbooks/site.yml" \
        -e "gatehouse_demo_dir=$demo_dir" -e "gatehouse_demo_net=$net_prefix" \
        >"$demo_dir/site.log" 2>&1; then
        tail -n 40 "$demo_dir/site.log" >&2
        die "playbooks/site.yml failed (full log: .gatehouse-demo/site.log)"
    fi
    # The recap shows what the run changed (changed=0 everywhere on a repeated run).
    sed -n '/^PLAY RECAP/,$p' "$demo_dir/site.log" | sed '/^$/d' >&2
}

session() {
    local password
    password=$(head -n1 "$demo_dir/secrets/user-corp-demo")
    log "client session through the VIP https://$net_prefix.100 (gatehouse-client in a container on $network)"
    # The password reaches the client through its environment, never its command line.
    GH_PASSWORD=$password docker run --rm --network "$network" --label "$label" --label gatehouse.role=client \
        --env GH_PASSWORD --entrypoint gatehouse-client "gatehouse/cm:$version" \
        --url "https://$net_prefix.100" --user demo --password-env GH_PASSWORD --insecure
}

endpoints() {
    local password file=$demo_dir/endpoints.json
    password=$(head -n1 "$demo_dir/secrets/user-corp-demo")
    (umask 077 && NET=$net_prefix PASSWORD=$password "$venv/python" - >"$file" <<'PY'
import json, os
net = os.environ["NET"]
print(json.dumps({
    "vip": f"https://{net}.100",
    "cm": [f"https://{net}.21:8443", f"https://{net}.22:8443"],
    "sg": [f"{net}.21:4172", f"{net}.22:4172"],
    "broker": f"https://{net}.10:8443",
    "desktops": [f"{net}.31:60443", f"{net}.32:60443"],
    "user": "CORP\\demo",
    "password": os.environ["PASSWORD"],
}, indent=2))
PY
    )
    chmod 0600 "$file"
    cat <<EOT
Gatehouse demo is up (network $network, $net_prefix.0/24):
  VIP (HALB pair)   https://$net_prefix.100        halb1 $net_prefix.41 (primary), halb2 $net_prefix.42
  CM + SG           https://$net_prefix.21:8443, https://$net_prefix.22:8443 (gateways on 4172 tcp/udp)
  broker            https://$net_prefix.10:8443
  desktops          desk1 $net_prefix.31, desk2 $net_prefix.32 (pool demo-pool)
  user              CORP\\demo, password in .gatehouse-demo/secrets/user-corp-demo
  endpoints         .gatehouse-demo/endpoints.json (mode 0600)
  remove it all     make demo-down
EOT
}

case ${1:-up} in
up)
    start=$(now)
    docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"
    [[ -x $venv/ansible-playbook ]] || die "$venv/ansible-playbook not found; run 'make venv' first"
    ensure_images
    ensure_hosts
    deploy
    session
    endpoints
    log "demo ready in $(($(now) - start)) s"
    ;;
down) down ;;
*) die "usage: $0 up|down" ;;
esac

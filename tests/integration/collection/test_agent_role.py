"""gatehouse.access.agent (role and module) through ansible-playbook against the local Docker engine.

Two test desktops in the host's network namespace on free ports, their certificates from a real
deployment CA (role pki, ca entry point). The role is two tasks per host, and a second run changes
nothing; each agent serves its control port with its own certificate and sees no other agent's
key; a change of one agent's settings is predicted by check mode (diff, nothing changed) and then
recreates that agent's container only; bad options fail before anything exists; state=absent
removes the containers and every file of the agents.
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collection_helpers import run_module, run_playbook
from deploy_helpers import IMAGE_TAG, cleanup, docker_client, objects_named, unique_prefix
from services import free_port

pytestmark = [pytest.mark.docker, pytest.mark.images, pytest.mark.timeout(600)]

RUN = "gatehouse.access.agent : Run the agent containers (their agent.properties, certificates and CAs)"


@pytest.fixture
def env(tmp_path: Path):
    cli = docker_client()
    try:
        cli.images.get(f"gatehouse/agent:{IMAGE_TAG}")
    except Exception:
        pytest.skip(f"gatehouse/agent:{IMAGE_TAG} is not built yet (make images)")
    prefix = unique_prefix("agent")
    try:
        yield cli, prefix, tmp_path
    finally:
        cleanup(cli, prefix)


def play(tmp_path: Path, prefix: str, instances: list[dict], *options: str, **extra) -> dict:
    """The pki role's CA entry point, then the agent role, on localhost; {task: result}, stats, tasks run."""
    variables = {
        "pki_ca_dir": str(tmp_path / "controller" / "ca"),
        "agent_pki_ca_dir": str(tmp_path / "controller" / "ca"),
        "agent_data_dir": str(tmp_path / "node" / "agent"),
        "agent_instances": instances,
        "agent_host_address": "127.0.0.1",
        "agent_network_mode": "host",
        "agent_name_prefix": prefix,
        "agent_host_label": "desktops1",
        **extra,
    }
    playbook = tmp_path / "agent.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "agents",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": variables,
                    "tasks": [
                        {
                            "ansible.builtin.include_role": {
                                "name": "gatehouse.access.pki",
                                "tasks_from": "ca",
                            }
                        },
                        {"ansible.builtin.include_role": {"name": "gatehouse.access.agent"}},
                    ],
                }
            ]
        )
    )
    run = run_playbook(*options, str(playbook))
    tasks = {}
    for task in run.report["plays"][0]["tasks"]:
        tasks[task["task"]["name"]] = task["hosts"]["localhost"]
    return {
        "tasks": tasks,
        "stats": run.report["stats"]["localhost"],
        "rc": run.returncode,
        "out": run.stdout,
    }


def served_certificate(port: int, ca: Path) -> x509.Certificate:
    """The agent's control-port certificate, verified against the deployment CA."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def wait_served(port: int, ca: Path) -> x509.Certificate:
    deadline = time.monotonic() + 30
    while True:
        try:
            return served_certificate(port, ca)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_two_agents_converge_in_two_tasks_and_a_second_run_changes_nothing(env) -> None:
    cli, prefix, tmp_path = env
    ports = {name: (free_port(), free_port()) for name in ("desk1", "desk2")}
    instances = [
        {
            "name": name,
            "control_port": control,
            "session_port": session,
            "admin_port": free_port(),
            "site": "ignored-by-the-agent",
        }
        for name, (control, session) in ports.items()
    ]
    first = play(tmp_path, prefix, instances)
    assert first["rc"] == 0, first["out"][-4000:]
    run = first["tasks"][RUN]
    assert sorted(c["name"] for c in run["containers"]) == [f"{prefix}-agent-desk1", f"{prefix}-agent-desk2"]
    # Role tasks that reach the node: the certificates and the module (plus the CA on the controller).
    agent_tasks = [name for name in first["tasks"] if name.startswith("gatehouse.access.agent : ")]
    assert len([n for n in agent_tasks if "Validating arguments" not in n]) == 2, agent_tasks

    ca = tmp_path / "controller" / "ca" / "ca.pem"
    pki = tmp_path / "node" / "agent" / "pki"
    for name, (control, _session) in ports.items():
        cert = wait_served(control, ca)
        assert cert.public_bytes(Encoding.PEM) == (pki / f"{name}.pem").read_bytes()
        container = cli.containers.get(f"{prefix}-agent-{name}")
        assert (
            container.labels["gatehouse.role"] == "agent"
            and container.labels["gatehouse.host"] == "desktops1"
        )
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert container.attrs["HostConfig"]["CapDrop"] == ["ALL"]
        mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
        assert mounts["/certs/key.pem"] == str(pki / f"{name}.key")
        other = "desk2" if name == "desk1" else "desk1"
        assert str(pki / f"{other}.key") not in mounts.values()
        properties = (tmp_path / "node" / "agent" / name / "data" / "agent.properties").read_text()
        assert f"ControlPort={control}\n" in properties and "AdvertiseAddress=\n" in properties

    again = play(tmp_path, prefix, instances)
    assert again["rc"] == 0 and again["stats"]["changed"] == 0, again["out"][-4000:]

    # One agent's change: check mode predicts it (diff of its properties only), then it alone is recreated.
    before = {n: cli.containers.get(f"{prefix}-agent-{n}").id for n in ports}
    instances[1]["capacity"] = 3
    check = play(tmp_path, prefix, instances, "--check", "--diff")
    assert check["rc"] == 0, check["out"][-4000:]
    predicted = check["tasks"][RUN]
    assert predicted["changed"] and predicted["containers"] == [
        {"name": f"{prefix}-agent-desk2", "action": "recreate"}
    ]
    assert [d["after_header"] for d in predicted["diff"]] == [
        str(tmp_path / "node" / "agent" / "desk2" / "data" / "agent.properties")
    ]
    assert "Capacity=3" in predicted["diff"][0]["after"]
    assert cli.containers.get(f"{prefix}-agent-desk2").id == before["desk2"]
    real = play(tmp_path, prefix, instances)
    assert real["rc"] == 0 and real["tasks"][RUN]["containers"] == predicted["containers"]
    assert cli.containers.get(f"{prefix}-agent-desk1").id == before["desk1"]
    assert cli.containers.get(f"{prefix}-agent-desk2").id != before["desk2"]

    gone = play(tmp_path, prefix, instances, agent_state="absent")
    assert gone["rc"] == 0, gone["out"][-4000:]
    assert objects_named(cli, prefix) == []
    assert not (tmp_path / "node" / "agent").exists()


def test_bad_options_fail_before_anything_exists(env) -> None:
    cli, prefix, tmp_path = env
    port = free_port()
    instances = [
        {"name": "desk1", "control_port": port, "session_port": free_port()},
        {"name": "desk2", "control_port": port, "session_port": free_port(), "capacity": 0},
    ]
    run = play(tmp_path, prefix, instances, agent_broker_url="broker:8443")
    assert run["rc"] != 0
    errors = run["tasks"][RUN]["errors"]
    assert any(f"control_port {port} is taken by desk1 (control_port)" in e for e in errors), errors
    assert any("desk2: capacity must be at least 1" in e for e in errors), errors
    assert any("broker_url must look like https://broker:port" in e for e in errors), errors
    assert objects_named(cli, prefix) == []
    assert not (tmp_path / "node" / "agent" / "desk1").exists()
    # Names are checked before the certificates are looked for.
    data_dir = tmp_path / "node" / "other"
    twice = run_module(
        "agent",
        {
            "instances": [{"name": "desk1"}, {"name": "desk1"}],
            "data_dir": str(data_dir),
            "name_prefix": prefix,
        },
    )
    assert twice.failed and "instances names desk1 more than once" in twice.result["errors"], twice.result
    missing = run_module(
        "agent", {"instances": [{"name": "desk9"}], "data_dir": str(data_dir), "name_prefix": prefix}
    )
    assert missing.failed and any("agent desk9:" in e and "missing" in e for e in missing.result["errors"])
    assert not data_dir.exists() and objects_named(cli, prefix) == []


def test_in_the_default_bridge_mode_the_agent_serves_through_its_published_ports(env) -> None:
    """network_mode bridge (the role's default): the control port reaches the agent through Docker's
    published port, with its own certificate; the session port is published for TCP and UDP."""
    cli, prefix, tmp_path = env
    control, session = free_port(), free_port()
    instances = [{"name": "desk1", "control_port": control, "session_port": session}]
    run = play(tmp_path, prefix, instances, agent_network_mode="bridge")
    assert run["rc"] == 0, run["out"][-4000:]
    ca = tmp_path / "controller" / "ca" / "ca.pem"
    cert = wait_served(control, ca)
    assert cert.public_bytes(Encoding.PEM) == (tmp_path / "node" / "agent" / "pki" / "desk1.pem").read_bytes()
    container = cli.containers.get(f"{prefix}-agent-desk1")
    assert container.attrs["HostConfig"]["NetworkMode"] == "bridge"
    bindings = container.attrs["HostConfig"]["PortBindings"]
    for port in (f"{control}/tcp", f"{session}/tcp", f"{session}/udp"):
        assert [b["HostPort"] for b in bindings[port]] == [port.partition("/")[0]], bindings
    properties = (tmp_path / "node" / "agent" / "desk1" / "data" / "agent.properties").read_text()
    # The host's address is the one the broker and the CMs reach a bridged agent at.
    assert "AdvertiseAddress=127.0.0.1\n" in properties
    again = play(tmp_path, prefix, instances, agent_network_mode="bridge")
    assert again["rc"] == 0 and again["stats"]["changed"] == 0, again["out"][-4000:]

"""gatehouse_tls_certificate_expiry_timestamp_seconds on the management listeners of the real services.

The SG and the broker run as host processes with certificates of the test CA; their /metrics must
carry the notAfter of the certificate each one serves (read back from the TLS handshake), which is
what the alert GatehouseCertificateExpiresSoon compares with time().
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import urllib.request
from pathlib import Path

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from services import ServiceProcess, start_broker, start_sg

METRIC = "gatehouse_tls_certificate_expiry_timestamp_seconds"


def expiry_samples(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["certificate"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == METRIC
        for sample in family.samples
    }


def served_not_after(port: int) -> float:
    context = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()


def test_sg_and_broker_publish_the_expiry_of_the_certificate_they_serve(
    pki, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    sg = start_sg(pki, tmp_path / "sg", "sg-expiry", secret)
    processes.append(sg)
    broker = start_broker(pki, tmp_path / "broker", "broker-expiry", "admin-" + "t" * 30)
    processes.append(broker)

    for service, tls_port in ((sg, sg.config["Port"]), (broker, broker.config["ListenPort"])):
        samples = expiry_samples(int(service.config["AdminPort"]))
        # One sample, labelled by the file's name, with the notAfter the handshake shows.
        assert samples == {Path(str(service.config["SslCert"])).name: served_not_after(int(tls_port))}

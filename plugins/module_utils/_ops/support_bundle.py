# Copyright (c) Gatehouse contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Support bundle (``diagnose --support-bundle``): collect, redact, archive (private to the collection).

Everything that goes into the archive passes the redaction rule of ``_redact`` first; private
keys are never read into the archive at all (certificate and key files are only listed, with
fingerprints). Before the archive is written, every member is scanned once more for every
secret value seen; a hit stops the module instead of writing the bundle.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import socket
import stat
import sys
import tarfile

from ansible_collections.gatehouse.access.plugins.module_utils._common.atomicfile import atomic_open
from ansible_collections.gatehouse.access.plugins.module_utils._docker import containers as ctr
from ansible_collections.gatehouse.access.plugins.module_utils._ops.redact import REDACTED, RULE, Redactor

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
except ImportError:
    HAS_CRYPTOGRAPHY = False
else:
    HAS_CRYPTOGRAPHY = True

DEFAULT_DATA_DIR = "/opt/gatehouse/cmsg"
# Files the CM/SG data directory is known to hold; listed in the manifest when missing.
EXPECTED_FILES = (
    "docker-compose.yaml",
    "data/config.properties",
    "data/SecurityGateway.conf",
    "data/cmsg.env",
)
KEY_EXTENSIONS = (".key", ".p12", ".pfx", ".jks", ".keystore", ".p8")
# The broker's secrets/ (directory bind passwords, the RADIUS shared secret): never read either.
SECRET_EXTENSIONS = (".password", ".secret")
CERT_EXTENSIONS = (".pem", ".crt", ".cer", ".der", ".csr")
IMAGE_LABEL = "gatehouse.image"


class BundleError(Exception):
    """The bundle cannot be made; nothing was written."""


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _colon_hex(digest: bytes) -> str:
    return ":".join("%02X" % b for b in digest)


def _is_binary(data: bytes) -> bool:
    if b"\x00" in data[:8192]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _mode_text(st) -> str:
    return "%04o" % stat.S_IMODE(st.st_mode)


def describe_tls_file(path: str, data: bytes, st) -> dict | None:
    """A listing entry for certificate and key files, or None when the file is neither.

    Keys are described (type, size, public key fingerprint to match them with certificates) but
    their content is never returned.
    """
    lower = path.lower()
    entry = {"path": path, "size": st.st_size, "mode": _mode_text(st)}
    has_key_block = b"PRIVATE KEY-----" in data
    if has_key_block or lower.endswith(KEY_EXTENSIONS):
        entry["kind"] = "private key (not copied)"
        if HAS_CRYPTOGRAPHY and has_key_block:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (TypeError, ValueError):
                entry["note"] = "encrypted or unreadable"
            else:
                public = key.public_key()
                entry["key_size"] = getattr(key, "key_size", None)
                entry["key_type"] = "RSA" if isinstance(key, rsa.RSAPrivateKey) else type(key).__name__
                entry["public_key_fingerprint_sha256"] = _public_fingerprint(public)
        return entry
    if not (b"-----BEGIN CERTIFICATE" in data or b"-----BEGIN CERTIFICATE REQUEST" in data):
        if not lower.endswith(CERT_EXTENSIONS):
            return None
        if not _is_binary(data):
            return None
    entry["kind"] = "certificate"
    if not HAS_CRYPTOGRAPHY:
        return entry
    certs = []
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs = list(x509.load_pem_x509_certificates(data))
        elif b"-----BEGIN CERTIFICATE REQUEST" in data:
            entry["kind"] = "certificate signing request"
            csr = x509.load_pem_x509_csr(data)
            entry["subject"] = csr.subject.rfc4514_string()
            entry["public_key_fingerprint_sha256"] = _public_fingerprint(csr.public_key())
            return entry
        else:
            certs = [x509.load_der_x509_certificate(data)]
            entry["format"] = "der"
    except ValueError:
        entry["note"] = "not readable as a certificate"
        return entry
    entry["certificates"] = [
        {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fingerprint_sha256": _colon_hex(cert.fingerprint(hashes.SHA256())),
            "public_key_fingerprint_sha256": _public_fingerprint(cert.public_key()),
            "key_size": getattr(cert.public_key(), "key_size", None),
        }
        for cert in certs
    ]
    return entry


def _public_fingerprint(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return _colon_hex(digest.finalize())


def _read_os_release() -> dict:
    values = {}
    try:
        with open("/etc/os-release", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.strip().partition("=")
                if sep:
                    values[key] = value.strip('"').strip("'")
    except OSError:
        pass
    return values


class Collector:
    """Gathers the bundle's members in memory, each one redacted."""

    def __init__(self, params: dict, redactor: Redactor, now: datetime.datetime) -> None:
        self.params = params
        self.redactor = redactor
        self.now = now
        self.members: dict[str, bytes] = {}
        self.text_members: set[str] = set()
        self.collected_files: list[str] = []
        self.skipped: list[dict] = []
        self.tls_files: list[dict] = []
        self.containers: list[dict] = []
        self.notes: list[str] = []
        self._file_count = 0
        self._seen: set[str] = set()

    # ------------------------------------------------------------ files

    def add_text(self, name: str, text: str) -> None:
        self.members[name] = text.encode("utf-8")
        self.text_members.add(name)

    def collect_paths(self) -> None:
        data_dir = self.params["data_dir"]
        if data_dir:
            if os.path.isdir(data_dir):
                for expected in EXPECTED_FILES:
                    if not os.path.exists(os.path.join(data_dir, expected)):
                        self.notes.append("%s is missing" % os.path.join(data_dir, expected))
                self._walk(data_dir)
            else:
                self.notes.append(
                    "data directory %s does not exist (not a connection manager host?)" % data_dir
                )
        for path in self.params["extra_paths"] or []:
            if os.path.isdir(path):
                self._walk(path)
            elif os.path.lexists(path):
                self._file(path)
            else:
                self.skipped.append({"path": path, "reason": "does not exist"})

    def _walk(self, root: str) -> None:
        for directory, dirs, files in os.walk(root, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                self._file(os.path.join(directory, name))
            for name in dirs:
                full = os.path.join(directory, name)
                if os.path.islink(full):
                    self.skipped.append(
                        {"path": full, "reason": "symbolic link to %s, not followed" % os.readlink(full)}
                    )

    def _file(self, path: str) -> None:
        path = os.path.abspath(path)
        if path in self._seen:  # data_dir and extra_paths may overlap
            return
        self._seen.add(path)
        try:
            st = os.lstat(path)
        except OSError as exc:
            self.skipped.append({"path": path, "reason": "cannot stat: %s" % exc.strerror})
            return
        if stat.S_ISLNK(st.st_mode):
            self.skipped.append(
                {"path": path, "reason": "symbolic link to %s, not followed" % os.readlink(path)}
            )
            return
        if not stat.S_ISREG(st.st_mode):
            self.skipped.append({"path": path, "reason": "not a regular file"})
            return
        if self._file_count >= self.params["max_files"]:
            self.skipped.append(
                {"path": path, "reason": "more than max_files=%d files" % self.params["max_files"]}
            )
            return
        self._file_count += 1
        if path.lower().endswith(KEY_EXTENSIONS):
            # Decided by name alone: the key file is not even read.
            self.tls_files.append(
                {"path": path, "size": st.st_size, "mode": _mode_text(st), "kind": "private key (not copied)"}
            )
            return
        if path.lower().endswith(SECRET_EXTENSIONS):
            self.skipped.append({"path": path, "reason": "a secret file (not read)"})
            return
        limit = self.params["max_file_bytes"]
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            self.skipped.append({"path": path, "reason": "cannot read: %s" % exc.strerror})
            return
        tls = describe_tls_file(path, data, st)
        if tls is not None:
            self.tls_files.append(tls)
            return
        if len(data) > limit:
            self.skipped.append({"path": path, "reason": "larger than max_file_bytes=%d" % limit})
            return
        if _is_binary(data):
            self.skipped.append(
                {"path": path, "reason": "binary file (databases and archives are not copied)"}
            )
            return
        self.add_text("files" + path, self.redactor.text(data.decode("utf-8")))
        self.collected_files.append(path)

    # ------------------------------------------------------------ docker

    def collect_docker(self) -> dict:
        """Containers labelled ``container_label``: state (docker inspect) and logs; versions of images and engine."""
        versions: dict = {"docker": None, "gatehouse_images": []}
        if not self.params["collect_containers"]:
            return versions
        if not ctr.HAS_DOCKER:
            self.notes.append(
                "Docker SDK for Python not installed on the host: containers and logs not collected"
            )
            return versions
        try:
            client = ctr.client(self.params.get("docker_host"), 60)
        except ctr.ContainerError as exc:
            self.notes.append("Docker engine not reachable, containers and logs not collected: %s" % exc)
            return versions
        try:
            versions["docker"] = self.redactor.structure(client.version())
            containers = client.containers.list(all=True, filters={"label": self.params["container_label"]})
            image_ids = set()
            for container in sorted(containers, key=lambda c: c.name):
                self._container(container)
                image_ids.add(container.attrs.get("Image"))
            images = {img.id: img for img in client.images.list(filters={"label": IMAGE_LABEL})}
            for image_id in image_ids:
                if image_id and image_id not in images:
                    try:
                        images[image_id] = client.images.get(image_id)
                    except ctr.DockerException:
                        continue
            for image_id in sorted(images):
                image = images[image_id]
                versions["gatehouse_images"].append(
                    {
                        "id": image.id,
                        "tags": sorted(image.tags),
                        "created": image.attrs.get("Created"),
                        "labels": self.redactor.structure(image.labels or {}),
                    }
                )
        except ctr.DockerException as exc:
            self.notes.append("Docker error while collecting containers: %s" % exc)
        finally:
            client.close()
        return versions

    def _container(self, container) -> None:
        name = container.name
        attrs = dict(container.attrs)
        state = attrs.get("State") or {}
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        self.containers.append(
            {
                "name": name,
                "id": container.id[:12],
                "image": (attrs.get("Config") or {}).get("Image"),
                "role": labels.get(self.params["container_label"]),
                "host": labels.get("gatehouse.host"),
                "status": state.get("Status"),
                "exit_code": state.get("ExitCode"),
                "health": (state.get("Health") or {}).get("Status"),
                "started_at": state.get("StartedAt"),
                "restart_count": attrs.get("RestartCount"),
            }
        )
        self.add_text(
            "containers/%s/inspect.json" % name,
            json.dumps(self.redactor.structure(attrs), indent=2, sort_keys=True, default=str) + "\n",
        )
        if not self.params["collect_logs"]:
            return
        try:
            raw = container.logs(stdout=True, stderr=True, timestamps=True, tail=self.params["log_lines"])
        except ctr.DockerException as exc:
            self.notes.append("logs of %s not collected: %s" % (name, exc))
            return
        limit = self.params["max_log_bytes"]
        header = ""
        if len(raw) > limit:
            raw = raw[-limit:]
            cut = raw.find(b"\n")
            raw = raw[cut + 1 :] if cut >= 0 else raw
            header = "[log truncated to the last %d bytes (max_log_bytes)]\n" % limit
        self.add_text(
            "containers/%s/logs.txt" % name, header + self.redactor.text(raw.decode("utf-8", "replace"))
        )

    # ------------------------------------------------------------ assembly

    def versions(self, docker_versions: dict) -> dict:
        os_release = _read_os_release()
        return {
            "python": {"version": platform.python_version(), "executable": sys.executable},
            "os": {
                "pretty_name": os_release.get("PRETTY_NAME"),
                "id": os_release.get("ID"),
                "version_id": os_release.get("VERSION_ID"),
                "kernel": platform.release(),
                "architecture": platform.machine(),
            },
            "docker": docker_versions.get("docker"),
            "gatehouse_images": docker_versions.get("gatehouse_images", []),
        }

    def finish(self, docker_versions: dict) -> None:
        self.add_text(
            "versions.json", json.dumps(self.versions(docker_versions), indent=2, sort_keys=True) + "\n"
        )
        self.add_text("containers.json", json.dumps(self.containers, indent=2, sort_keys=True) + "\n")
        self.add_text("certificates.json", json.dumps(self.tls_files, indent=2, sort_keys=True) + "\n")
        # Rule 5 needs every secret seen anywhere; it runs once all members exist.
        for name in sorted(self.text_members):
            self.members[name] = self.redactor.literals(self.members[name].decode("utf-8")).encode("utf-8")
        manifest = {
            "format": 1,
            "created": self.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "hostname": socket.gethostname(),
            "data_dir": self.params["data_dir"],
            "extra_paths": self.params["extra_paths"],
            "container_label": self.params["container_label"],
            "collected_files": self.collected_files,
            "skipped": self.skipped,
            "containers": [c["name"] for c in self.containers],
            "notes": self.notes,
            "redactions": self.redactor.count,
            "redaction_rule": RULE.splitlines(),
            "redaction_marker": REDACTED,
        }
        self.add_text("manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        leaks = [
            name for name in self.text_members if self.redactor.leaked(self.members[name].decode("utf-8"))
        ]
        if leaks:
            raise BundleError(
                "refusing to write the bundle: a secret survived redaction in %s" % ", ".join(sorted(leaks))
            )


def top_directory(dest: str) -> str:
    base = os.path.basename(dest)
    for suffix in (".tar.gz", ".tgz"):
        if base.endswith(suffix):
            return base[: -len(suffix)] or "support-bundle"
    return base or "support-bundle"


def write_archive(dest: str, members: dict[str, bytes], mode: int, now: datetime.datetime) -> int:
    """Write a tar.gz atomically (temp file in the same directory, mode set first, then renamed)."""
    top = top_directory(dest)
    with atomic_open(dest, mode) as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for name in sorted(members):
            info = tarfile.TarInfo("%s/%s" % (top, name.lstrip("/")))
            info.size = len(members[name])
            info.mtime = int(now.timestamp())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(members[name]))
    return os.path.getsize(dest)


def parse_mode(text: str) -> int:
    try:
        mode = int(str(text), 8)
    except ValueError:
        raise BundleError("mode %r is not an octal file mode like 0600" % text) from None
    if not 0 <= mode <= 0o777:
        raise BundleError("mode %r is not a file permission mode" % text)
    return mode


def run(params: dict, check_mode: bool, now: datetime.datetime | None = None) -> dict:
    now = now or utcnow()
    dest = params["dest"]
    try:
        mode = parse_mode(params["mode"])
        for option in ("max_file_bytes", "max_log_bytes", "log_lines", "max_files"):
            if params[option] < 1:
                raise BundleError("%s must be at least 1" % option)
        directory = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(directory):
            raise BundleError("directory %s of dest does not exist" % directory)
        if os.path.isdir(dest):
            raise BundleError("dest %s is a directory; give the archive file name" % dest)
        exists = os.path.exists(dest)
        before = {"dest": dest, "exists": exists}
        if exists and not params["force"]:
            return {
                "changed": False,
                "dest": dest,
                "msg": "%s exists; not replaced (force: false)" % dest,
                "diff": {"before": before, "after": before},
            }
        redactor = Redactor(params.get("extra_secret_keys"), params.get("extra_secrets"))
        collector = Collector(params, redactor, now)
        collector.collect_paths()
        docker_versions = collector.collect_docker()
        collector.finish(docker_versions)
        top = top_directory(dest)
        member_names = ["%s/%s" % (top, name.lstrip("/")) for name in sorted(collector.members)]
        result = {
            "changed": True,
            "dest": dest,
            "members": member_names,
            "collected_files": collector.collected_files,
            "skipped": collector.skipped,
            "certificates": collector.tls_files,
            "containers": collector.containers,
            "redactions": redactor.count,
            "notes": collector.notes,
            "diff": {"before": before, "after": {"dest": dest, "exists": True, "members": member_names}},
        }
        if check_mode:
            result["msg"] = "would write %s with %d members" % (dest, len(member_names))
            return result
        result["size"] = write_archive(dest, collector.members, mode, now)
        result["msg"] = "wrote %s (%d members, %d redactions)" % (dest, len(member_names), redactor.count)
        return result
    except BundleError as exc:
        return {"failed": True, "changed": False, "msg": str(exc)}

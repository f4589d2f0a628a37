"""render-patroni.py SOURCE TARGET: Patroni's configuration with the passwords of /secrets.

SOURCE (written by the gatehouse.access.database module) holds no secret; the superuser and
replication passwords are read from /secrets/superuser.password and
/secrets/replication.password (first line) and TARGET is written with mode 0600, on the tmpfs
/run of the container, so the passwords are never in the environment, on a command line or in
the output.
"""

import os
import sys

import yaml

SECRETS = "/secrets"


def secret(name: str) -> str:
    with open(os.path.join(SECRETS, name + ".password"), encoding="utf-8") as handle:
        value = handle.readline().rstrip("\r\n")
    if not value:
        sys.exit(f"gatehouse-database: {SECRETS}/{name}.password is empty")
    return value


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    authentication = config.setdefault("postgresql", {}).setdefault("authentication", {})
    for role in ("superuser", "replication"):
        authentication.setdefault(role, {})["password"] = secret(role)
    fd = os.open(target + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, default_flow_style=False)
    os.replace(target + ".tmp", target)


if __name__ == "__main__":
    main()

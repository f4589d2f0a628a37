"""The real PCoIP agent's message format, from the fixtures in ``tests/fixtures/pcoip-agent``.

``shape()`` reduces a message to its element paths and attributes (values dropped): two messages
of the same format have the same shape. The contract tests and the strict real-format agent
fixture of the security tests both hold messages to it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pcoip-agent"
REQUEST = (FIXTURES / "launch-session.xml").read_bytes()
ANSWER = (FIXTURES / "launch-session-resp.xml").read_bytes()
REFUSAL = (FIXTURES / "launch-session-resp-failed.xml").read_bytes()

Shape = set[tuple[str, tuple[tuple[str, str], ...]]]


def shape(body: bytes) -> Shape:
    """Every element as (path, its attributes); the envelope's own attributes are left out."""
    root = ET.fromstring(body)
    out: Shape = set()

    def walk(el: ET.Element, path: str) -> None:
        here = f"{path}/{el.tag}"
        out.add((here, tuple(sorted(el.attrib.items())) if el is not root else ()))
        for child in el:
            walk(child, here)

    walk(root, "")
    return out

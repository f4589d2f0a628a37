"""The hardened stack itself: a legitimate session works and no secret reaches a log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pki as pkimod
import pytest
import stack as hardened


@pytest.fixture(scope="module")
def st(pki: pkimod.TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hardened.Stack]:
    s = hardened.build(pki, Path(tmp_path_factory.mktemp("baseline")))
    yield s
    s.stop()


async def test_a_legitimate_session_through_the_hardened_stack(st: hardened.Stack) -> None:
    hardened.assert_session_ok(await st.session())
    st.assert_no_secrets_logged()

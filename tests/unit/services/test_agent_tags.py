"""The agent's session-tags: issued fresh, accepted once, within their time to live."""

from __future__ import annotations

from gatehouse.agent.tags import TagStore


def test_tag_is_accepted_once() -> None:
    store = TagStore(ttl=60)
    tag = store.issue("sid-1", "198.51.100.7", now=0)
    issued = store.consume(tag, now=1)
    assert issued is not None and issued.session_id == "sid-1"
    assert store.consume(tag, now=2) is None


def test_tags_are_fresh_and_long() -> None:
    store = TagStore(ttl=60)
    tags = {store.issue("sid", "ip", now=0) for _i in range(100)}
    assert len(tags) == 100
    assert all(len(tag) >= 40 for tag in tags)


def test_unknown_and_expired_tags_are_refused() -> None:
    store = TagStore(ttl=60)
    assert store.consume("nope", now=0) is None
    tag = store.issue("sid", "ip", now=0)
    assert store.consume(tag, now=61) is None


def test_expired_tags_are_pruned() -> None:
    store = TagStore(ttl=10)
    for _tag in range(5):
        store.issue("sid", "ip", now=0)
    assert len(store) == 5
    store.issue("sid", "ip", now=100)
    assert len(store) == 1

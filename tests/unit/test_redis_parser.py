"""The broker's and the limiter's Redis replies are parsed in C (issue #11: CPU per job, distributed).

Without the ``hiredis`` package redis-py reads every reply in Python (a buffer object, a line at
a time, an int parsed per length prefix) and packs every command in Python too: about 600 of a
distributed job's Python calls, for the ten-odd round trips its two tasks make to the broker
(receive, the unacked record, the ack, the hand-off) and the limiter. With it installed, redis-py
picks its C parser and packer by itself; nothing else changes. No Redis is reached here: the
connections are built, never connected.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport.redis import Channel
from redis._parsers import _HiredisParser

from worker.limits import _client


def test_the_limiters_replies_are_parsed_in_c() -> None:
    pool = _client("redis://127.0.0.1:1/0").connection_pool
    connection = pool.make_connection()
    assert isinstance(connection._parser, _HiredisParser)


def test_the_brokers_replies_are_parsed_in_c() -> None:
    # kombu's Redis transport builds its connections from this class, with no parser of its own
    classes: tuple[Any, ...] = (Channel.connection_class, Channel.connection_class_ssl)
    for connection_class in classes:
        connection = connection_class(host="127.0.0.1", port=1)
        assert isinstance(connection._parser, _HiredisParser), connection_class


def test_commands_are_packed_in_c() -> None:
    connection: Any = redis.Connection(host="127.0.0.1", port=1)
    assert type(connection._command_packer).__name__ == "HiredisRespSerializer"

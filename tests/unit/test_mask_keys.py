"""Client masking keys: from os.urandom, without a system call per frame."""

from __future__ import annotations

import os

import pytest

from podterm.net import wsconn
from podterm.net.wsconn import UrandomMaskKeys


def test_keys_are_four_bytes_of_urandom_drawn_a_kilokey_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        draws.append(n)
        return real(n)

    monkeypatch.setattr(wsconn.os, "urandom", counted)
    keys = UrandomMaskKeys()
    assert draws == []  # nothing drawn before the first frame
    got = [keys() for _ in range(2 * UrandomMaskKeys.DRAW // 4 + 1)]
    assert all(type(k) is bytes and len(k) == 4 for k in got)
    assert draws == [UrandomMaskKeys.DRAW] * 3  # 1,024 keys per draw
    # Each key is the next 4 bytes of what was drawn: no key is handed out twice.
    assert len(set(got)) > len(got) * 0.99


def test_each_connection_has_its_own_keys() -> None:
    a, b = UrandomMaskKeys(), UrandomMaskKeys()
    assert [a() for _ in range(8)] != [b() for _ in range(8)]

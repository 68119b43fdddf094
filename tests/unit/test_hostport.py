from __future__ import annotations

import pytest

from podterm.net.hostport import join_host_port, split_host_port


@pytest.mark.parametrize(("text", "pair"), [
    ("127.0.0.1:7780", ("127.0.0.1", 7780)), ("[::1]:0", ("::1", 0)),
    ("gateway.example:443", ("gateway.example", 443)), ("[fd00::7]:65535", ("fd00::7", 65535)),
])
def test_split_and_join_round_trip(text: str, pair: tuple[str, int]) -> None:
    assert split_host_port(text) == pair
    assert join_host_port(*pair) == text


@pytest.mark.parametrize("text", ["7780", ":7780", "host:", "host:x1", "::1:7780", "host:-1"])
def test_split_refuses_what_is_not_host_port(text: str) -> None:
    with pytest.raises(ValueError, match="not HOST:PORT"):
        split_host_port(text)

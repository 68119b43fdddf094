"""Type stub for the compiled ``podterm._native.frame`` (built from ``native/frame.pyx``).

Same public names and signatures as the pure-Python twin :mod:`podterm.protocol.frame`.
"""

from typing import Final

from podterm.protocol._types import Buffer

OP_CONT: Final[int]
OP_TEXT: Final[int]
OP_BINARY: Final[int]
OP_CLOSE: Final[int]
OP_PING: Final[int]
OP_PONG: Final[int]

DEFAULT_MAX_FRAME_BYTES: Final[int]
DEFAULT_MAX_MESSAGE_BYTES: Final[int]
MAX_CONTROL_PAYLOAD: Final[int]

E_RSV: Final[str]
E_OPCODE: Final[str]
E_FRAG_CONTROL: Final[str]
E_UNEXPECTED_CONT: Final[str]
E_EXPECTED_CONT: Final[str]
E_UNMASKED: Final[str]
E_MASKED: Final[str]
E_CONTROL_LONG: Final[str]
E_LEN_MSB: Final[str]
E_FRAME_BIG: Final[str]
E_MESSAGE_BIG: Final[str]
E_CLOSE_1: Final[str]
E_TEXT_UTF8: Final[str]
E_CLOSE_CODE: Final[str]
E_CLOSE_UTF8: Final[str]

def is_valid_close_code(code: int) -> bool: ...
def parse_close_payload(payload: Buffer) -> tuple[int, str]: ...
def encode_close_payload(code: int, reason: str = "") -> bytes: ...
def encode_frame(
    opcode: int, payload: Buffer = b"", *, fin: bool = True, mask_key: bytes | None = None
) -> bytes: ...
def encode_message(
    prefix: Buffer, payload: Buffer, *, opcode: int = 2, mask_key: bytes | None = None
) -> bytes: ...

class FrameReader:
    """Incremental RFC 6455 frame parser; contract in :mod:`podterm.protocol.frame`."""

    is_server: bool
    max_frame_bytes: int
    max_message_bytes: int

    def __init__(
        self,
        *,
        is_server: bool,
        max_frame_bytes: int = ...,
        max_message_bytes: int = ...,
    ) -> None: ...
    @property
    def buffered(self) -> int: ...
    def feed(self, data: Buffer) -> list[tuple[int, bytes]]: ...

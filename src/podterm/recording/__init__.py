"""Session recordings: asciicast v2 files, written off the event loop, played by ``podterm replay``."""

from podterm.recording.asciicast import (
    CastEncoder,
    CastFormatError,
    Event,
    Header,
    encode_event,
    parse,
    parse_header,
)
from podterm.recording.recorder import CastRecord, Recorder, RecorderStatistics, RecordingFailed
from podterm.recording.writer import RecordingWriter, RecordingWriterStatistics, cast_path

__all__ = [
    "CastEncoder", "CastFormatError", "Event", "Header", "encode_event", "parse", "parse_header",
    "CastRecord", "Recorder", "RecorderStatistics", "RecordingFailed",
    "RecordingWriter", "RecordingWriterStatistics", "cast_path",
]

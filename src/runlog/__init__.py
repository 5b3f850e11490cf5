"""Run log: bluesky-shaped JSON documents plus frames in a Zarr v3 store."""

from stemagent.runlog.reader import RunLog
from stemagent.runlog.writer import LOG_FORMAT_VERSION, STREAMS, RunLogWriter

__all__ = ["LOG_FORMAT_VERSION", "RunLog", "RunLogWriter", "STREAMS"]

"""The executor: plan, cache, progress, cancel, device and model memory. No Qt."""

from .executor import (
    CACHED_DISK,
    CACHED_MEMORY,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    SKIPPED,
    Cancelled,
    EngineEvents,
    Executor,
    RunReport,
)

__all__ = ["CACHED_DISK", "CACHED_MEMORY", "DONE", "FAILED", "QUEUED", "RUNNING", "SKIPPED",
           "Cancelled", "EngineEvents", "Executor", "RunReport"]

"""The execution log: recording executions off the hot path, and listing them."""

from ductape_processor.runtime.logs.queries import ExecutionPage, ExecutionQueries
from ductape_processor.runtime.logs.recorder import ExecutionRecorder
from ductape_processor.store.base import ExecutionRecord

__all__ = ["ExecutionPage", "ExecutionQueries", "ExecutionRecord", "ExecutionRecorder"]

"""The execution log's statuses are the API's: a record's status goes into `Execution.status` as it is."""

from __future__ import annotations

from ductape.processor.v1 import log_pb2

from ductape_processor.store.base import ExecutionStatus


def test_each_execution_status_has_the_value_of_the_api_enum_member_of_its_name() -> None:
    api = {name.removeprefix("EXECUTION_STATUS_"): number for name, number in log_pb2.ExecutionStatus.items() if number}
    assert {status.name: status.value for status in ExecutionStatus} == api

"""The stored statuses are the API's: a record's status goes into its message as it is (the execution log's, feature
runs' and their calls')."""

from __future__ import annotations

from ductape.processor.v1 import feature_pb2, log_pb2

from ductape_processor.store.base import ExecutionStatus
from ductape_processor.store.feature_records import FeatureRunStatus, StepStatus


def test_each_execution_status_has_the_value_of_the_api_enum_member_of_its_name() -> None:
    api = {name.removeprefix("EXECUTION_STATUS_"): number for name, number in log_pb2.ExecutionStatus.items() if number}
    assert {status.name: status.value for status in ExecutionStatus} == api


def test_feature_run_and_step_statuses_have_the_values_of_the_api_enums() -> None:
    runs = {n.removeprefix("FEATURE_RUN_STATUS_"): v for n, v in feature_pb2.FeatureRunStatus.items() if v}
    steps = {n.removeprefix("FEATURE_STEP_STATUS_"): v for n, v in feature_pb2.FeatureStepStatus.items() if v}
    assert {status.name: status.value for status in FeatureRunStatus} == runs
    assert {status.name: status.value for status in StepStatus} == steps

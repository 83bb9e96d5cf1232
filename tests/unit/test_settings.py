"""The settings model refuses what would break a service later, with a message naming the fix."""

import pytest
from pydantic import ValidationError

from postback_libs.settings import MAX_RETRY_DELAY_SECONDS, Settings

pytestmark = pytest.mark.unit


def test_a_retry_schedule_of_seconds_within_bounds_is_taken():
    settings = Settings(retry_schedule=f"0, 5, 300,{MAX_RETRY_DELAY_SECONDS}")
    assert settings.retry_delays == [0, 5, 300, MAX_RETRY_DELAY_SECONDS]


@pytest.mark.parametrize("schedule", ["", "soon", "0,-5", "0,1e12", "nan", "inf"])
def test_a_retry_schedule_out_of_bounds_is_refused(schedule):
    with pytest.raises(ValidationError, match="retry_schedule"):
        Settings(retry_schedule=schedule)

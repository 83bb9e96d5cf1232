"""The settings model refuses what would break a service later, with a message naming the fix."""

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from postback_libs.settings import (
    MAX_RETRY_DELAY_SECONDS,
    MIN_SECRET_KEY_CHARS,
    ConfigurationError,
    Settings,
)

pytestmark = pytest.mark.unit


def test_a_retry_schedule_of_seconds_within_bounds_is_taken():
    settings = Settings(retry_schedule=f"0, 5, 300,{MAX_RETRY_DELAY_SECONDS}")
    assert settings.retry_delays == [0, 5, 300, MAX_RETRY_DELAY_SECONDS]


@pytest.mark.parametrize("schedule", ["", "soon", "0,-5", "0,1e12", "nan", "inf"])
def test_a_retry_schedule_out_of_bounds_is_refused(schedule):
    with pytest.raises(ValidationError, match="retry_schedule"):
        Settings(retry_schedule=schedule)


def test_there_is_no_default_master_key() -> None:
    """A key everyone knows would let anyone sign requests and callbacks as Postback."""
    for key in ("", "x" * (MIN_SECRET_KEY_CHARS - 1)):
        with pytest.raises(ConfigurationError, match="POSTBACK_SECRET_KEY"):
            Settings(secret_key=key).master_key()  # type: ignore[arg-type]
    key = "k" * MIN_SECRET_KEY_CHARS
    assert Settings(secret_key=key).master_key() == key.encode()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"POSTBACK_HTTP_PORT": "eighty"}, "POSTBACK_HTTP_PORT: Input should be a valid integer"),
        ({"POSTBACK_SECRET_KEY": "short"}, "POSTBACK_SECRET_KEY must be set"),
    ],
)
def test_a_service_with_bad_configuration_says_what_to_fix(env: dict[str, str], says: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    result = subprocess.run(
        [sys.executable, "-m", "postback", "run", "ingress"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"invalid configuration: {says}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_service_that_cannot_reach_its_database_says_so_in_one_line() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    result = subprocess.run(
        [sys.executable, "-m", "postback", "run", "routing"],
        env={**clean, "POSTBACK_DATABASE_URL": "postgresql://postback@127.0.0.1:1/postback"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [line] = [json.loads(x) for x in result.stdout.splitlines() if "could not start" in x]
    assert "POSTBACK_DATABASE_URL" in line["step"] and line["service"] == "routing"
    assert "Traceback" not in result.stderr + result.stdout


def test_an_operator_command_that_cannot_reach_the_database_names_the_setting() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    result = subprocess.run(
        [sys.executable, "-m", "postback", "migrate"],
        env={**clean, "POSTBACK_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/postback"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "could not reach the database at postgresql://u@127.0.0.1:1/postback" in result.stderr
    assert "POSTBACK_DATABASE_URL" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr

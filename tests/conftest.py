from __future__ import annotations

import os

import pytest
from helpers import INPUT_KINDS
from hypothesis import settings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(params=INPUT_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)

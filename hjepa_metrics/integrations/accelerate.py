"""A Hugging Face Accelerate tracker that writes through hjepa-metrics' writers.

    tracker = HJEPAMetricsTracker("vit-s", config={"backends": ["mlflow", "jsonl"], "log_dir": "runs/vit-s"})
    accelerator = Accelerator(log_with=tracker)
    accelerator.init_trackers("hjepa", config={"lr": 1e-3})
    accelerator.log({"train/loss/total": loss}, step=step)

``accelerator.get_tracker("hjepa_metrics", unwrap=True)`` is the writer; an ``HJEPAMetricsLogger`` over it
(``HJEPAMetricsLogger(tracker.writer)``) logs the guide's metrics into the same run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from writers import Writer, build_writers

try:
    from accelerate.tracking import GeneralTracker, on_main_process
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'the Accelerate tracker needs accelerate: pip install "hjepa-metrics[accelerate]"'
    ) from exc


class HJEPAMetricsTracker(GeneralTracker):  # type: ignore[misc]
    """``GeneralTracker`` over ``build_writers(config)``; numbers and 0-d tensors are logged, other values
    (strings, lists) are skipped, as Accelerate's own trackers do."""

    name = "hjepa_metrics"
    requires_logging_directory = False

    @on_main_process  # type: ignore[misc,untyped-decorator]
    def __init__(
        self, run_name: str, config: Mapping[str, Any] | str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__()
        self.run_name = run_name
        self._config = config
        self.writer: Writer | None = None
        self._step = 0

    @on_main_process  # type: ignore[misc,untyped-decorator]
    def start(self) -> None:
        if self.writer is None:
            config = self._config if self._config is not None else {"experiment_name": self.run_name}
            self.writer = build_writers(config)

    @property
    def tracker(self) -> Writer | None:
        return self.writer

    @on_main_process  # type: ignore[misc,untyped-decorator]
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.start()
        assert self.writer is not None
        self.writer.log_config(values)

    @on_main_process  # type: ignore[misc,untyped-decorator]
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.start()
        assert self.writer is not None
        self._step = self._step if step is None else int(step)
        scalars = {}
        for key, value in values.items():
            if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[key] = float(value)
            elif isinstance(value, bool):
                scalars[key] = 1.0 if value else 0.0
        if scalars:
            self.writer.log_scalars(scalars, self._step)

    @on_main_process  # type: ignore[misc,untyped-decorator]
    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()

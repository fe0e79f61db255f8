"""A Hugging Face Accelerate tracker that writes through hjepa-metrics' writers.

    tracker = HJEPAMetricsTracker("vit-s", config={"backends": ["mlflow", "jsonl"], "log_dir": "runs/vit-s"})
    accelerator = Accelerator(log_with=tracker)
    accelerator.init_trackers("hjepa", config={"lr": 1e-3})
    logger = HJEPAMetricsLogger(tracker.writer)  # on every process: the guide's metrics, same run
    accelerator.log({"train/loss/total": loss}, step=step)

The tracker can be built before or after ``Accelerator(...)``: building it touches none of Accelerate's
state (``PartialState`` is left for the Accelerator to set up from ``accelerate launch``). Only the main
process opens writers; :attr:`HJEPAMetricsTracker.writer` is a writer that writes nothing on the others
(and before ``init_trackers``), so the logger can be built on every process, where its values are
reduced over the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from writers import Writer, build_writers
from writers.base import NullWriter

try:
    from accelerate.tracking import GeneralTracker
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'the Accelerate tracker needs accelerate: pip install "hjepa-metrics[accelerate]"'
    ) from exc


class HJEPAMetricsTracker(GeneralTracker):  # type: ignore[misc]
    """``GeneralTracker`` over ``build_writers(config)``; numbers and 0-d tensors are logged, other values
    (strings, lists) are skipped, as Accelerate's own trackers do. Accelerate calls it on the main
    process only; called on another process, it writes nothing (``build_writers`` gives a
    :class:`~writers.base.NullWriter` there)."""

    name = "hjepa_metrics"
    requires_logging_directory = False
    main_process_only = True

    def __init__(
        self, run_name: str, config: Mapping[str, Any] | str | os.PathLike[str] | None = None
    ) -> None:
        # no @on_main_process here: it would create Accelerate's PartialState with defaults before
        # the Accelerator exists, and every process of `accelerate launch` would think it is alone
        super().__init__()
        self.run_name = run_name
        self._config = config
        self.writer: Writer = NullWriter(self.name)
        self._started = False
        self._step = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            config = self._config if self._config is not None else {"experiment_name": self.run_name}
            self.writer = build_writers(config)

    @property
    def tracker(self) -> Writer:
        return self.writer

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self.start()
        self.writer.log_config(values)

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.start()
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

    def finish(self) -> None:
        self.writer.close()

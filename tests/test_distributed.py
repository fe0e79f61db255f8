"""Two processes on gloo: only rank 0 writes, and whole-batch metrics equal the single-process result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

import hjepa_metrics as hm
from writers import read_jsonl

WORLD = 2


def _data() -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        "features": [torch.randn(300 + 57 * r, 16, generator=gen) for r in range(WORLD)],
        "preds": [[torch.randn(4, n, 8, generator=gen) for n in (8, 4, 2)] for _ in range(WORLD)],
        "targs": [[torch.randn(4, n, 8, generator=gen) for n in (8, 4, 2)] for _ in range(WORLD)],
        "masks": [torch.rand(4 + 2 * r, 3, 16, generator=gen) > 0.6 for r in range(WORLD)],
        # level 2 of rank 0 collapsed to zeros, rank 1's all above 1: the global min is rank 0's 0
        "hier": [
            [
                torch.randn(3 + r, 8, 8, generator=gen),
                torch.randn(3 + r, 4, 8, generator=gen),
                torch.zeros(3, 2, 8) if r == 0 else 1 + torch.rand(4, 2, 8, generator=gen),
            ]
            for r in range(WORLD)
        ],
    }


def _worker(rank: int, port: int, log_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data = _data()
        config = {"log_dir": f"{log_dir}/rank{rank}", "backends": ["jsonl"]}
        with hm.HJEPAMetricsLogger(config=config, num_hierarchies=3) as logger:
            logger.log_collapse_metrics(data["features"][rank], level=0, global_step=1)
            logger.log_prediction_quality(data["preds"][rank], data["targs"][rank], global_step=1)
            logger.log_masking_statistics(data["masks"][rank], global_step=1)
            logger.log_hierarchy_feature_stats(data["hier"][rank], global_step=1)
            val = logger.validation()
            val.update(data["preds"][rank], data["targs"][rank], features=data["features"][rank])
            val.log(global_step=2)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_reduce_to_the_single_process_result(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert not (tmp_path / "rank1").exists()  # rank 1 built no writer at all
    records = [r for r in read_jsonl(tmp_path / "rank0") if "metrics" in r]
    logged = {k: v for r in records if r["step"] == 1 for k, v in r["metrics"].items()}
    val = {k: v for r in records if r["step"] == 2 for k, v in r["metrics"].items()}

    data = _data()
    features = torch.cat(data["features"])
    preds = [torch.cat([data["preds"][r][lvl] for r in range(WORLD)]) for lvl in range(3)]
    targs = [torch.cat([data["targs"][r][lvl] for r in range(WORLD)]) for lvl in range(3)]
    hier = [torch.cat([data["hier"][r][lvl] for r in range(WORLD)]) for lvl in range(3)]
    want = {
        **hm.hierarchy_feature_stats(hier),
        **hm.collapse_metrics(features),
        **hm.prediction_quality(preds, targs),
        **hm.masking_statistics(torch.cat(data["masks"])),
    }
    for key, value in want.items():
        if key.endswith("max_similarity"):
            continue  # a seeded sample of rows: merged across ranks, not the same draw
        # hierarchy sums float32 features pairwise in float32 (no float64 copy): ~1e-7 relative
        rel = 1e-6 if key.startswith("hierarchy/") else 1e-9
        assert logged["train/" + key] == pytest.approx(value, rel=rel, abs=1e-12), key
        if key.startswith(("collapse/", "prediction/")):
            assert val["val/" + key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for level, x in enumerate(hier):  # float64 brute force
        x64 = x.double().numpy()
        assert logged[f"train/hierarchy/level{level}_feat_range"] == pytest.approx(x64.max() - x64.min())
        assert logged[f"train/hierarchy/level{level}_feat_std"] == pytest.approx(x64.std(ddof=1), rel=1e-6)
    exact_max = hm.collapse_metrics(features, max_similarity_rows=len(features))[
        "collapse/level0_max_similarity"
    ]
    assert logged["train/collapse/level0_max_similarity"] <= exact_max + 1e-12


def _alert_worker(rank: int, port: int, log_dir: str) -> None:
    import json
    import logging

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    printed: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: printed.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hjepa_metrics.alerts").addHandler(handler)
    try:
        called: list[str] = []
        config = {"log_dir": f"{log_dir}/rank{rank}", "backends": ["jsonl"]}
        with hm.HJEPAMetricsLogger(config=config, on_alert=lambda a: called.append(a.tag)) as logger:
            logger.log_gradient_clipping(5.0, 1.0, clip_threshold=1.0, global_step=1)  # 100 % clipped
            fired = [a.tag for a in logger.alerts]
        with open(f"{log_dir}/alerts{rank}.json", "w", encoding="utf-8") as f:
            json.dump({"printed": printed, "called": called, "fired": fired}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_an_alert_is_printed_once_and_reaches_every_ranks_callback(tmp_path: Path) -> None:
    import json

    mp.spawn(_alert_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    seen = [json.loads((tmp_path / f"alerts{r}.json").read_text(encoding="utf-8")) for r in range(WORLD)]
    tag = "train/gradient/clipping_percentage"
    for rank in range(WORLD):  # every rank stops alike if the callback stops training
        assert seen[rank]["called"] == seen[rank]["fired"] == [tag]
    (printed,) = seen[0]["printed"]
    assert printed.startswith(f"alert: {tag} = 100 at step 1")
    assert seen[1]["printed"] == []

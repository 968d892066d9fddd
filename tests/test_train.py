"""Training: a tiny U-Net learns on CPU, checkpoints resume, stop signals save, two processes agree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from pipeline.model.checkpoint import load_model, read_checkpoint
from pipeline.stages import train
from pipeline.training.signals import EXIT_REQUEUE
from tests.builders import make_config, write_dataset

TINY = {"model": {"base_channels": 4, "depth": 2}, "batch_size": 8, "workers": 0, "learning_rate": 0.01,
        "mixed_precision": False}


def config_for(root, **training):
    return make_config(root, training={**TINY, **training})


def write_config_file(root, **training) -> str:
    data = {"tile_id": "32TNS", "paths": {"dataset": "dataset", "results": "results"},
            "training": {"enable": True, **TINY, **training}}
    path = root / "pipeline-config.yml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def history(root) -> list[dict]:
    return json.loads((root / "results" / "training" / "history.json").read_text())


def test_a_tiny_unet_learns_and_writes_checkpoints_history_and_curves(tmp_path):
    write_dataset(tmp_path / "dataset")
    report = train.run(config_for(tmp_path, epochs=6))
    assert report.count("done") == 1
    records = history(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert set(records[0]["val_metrics"]) == {"iou", "dice", "precision", "recall", "accuracy"}
    assert all(0 <= v <= 1 for v in records[-1]["val_metrics"]["accuracy"].values())  # never 1.0002
    folder = tmp_path / "results" / "training"
    assert {"last.pt", "best.pt", "history.json", "loss.png", "iou.png"} <= {p.name for p in folder.iterdir()}
    model, state = load_model(folder / "best.pt")
    assert state["channels"][-1] == "DEM" and state["spec"]["in_channels"] == 14
    assert model(torch.zeros(1, 14, 32, 32)).shape == (1, 4, 32, 32)


def test_training_resumes_from_last_and_continues_the_epoch_count(tmp_path):
    write_dataset(tmp_path / "dataset")
    train.run(config_for(tmp_path, epochs=2))
    first = read_checkpoint(tmp_path / "results" / "training" / "last.pt")
    assert first["epoch"] == 2 and not first["progress"]["finished"]  # not stopped early
    assert train.run(config_for(tmp_path, epochs=2)).count("skipped") == 1
    report = train.run(config_for(tmp_path, epochs=4))  # more epochs: resume, not restart
    assert report.count("done") == 1
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2, 3, 4]
    assert read_checkpoint(tmp_path / "results" / "training" / "last.pt")["epoch"] == 4
    train.run(config_for(tmp_path, epochs=4, learning_rate=0.02))  # another config: a new training
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2, 3, 4]
    assert history(tmp_path)[0]["lr"] == 0.02
    (kept,) = (tmp_path / "results" / "training").glob("previous-*")  # the first model is moved aside, not lost
    assert read_checkpoint(kept / "best.pt")["history"][0]["lr"] == 0.01


def test_sigusr1_saves_last_and_exits_with_the_requeue_code(tmp_path):
    write_dataset(tmp_path / "dataset", train=160, validation=8)
    config = write_config_file(tmp_path, epochs=500, batch_size=4)
    job = subprocess.Popen([sys.executable, "-m", "pipeline", "stage", "train", config],
                           stderr=subprocess.PIPE, text=True)
    history_file = tmp_path / "results" / "training" / "history.json"
    deadline = time.monotonic() + 120
    while not history_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # SLURM: --signal=B:USR1@300 before the time limit
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == EXIT_REQUEUE, stderr
    assert "stopped by SIGUSR1" in stderr and "Traceback" not in stderr
    saved = read_checkpoint(tmp_path / "results" / "training" / "last.pt")
    assert saved["epoch"] >= 1 and not saved["progress"]["finished"]
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "stage", "train", write_config_file(
        tmp_path, epochs=saved["epoch"] + 1, batch_size=4)], capture_output=True, text=True)
    assert resumed.returncode == 0 and f"resuming after epoch {saved['epoch']}" in resumed.stderr


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    for root in (single, double):
        write_dataset(root / "dataset", train=40, validation=10)
    subprocess.run([sys.executable, "-m", "pipeline", "stage", "train", write_config_file(single, epochs=2)],
                   check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", "-m", "pipeline", "stage", "train",
                             write_config_file(double, epochs=2)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stderr
    one, two = history(single), history(double)
    assert [r["steps"] for r in two] == [r["steps"] for r in one] == [5, 5]  # 40 patches, global batch 8
    assert len(two) == 2 and np.isfinite(two[-1]["val_loss"])
    checkpoints = sorted(p.name for p in (double / "results" / "training").glob("*.pt"))
    assert checkpoints == ["best.pt", "last.pt"]  # written once, by rank 0
    event_files = list((double / "results" / "training" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1  # TensorBoard too: rank 0 only
    # Validation covers the whole set exactly once across both processes.
    assert two[-1]["val_pixels"] == one[-1]["val_pixels"] == 10 * 32 * 32

"""The training recipe's choices: each loss learns and ignores unlabelled pixels, best.pt is the epoch with
the best selection score, the cosine schedule warms up and decays, and a recipe resumes like any other."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import get_args

import pytest
import torch

from pipeline.bands import CLASS_NAMES
from pipeline.config import SelectBy
from pipeline.model.checkpoint import read_checkpoint
from pipeline.stages import train
from pipeline.training.data import IGNORE
from pipeline.training.loop import best_epoch
from pipeline.training.losses import LOSSES, segmentation_loss
from pipeline.training.selection import make_scheduler, selection_score
from tests.builders import write_dataset
from tests.test_train import config_for, history, write_config_file


def rare_class_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 16 px patches: mostly snow, a small lake (class 3), and an unlabelled corner."""
    target = torch.ones(2, 16, 16, dtype=torch.long)
    target[:, 4:7, 4:7] = 3
    target[:, :, :3] = 0
    target[0, 12:, 12:] = IGNORE
    torch.manual_seed(0)
    return torch.randn(2, 3, 16, 16), target


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_is_finite_and_falls_while_a_small_network_learns_a_lake(name):
    x, target = rare_class_batch()
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    weights = torch.tensor([1.0, 0.5, 1.0, 4.0])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        loss = segmentation_loss(name, net(x), target, weights, IGNORE)
        assert torch.isfinite(loss) and loss.ndim == 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    predicted = net(x).argmax(1)
    assert (predicted[target == 3] == 3).float().mean() > 0.5  # the rare class is learnt, not drowned


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_ignores_unlabelled_pixels(name):
    """Whatever the network says where there is no label, the loss and its gradient there are unchanged."""
    _, target = rare_class_batch()
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = segmentation_loss(name, logits, target, None, IGNORE)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[0, :, 12:, 12:] == 0)
    changed = logits.detach().clone()
    changed[0, :, 12:, 12:] = 100 * torch.randn(4, 4, 4)
    assert segmentation_loss(name, changed, target, None, IGNORE).item() == pytest.approx(loss.item(), rel=1e-6)
    every_pixel_ignored = torch.full_like(target, IGNORE)
    assert torch.isfinite(segmentation_loss(name, logits, every_pixel_ignored, None, IGNORE))


def test_validation_sums_match_the_mean_over_a_batch():
    """Validation adds `sum` losses over batches and divides by the summed pixel weights."""
    logits, target = torch.randn(2, 4, 16, 16), rare_class_batch()[1]
    weights = torch.tensor([1.0, 0.5, 1.0, 4.0])
    valid = target != IGNORE
    for name in LOSSES:
        summed = segmentation_loss(name, logits, target, weights, IGNORE, reduction="sum")
        mean = segmentation_loss(name, logits, target, weights, IGNORE)
        assert (summed / weights[target[valid]].sum()).item() == pytest.approx(mean.item(), rel=1e-5), name


def test_the_selection_score_is_higher_for_better_epochs():
    metrics = {"iou": {"background": 0.9, "snow": 0.8, "clouds": None, "water": 0.4}}
    assert selection_score("mean_iou", 0.3, metrics) == pytest.approx(0.7)  # classes absent from validation: left out
    assert selection_score("water_iou", 0.3, metrics) == pytest.approx(0.4)
    assert selection_score("val_loss", 0.3, metrics) > selection_score("val_loss", 0.4, metrics)
    assert selection_score("clouds_iou", 0.3, metrics) == -math.inf
    assert set(get_args(SelectBy)) == {f"{name}_iou" for name in CLASS_NAMES} | {"mean_iou", "val_loss"}


@pytest.mark.parametrize("select_by", ["mean_iou", "water_iou", "val_loss"])
def test_best_pt_is_the_epoch_with_the_best_selection_score(tmp_path, select_by):
    write_dataset(tmp_path / "dataset")
    train.run(config_for(tmp_path, epochs=6, select_by=select_by, learning_rate=0.05))
    records = history(tmp_path)

    def score(record):
        return selection_score(select_by, record["val_loss"], record["val_metrics"])

    chosen = max(records, key=lambda r: (score(r), -r["epoch"]))  # the first epoch reaching the best score
    assert best_epoch(records) == chosen["epoch"]
    assert read_checkpoint(tmp_path / "results" / "training" / "best.pt")["epoch"] == chosen["epoch"]
    assert sum(r["best"] for r in records) >= 1


def test_the_cosine_schedule_warms_up_then_decays_to_one_percent():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", epochs=10, warmup_epochs=2, factor=0.1, patience=1)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_a_cosine_training_with_dice_and_iou_selection_resumes_on_its_schedule(tmp_path):
    write_dataset(tmp_path / "dataset")
    recipe = {"loss": "cross_entropy_dice", "schedule": "cosine", "warmup_epochs": 1, "select_by": "mean_iou"}
    train.run(config_for(tmp_path, epochs=4, **recipe))
    straight = [r["lr"] for r in history(tmp_path)]
    assert straight[0] < straight[1] and straight[1] > straight[2] > straight[3]

    other = tmp_path / "again"
    write_dataset(other / "dataset")
    train.run(config_for(other, epochs=2, **recipe))
    assert train.run(config_for(other, epochs=4, **recipe)).count("done") == 1  # resumed for two more epochs
    assert [r["lr"] for r in history(other)] == pytest.approx(straight)


def test_the_same_seed_and_thread_count_give_the_same_model_whatever_the_loading_workers(tmp_path):
    """Reproducible for a seed and a thread count: the data order and augmentation are seeded per sample, so
    the number of data-loading processes changes nothing. (Another thread count changes the order of float
    sums inside torch's kernels: docs/model.md says by how much.)"""
    models = []
    for workers in (0, 2):
        root = tmp_path / f"workers{workers}"
        write_dataset(root / "dataset")
        config = write_config_file(root, epochs=2, workers=workers)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "pipeline", "stage", "train", config], env=env, check=True,
                       capture_output=True, timeout=300)
        models.append(read_checkpoint(root / "results" / "training" / "last.pt")["model"])
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])

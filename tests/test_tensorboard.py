"""TensorBoard events of a training: what `tensorboard --logdir results/training` shows a user, and that a
training killed and resumed shows each epoch once."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.stages import train
from tests.builders import write_dataset
from tests.test_training_faults import config_for, snowpipe_train, training, write_config_file


def events(root) -> EventAccumulator:
    board = EventAccumulator(str(training(root) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def steps(board: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in board.Scalars(tag)]


def test_each_epoch_shows_losses_iou_learning_rate_and_a_picture(tmp_path):
    write_dataset(tmp_path / "dataset", train=16, validation=4)
    train.run(config_for(tmp_path, epochs=3))
    board = events(tmp_path)
    tags = board.Tags()
    assert {"loss/train", "loss/validation", "learning_rate", "validation/pixel_accuracy"} <= set(tags["scalars"])
    assert any(tag.startswith("iou/") for tag in tags["scalars"])
    assert steps(board, "loss/validation") == [1, 2, 3]
    (picture, *_) = board.Images("validation/label_vs_prediction")
    assert picture.step == 1 and picture.width == 2 * 32 + 2  # label | prediction


def test_a_training_killed_after_its_events_and_resumed_shows_every_epoch_once(tmp_path):
    """SIGKILL after epoch 3's events were written but before its checkpoint: the next run redoes epoch 3."""
    write_dataset(tmp_path / "dataset", train=16, validation=4)
    config = write_config_file(tmp_path, epochs=4, tensorboard=True)
    killed = snowpipe_train(config, kill_at="wrote tensorboard events:3")
    assert killed.returncode == -9
    assert steps(events(tmp_path), "loss/train")[-1] == 3  # written, but last.pt still holds epoch 2
    resumed = snowpipe_train(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    board = events(tmp_path)
    assert steps(board, "loss/train") == steps(board, "iou/snow") == [1, 2, 3, 4]


def test_tensorboard_can_be_switched_off(tmp_path):
    write_dataset(tmp_path / "dataset", train=16, validation=4)
    train.run(config_for(tmp_path, epochs=1, tensorboard=False))
    assert not (training(tmp_path) / "tensorboard").exists()


@pytest.fixture(autouse=True)
def _quiet_tensorboard(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")

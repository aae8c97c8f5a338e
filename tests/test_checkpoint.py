"""d2norm.engine.checkpoint: damaged or foreign checkpoint files are named; --resume falls back past them."""
import logging
import os

import pytest
import torch
import torch.nn as nn

from d2norm.engine.checkpoint import Checkpointer, CheckpointError


def model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def periodic_checkpoints(save_dir, iterations=(1, 3)):
    """Checkpoints as detectron2's PeriodicCheckpointer writes them, from models seeded by iteration."""
    for iteration in iterations:
        Checkpointer(model(iteration), str(save_dir)).save(f"model_{iteration:07d}")


def assert_model_equal(a, b):
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"PK\x03\x04 half a zip"])
def test_unreadable_weights_file_is_named_in_the_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"Cannot read checkpoint file {path}: it is damaged") as info:
        Checkpointer(model(0)).load(str(path))
    assert "weights_only=False" not in str(info.value)  # torch's advice is wrong for a damaged file


def test_truncated_checkpoint_is_named_in_the_error(tmp_path):
    periodic_checkpoints(tmp_path, (1,))
    path = tmp_path / "model_0000001.pth"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=str(path)):
        Checkpointer(model(0)).load(str(path))


def test_foreign_torch_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "not_a_model.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=f"{path} holds no model state dict"):
        Checkpointer(model(0)).load(str(path))


def test_resume_falls_back_from_a_truncated_last_checkpoint_and_says_so(tmp_path, caplog):
    periodic_checkpoints(tmp_path)
    last = tmp_path / "model_0000003.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    restored = model(99)
    with caplog.at_level(logging.WARNING):
        Checkpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert_model_equal(model(1), restored)
    assert str(last) in caplog.text and "Resumed from" in caplog.text


def test_resume_with_a_binary_last_checkpoint_tag_uses_the_newest_checkpoint(tmp_path, caplog):
    periodic_checkpoints(tmp_path)
    tag = tmp_path / "last_checkpoint"
    tag.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match=f"{tag} is damaged"):
        Checkpointer(model(0), str(tmp_path)).get_checkpoint_file()
    restored = model(99)
    with caplog.at_level(logging.WARNING):
        Checkpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert_model_equal(model(3), restored)
    assert str(tag) in caplog.text


def test_resume_without_any_readable_checkpoint_is_an_error_naming_the_directory(tmp_path):
    periodic_checkpoints(tmp_path, (1,))
    (tmp_path / "model_0000001.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"no readable checkpoint in {tmp_path}"):
        Checkpointer(model(0), str(tmp_path)).resume_or_load("", resume=True)

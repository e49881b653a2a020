"""The checkpoint keys: `checkpoint.async` (a Python keyword, so the field is `async_`) and `checkpoint.timeout_s`."""

import pytest

from pretrain.ckpt_group import timeout_message
from pretrain.config import config_to_dict, load_config, save_config, validate
from pretrain.errors import UserError


def test_async_key_round_trips_under_its_yaml_name(tmp_path):
    cfg = load_config("configs/tiny-cpu.yaml", ["checkpoint.async=true", "checkpoint.timeout_s=90"])
    assert cfg.checkpoint.async_ is True and cfg.checkpoint.timeout_s == 90
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert "async: true" in (tmp_path / "c.yaml").read_text()
    assert load_config(str(tmp_path / "c.yaml"), []).checkpoint == cfg.checkpoint
    assert config_to_dict(cfg)["checkpoint.async"] is True
    assert load_config("configs/tiny-cpu.yaml", []).checkpoint.async_ is None  # decided by the device


@pytest.mark.parametrize("override, message", [
    ("checkpoint.async=sometimes", "checkpoint.async must be true or false or null"),
    ("checkpoint.asinc=true", "did you mean 'checkpoint.async'?"),
    ("checkpoint.timeout_s=0", "checkpoint.timeout_s must be >= 1"),
])
def test_bad_checkpoint_values_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        validate(load_config("configs/tiny-cpu.yaml", [override]), 1)


def test_a_timeout_names_the_size_and_a_timeout_that_fits():
    line = timeout_message(3, "sealing checkpoint step_000400", 600, 97_000_000_000, 1_500_000_000)
    assert line.startswith("rank 3: sealing checkpoint step_000400 did not finish within checkpoint.timeout_s=600s")
    assert "97.00 GB (1.50 GB written or read by this rank)" in line and "0.003 GB/s per rank" in line
    assert "raise checkpoint.timeout_s (e.g. to 1200, 1.50 GB at 50 MB/s)" in line

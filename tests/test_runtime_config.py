"""Command-line overrides: a `+key` that nothing reads is refused; `+group=option` is hydra's way to add a preset."""
import pytest
from hydra import compose, initialize_config_dir

from runtime.config import CONFIG_DIR, ConfigError, check_overrides, validate_config


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train_kd_qat", overrides=list(overrides))


def test_an_added_preset_of_a_config_group_is_accepted():
    overrides = ["+experiment=[quick,main_kd_qat]", "seed=1"]
    check_overrides(composed(*overrides), overrides)


def test_an_added_key_that_nothing_reads_is_refused_with_the_closest_key():
    with pytest.raises(ConfigError, match=r"\+train\.epoch: no such key; did you mean train\.epochs\?"):
        check_overrides(composed("+train.epoch=5"), ["+train.epoch=5"])


@pytest.mark.parametrize("overrides, line", [
    (["artifact=fast"], r"^artifact=fast: use auto, portable or kernels$"),
    (["artifact=kernels", "qat.backend=pt2e_x86"], r"^artifact=kernels chooses .* leave artifact=auto$"),
])
def test_an_artifact_setting_that_cannot_be_honoured_is_one_line(overrides, line):
    with pytest.raises(ConfigError, match=line):
        validate_config(composed(*overrides))
    validate_config(composed("artifact=auto", *overrides[1:]))  # control: the rest of the config is fine


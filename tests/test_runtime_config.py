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



def test_overwrite_removes_everything_the_earlier_run_left_artifact_included(tmp_path):
    from runtime.rundir import RunDirectory

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    left = ["config.yaml", "metrics.json", "log.jsonl", "student/last.pt", "model_int8.pt", "model_int8.json",
            "model_int8_kdqat_C.so"]
    for name in left:
        (run / name).write_text("earlier run")
    (run / "notes.txt").write_text("the user's")  # not the run's: kept
    cfg = composed("overwrite=true")
    owner = RunDirectory.open(run, cfg, resume=False)
    owner.write_config(cfg)
    owner.close()
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["config.yaml", "notes.txt"]
    assert (run / "config.yaml").read_text() != "earlier run"

"""`tools/quick_quantize.sh`: the workflow menu, driven non-interactively (and once through its prompts)."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
MENU = ROOT / "tools" / "quick_quantize.sh"
PYTHON = sys.executable  # the menu runs what KDQAT_PYTHON names (set in `menu` below)
TRICKY = "/tmp/my dir;rm -rf nothing/it's.pt"  # a space, a ';' and a quote: must reach the tool as one value
CHOICES = {  # choice -> the tool and the arguments it implies
    "train": ("train_kd_qat.py", ["mode=fp32"]),
    "static": ("quantize.py", ["method=static"]),
    "qat": ("quantize.py", ["method=qat"]),
    "kd_qat": ("quantize.py", ["method=kd_qat"]),
    "compare": ("quantize.py", ["method=compare"]),
    "search": ("search_qconfig.py", []),
    "evaluate": ("evaluate.py", []),
    "benchmark": ("benchmark.py", []),
}


def menu(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "KDQAT_CACHE": str(cwd / "cache"),
           "KDQAT_PYTHON": sys.executable}  # the interpreter running the tests, wherever its venv lives
    return subprocess.run(["bash", str(MENU), *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=300)


def printed_command(proc: subprocess.CompletedProcess) -> list[str]:
    """The argument vector a shell reads back from the 'command: ...' line."""
    line = next(line for line in proc.stdout.splitlines() if line.startswith("command: "))
    return shlex.split(line[len("command: "):])


def test_menu_script_parses_with_bash():
    assert subprocess.run(["bash", "-n", str(MENU)], capture_output=True).returncode == 0


@pytest.mark.parametrize("choice", list(CHOICES))
def test_dry_run_prints_the_direct_command_with_user_values_intact(choice, tmp_path):
    proc = menu(tmp_path, "--dry-run", choice, f"pretrained={TRICKY}", "train.epochs=2",
                "bench.points_sweep=[512,1024]")
    assert proc.returncode == 0, proc.stderr
    tool, implied = CHOICES[choice]
    hydra_quoted = "'" + TRICKY.replace("'", "\\'") + "'"  # hydra's grammar rejects a bare space or ';'
    assert printed_command(proc) == [PYTHON, str(ROOT / "tools" / tool), *implied, f"pretrained={hydra_quoted}",
                                     "train.epochs=2", "bench.points_sweep=[512,1024]"]
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_menu_numbers_name_the_same_workflows(tmp_path):
    for number, choice in enumerate(CHOICES, start=1):
        by_number = printed_command(menu(tmp_path, "--dry-run", str(number)))
        assert by_number == printed_command(menu(tmp_path, "--dry-run", choice))


def test_unknown_choice_fails_with_one_line_listing_the_choices(tmp_path):
    proc = menu(tmp_path, "--dry-run", "quantise")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: unknown choice 'quantise'; use 1-8 or one of: " + " ".join(CHOICES)]


def test_interactive_menu_asks_checkpoint_dataset_and_epochs(tmp_path):
    answers = f"compare\n{TRICKY}\nmodelnet40\n/data/model net\n7\n"
    proc = menu(tmp_path, "--dry-run", stdin=answers)
    assert proc.returncode == 0, proc.stderr
    defaults = OmegaConf.load(ROOT / "configs" / "train_kd_qat.yaml")  # shown as read from the config
    assert f"teacher {defaults.teacher.epochs} epochs, QAT {defaults.train.epochs} epochs" in proc.stderr
    assert printed_command(proc)[2:] == ["method=compare", "pretrained='" + TRICKY.replace("'", "\\'") + "'",
                                         "dataset=modelnet40", "dataset.root='/data/model net'", "train.epochs=7"]


def test_interactive_menu_keeps_the_defaults_on_empty_answers(tmp_path):
    proc = menu(tmp_path, "--dry-run", stdin="4\n\n\n\n")
    assert proc.returncode == 0, proc.stderr
    assert printed_command(proc)[1:] == [str(ROOT / "tools" / "quantize.py"), "method=kd_qat"]


@pytest.mark.slow
def test_non_interactive_run_executes_the_printed_command(tmp_path):
    import sys
    from models import create_model

    odd = tmp_path / "odd dir; x"  # the checkpoint and the run directory both need quoting
    odd.mkdir()
    torch.save({"model": create_model("pointnext-s", num_classes=16, width=8).state_dict()}, odd / "fp32.pth")
    proc = menu(tmp_path, "evaluate", f"checkpoint={odd / 'fp32.pth'}", "model.width=8", "dataset.train_per_class=2",
                "dataset.test_per_class=2", "dataset.num_points=128", "train.num_workers=0",
                f"hydra.run.dir={odd / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((odd / "eval" / "eval.json").read_text())
    assert result["kind"] == "fp32" and result["checkpoint"] == str(odd / "fp32.pth") and result["num_clouds"] == 32

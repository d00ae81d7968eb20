"""`atomic_write`: the new file appears whole under its name, or the old one stays."""
from pathlib import Path

import pytest

from atomic_io import atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    assert atomic_write(target, lambda tmp: Path(tmp).write_text("new")) == target
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_io_imports_nothing_of_the_project():
    """Every package may import it, `models/` included, only while it stays at the very bottom."""
    source = (Path(__file__).resolve().parents[1] / "atomic_io.py").read_text()
    imported = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not {name.split(".")[0] for name in imported} & {"models", "data", "distill", "qat", "runtime", "tools"}

"""Every committed table in results/ is rebuilt from its committed run files, byte for byte."""
import re
import shutil
from pathlib import Path

import pytest

from _tools import ROOT, run_tool

TABLES = sorted((ROOT / "results").glob("*/*.md"))
NOT_REBUILDABLE = "NOT_REBUILDABLE.md"  # a table whose runs are lost says so here


def rebuild_command(table_md: Path) -> dict[str, str]:
    """table, profile and seeds from the 'Rebuilt by `python tools/ablate.py ...`' line the table ends with."""
    found = re.search(r"tools/ablate\.py table=(\S+) profile=(\S+) seeds=(\[[\d,]*\]) collect_only=true",
                      table_md.read_text())
    assert found, f"{table_md}: no 'Rebuilt by' line"
    return dict(zip(("table", "profile", "seeds"), found.groups()))


@pytest.mark.slow
@pytest.mark.parametrize("table_md", [t for t in TABLES if t.name != NOT_REBUILDABLE],
                         ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_committed_table_is_rebuilt_byte_for_byte_by_collect_only(table_md, tmp_path):
    args = rebuild_command(table_md)
    folder = table_md.parent
    runs = folder / "runs" / args["profile"]
    if (folder / NOT_REBUILDABLE).is_file():
        assert not runs.is_dir(), f"{folder / NOT_REBUILDABLE} says the runs are lost, but {runs} exists: rebuild"
        pytest.skip(f"{table_md.relative_to(ROOT)}: marked not rebuildable ({NOT_REBUILDABLE})")
    assert runs.is_dir(), f"{table_md}: its runs ({runs}) are not committed; commit them or add {NOT_REBUILDABLE}"
    shutil.copytree(folder / "runs", tmp_path / args["table"] / "runs")
    run_tool("ablate.py", tmp_path, *(f"{k}={v}" for k, v in args.items()), "collect_only=true",
             f"results_dir={tmp_path}")
    for suffix in (".md", ".csv"):
        committed = table_md.with_suffix(suffix)
        assert (tmp_path / args["table"] / committed.name).read_bytes() == committed.read_bytes(), committed

"""graphopt.timing's table of measured values: written only when something was measured, merged with what another
process wrote meanwhile, and replaced in one step."""

import json

from graphopt.timing import TimingTable, num_threads


def test_a_table_that_measured_nothing_writes_nothing(tmp_path):
    table = TimingTable("t", tmp_path / "t.json")
    table.save()
    assert not (tmp_path / "t.json").exists()
    assert table.get("a", lambda: 1.0) == 1.0 and table.get("a", lambda: 2.0) == 1.0 and table.measured == 1
    table.save()
    assert json.loads((tmp_path / "t.json").read_text()) == {"a": 1.0}


def test_two_processes_tables_keep_each_others_entries(tmp_path):
    path = tmp_path / "t.json"
    first, second = TimingTable("t", path), TimingTable("t", path)  # both read the file before either wrote
    first.get("a", lambda: 1.0)
    second.get("b", lambda: 2.0)
    first.save()
    second.save()
    assert json.loads(path.read_text()) == {"a": 1.0, "b": 2.0}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary file left behind
    path.write_text("{not json")
    third = TimingTable("t", path)
    assert third.entries == {}  # an unreadable table is measured again, and rewritten whole
    third.get("c", lambda: 3.0)
    third.save()
    assert json.loads(path.read_text()) == {"c": 3.0}


def test_num_threads_sets_and_restores_the_count():
    import torch

    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with num_threads(None):
        assert torch.get_num_threads() == before

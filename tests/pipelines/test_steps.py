import threading

from pipelines.steps import home_instance_id, sweep_partitions


def test_home_instance_id_is_stable_and_changes_with_a_new_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "a"))
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(home_instance_id())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids[0]) == 32
    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "b"))
    assert home_instance_id() != ids[0]


def test_sweep_partitions_keep_order_and_balance():
    groups = [f"g{i}" for i in range(7)]
    parts = sweep_partitions(groups, 3)
    assert parts == [["g0", "g1", "g2"], ["g3", "g4"], ["g5", "g6"]]
    assert sweep_partitions(groups, 20) == [[g] for g in groups]
    assert sweep_partitions(groups, 1) == [groups]

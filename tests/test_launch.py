"""The local multi-process launcher behind ``train.py --cpu-processes`` (no JAX needed)."""

import json
import os
import sys
import time

import pytest

from mednca_jax.train.launch import core_blocks, run_local_job


def test_core_blocks_split_the_cores_evenly_and_completely():
    assert core_blocks(2, [0, 1]) == [[0], [1]]
    assert core_blocks(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3, 4]]
    assert core_blocks(1, [3, 5]) == [[3, 5]]
    blocks = core_blocks(3, list(range(8)))
    assert sorted(c for b in blocks for c in b) == list(range(8)) and all(blocks)


@pytest.mark.parametrize("n", [0, 3])
def test_core_blocks_refuse_more_processes_than_cores(n):
    with pytest.raises(ValueError, match="usable cores"):
        core_blocks(n, [0, 1])


@pytest.mark.slow
def test_processes_get_the_job_variables_and_their_own_cores(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable cores")
    code = (  # the sleep: the launcher pins a process right after starting it
        "import json, os, sys, time; time.sleep(0.5); "
        "json.dump({'id': os.environ['JAX_PROCESS_ID'], 'n': os.environ['JAX_NUM_PROCESSES'], "
        "'addr': os.environ['JAX_COORDINATOR_ADDRESS'], 'cores': sorted(os.sched_getaffinity(0))}, "
        "open(sys.argv[1] + os.environ['JAX_PROCESS_ID'], 'w'))"
    )
    assert run_local_job([sys.executable, "-c", code, str(tmp_path / "p")], 2) == 0
    got = [json.loads((tmp_path / f"p{i}").read_text()) for i in range(2)]
    assert [g["id"] for g in got] == ["0", "1"] and {g["n"] for g in got} == {"2"}
    assert got[0]["addr"] == got[1]["addr"] and got[0]["addr"].startswith("localhost:")
    assert got[0]["cores"] == core_blocks(2)[0] and got[1]["cores"] == core_blocks(2)[1]


@pytest.mark.slow
def test_a_failing_process_stops_the_job_with_its_status():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable cores")
    code = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '0' else time.sleep(60)"
    t = time.perf_counter()
    assert run_local_job([sys.executable, "-c", code], 2) == 3
    assert time.perf_counter() - t < 30  # the sleeping process was stopped, not waited for


def test_train_cli_rejects_more_processes_than_cores(capsys, monkeypatch):
    import train

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert train.main(["--config", "configs/demo.toml", "--cpu-processes", "999"]) == 2
    assert "--cpu-processes: cannot run 999 processes" in capsys.readouterr().err


def test_the_default_is_one_process_per_core_on_a_cpu_only_machine():
    from mednca_jax.train.launch import auto_processes

    assert auto_processes("cpu", 2, 24) == 2
    assert auto_processes("cpu", 4, 24) == 4
    assert auto_processes("cpu", 16, 24) == 12  # the most processes that divide the batch
    assert auto_processes("cpu", 2, 5) == 1
    assert auto_processes("cpu", 1, 24) == 1
    assert auto_processes("gpu", 16, 24) == 1
    assert auto_processes("tpu", 8, 24) == 1


def test_a_bad_process_count_in_the_environment_is_one_error_line(monkeypatch, capsys):
    from mednca_jax.cli import train

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("MEDNCA_CPU_PROCESSES", "two")
    assert train.main(["--config", "configs/demo.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MEDNCA_CPU_PROCESSES must be a whole number") and err.count("\n") == 1, err

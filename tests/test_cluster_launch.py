"""Launch like a cluster: torchrun's and SLURM's environments are understood, and a training started
by either reaches the weights of the same training started with ``--num-gpus``."""
import os
import sys

import pytest
import torch
from test_train_net import DEMO_BASE, tiny_opts, tiny_splits, train_script  # noqa: F401  (fixture)

from d2norm.engine.cluster_env import ClusterProcess, cluster_process, expand_hostlist
from d2norm.engine.launch import free_port


@pytest.mark.parametrize("hostlist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-10],login2", ["gpu8", "gpu9", "gpu10", "login2"]),
    ("rack1-n[001-002]-ib,localhost", ["rack1-n001-ib", "rack1-n002-ib", "localhost"]),
])
def test_slurm_compressed_host_lists_expand_in_order(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_torchrun_and_slurm_environments_describe_the_process():
    torchrun = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h0",
                "MASTER_PORT": "29500"}
    assert cluster_process(torchrun) == ClusterProcess("torchrun", 5, 8, 1, 4, "h0", 29500)
    slurm = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "gpu[03-04]",
             "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "123456"}
    process = cluster_process(slurm)
    assert process == ClusterProcess("slurm", 6, 8, 2, 4, "gpu03", 10000 + 123456 % 20000)
    assert (process.machine_rank, process.num_machines) == (1, 2)
    assert cluster_process({**slurm, **torchrun}).launcher == "torchrun"  # torchrun inside an allocation
    assert cluster_process({"PATH": "/usr/bin"}) is None
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        cluster_process({**slurm, "SLURM_JOB_NODELIST": ""})


def _run(argv, env, cwd):
    """Start a training; one thread per process everywhere (the two simulated "nodes" share one
    machine, and a different thread count changes the floating-point sums)."""
    import subprocess

    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env})
    return proc


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_torchrun_and_a_two_node_slurm_job_reach_the_weights_of_num_gpus_2(tiny_splits, tmp_path):  # noqa: F811
    script = train_script(tmp_path)
    config = ["--config-file", str(DEMO_BASE)]

    def opts(name):
        return tiny_opts("CBN", tmp_path / name, tiny_splits, max_iter=3) + [
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SEED", "7"]

    data = {"DATA_ROOT": str(tmp_path / "data")}
    runs = {"spawn": [_run([sys.executable, str(script), *config, "--num-gpus", "2", "--dist-url", "auto",
                            *opts("spawn")], data, tmp_path)]}
    runs["torchrun"] = [_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), *config, *opts("torchrun")], data, tmp_path)]
    port = free_port()
    runs["slurm"] = [  # two "nodes" with one task each, as srun sets them up
        _run([sys.executable, str(script), *config, *opts("slurm")],
             {"DATA_ROOT": str(tmp_path / f"data{node}"), "SLURM_PROCID": str(node), "SLURM_NTASKS": "2",
              "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "1(x2)",
              "SLURM_JOB_NODELIST": "localhost,127.0.0.1", "MASTER_PORT": str(port), "SLURM_JOB_ID": "42"}, tmp_path)
        for node in (0, 1)
    ]
    for name, procs in runs.items():
        for proc in procs:
            output = proc.communicate(timeout=900)[0]
            assert proc.returncode == 0, f"{name}: {output[-6000:]}"
            if name != "spawn":
                assert f"Started by {name}: rank" in output
    reference = _weights(tmp_path / "spawn" / "model_final.pth")
    for name in ("torchrun", "slurm"):
        assert "World size: 2" in (tmp_path / name / "log.txt").read_text()
        weights = _weights(tmp_path / name / "model_final.pth")
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(weights[key], value), f"{name}: {key}"


def test_a_single_slurm_task_launches_its_own_processes(monkeypatch):
    """``srun -n 1 python tools/train_net.py --num-gpus 2``: one task, so d2norm spawns the 2 processes."""
    from d2norm.engine import launch as launch_module

    monkeypatch.setattr(launch_module, "cluster_process", lambda: ClusterProcess("slurm", 0, 1, 0, 1, "h", 1))
    joined, spawned = [], []
    monkeypatch.setattr(launch_module, "join_cluster_job", lambda *a, **k: joined.append(a))
    class Workers:  # what mp.start_processes(join=False) returns, for workers that have finished
        processes = []

        def join(self):
            return True

    monkeypatch.setattr(launch_module.mp, "start_processes", lambda *a, **k: spawned.append(k["nprocs"]) or Workers())
    monkeypatch.setattr(launch_module.torch.cuda, "is_available", lambda: False)
    launch_module.launch(print, 2, dist_url="auto")
    assert not joined and spawned == [2]

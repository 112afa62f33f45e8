"""Multi-node launch files: the checked-in multi-machine accelerate configs and DeepSpeed hostfile validate,
and a 2-machine launch on one host (machine ranks 0 and 1 over 127.0.0.1, one CPU process each, started
by the same `accelerate launch --config_file ds_configs/accelerate_multinode_ddp.yaml` command as on a
cluster) trains the tiny LLaVA to the single-process run's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_llava_distributed import _args, _assert_same_as_reference, reference  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
MULTINODE = sorted((REPO / "ds_configs").glob("accelerate_multinode*.yaml"))


@pytest.mark.parametrize("path", MULTINODE, ids=lambda p: p.name)
def test_multinode_yaml_describes_several_machines(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)
    cfg = load_config_from_file(str(path))
    assert cfg.num_machines >= 2 and cfg.machine_rank == 0
    assert cfg.num_processes % cfg.num_machines == 0 and cfg.num_processes > cfg.num_machines
    assert cfg.main_process_ip and cfg.main_process_port and cfg.rdzv_backend == "static"
    if cfg.deepspeed_config:  # every machine is started by accelerate unless the pdsh hostfile route is chosen
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    for flag in ("--machine_rank", "--main_process_ip"):  # the file says how it is run on each machine
        assert flag in path.read_text()
    assert len(MULTINODE) >= 2


def test_deepspeed_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "ds_configs" / "hostfile.example"))
    assert len(hosts) >= 2 and all(slots > 0 for slots in hosts.values())


@pytest.mark.slow
def test_two_machines_on_one_host_equal_one_process(tiny_llava_dir, tiny_llava_data, tmp_path, reference):  # noqa: F811
    out = tmp_path / "multinode"
    procs = []
    for rank in (0, 1):
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
                    # each "machine" has its own local cache, as separate hosts would
                    "XDG_CACHE_HOME": str(tmp_path / f"cache-machine{rank}")})
        cmd = [str(ACCELERATE), "launch", "--config_file", "ds_configs/accelerate_multinode_ddp.yaml",
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", "29631",
               "-m", "llava_address.train", *_args(tiny_llava_dir, tiny_llava_data, out)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            outputs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (code, stdout, stderr) in enumerate(outputs):
        assert code == 0, f"machine {rank}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-6000:]}"
    summaries = [[json.loads(x) for x in stdout.splitlines() if x.startswith('{"global_step"')] for _, stdout, _ in outputs]
    assert len(summaries[0]) == 1 and summaries[1] == []  # global rank 0 (machine 0) reports, machine 1 does not
    assert summaries[0][0]["world_size"] == 2 and summaries[0][0]["global_step"] == 4
    assert "2 process(es), DistributedType.MULTI_CPU" in outputs[0][1]
    _assert_same_as_reference(out, reference, world=2, accumulation=2)

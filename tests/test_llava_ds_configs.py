"""Every launch file in ds_configs/ loads and validates: DeepSpeed JSONs through DeepSpeed's own config
parser (after filling "auto" the way train-llava does), accelerate YAMLs through accelerate's loader.
The DeepSpeed files must leave optimizer, schedule, batch sizes, accumulation, clipping and precision to
the recipe ("auto" or absent), so none of them can silently override it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / "ds_configs"
DS_JSONS = sorted(DS_DIR.glob("*.json"))
ACC_YAMLS = sorted(DS_DIR.glob("accelerate_*.yaml"))
RECIPE_OWNED = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping")


def test_expected_files_exist():
    assert {p.name for p in DS_JSONS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
    assert {p.name for p in ACC_YAMLS} >= {
        "accelerate_ddp.yaml", "accelerate_zero2.yaml", "accelerate_zero3.yaml", "accelerate_zero3_offload.yaml",
    }


def _filled(cfg: dict, micro=2, accumulation=4, world=1, hidden=64, clip=0.5) -> dict:
    """The config as train-llava + accelerate hand it to DeepSpeed (all "auto" replaced)."""
    from llava_address.optim import fill_deepspeed_auto

    cfg = copy.deepcopy(cfg)
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=cfg)))
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=hidden)))
    fill_deepspeed_auto(acc, model, SimpleNamespace(max_grad_norm=clip))
    # What accelerate itself fills from the Accelerator and the DataLoader.
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["train_batch_size"] = micro * accumulation * world
    cfg["bf16"] = {"enabled": False}
    cfg["fp16"] = {"enabled": False}
    return cfg


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_validates_and_leaves_the_recipe_alone(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    assert "optimizer" not in raw and "scheduler" not in raw, "the recipe's AdamW + schedule must stay in charge"
    for key in RECIPE_OWNED:
        assert raw.get(key, "auto") == "auto", f"{path.name}: {key} must be 'auto' (recipe-owned)"
    for dtype in ("bf16", "fp16"):
        assert raw.get(dtype, {}).get("enabled", "auto") == "auto", f"{path.name}: {dtype} follows --mixed-precision"

    filled = _filled(raw)
    assert "auto" not in json.dumps(filled), f"{path.name}: an 'auto' value train-llava does not fill"
    assert filled["gradient_clipping"] == 0.5  # the recipe's clipping, not accelerate's default 1.0
    ds = DeepSpeedConfig(filled)
    stage = int(path.stem[len("zero"):].split("_")[0])
    assert ds.zero_config.stage == stage
    assert ds.gradient_clipping == 0.5
    assert ds.train_batch_size == 8
    if stage == 3:
        # ZeRO-3 checkpoints must be gatherable (accelerate's get_state_dict needs it too).
        assert ds.zero_config.gather_16bit_weights_on_model_save is True
    offload = "offload" in path.stem
    assert (ds.zero_config.offload_optimizer is not None) == offload
    assert (ds.zero_config.offload_param is not None) == offload


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_accelerate_plugin_accepts_deepspeed_json(path, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(REPO)
    plugin = DeepSpeedPlugin(hf_ds_config=str(path.relative_to(REPO)))
    assert plugin.zero_stage == json.loads(path.read_text())["zero_optimization"]["stage"]


@pytest.mark.parametrize("path", ACC_YAMLS, ids=lambda p: p.name)
def test_accelerate_yaml_loads(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)
    cfg = load_config_from_file(str(path))
    dist = str(cfg.distributed_type).split(".")[-1]
    # accelerate_multinode_<kind>.yaml is <kind> over several machines (tests/test_llava_multinode.py)
    kind = path.stem[len("accelerate_"):].removeprefix("multinode_")
    assert (cfg.num_machines > 1) == path.stem.startswith("accelerate_multinode_")
    if kind == "ddp":
        assert dist == "MULTI_GPU"
        assert not cfg.deepspeed_config
    else:
        assert dist == "DEEPSPEED"
        ds_file = REPO / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), f"{path.name} points at a missing {ds_file}"
        assert ds_file.stem == kind
        # Under ZeRO-3, transformers' from_pretrained loads the base already partitioned (zero.Init); accelerate
        # does so whatever this flag says, so the files say what happens.
        assert cfg.deepspeed_config.get("zero3_init_flag") is (ds_file.stem.startswith("zero3"))
    assert cfg.mixed_precision in (None, "no"), "precision comes from the recipe, not the launch file"


def test_fill_refuses_an_optimizer_section():
    from llava_address.optim import fill_deepspeed_auto

    cfg = json.loads((DS_DIR / "zero2.json").read_text())
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=cfg)))
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=8)))
    with pytest.raises(ValueError, match="optimizer"):
        fill_deepspeed_auto(acc, model, SimpleNamespace(max_grad_norm=1.0))

"""Training on several processes (gloo on the CPU): DDP and FSDP2 against one process, sharded
evaluation, sharded checkpoints (kill, resume, damage), a two-machine launch, export.

Several runs share one torchrun launch (the driver below) because a launch costs seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.checkpoint import CheckpointError, CheckpointReader, load_checkpoint, read_trained
from flowgrpo.config import load_config, save_config
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

DRIVER = """
import sys
from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train
for path in sys.argv[1:]:
    train(validate(load_config(TrainConfig, path)))
"""

# the four trainings each strategy must reproduce: LoRA and full weights, DiffusionNFT and the
# clipped ratio with KL to the reference and EMA weights
CASES = {
    "lora_nft": ["optim.policy_loss=nft", "sample.kind=ode", "sample.guidance=1.0", "optim.nft_beta=0.5"],
    # the LoRA folded into gradient-free forwards (DDP folds; FSDP2's sharded weights run unfolded)
    "lora_nft_folded": ["optim.policy_loss=nft", "sample.kind=ode", "sample.guidance=1.0", "optim.nft_beta=0.5",
                        "model.fold_lora=true"],
    "lora_ratio": ["optim.kl_beta=0.04", "optim.ema_decay=0.5", "optim.ema_every=1"],
    "full_nft": ["optim.policy_loss=nft", "sample.kind=ode", "sample.guidance=1.0", "model.lora.enabled=false",
                 "optim.lr=1e-4"],
    "full_ratio": ["model.lora.enabled=false", "optim.lr=1e-4", "optim.kl_beta=0.04", "optim.ema_decay=0.5",
                   "optim.ema_every=1"],
    # a reward that trains (Adv-GRPO's discriminator) beside the generator, under the same launch
    "lora_adversarial": ["reward.weights={adversarial: 1.0, shapes_partial: 0.5}", "reward.d_steps=1",
                         "reward.d_period=2", "reward.args={adversarial: {backbone: shapes, references: shapes, lr: 0.001}}"],
}


GENERIC_PROMPTS = ["a red apple on a table", "a blue car in the rain", "a green frog", "two yellow lamps",
                   "a cat reading a book"]


def overrides(model: Path, out: Path, steps: int = 3) -> list[str]:
    # 2 groups of 4 over 2 processes: each holds one group; evaluation on the colour prompts
    return [f"model.path={model}", "model.lora.rank=4", "model.lora.alpha=8", "sample.num_steps=4",
            "sample.group_size=4", "sample.prompts_per_step=2", "sample.batch_size=8", "sample.guidance=2.0",
            "optim.train_batch_size=8", f"optim.steps={steps}", "optim.lr=0.001", "optim.clip_range=0.2",
            "optim.drop_zero_signal=false", "run.tensorboard=false", "data.test=shapes:test",
            "data.test_tags=[colors]", "run.eval_images_per_prompt=2", "run.eval_steps=3", "run.eval_batch_size=4",
            f"run.output_dir={out}", "reward.weights={jpeg_compressibility: 1.0, shapes_partial: 0.5}"]


def make_cfg(model: Path, out: Path, extra=(), steps: int = 3) -> TrainConfig:
    return validate(load_config(TrainConfig, None, overrides(model, out, steps) + list(extra)))


def launch(args: list[str], nproc: int = 2, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def losses(out: Path) -> list[float]:
    return [m["train/policy_loss"] for m in read_metrics(out / "metrics.jsonl") if "train/policy_loss" in m]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_shapes_model, tmp_path_factory) -> Path:
    """Every case trained on one process, and on two under DDP and under FSDP2 (one launch)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "prompts.txt").write_text("\n".join(GENERIC_PROMPTS) + "\n")
    configs = []
    cases = {**CASES, "generic_eval": CASES["lora_ratio"] + [
        f"data.test={root / 'prompts.txt'}", "data.test_tags=[]", "run.eval_rewards={jpeg_compressibility: 1.0}"]}
    for name, extra in cases.items():
        train(make_cfg(tiny_shapes_model, root / f"{name}-one", extra))
        for strategy in ("ddp", "fsdp2"):
            cfg = make_cfg(tiny_shapes_model, root / f"{name}-{strategy}", extra + [f"parallel.strategy={strategy}"])
            save_config(cfg, root / f"{name}-{strategy}.yaml")
            configs.append(str(root / f"{name}-{strategy}.yaml"))
    # make demo's own config on the shipped model, evaluation on, at a reduced size
    demo = [str(ROOT / "configs" / "demo.yaml"), "optim.steps=1", "sample.prompts_per_step=2", "sample.group_size=4",
            "run.eval_images_per_prompt=2", "run.threads=1", "run.tensorboard=false"]
    train(validate(load_config(TrainConfig, demo[0], demo[1:] + [f"run.output_dir={root / 'demo-one'}"])))
    for strategy in ("ddp", "fsdp2"):
        cfg = validate(load_config(TrainConfig, demo[0], demo[1:] + [f"run.output_dir={root / f'demo-{strategy}'}",
                                                                     f"parallel.strategy={strategy}"]))
        save_config(cfg, root / f"demo-{strategy}.yaml")
        configs.append(str(root / f"demo-{strategy}.yaml"))
    (root / "driver.py").write_text(DRIVER)
    launch([str(root / "driver.py"), *configs])
    return root


def test_the_demo_config_on_two_processes_gives_one_process_table(runs):
    """configs/demo.yaml (reduced), held-out evaluation on: DDP and FSDP2 print one process's table."""
    one = summary(runs / "demo-one")
    assert one["before"]["n_images"] == one["after"]["n_images"] > 0
    for strategy in ("ddp", "fsdp2"):
        run = summary(runs / f"demo-{strategy}")
        assert run["before"] == one["before"], strategy  # the same weights: the same images, bit for bit
        # after training the weights differ by Adam-amplified rounding (see above): the same accuracy
        # table, and image statistics equal to float noise
        assert run["after"]["per_tag"] == one["after"]["per_tag"] and run["change"] == one["change"], strategy
        for k, v in one["after"]["image_stats"].items():
            assert abs(run["after"]["image_stats"][k] - v) <= 1e-3 * max(1.0, abs(v)), (strategy, k)


@pytest.mark.parametrize("name", [*CASES, "generic_eval"])
def test_ddp_and_fsdp2_match_one_process(runs, name):
    """Losses, trained weights and the held-out table (the shapes verifier's, or for other prompts
    the rewards', here 5 prompts judged by the training rewards) of 2 processes equal 1 process's."""
    one = runs / f"{name}-one"
    base = read_trained(one / "checkpoints" / "ckpt-000003")
    for strategy in ("ddp", "fsdp2"):
        run = runs / f"{name}-{strategy}"
        ckpt = run / "checkpoints" / "ckpt-000003"
        assert json.loads((ckpt / "state.json").read_text())["shards"] == (2 if strategy == "fsdp2" else 1)
        # the first iteration's loss is computed before any update: equal to fp32 rounding
        assert abs(losses(run)[0] - losses(one)[0]) <= 1e-6 * max(1.0, abs(losses(one)[0])), strategy
        np.testing.assert_allclose(losses(run), losses(one), rtol=1e-4, atol=1e-6, err_msg=strategy)
        trained = read_trained(ckpt)
        assert trained.keys() == base.keys()
        if name == "lora_adversarial":  # the discriminator: trained on the gathered images, as one process does
            d_one = CheckpointReader(one / "checkpoints" / "ckpt-000003").whole("reward_adversarial")
            d_run = CheckpointReader(ckpt).whole("reward_adversarial")
            assert d_one.keys() == d_run.keys()
            # each process samples its share in smaller batches: images differ in the last float bits, and
            # an Adam-trained head follows them to within a relative 1e-3 (measured 2e-5 absolute)
            for k in d_one:
                a, b = d_one[k].double(), d_run[k].double()
                assert float((a - b).abs().max()) <= 1e-3 * max(1e-3, float(a.abs().max())), k
        gap = max(float((trained[k] - base[k]).abs().max()) for k in base)
        # measured 3e-8 .. 3e-6: Adam divides a gradient by its running RMS, so fp32 rounding noise in
        # near-zero gradients (summed in another order over 2 processes) moves weights by a share of lr
        assert gap < 1e-5, (strategy, gap)
        for key in ("train/nft/old_distance", "train/kl"):  # statistics of sharded tensors are reduced whole
            a = [m[key] for m in read_metrics(run / "metrics.jsonl") if key in m]
            b = [m[key] for m in read_metrics(one / "metrics.jsonl") if key in m]
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7, err_msg=f"{strategy} {key}")
        # the same held-out table, before and after, as one process
        assert summary(run)["before"] == summary(one)["before"], strategy
        assert summary(run)["after"]["per_tag"] == summary(one)["after"]["per_tag"], strategy


def test_fsdp2_lora_loads_in_plain_diffusers_and_draws_the_evaluated_images(runs, tiny_shapes_model):
    """The LoRA an FSDP2 run saves, loaded with load_lora_weights into StableDiffusion3Pipeline,
    draws the images of the trainer's own "after" evaluation (its grid), seed for seed."""
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    from flowgrpo.data import load_prompts
    from flowgrpo.eval.held_out import grid_prompt_indices
    from flowgrpo.eval.shapes import image_seeds
    from flowgrpo.runlog import image_grid

    run = runs / "lora_nft-fsdp2"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_shapes_model, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(run / "lora"))
    pipe.set_progress_bar_config(disable=True)
    items = load_prompts("shapes:test", ["colors"])
    per = 2
    seeds = image_seeds(len(items), per, 0 + 777)
    picked = grid_prompt_indices(len(items))
    images = []
    for i in picked:
        for j in range(per):
            g = torch.Generator().manual_seed(seeds[i * per + j])
            out = pipe(items[i]["prompt"], height=16, width=16, guidance_scale=1.0, num_inference_steps=3,
                       max_sequence_length=1, generator=g, output_type="np").images[0]
            images.append(np.round(out * 255).clip(0, 255).astype(np.uint8))
    ours = np.asarray(image_grid(np.stack(images), per, [items[i]["prompt"] for i in picked], scale=3)).astype(int)
    trainer_grid = np.asarray(Image.open(run / "grids" / "eval-after.png")).astype(int)
    assert ours.shape == trainer_grid.shape
    assert np.abs(ours - trainer_grid).max() <= 1  # uint8 rounding of float noise at most


def test_a_sharded_checkpoint_resumes_in_one_process_with_the_same_weights(runs, tiny_shapes_model, tmp_path):
    """Resume on another number of processes: the shards are joined."""
    from flowgrpo.trainer import Trainer

    ckpt = runs / "full_ratio-fsdp2" / "checkpoints" / "ckpt-000003"
    trainer = Trainer(make_cfg(tiny_shapes_model, tmp_path, CASES["full_ratio"]))
    load_checkpoint(ckpt, named_params=trainer.named_params, optimizer=trainer.optimizer, ema=trainer.ema)
    whole = read_trained(ckpt)
    for name, p in trainer.named_params.items():
        assert torch.equal(p.detach(), whole[name]), name
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(trainer.named_params) and all(float(s["step"]) == 3 for s in state.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_then_resume_equals_an_uninterrupted_sharded_run(runs, tiny_shapes_model, tmp_path):
    """FSDP2 on 2 processes, killed with SIGKILL after its second checkpoint, resumed: the final
    weights equal the uninterrupted run's bit for bit."""
    out = tmp_path / "killed"
    cfg = make_cfg(tiny_shapes_model, out, CASES["lora_nft"] + ["parallel.strategy=fsdp2", "run.save_every=1",
                                                                "run.keep_last=5"])
    save_config(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", "-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "ckpt-000002").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "lora").exists()  # it really was cut short
    launch(["-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml"), "--resume"])
    a = read_trained(out / "checkpoints" / "ckpt-000003")
    b = read_trained(runs / "lora_nft-fsdp2" / "checkpoints" / "ckpt-000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    lb = load_file(runs / "lora_nft-fsdp2" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(la[k], lb[k]) for k in la)


def test_two_machines_emulated_on_one_host(tiny_shapes_model, tmp_path):
    """Two launchers, one process each, static rendezvous on localhost: train and save."""
    out = tmp_path / "nodes"
    cfg = make_cfg(tiny_shapes_model, out, CASES["lora_ratio"] + ["parallel.strategy=fsdp2", "run.eval_before=false"],
                   steps=2)
    save_config(cfg, tmp_path / "cfg.yaml")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml")],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results[0][1][-3000:] + results[1][1][-3000:]
    state = json.loads((out / "checkpoints" / "ckpt-000002" / "state.json").read_text())
    assert state["shards"] == 2 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(losses(out)) == 2 and summary(out)["after"]["n_images"] > 0


def test_a_damaged_checkpoint_is_named_and_resume_falls_back(tiny_shapes_model, tmp_path):
    """A truncated file: `--resume PATH` fails in one line naming it; `--resume` takes the newest
    intact checkpoint and says so."""
    out = tmp_path / "run"
    cfg = make_cfg(tiny_shapes_model, out, CASES["lora_nft"] + ["run.save_every=1", "run.keep_last=5",
                                                                "run.eval_before=false", "data.test="], steps=2)
    save_config(cfg, tmp_path / "cfg.yaml")
    train(cfg)
    damaged = out / "checkpoints" / "ckpt-000002" / "reward_objective.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    cli = [sys.executable, "-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml"), "--resume"]
    res = subprocess.run(cli + [str(damaged.parent)], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("flowgrpo train: error:")]
    assert len(errors) == 1 and "ckpt-000002" in errors[0] and "reward_objective.safetensors" in errors[0], res.stderr
    with pytest.raises(CheckpointError, match="reward_objective.safetensors"):
        CheckpointReader(damaged.parent)
    res = subprocess.run(cli, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ckpt-000002 is damaged" in res.stdout and "resuming from" in res.stdout and "ckpt-000001" in res.stdout
    CheckpointReader(damaged.parent)  # the resumed run wrote it again, whole


def test_full_fine_tune_saved_by_fsdp2_is_the_trained_transformer(runs, tmp_path):
    """The final `model/` of a sharded full fine-tune (gathered once at the end) and `flowgrpo
    export --transformer CKPT` (shards joined offline) both hold the trained weights."""
    from diffusers import SD3Transformer2DModel

    from flowgrpo.model_commands import export_model

    run = runs / "full_nft-fsdp2"  # no EMA: the saved model is the last trained weights
    trained = read_trained(run / "checkpoints" / "ckpt-000003")
    saved = SD3Transformer2DModel.from_pretrained(run / "model" / "transformer").state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    cfg = load_config(TrainConfig, run / "config.yaml")
    out = export_model(cfg.model.path, tmp_path / "export", transformer=str(run / "checkpoints" / "ckpt-000003"),
                       dtype="float32")
    exported = SD3Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_held_out_prompts_need_pointwise_rewards(tiny_shapes_model, tmp_path):
    """Win rates average 0.5 in every group: they cannot measure held-out progress."""
    from flowgrpo.config import ConfigError
    from flowgrpo.trainer import Trainer

    (tmp_path / "p.txt").write_text("\n".join(GENERIC_PROMPTS))
    cfg = make_cfg(tiny_shapes_model, tmp_path / "run", [f"data.test={tmp_path / 'p.txt'}", "data.test_tags=[]",
                                                         "run.eval_rewards={pref_winrate: 1.0}"])
    with pytest.raises(ConfigError, match="run.eval_rewards"):
        Trainer(cfg)

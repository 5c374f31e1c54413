"""Does the intra-op thread count change more than the rounding of a shapes-model update?

    python scripts/thread_rounding.py --config configs/demo_six.yaml

Puts the config's LoRA (rank, alpha and target layers; B drawn small so that it acts) on its
model's transformer, runs one forward and backward of a squared-error loss
on a fixed random batch with 1 and with 2 threads (and 2 threads twice), and compares the LoRA
gradients with each other and with the same model in float64. Results:
docs/results/all-tags.md ("One and two threads").
"""

from __future__ import annotations

import argparse
import copy

import torch


def main() -> None:
    from flowgrpo.config import load_config
    from flowgrpo.models import load_policy
    from flowgrpo.models.sd3 import LoraSpec
    from flowgrpo.train_config import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo_six.yaml")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    cfg = load_config(TrainConfig, args.config)
    policy = load_policy(cfg.model.path)
    m = cfg.model.lora  # the trainer's own LoRA set-up: rank, alpha, init, targets
    policy.add_lora(LoraSpec(m.rank, m.alpha, m.init, list(m.targets)))
    model = policy.transformer
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained LoRA's is not
            p.data.normal_(0, 0.01)
    c, size = model.config.in_channels, model.config.sample_size
    batch = dict(hidden_states=torch.randn(args.batch, c, size, size),
                 encoder_hidden_states=torch.randn(args.batch, 16, model.config.joint_attention_dim),
                 pooled_projections=torch.randn(args.batch, model.config.pooled_projection_dim),
                 timestep=torch.full((args.batch,), 900.0))
    target = torch.randn(args.batch, c, size, size)

    def lora_gradient(m, threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        m.zero_grad()
        dtype = next(m.parameters()).dtype
        out = m(**{k: v.to(dtype) for k, v in batch.items()}).sample
        ((out - target.to(dtype)) ** 2).mean().backward()
        return torch.cat([p.grad.double().flatten() for n, p in m.named_parameters() if "lora" in n])

    one, two, two_again = lora_gradient(model, 1), lora_gradient(model, 2), lora_gradient(model, 2)
    exact = lora_gradient(copy.deepcopy(model).double(), 2)
    scale = exact.norm()
    print(f"relative difference, 1 vs 2 threads:        {float((one - two).norm() / scale):.2e}")
    print(f"relative difference, 2 vs 2 threads:        {float((two - two_again).norm() / scale):.2e}")
    print(f"relative error against float64, 1 thread:  {float((one - exact).norm() / scale):.2e}")
    print(f"relative error against float64, 2 threads: {float((two - exact).norm() / scale):.2e}")


if __name__ == "__main__":
    main()

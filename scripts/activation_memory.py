"""Measure the activation memory one transformer block keeps for the backward pass, per token.

For each block kind of SD3.5-M, FLUX.1-dev, Qwen-Image and FLUX.2 [dev], build ONE block at
the published width (diffusers' own block classes, random weights, bf16, on the CPU), freeze
its weights, give its hidden-state inputs requires_grad=True, and run one forward under
`torch.autograd.graph.saved_tensors_hooks`. The pack hook records the storage of every
tensor autograd saves for the backward pass; storages are deduplicated by data pointer and
summed. Two token counts are run (image tokens N1 and N2, text length fixed) and

    KB per token and block = (bytes(N2) - bytes(N1)) / (N2 - N1) / 1000

so everything that does not grow with the sequence (the weights autograd saves, modulation
vectors) cancels. Tensors that are inputs shared by every block of a model (rotary tables,
timestep modulation) are not the block's own and are reported apart ("shared"); they are
made once per forward in the real transformer. The attention is whatever
`scaled_dot_product_attention` picks for these inputs on this machine; the autograd node it
leaves is printed (on a CPU: ScaledDotProductFlashAttentionForCpuBackward0, which saves q, k,
v, the output and the log-sum-exp, i.e. memory linear in the sequence, like the CUDA flash and
memory-efficient kernels).

Widths: SD3.5-M is hard-coded (24 heads x 64 = 1,536, qk RMSNorm, dual attention in blocks
0-12: its config.json); FLUX.1, Qwen-Image and FLUX.2 take the defaults of diffusers'
`FluxTransformer2DModel`, `QwenImageTransformer2DModel` and `Flux2Transformer2DModel`, which
are the published configs.

    OMP_NUM_THREADS=1 python scripts/activation_memory.py [--out activations.json]
    python scripts/activation_memory.py --only flux2 --image-tokens 256 512 --text-tokens 128

Weights take 1-2 GB per block at FLUX.2's width 6,144; one block is alive at a time.
`--weights-require-grad` also marks the block's matrices trainable (close to what LoRA on every
linear layer keeps: the linear layers' inputs are then saved too). `--device cuda` is untried.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

DTYPE = torch.bfloat16
DEVICE = torch.device("cpu")  # set by --device


# ---------------------------------------------------------------------------- measurement


@dataclass
class Saved:
    block_bytes: int  # unique storages saved for backward, excluding parameters and shared inputs
    shared_bytes: int  # storages of shared inputs (rotary tables, modulation) that were saved
    param_bytes: int  # storages of parameters that were saved (constant in the sequence length)
    attention_nodes: list[str]


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _attention_nodes(outputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Names of the autograd nodes of attention kernels reachable from the outputs."""
    seen, names = set(), set()
    stack = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if "Attention" in name or "Softmax" in name:
            names.add(name)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(names)


def measure(
    run: Callable[[], tuple[torch.Tensor, ...]], params: list[torch.Tensor], shared: list[torch.Tensor]
) -> Saved:
    """One forward of `run` under a saved-tensors hook; sums unique saved storages."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    shared_ptrs = {t.untyped_storage().data_ptr() for t in shared}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if nbytes:
            storages[ptr] = max(storages.get(ptr, 0), nbytes)
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        outputs = run()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    nodes = _attention_nodes(outputs)
    block = sum(n for p, n in storages.items() if p not in param_ptrs and p not in shared_ptrs)
    shared_b = sum(n for p, n in storages.items() if p in shared_ptrs)
    param_b = sum(n for p, n in storages.items() if p in param_ptrs)
    del outputs
    return Saved(block, shared_b, param_b, nodes)


def init_block(block: torch.nn.Module, weights_require_grad: bool) -> list[torch.Tensor]:
    """Random bf16 weights (std 0.02 matrices, unit norm scales, zero biases), frozen unless asked."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = []
    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
            p.requires_grad_(weights_require_grad and p.ndim >= 2)
            params.append(p)
    for b in block.buffers():
        if b.is_floating_point():
            b.zero_()
    return params


def build(ctor: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct on the meta device, materialise empty bf16 storage on the CPU (no fp32 copy)."""
    with torch.device("meta"):
        block = ctor()
    block = block.to(DTYPE).to_empty(device=DEVICE)
    return block.eval()  # no dropout in these blocks; eval() only to be explicit


def grid(n: int) -> tuple[int, int]:
    """A (rows, cols) latent-token grid with rows*cols == n, as square as possible."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def hidden(n: int, dim: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(1, n, dim, dtype=DTYPE, device=DEVICE).requires_grad_(grad)


def vec(n: int) -> torch.Tensor:
    """A modulation / timestep vector (batch 1), not requiring grad (frozen embedders)."""
    return torch.randn(1, n, dtype=DTYPE, device=DEVICE)


# ---------------------------------------------------------------------------- block kinds
# Each case returns (block constructor, input factory). The input factory takes (image tokens,
# text tokens) and returns (run closure, shared input tensors, token count the block processes).


def _default(cls, name):
    return inspect.signature(cls.__init__).parameters[name].default


def sd35m_case(dual: bool, last: bool = False):
    from diffusers.models.attention import JointTransformerBlock

    heads, head_dim = 24, 64  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    dim = heads * head_dim

    def ctor():
        return JointTransformerBlock(
            dim, heads, head_dim, context_pre_only=last, qk_norm="rms_norm", use_dual_attention=dual
        )

    def inputs(block, n_img, n_txt):
        x, c = hidden(n_img, dim), hidden(n_txt, dim)
        temb = vec(dim)
        return (lambda: block(hidden_states=x, encoder_hidden_states=c, temb=temb)), [temb], n_img + n_txt

    return dim, heads, head_dim, ctor, inputs


def flux1_case(single: bool):
    from diffusers.models.transformers.transformer_flux import (
        FluxPosEmbed,
        FluxSingleTransformerBlock,
        FluxTransformer2DModel,
        FluxTransformerBlock,
    )

    heads = _default(FluxTransformer2DModel, "num_attention_heads")
    head_dim = _default(FluxTransformer2DModel, "attention_head_dim")
    axes = list(_default(FluxTransformer2DModel, "axes_dims_rope"))
    dim = heads * head_dim
    pos = FluxPosEmbed(theta=10000, axes_dim=axes)  # as FluxTransformer2DModel builds it

    def ctor():
        return (FluxSingleTransformerBlock if single else FluxTransformerBlock)(dim, heads, head_dim)

    def inputs(block, n_img, n_txt):
        rows, cols = grid(n_img)
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        ids = torch.cat([torch.zeros(n_txt, 3), img_ids.reshape(-1, 3)])  # text first, as the model
        rope = tuple(r.to(DEVICE) for r in pos(ids))
        x, c = hidden(n_img, dim), hidden(n_txt, dim)
        temb = vec(dim)
        run = lambda: block(hidden_states=x, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope)
        return run, [temb, *rope], n_img + n_txt

    return dim, heads, head_dim, ctor, inputs


def qwen_case():
    from diffusers.models.transformers.transformer_qwenimage import (
        QwenEmbedRope,
        QwenImageTransformer2DModel,
        QwenImageTransformerBlock,
    )

    heads = _default(QwenImageTransformer2DModel, "num_attention_heads")
    head_dim = _default(QwenImageTransformer2DModel, "attention_head_dim")
    axes = list(_default(QwenImageTransformer2DModel, "axes_dims_rope"))
    dim = heads * head_dim
    pos = QwenEmbedRope(theta=10000, axes_dim=axes, scale_rope=True)  # as the model builds it

    def ctor():
        return QwenImageTransformerBlock(dim, heads, head_dim)

    def inputs(block, n_img, n_txt):
        rows, cols = grid(n_img)
        img_freqs, txt_freqs = pos([(1, rows, cols)], max_txt_seq_len=n_txt, device=DEVICE)
        x, c = hidden(n_img, dim), hidden(n_txt, dim)
        temb = vec(dim)
        # no text mask: the trainer passes one only when a batch row is padded
        run = lambda: block(
            hidden_states=x,
            encoder_hidden_states=c,
            encoder_hidden_states_mask=None,
            temb=temb,
            image_rotary_emb=(img_freqs, txt_freqs),
        )
        return run, [temb, img_freqs, txt_freqs], n_img + n_txt

    return dim, heads, head_dim, ctor, inputs


def flux2_case(single: bool):
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2PosEmbed,
        Flux2SingleTransformerBlock,
        Flux2Transformer2DModel,
        Flux2TransformerBlock,
    )

    heads = _default(Flux2Transformer2DModel, "num_attention_heads")
    head_dim = _default(Flux2Transformer2DModel, "attention_head_dim")
    mlp_ratio = _default(Flux2Transformer2DModel, "mlp_ratio")
    eps = _default(Flux2Transformer2DModel, "eps")
    axes = list(_default(Flux2Transformer2DModel, "axes_dims_rope"))
    theta = _default(Flux2Transformer2DModel, "rope_theta")
    dim = heads * head_dim
    pos = Flux2PosEmbed(theta=theta, axes_dim=axes)

    def ctor():
        cls = Flux2SingleTransformerBlock if single else Flux2TransformerBlock
        return cls(dim, heads, head_dim, mlp_ratio=mlp_ratio, eps=eps, bias=False)

    def inputs(block, n_img, n_txt):
        rows, cols = grid(n_img)
        img_ids = torch.zeros(rows, cols, 4)  # (0, row, col, 0), as Flux2Policy / the pipeline
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        txt_ids = torch.zeros(n_txt, 4)
        txt_ids[:, 3] = torch.arange(n_txt)  # (0, 0, 0, l)
        ti, ii = pos(txt_ids), pos(img_ids.reshape(-1, 4))
        rope = tuple(torch.cat([t, i]).to(DEVICE) for t, i in zip(ti, ii))  # text first, as the model
        if single:
            # the model concatenates text and image once before the single blocks
            xc = hidden(n_txt + n_img, dim)
            mod = vec(3 * dim)
            run = lambda: block(hidden_states=xc, encoder_hidden_states=None, temb_mod=mod, image_rotary_emb=rope)
            return run, [mod, *rope], n_img + n_txt
        x, c = hidden(n_img, dim), hidden(n_txt, dim)
        mod_img = vec(6 * dim)
        mod_txt = vec(6 * dim)
        run = lambda: block(
            hidden_states=x,
            encoder_hidden_states=c,
            temb_mod_img=mod_img,
            temb_mod_txt=mod_txt,
            image_rotary_emb=rope,
        )
        return run, [mod_img, mod_txt, *rope], n_img + n_txt

    return dim, heads, head_dim, ctor, inputs


CASES = {
    "sd35m": [
        ("SD3.5-M", "joint, dual attention (blocks 0-12)", lambda: sd35m_case(True)),
        ("SD3.5-M", "joint (blocks 13-22)", lambda: sd35m_case(False)),
        ("SD3.5-M", "joint, context_pre_only (block 23)", lambda: sd35m_case(False, last=True)),
    ],
    "flux1": [
        ("FLUX.1-dev", "double-stream", lambda: flux1_case(False)),
        ("FLUX.1-dev", "single-stream", lambda: flux1_case(True)),
    ],
    "qwen": [("Qwen-Image", "double-stream", qwen_case)],
    "flux2": [
        ("FLUX.2 [dev]", "double-stream", lambda: flux2_case(False)),
        ("FLUX.2 [dev]", "single-stream", lambda: flux2_case(True)),
    ],
}


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-tokens", type=int, nargs=2, default=[256, 512], metavar=("N1", "N2"))
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="models to run (default: all)")
    ap.add_argument(
        "--weights-require-grad", action="store_true", help="trainable block matrices (~ LoRA on every linear layer)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (what docs/models.md reports) or cuda (untried)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    n1, n2 = args.image_tokens
    if n2 <= n1:
        ap.error("--image-tokens N1 N2 needs N2 > N1")

    rows = []
    print(
        f"torch {torch.__version__}, {DTYPE}, {DEVICE}, image tokens {n1} and {n2}, text tokens {args.text_tokens}, "
        f"weights {'trainable' if args.weights_require_grad else 'frozen'}"
    )
    for key in args.only or list(CASES):
        for model, kind, case in CASES[key]:
            dim, heads, head_dim, ctor, inputs = case()
            t0 = time.time()
            block = build(ctor)
            params = init_block(block, args.weights_require_grad)
            n_params = sum(p.numel() for p in params)
            results = {}
            for n_img in (n1, n2):
                run, shared, tokens = inputs(block, n_img, args.text_tokens)
                results[n_img] = (measure(run, params, shared), tokens)
                del run, shared
                gc.collect()
            (s1, t1), (s2, t2) = results[n1], results[n2]
            per_token = (s2.block_bytes - s1.block_bytes) / (t2 - t1)
            shared_per_token = (s2.shared_bytes - s1.shared_bytes) / (t2 - t1)
            row = {
                "model": model,
                "block": kind,
                "width": dim,
                "heads": heads,
                "head_dim": head_dim,
                "block_params_M": round(n_params / 1e6, 1),
                "tokens": [t1, t2],
                "saved_bytes": [s1.block_bytes, s2.block_bytes],
                "bytes_per_token": per_token,
                "kb_per_token": per_token / 1000,
                "bytes_per_token_per_width": per_token / dim,
                "shared_inputs_kb_per_token": shared_per_token / 1000,
                "saved_weight_bytes": s2.param_bytes,
                "attention": s2.attention_nodes,
                "seconds": round(time.time() - t0, 1),
            }
            rows.append(row)
            print(
                f"  {model:13s} {kind:37s} width {dim:5d}: {per_token / 1000:7.2f} KB/token/block "
                f"({per_token / dim:5.2f} B x width; shared rope/modulation {shared_per_token / 1000:.2f} KB/token; "
                f"{', '.join(s2.attention_nodes) or 'no attention node found'}; {row['seconds']} s)",
                flush=True,
            )
            del block, params, results
            gc.collect()

    print()
    print("| model | block | width | KB / token / block |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['block']} | {r['width']:,} | {r['kb_per_token']:.1f} |")
    backends = sorted({n for r in rows for n in r["attention"]})
    print(f"\nattention autograd node(s): {', '.join(backends)} (torch.nn.functional.scaled_dot_product_attention)")
    print("KB = 1,000 bytes; rotary tables and modulation vectors are shared by all blocks and not included.")
    if args.out:
        meta = {
            "torch": torch.__version__,
            "dtype": str(DTYPE),
            "device": str(DEVICE),
            "image_tokens": [n1, n2],
            "text_tokens": args.text_tokens,
            "weights_require_grad": args.weights_require_grad,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

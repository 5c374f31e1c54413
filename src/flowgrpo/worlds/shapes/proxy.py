"""A learned proxy of the shapes verifier: a small CNN that reads an image and the prompt's
metadata and predicts the verifier's partial credit.

Like any learned reward (PickScore, ImageReward) it agrees with its labeller on images like
those it was trained on and can be wrong elsewhere: what a policy optimising it finds is
over-optimisation that the verifier, kept as the gold reward, measures.

    flowgrpo make-proxy --out runs/shapes-proxy          # renders + base samples, minutes on CPU

The training images are renders and samples of a shipped base model, each labelled by the
verifier for the prompt it was made for and for a few prompts drawn at random (partly right).
Saved as proxy.safetensors + proxy.json (sizes and held-out agreement).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .grammar import CLASSES, COLORS, RELATIONS, TAGS, all_records

PROMPT_FEATURES = len(TAGS) + len(CLASSES) * (2 + len(COLORS)) + len(RELATIONS) + 2 * len(CLASSES)
IMAGE_SIZE = 32


def prompt_features(record: dict) -> np.ndarray:
    """The metadata as a fixed vector: tag; per class the wanted count / 4, its colour and the
    excluded count / 5; the relation and which classes it binds."""
    v = np.zeros(PROMPT_FEATURES, np.float32)
    v[TAGS.index(record["tag"])] = 1
    base = len(TAGS)
    per = 2 + len(COLORS)
    for clause in record["include"]:
        at = base + CLASSES.index(clause["class"]) * per
        v[at] += clause.get("count", 1) / 4
        if clause.get("color"):
            v[at + 2 + COLORS.index(clause["color"])] = 1
    for clause in record.get("exclude", []):
        v[base + CLASSES.index(clause["class"]) * per + 1] = clause.get("count", 1) / 5
    rel = base + len(CLASSES) * per
    for clause in record["include"]:
        if "position" in clause:
            name, ref = clause["position"]
            v[rel + RELATIONS.index(name)] = 1
            v[rel + len(RELATIONS) + CLASSES.index(clause["class"])] = 1
            v[rel + len(RELATIONS) + len(CLASSES) + CLASSES.index(record["include"][ref]["class"])] = 1
    return v


@dataclass
class ProxyArchitecture:
    width: int = 32  # channels of the first convolutions (doubled after two down-samplings)
    hidden: int = 128  # width of the image and prompt embeddings and of the head


class ProxyNet(nn.Module):
    """Image (B, 3, 32, 32) in [0, 1] and prompt features -> predicted partial credit in [0, 1].
    The prompt scales and shifts the convolutions' channels (FiLM), so the first layers can look
    for the colours and shapes asked for; the image is flattened at 4x4, not pooled, because
    where an object sits decides position prompts."""

    def __init__(self, arch: ProxyArchitecture):
        super().__init__()
        w, h = arch.width, arch.hidden
        self.convs = nn.ModuleList([nn.Conv2d(3, w, 3, padding=1), nn.Conv2d(w, w, 3, stride=2, padding=1),
                                    nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)])
        self.prompt = nn.Sequential(nn.Linear(PROMPT_FEATURES, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.film = nn.ModuleList([nn.Linear(h, 2 * c.out_channels) for c in self.convs])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        x = (images - 0.5) / 0.25  # the renders' near-white background would otherwise dominate
        e = self.prompt(prompts)
        for conv, film in zip(self.convs, self.film):
            gamma, beta = film(e)[:, :, None, None].chunk(2, dim=1)
            x = torch.relu(conv(x) * (1 + gamma) + beta)
        return torch.sigmoid(self.head(x)[:, 0])


def as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, 32, 32) in [0, 1] (other sizes are resized)."""
    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x


# ---- the data set ------------------------------------------------------------------------------
def labelled_images(renders: int, samples: int, prompts_per_image: int, model: str | None, seed: int,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[dict], np.ndarray, np.ndarray]:
    """(images, image index of each pair, record of each pair, label of each pair, source of each
    image: 0 = render, 1 = base sample). Every image is judged against the prompt it was made for
    and `prompts_per_image - 1` others drawn at random (partly right, mostly): the verifier
    detects once per image, so each extra prompt costs almost nothing, and comparing one image
    with several prompts is what teaches the network to read the prompt."""
    from .render import render
    from .verify import detect, score

    rng = np.random.default_rng(seed)
    records = all_records()
    made_for = [records[i] for i in rng.integers(len(records), size=renders + samples)]
    imgs = [render(r, rng, IMAGE_SIZE, cells=bool(rng.integers(2))) for r in made_for[:renders]]
    if samples:
        imgs.extend(base_samples(model, [r["prompt"] for r in made_for[renders:]], seed, progress))
    images = np.stack(imgs) if imgs else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    index, recs, labels = [], [], []
    for i, (img, own) in enumerate(zip(images, made_for)):
        dets = detect(img)
        for r in [own] + [records[k] for k in rng.integers(len(records), size=prompts_per_image - 1)]:
            index.append(i), recs.append(r), labels.append(score(img, r, detections=dets).partial)
    source = np.r_[np.zeros(renders, int), np.ones(samples, int)]
    return images, np.array(index, int), recs, np.array(labels, np.float32), source


def base_samples(model: str, prompts: list[str], seed: int, progress: bool) -> np.ndarray:
    """The shipped base model's images for `prompts` (ODE, its default steps and guidance)."""
    from ...eval.shapes import sample_images
    from ...models import load_policy

    defaults_file = Path(model) / "flowgrpo_defaults.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.exists() else {}
    policy = load_policy(model, "auto", torch.float32, torch.device("cpu"))
    return sample_images(policy, prompts, [seed * 100_003 + i for i in range(len(prompts))], steps=10,
                         guidance=defaults.get("guidance", 4.5), resolution=IMAGE_SIZE, progress=progress)


# ---- training, agreement, saving ---------------------------------------------------------------
def agreement(pred: np.ndarray, labels: np.ndarray, records: list[dict]) -> dict[str, float]:
    """How well predictions track the verifier: Pearson and Spearman correlation, mean absolute
    error, and pairwise accuracy (of two images for one prompt with different labels, the share
    the proxy orders as the verifier does: what a win-rate judge needs)."""
    from scipy.stats import pearsonr, spearmanr

    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_prompt.setdefault(r["prompt"], []).append(i)
    right = total = 0
    for idx in by_prompt.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if labels[i] != labels[j]:
                    total += 1
                    right += (pred[i] - pred[j]) * (labels[i] - labels[j]) > 0
    varied = np.std(pred) > 0 and np.std(labels) > 0  # a correlation with a constant is undefined
    return {"pearson": float(pearsonr(pred, labels)[0]) if varied else float("nan"),
            "spearman": float(spearmanr(pred, labels)[0]) if varied else float("nan"),
            "mae": float(np.abs(pred - labels).mean()),
            "pair_accuracy": float(right / total) if total else float("nan"), "pairs": total,
            "labelled": len(labels)}  # (image, prompt) pairs judged


def predict(net: ProxyNet, images: np.ndarray, records: list[dict], batch: int = 256) -> np.ndarray:
    feats = torch.as_tensor(np.stack([prompt_features(r) for r in records]))
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            out.append(net(as_input(images[s:s + batch]), feats[s:s + batch]))
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def train_proxy(images, records, labels, *, arch: ProxyArchitecture, epochs: int, seed: int,
                batch: int = 64, lr: float = 2e-3, progress: bool = False) -> ProxyNet:
    torch.manual_seed(seed)
    net = ProxyNet(arch)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x = as_input(images)
    p = torch.as_tensor(np.stack([prompt_features(r) for r in records]))
    y = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    passes = range(epochs)
    if progress:
        from tqdm import tqdm

        passes = tqdm(passes, desc="training", unit="epoch")
    for _ in passes:
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = nn.functional.mse_loss(net(x[idx], p[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def save_proxy(net: ProxyNet, arch: ProxyArchitecture, out: Path, info: dict) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "proxy.safetensors")
    (out / "proxy.json").write_text(json.dumps({"architecture": asdict(arch), "image_size": IMAGE_SIZE,
                                                "prompt_features": PROMPT_FEATURES, **info}, indent=2))
    return out


def load_proxy(path: str | Path) -> tuple[ProxyNet, dict]:
    from safetensors.torch import load_file

    from ...rewards.base import RewardError

    folder = Path(path)
    if not (folder / "proxy.json").exists() or not (folder / "proxy.safetensors").exists():
        raise RewardError(f"no shapes proxy at {folder} (proxy.json and proxy.safetensors); train one with "
                          f"`flowgrpo make-proxy --out {folder}`")
    meta = json.loads((folder / "proxy.json").read_text())
    if meta.get("prompt_features") != PROMPT_FEATURES:
        raise RewardError(f"the proxy at {folder} encodes prompts in {meta.get('prompt_features')} features, this "
                          f"version in {PROMPT_FEATURES}; retrain it with `flowgrpo make-proxy --out {folder}`")
    arch = ProxyArchitecture(**meta["architecture"])
    net = ProxyNet(arch)
    try:
        net.load_state_dict(load_file(folder / "proxy.safetensors"))
    except RuntimeError as exc:  # missing or misshapen weights: another version of the network
        raise RewardError(f"the proxy at {folder} does not fit this version's network ({str(exc).splitlines()[0]}); "
                          f"retrain it with `flowgrpo make-proxy --out {folder}`") from None
    return net.eval(), meta


def make_proxy(out: str | Path, *, renders: int = 2000, samples: int = 500, prompts_per_image: int = 5,
               model: str | None = "assets/shapes-sd3-cells-alt", held_out: float = 0.2, epochs: int = 20,
               arch: ProxyArchitecture | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Build the data set, train on the pairs of (1 - held_out) of the images, measure agreement
    on the pairs of the other images (never seen in training), save."""
    arch = arch or ProxyArchitecture()
    images, index, records, labels, source = labelled_images(renders, samples, prompts_per_image, model, seed,
                                                             progress)
    test_images = np.random.default_rng(seed + 1).random(len(images)) < held_out
    te, tr = np.flatnonzero(test_images[index]), np.flatnonzero(~test_images[index])
    net = train_proxy(images[index[tr]], [records[i] for i in tr], labels[tr], arch=arch, epochs=epochs, seed=seed,
                      progress=progress)
    pred = predict(net, images[index[te]], [records[i] for i in te])
    report = {}
    for name, sel in (("held_out", np.ones(len(te), bool)), ("held_out_renders", source[index[te]] == 0),
                      ("held_out_samples", source[index[te]] == 1)):
        if sel.sum() > 2:
            report[name] = agreement(pred[sel], labels[te][sel], [records[i] for i in te[sel]])
    info = {"trained_on": {"renders": renders, "samples": samples, "prompts_per_image": prompts_per_image,
                           "model": model if samples else None, "held_out_share": held_out, "epochs": epochs,
                           "seed": seed, "label_mean": float(labels.mean()) if len(labels) else None}, **report}
    save_proxy(net, arch, Path(out), info)
    return info


# ---- the command -------------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "make-proxy", help="train a learned proxy of the shapes verifier (a reward to over-optimise)",
        description="Label renders and base-model samples with the shapes verifier's partial credit for "
                    "their own prompt and a few others, train a small CNN on them, report its agreement with the "
                    "verifier on held-out images "
                    "and save OUT/proxy.safetensors + OUT/proxy.json. Use it as reward shapes_proxy "
                    "(reward.args: {shapes_proxy: {path: OUT}}) or as judge shapes_proxy for pref_winrate.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--renders", type=int, default=2000, help="rendered images (default 2000)")
    p.add_argument("--samples", type=int, default=500, help="base-model samples (default 500; 0 = none)")
    p.add_argument("--prompts-per-image", type=int, default=5,
                   help="prompts each image is labelled for: its own and others at random (default 5)")
    p.add_argument("--model", default="assets/shapes-sd3-cells-alt", help="the base model sampled")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training images (default 20)")
    p.add_argument("--width", type=int, default=32, help="CNN channels (default 32)")
    p.add_argument("--hidden", type=int, default=128, help="embedding width (default 128)")
    p.add_argument("--held-out", type=float, default=0.2, help="share of images kept out of training (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_proxy)


def _cmd_make_proxy(args) -> int:
    from ...cli import UserError

    if min(args.renders, args.samples) < 0 or args.renders + args.samples < 10 or args.prompts_per_image < 1:
        raise UserError("make-proxy needs at least 10 images and --prompts-per-image >= 1: raise --renders or "
                        "--samples")
    if not 0 < args.held_out < 1:
        raise UserError(f"--held-out must be in (0, 1), got {args.held_out}")
    if args.samples and not (Path(args.model) / "model_index.json").exists():
        raise UserError(f"--model {args.model}: not a diffusers model folder (no model_index.json); "
                        f"point it at a shapes model, e.g. assets/shapes-sd3-cells-alt, or pass --samples 0")
    info = make_proxy(args.out, renders=args.renders, samples=args.samples, prompts_per_image=args.prompts_per_image,
                      model=args.model, held_out=args.held_out, epochs=args.epochs,
                      arch=ProxyArchitecture(args.width, args.hidden), seed=args.seed, progress=True)
    for key in ("held_out", "held_out_renders", "held_out_samples"):
        if info.get(key):
            a = info[key]
            print(f"{key:20s} labelled {a['labelled']:5d}  pearson {a['pearson']:.3f}  spearman {a['spearman']:.3f}  "
                  f"mae {a['mae']:.3f}  pair accuracy {a['pair_accuracy']:.3f} ({a['pairs']} pairs)")
    print(f"wrote {Path(args.out) / 'proxy.safetensors'}")
    return 0

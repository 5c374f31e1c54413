"""`flowgrpo data fetch NAME`: download the benchmark prompt files from their public
repositories into `data/`, in the layout the recipes and `flowgrpo eval` read
(`data/unigenbench/...`, `data/flow_grpo/...`), and check each file's sha256.

A file is written to a temporary name, hashed, and moved into place only when its hash is the
recorded one, so a cut download or a changed upstream file never sits where a recipe reads it.
Files the project holds no reference copy of (the training prompt lists of GenEval, OCR and
PickScore) have no recorded hash; they are fetched and their hash is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

UNIGENBENCH = "https://raw.githubusercontent.com/CodeGoat24/UniGenBench/main/data/"
FLOW_GRPO = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/"


@dataclass(frozen=True)
class RemoteFile:
    url: str
    path: str  # below the data folder
    sha256: str | None  # None: no reference copy to check against


_FLOW_GRPO_LICENSE = RemoteFile(FLOW_GRPO + "LICENSE", "flow_grpo/LICENSE", None)

DATASETS: dict[str, tuple[str, list[RemoteFile]]] = {
    "unigenbench": ("UniGenBench test prompts and testpoints, and Pref-GRPO's training prompts (CC BY 4.0)", [
        RemoteFile(UNIGENBENCH + "test_prompts_en.csv", "unigenbench/test_prompts_en.csv",
                   "f82e8ce854985ef963378eaaf8ce12f2e3a57dd6f53e1aea84a61fbeadfe4459"),
        RemoteFile(UNIGENBENCH + "test_prompts_en_long.csv", "unigenbench/test_prompts_en_long.csv",
                   "5d2c3d642cc4923504b662ad15b425c2d161a137884701881e00c2691a697253"),
        RemoteFile(UNIGENBENCH + "test_prompts_zh.csv", "unigenbench/test_prompts_zh.csv",
                   "7ff2d2131e68e6182f43a28ecf03d070f7735788f3c5420db3f83141492e8cb3"),
        RemoteFile(UNIGENBENCH + "train_prompt.txt", "unigenbench/train_prompt.txt",
                   "6f623f9b104e3487269444d99f4790b15566e3e4f7fc8e67ffd853699d1e19ab"),
        RemoteFile(UNIGENBENCH.removesuffix("data/") + "LICENSE.txt", "unigenbench/LICENSE.txt",
                   "b639d6eea380e4dc9e3c1d7e38e3924052fa4c11b556ea9c0e2b4b3c058a1acb"),
    ]),
    "geneval": ("GenEval prompts with metadata, as Flow-GRPO ships them (MIT)", [
        RemoteFile(FLOW_GRPO + "dataset/geneval/test_metadata.jsonl", "flow_grpo/geneval/test_metadata.jsonl",
                   "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28"),
        RemoteFile(FLOW_GRPO + "dataset/geneval/train_metadata.jsonl", "flow_grpo/geneval/train_metadata.jsonl",
                   None),
        _FLOW_GRPO_LICENSE,
    ]),
    "ocr": ("text-rendering prompts, as Flow-GRPO ships them (MIT)", [
        RemoteFile(FLOW_GRPO + "dataset/ocr/test.txt", "flow_grpo/ocr/test.txt",
                   "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc"),
        RemoteFile(FLOW_GRPO + "dataset/ocr/train.txt", "flow_grpo/ocr/train.txt", None),
        _FLOW_GRPO_LICENSE,
    ]),
    "pickscore": ("the PickScore training prompts, as Flow-GRPO ships them (MIT)", [
        RemoteFile(FLOW_GRPO + "dataset/pickscore/train.txt", "flow_grpo/pickscore/train.txt", None),
        _FLOW_GRPO_LICENSE,
    ]),
}


class DataFetchError(Exception):
    """A download failed or a file's checksum differs; printed as one line."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Copy `url` to `dest` (http(s) or file://). Replaced in tests."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
    except OSError as exc:
        raise DataFetchError(f"could not download {url}: {exc}; check the network, or fetch it by hand "
                             f"and place it at {dest.with_suffix('')}") from exc


def fetch_file(item: RemoteFile, data_dir: Path, *, force: bool = False, verify: bool = True) -> tuple[Path, str]:
    """Fetch one file; returns (path, status) with status 'present', 'fetched' or 'fetched, unchecked'."""
    dest = data_dir / item.path
    if dest.is_file() and not force:
        if item.sha256 and verify and sha256_of(dest) != item.sha256:
            raise DataFetchError(f"{dest} exists but its sha256 is not the recorded one; "
                                 f"re-fetch it with --force")
        return dest, "present"
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        download(item.url, part)
        digest = sha256_of(part)
        if item.sha256 and verify and digest != item.sha256:
            raise DataFetchError(f"{item.url}: sha256 {digest[:16]}... is not the recorded {item.sha256[:16]}...: "
                                 f"the download was cut or the upstream file changed; retry, or keep the "
                                 f"changed file with --no-verify")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest, "fetched" if item.sha256 and verify else f"fetched, unchecked (sha256 {digest})"


def fetch(names: list[str], data_dir: str | Path = "data", *, force: bool = False, verify: bool = True) -> list[Path]:
    unknown = [n for n in names if n not in DATASETS and n != "all"]
    if unknown:
        raise DataFetchError(f"unknown data set {unknown[0]!r}; choose from {', '.join([*DATASETS, 'all'])}")
    chosen = list(DATASETS) if "all" in names else list(dict.fromkeys(names))
    seen, written = set(), []
    for name in chosen:
        for item in DATASETS[name][1]:
            if item.path in seen:
                continue
            seen.add(item.path)
            path, status = fetch_file(item, Path(data_dir), force=force, verify=verify)
            print(f"{path}: {status}")
            written.append(path)
    return written


def _fetch_command(args) -> int:
    fetch(args.names, args.data_dir, force=args.force, verify=not args.no_verify)
    return 0


def _list_command(args) -> int:
    for name, (what, files) in DATASETS.items():
        print(f"{name}: {what}")
        for item in files:
            print(f"  {item.path}  <- {item.url}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download benchmark prompt files into data/")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download UniGenBench, GenEval, OCR or PickScore prompt files and "
                                          "check their sha256")
    f.add_argument("names", nargs="+", metavar="NAME", help=f"{', '.join(DATASETS)} or all")
    f.add_argument("--data-dir", default="data", help="where to put them (the recipes read data/)")
    f.add_argument("--force", action="store_true", help="download again even when the file is present")
    f.add_argument("--no-verify", action="store_true", help="keep a file whose sha256 differs from the recorded one")
    f.set_defaults(func=_fetch_command)
    ls = data_sub.add_parser("list", help="the data sets, their files and sources")
    ls.set_defaults(func=_list_command)

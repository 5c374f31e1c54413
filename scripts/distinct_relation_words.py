"""Copy a shapes pipeline folder, giving the relation words token embeddings that cannot blur.

    python scripts/distinct_relation_words.py assets/shapes-sd3-cells runs/distinct-words --norm 8

In both CLIP encoders, "left", "right", "above" and "below" get orthogonal token embeddings of the given
norm (the trained ones have norm about 0.33 and cosines 0.5-0.8). Continuing pretraining from the copy
with the encoders frozen (`flowgrpo pretrain ... init_from=OUT train_text_encoders=false`) asks whether
the transformer learns the relations once the words reach it as clearly different inputs;
`scripts/relation_probe.py` prints the resulting per-token cosines and layouts.
"""

from __future__ import annotations

import argparse
import shutil

import torch

RELATION_WORDS = ("left", "right", "above", "below")


def main() -> None:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="a shapes pipeline folder")
    ap.add_argument("out", help="where the copy goes")
    ap.add_argument("--norm", type=float, default=8.0, help="norm of each redrawn embedding")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    shutil.copytree(args.src, args.out, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    for encoder_dir, tokenizer_dir in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tok = AutoTokenizer.from_pretrained(args.src, subfolder=tokenizer_dir)
        encoder = CLIPTextModelWithProjection.from_pretrained(args.src, subfolder=encoder_dir)
        table = encoder.text_model.embeddings.token_embedding.weight
        ids = []
        for word in RELATION_WORDS:
            word_ids = tok(word, add_special_tokens=False).input_ids
            if len(word_ids) != 1:
                raise ValueError(f"{args.src}: {word!r} is not one token of {tokenizer_dir} ({word_ids})")
            ids.append(word_ids[0])
        basis, _ = torch.linalg.qr(torch.randn(table.shape[1], len(ids), generator=gen))
        with torch.no_grad():
            table[ids] = basis.T * args.norm
        encoder.save_pretrained(f"{args.out}/{encoder_dir}")
    print(f"wrote {args.out}: {', '.join(RELATION_WORDS)} redrawn at norm {args.norm}")


if __name__ == "__main__":
    main()

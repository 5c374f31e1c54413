"""`flowgrpo eval generate | adopt | score | report`: benchmark runs from the command line.

    flowgrpo eval generate --benchmark unigenbench --model black-forest-labs/FLUX.1-dev --out runs/flux
    flowgrpo eval adopt --benchmark unigenbench --images downloaded/flux_images   # images made elsewhere
    flowgrpo eval score runs/flux --judge-url http://127.0.0.1:8080/v1 --judge-model QwenVL
    flowgrpo eval score runs/flux --judge-url ... --template-file ugb_en.json --parser official \
        --retry-style fresh --parse-retries 10 --image-format JPEG --max-tokens 4096 --temperature none \
        --testpoints test_prompts_en_aug2025.csv      # the official protocol (docs/evaluation.md)
    flowgrpo eval report runs/flux runs/flux-prefgrpo --out reports/flux

Bad input (a missing column, an unreachable judge setting, a half-generated run) ends with a
one-line error naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os


def _user_error(exc: Exception):
    from ..cli import UserError

    return UserError(str(exc))


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        rank, world = (int(x) for x in text.split("/"))
    except ValueError:
        from ..cli import UserError

        raise UserError(f"--shard takes RANK/WORLD such as 0/4, got {text!r}") from None
    return rank, world


def _generate(args) -> int:
    from .benchmarks import EvalError
    from .generate import generate

    try:
        path = generate(args.benchmark, args.model, lora=args.lora, out_dir=args.out,
                        images_per_prompt=args.images_per_prompt, steps=args.steps, guidance=args.guidance,
                        seed=args.seed, resolution=args.resolution, batch_size=args.batch_size, limit=args.limit,
                        shard=_shard(args.shard), dtype=args.dtype, device=args.device, data_dir=args.data_dir,
                        prompts=args.prompts, lora_scale=args.lora_scale, progress=not args.quiet)
    except EvalError as exc:
        raise _user_error(exc) from None
    print(f"wrote {path}")
    return 0


def _adopt(args) -> int:
    from .benchmarks import EvalError
    from .generate import adopt, load_manifest

    try:
        path = adopt(args.benchmark, args.images, args.images_per_prompt, args.label, args.data_dir, args.prompts)
    except EvalError as exc:
        raise _user_error(exc) from None
    man = load_manifest(args.images)
    print(f"wrote {path}: {man['images_done']} of {man['images_total']} expected images present")
    return 0


def _judge_config(args):
    from ..chat import ChatConfig

    if not args.judge_url:
        return None
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        from ..cli import UserError

        raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    return ChatConfig(base_url=args.judge_url, model=args.judge_model, api_key=key, timeout=args.timeout,
                      max_retries=args.max_retries, concurrency=args.concurrency, max_tokens=args.max_tokens,
                      temperature=args.temperature)


def _temperature(text: str) -> float | None:
    """--temperature: a number, or none (send no temperature: the server's default)."""
    if text.strip().lower() in ("none", "null", "default"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'none', got {text!r}") from None


def _score(args) -> int:
    from .benchmarks import EvalError
    from .score import score

    judge_options = {"image_quality": args.image_quality, "parser": args.parser, "retry_style": args.retry_style,
                     "template_file": args.template_file, "template_syntax": args.template_syntax,
                     "testpoints": args.testpoints}
    try:
        kwargs = {"url": args.reward_url} if args.reward_url else None
        result = score(args.run_dir, args.metric, reward=args.reward, out_dir=args.out, judge=_judge_config(args),
                       reward_kwargs=kwargs,
                       batch_size=args.batch_size, parse_retries=args.parse_retries,
                       retry_failures=args.retry_failures, image_format=args.image_format, progress=not args.quiet,
                       judge_options=judge_options)
    except EvalError as exc:
        raise _user_error(exc) from None
    if result["metric"] == "unigenbench":
        from .unigenbench import markdown_table

        print(markdown_table(result))
    else:
        from .score import markdown_summary

        print(markdown_summary(result))
    return 0


def _report(args) -> int:
    from .benchmarks import EvalError
    from .report import report

    names = args.names.split(",") if args.names else None
    try:
        path = report(args.run_dirs, args.out, names=names, n_prompts=args.prompts_shown,
                      images_per_prompt=args.images_shown, cell=args.cell)
    except EvalError as exc:
        raise _user_error(exc) from None
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0


def add_eval_commands(esub: argparse._SubParsersAction) -> None:
    """Add generate, score and report to the `flowgrpo eval` subcommands."""
    g = esub.add_parser("generate", help="generate a benchmark's images (fixed seeds, resumable, sharded)")
    g.add_argument("--benchmark", required=True,
                   help="unigenbench, geneval, ocr, shapes, or a prompt FILE (.txt, .jsonl, .csv)")
    g.add_argument("--model", required=True, help="hub id or diffusers folder (SD3/SD3.5, FLUX.1, shapes)")
    g.add_argument("--lora", default=None, help="a trained LoRA folder to apply")
    g.add_argument("--lora-scale", type=float, default=1.0, help="multiple of the trained strength (1 = as trained)")
    g.add_argument("--out", required=True, help="run folder: images {key}_{j}.png and manifest.json")
    g.add_argument("--prompts", default=None, help="the named benchmark's file, if not under --data-dir")
    g.add_argument("--data-dir", default=None, help="folder holding unigenbench/, flow_grpo/ (default $FLOWGRPO_DATA)")
    g.add_argument("--images-per-prompt", type=int, default=None, help="default: the benchmark's (UniGenBench 4)")
    g.add_argument("--steps", type=int, default=None, help="default: the model's eval steps (SD3 40, FLUX 30)")
    g.add_argument("--guidance", type=float, default=None, help="default: the model's (SD3 4.5, FLUX 3.5)")
    g.add_argument("--resolution", type=int, default=None, help="square side in pixels; default: the model's")
    g.add_argument("--seed", type=int, default=0, help="base seed; image seeds derive from it, the item and j")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--limit", type=int, default=None, help="only the first N prompts (a quick look)")
    g.add_argument("--shard", default=None, help="RANK/WORLD for independent jobs without torch.distributed")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    g.add_argument("--device", default=None)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    a = esub.add_parser("adopt", help="make a folder of {key}_{j}.png images made elsewhere scoreable")
    a.add_argument("--benchmark", required=True, help="the benchmark the images answer (as for generate)")
    a.add_argument("--images", required=True, help="the image folder (the manifest is written into it)")
    a.add_argument("--images-per-prompt", type=int, default=None)
    a.add_argument("--label", default="external", help="name of the model that made them")
    a.add_argument("--prompts", default=None)
    a.add_argument("--data-dir", default=None)
    a.set_defaults(func=_adopt)

    s = esub.add_parser("score", help="score a generated run (UniGenBench judge, GenEval, OCR, shapes, a reward)")
    s.add_argument("run_dir")
    s.add_argument("--metric", default="auto",
                   help="auto (from the run's benchmark), unigenbench, geneval, ocr, shapes, or a reward name")
    s.add_argument("--reward", default=None, help="reward to use instead of the metric's default "
                                                  "(any registered name, or remote:http://HOST:PORT)")
    s.add_argument("--reward-url", default=None, help="server of a client reward, e.g. the GenEval scorer "
                                                      "(geneval: default http://127.0.0.1:18085)")
    s.add_argument("--out", default=None, help="default: RUN_DIR/scores/<metric>")
    s.add_argument("--batch-size", type=int, default=16, help="images per reward call")
    j = s.add_argument_group("UniGenBench judge (an OpenAI-compatible server)")
    j.add_argument("--judge-url", default=None, help="e.g. http://127.0.0.1:8080/v1 (vLLM) or Gemini's "
                                                     "https://generativelanguage.googleapis.com/v1beta/openai")
    j.add_argument("--judge-model", default="default", help="the served model name")
    j.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    j.add_argument("--concurrency", type=int, default=16)
    j.add_argument("--timeout", type=float, default=180.0, help="seconds per request")
    j.add_argument("--max-retries", type=int, default=3, help="transport retries per request")
    j.add_argument("--parse-retries", type=int, default=2,
                   help="asks after an unreadable answer (official: 10 with --retry-style fresh)")
    j.add_argument("--retry-style", default="correct", choices=["correct", "fresh"],
                   help="correct: re-ask in the same conversation with the reason; fresh: ask the same "
                        "single-turn question again, also after a failed request (the official way)")
    j.add_argument("--parser", default="strict", choices=["strict", "official"],
                   help="strict: the last <score> block, JSON 0/1 integers; official: the first <analysis> "
                        "and <score> blocks, as the official scorer reads them")
    j.add_argument("--template-file", default=None,
                   help="the judge question from a file (e.g. your copy of the official one; placeholders "
                        "{prompt} {testpoint} {explanation} {test_explanation}; a .json file may add "
                        "definitions and headers, see docs/evaluation.md)")
    j.add_argument("--template-syntax", default=None, choices=["plain", "format"],
                   help="how placeholders are filled (default: the file's own, else plain)")
    j.add_argument("--testpoints", default=None,
                   help="score against this UniGenBench CSV's testpoints instead of the run's (e.g. the "
                        "Aug-2025 file, 1,814 testpoints; the Oct-2025 file dropped one at index 428: 1,813)")
    j.add_argument("--max-tokens", type=int, default=2048, help="official: 4096")
    j.add_argument("--temperature", type=_temperature, default=0.0,
                   help="a number, or none to send no temperature (the server's default, as the official)")
    j.add_argument("--image-format", default="PNG", choices=["PNG", "JPEG"],
                   help="how images are sent (official vLLM client: JPEG quality 95)")
    j.add_argument("--image-quality", type=int, default=95, help="JPEG quality (1-100) with --image-format JPEG")
    j.add_argument("--retry-failures", action="store_true", help="ask again about images recorded as failures")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_score)

    r = esub.add_parser("report", help="compare scored runs side by side (Markdown, HTML, charts, grids)")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", required=True, help="report folder")
    r.add_argument("--names", default=None, help="comma-separated column names (default: folder names)")
    r.add_argument("--prompts-shown", type=int, default=8, help="prompts in the image grids")
    r.add_argument("--images-shown", type=int, default=2, help="images per prompt and run in the grids")
    r.add_argument("--cell", type=int, default=192, help="grid cell size in pixels")
    r.set_defaults(func=_report)


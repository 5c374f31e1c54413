"""README and docs/ stay true to the repository: links, paths, commands, config keys, no history
(rules in tests/docs_check.py), and the generated config references are current."""

import subprocess
import sys

import pytest
from docs_check import ROOT, check_code, check_config_comments, check_doc, check_test_names, doc_files


def _run(script_args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "config_docs.py"), *script_args],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("args,page", [([], "configs.md"), (["--shapes"], "shapes-configs.md")])
def test_config_reference_is_current_and_every_field_has_a_reason(args, page):
    out = _run(args)
    fix = f"run: python scripts/config_docs.py {' '.join(args)} > docs/{page}"
    assert out == (ROOT / "docs" / page).read_text(), fix
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) > 40
    assert not [r for r in rows if r.rstrip().endswith("|  |")], "a config field has no reason comment"


def test_readme_and_docs_links_paths_commands_keys_and_no_history():
    errors = [e for path in doc_files() for e in check_doc(path)]
    assert not errors, "\n".join(errors)


def test_config_comments_and_code_hold_no_history():
    errors = [e for path in sorted((ROOT / "configs").rglob("*.yaml")) for e in check_config_comments(path)]
    rules = {ROOT / "tests" / "docs_check.py", ROOT / "tests" / "test_docs.py"}  # they spell the patterns out
    for folder in ("src", "scripts", "tests"):
        errors += [e for path in sorted((ROOT / folder).rglob("*.py")) if path not in rules for e in check_code(path)]
    errors += check_test_names()
    assert not errors, "\n".join(errors)


PLANTED = [
    ("## Results (session 12)\n", "history word"),
    ("The base make demo trains now trains faster.\n", "history word"),
    ("See [the world](shapes-world.md#no-such-heading).\n", "no heading for anchor"),
    ("See [the world](no-such-page.md).\n", "does not exist"),
    ("Edit `configs/no_such_recipe.yaml` first.\n", "does not exist"),
    ("Run `flowgrpo trian configs/demo.yaml`.\n", "unknown subcommand"),
    ("Run `flowgrpo eval shapes --modle M`.\n", "has no flag --modle"),
    ("Run `flowgrpo eval shapes --model M\n--tgas colors` on the split.\n", "has no flag --tgas"),
    ("```bash\nflowgrpo train configs/demo.yaml \\\n    optim.lrr=1e-4\n```\n", "config key 'optim.lrr'"),
    ("Set `sample.windw_size` to 3.\n", "config key 'sample.windw_size'"),
    ("Run `flowgrpo train configs/demo.yaml optim.policy_loss=nftt`.\n", "the config does not load"),
    ("Prompts: `../shared/data/unigenbench/train_prompt.txt`.\n", "points at ../shared"),
]


@pytest.mark.parametrize("line,message", PLANTED)
def test_a_planted_bad_line_is_caught(line, message):
    page = ROOT / "docs" / "planted.md"  # never written: the check reads the text given
    clean = "# A page\n\nOutputs land in `runs/demo/lora`; `flowgrpo train configs/demo.yaml optim.lr=1e-4`.\n"
    assert check_doc(page, clean) == []
    errors = check_doc(page, clean + line)
    assert any(message in e for e in errors), errors


def test_planted_history_in_a_config_comment_is_caught():
    text = "optim:\n  lr: 1.0e-3  # tuned in session 7\n  steps: 80  # the demo's length\n"
    errors = check_config_comments(ROOT / "configs" / "planted.yaml", text)
    assert len(errors) == 1 and ":2:" in errors[0]

"""The README's promises: its code runs as written, its config reference matches the dataclass, CI runs its command."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

from peft.config import PeftConfig

from sdlora_peft import SDLoraConfig
from sdlora_peft.continual import cli, zoo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_python_examples_run():
    blocks = python_blocks()
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_config_reference_lists_exactly_the_sdlora_fields():
    own = {f.name for f in dataclasses.fields(SDLoraConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    own |= {"target_modules", "modules_to_save"} & {f.name for f in dataclasses.fields(SDLoraConfig)}
    documented = set(re.findall(r"^\| `(\w+)` \|", README, flags=re.MULTILINE))
    assert documented == own
    for field in dataclasses.fields(SDLoraConfig):
        if field.name in documented:
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            assert f"| `{field.name}` | `{default!r}` |".replace("'", '"') in README, field.name


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make conformance" in README
    assert "make conformance" in (ROOT / ".ci" / "run").read_text()


def test_the_demo_is_an_offline_sdlora_cil_run_of_three_seeds():
    """`make demo`'s options parse, name offline zoo sets and compare SD-LoRA, sequential LoRA and a frozen head."""
    makefile = (ROOT / "Makefile").read_text()
    demo_args = re.search(r"^DEMO_ARGS := (.*?)(?<!\\)$", makefile, flags=re.MULTILINE | re.DOTALL).group(1)
    args = cli.parse_args(shlex.split(demo_args.replace("\\\n", " ")) + ["--output", "unused"])
    assert args.model in zoo.MODEL_NAMES and args.dataset in zoo.DATASET_NAMES
    assert args.seeds == "0,1,2"
    methods = args.methods.split(",")
    assert {"sdlora", "lora-seq"} <= set(methods) and any(method.startswith("ncm") for method in methods)

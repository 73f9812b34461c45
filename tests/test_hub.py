"""SD-LoRA adapters to and from the Hugging Face Hub, offline.

Uploads run the real `push_to_hub`; only the Hub's HTTP calls are replaced, and the files of the commit it would
send are captured. Downloads read a local Hub cache laid out as the Hub client writes it, with offline mode on.
Offline mode is on in every test, so anything that tried to reach the Hub would fail instead.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import CASE_BY_NAME, output, sdlora_layers, train_steps
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import EntryNotFoundError
from peft import AutoPeftModel, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from transformers import BertForSequenceClassification, ViTForImageClassification

from sdlora_peft import SDLoraConfig

ADAPTER_ID = "someone/sdlora-adapter"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# offline, PEFT cannot look up the base model's config to see whether its vocabulary changed; here it did not
pytestmark = [
    pytest.mark.usefixtures("offline_hub"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in tiny-org"),
    pytest.mark.filterwarnings("error:Unable to fetch remote file"),  # a Hub request slipped through
]


class FakeHub:
    """Stands in for the Hub's HTTP API: records the files of each commit, and serves the latest README."""

    def __init__(self, monkeypatch, readme: str | None = None) -> None:
        self.commits: list[dict[str, bytes]] = []
        self.readme = readme
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", self.download_readme)

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as handle:  # the upload reads the file now; push_to_hub deletes it after
                files[operation.path_in_repo] = handle.read()
        self.commits.append(files)
        if "README.md" in files:
            self.readme = files["README.md"].decode()
        return SimpleNamespace(oid=COMMIT, commit_url="", pr_url=None)

    def download_readme(self, repo_id, filename, **kwargs):
        if self.readme is None:
            raise EntryNotFoundError(f"{filename} not found in {repo_id}")  # a new repository
        path = Path(kwargs.get("cache_dir") or constants.HF_HUB_CACHE) / "remote-README.md"
        path.write_text(self.readme)
        return str(path)


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
    """Lay `files` out as the Hub client caches a download: content-addressed blobs, a snapshot of relative
    symlinks per commit, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def trained_sequence(model, inputs, tasks: int = 3) -> None:
    """Train `tasks` tasks, advancing after each but the last (which stays open, as after a real run)."""
    for task in range(tasks):
        if task:
            model.advance_task()
        train_steps(model, inputs)


def vit_in_cache(cache: Path, tmp_path: Path, repo_id: str = "tiny-org/tiny-vit") -> torch.nn.Module:
    """A tiny ViT placed in the Hub cache under `repo_id` and loaded back from it by id, as a user would."""
    case = CASE_BY_NAME["vit"]
    case.build().save_pretrained(tmp_path / "base")
    put_in_cache(cache, repo_id, folder_files(tmp_path / "base"))
    return ViTForImageClassification.from_pretrained(repo_id).eval()


def test_push_to_hub_uploads_a_loadable_adapter(monkeypatch, tmp_path, offline_hub):
    case = CASE_BY_NAME["vit"]
    base = vit_in_cache(offline_hub, tmp_path)
    config = SDLoraConfig(r=4, rank_schedule=[4, 2, 3], modules_to_save=["classifier"])
    model = get_peft_model(copy.deepcopy(base), config)
    inputs = case.inputs()
    trained_sequence(model, inputs)
    hub = FakeHub(monkeypatch)

    model.push_to_hub(ADAPTER_ID)

    (files,) = hub.commits
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    pushed = write_files(tmp_path / "pushed", files)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), pushed)
    assert [layer.sdlora_frozen_ranks["default"] for layer in sdlora_layers(loaded)] == [[4, 2]] * 4
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=0, atol=0)
    card = ModelCard.load(pushed / "README.md")
    assert card.data.library_name == "peft"  # not the generic template's "transformers"
    assert card.data.base_model == "tiny-org/tiny-vit"
    assert f'AutoPeftModel.from_pretrained("{ADAPTER_ID}")' in card.text


def test_push_keeps_the_card_already_on_the_hub(monkeypatch, tmp_path, offline_hub):
    case = CASE_BY_NAME["vit"]
    base = vit_in_cache(offline_hub, tmp_path)
    model = get_peft_model(copy.deepcopy(base), SDLoraConfig(r=4, modules_to_save=["classifier"]))
    trained_sequence(model, case.inputs(), tasks=2)
    remote = "---\nlicense: mit\ntags:\n- my-tag\n---\n\n# My adapter\n\nWritten by hand.\n"
    hub = FakeHub(monkeypatch, readme=remote)

    model.push_to_hub(ADAPTER_ID, tags=["pushed-tag"])
    model.push_to_hub(ADAPTER_ID)

    first, second = (ModelCard(commit["README.md"].decode()) for commit in hub.commits)
    assert first.content == second.content  # a second push adds nothing twice
    assert second.data.license == "mit" and "Written by hand." in second.text
    assert {"my-tag", "pushed-tag", "sdlora", "peft"} <= set(first.data.tags)
    assert second.text.count("<!-- sdlora-peft:start -->") == 1
    assert "| 1 (open) |" in second.text


@pytest.mark.parametrize("case_name", ["vit", "bert"])
def test_load_by_repo_id_from_the_offline_cache(monkeypatch, tmp_path, offline_hub, case_name):
    case = CASE_BY_NAME[case_name]
    base_id = f"tiny-org/tiny-{case_name}"
    case.build().save_pretrained(tmp_path / "base")
    put_in_cache(offline_hub, base_id, folder_files(tmp_path / "base"))
    base_class = ViTForImageClassification if case_name == "vit" else BertForSequenceClassification
    base = base_class.from_pretrained(base_id).eval()
    task_type = None if case_name == "vit" else "SEQ_CLS"  # an image classifier has no PEFT task type
    config = SDLoraConfig(r=3, rank_schedule=[3, 5], task_type=task_type, modules_to_save=["classifier"])
    model = get_peft_model(copy.deepcopy(base), config)
    inputs = case.inputs()
    trained_sequence(model, inputs)
    hub = FakeHub(monkeypatch)
    model.push_to_hub(ADAPTER_ID)
    put_in_cache(offline_hub, ADAPTER_ID, hub.commits[0])
    expected = output(model, inputs)

    by_id = PeftModel.from_pretrained(copy.deepcopy(base), ADAPTER_ID)
    auto_class = AutoPeftModel if task_type is None else AutoPeftModelForSequenceClassification
    auto = auto_class.from_pretrained(ADAPTER_ID)

    for loaded in (by_id, auto):
        assert loaded.peft_config["default"].frozen_ranks == [3, 5]
        torch.testing.assert_close(output(loaded.eval(), inputs), expected, rtol=0, atol=0)


def test_transformers_load_adapter_refuses_sdlora(tmp_path):
    """transformers 5.23's `PreTrainedModel.load_adapter` injects through peft's `inject_adapter_in_model`, which
    peft 0.21 refuses for tuners with state on the tuner (SD-LoRA's global magnitudes): a clear error, and the
    base model is left as it was."""
    case = CASE_BY_NAME["vit"]
    base = case.build()
    model = get_peft_model(copy.deepcopy(base), SDLoraConfig(r=4, magnitude_sharing="layer"))
    trained_sequence(model, case.inputs(), tasks=2)
    model.save_pretrained(tmp_path / "adapter")
    target = copy.deepcopy(base)

    with pytest.raises(ValueError, match="shared state"):
        target.load_adapter(str(tmp_path / "adapter"))

    assert not sdlora_layers(target)
    torch.testing.assert_close(output(target, case.inputs()), output(base, case.inputs()), rtol=0, atol=0)

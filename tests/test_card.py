"""The model card every SD-LoRA save writes, and the results `write_model_card` adds to it."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import CASE_BY_NAME, make_peft, output, put_old_direction, train_steps
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from sdlora_peft import SDLoraConfig
from sdlora_peft.card import CARD_TAGS, REPO_ID_PLACEHOLDER, write_model_card
from sdlora_peft.registration import register

# offline, PEFT cannot look up the base model's config to see whether its vocabulary changed; here it did not
pytestmark = [
    pytest.mark.usefixtures("offline_hub"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in tiny-org"),
    pytest.mark.filterwarnings("error:Unable to fetch remote file"),  # a Hub request slipped through
]

SUMMARY = {
    "final_accuracy": {"mean": 43.6, "std": 1.25},
    "average_incremental_accuracy": {"mean": 61.0, "std": 2.0},
    "forgetting": {"mean": 12.5, "std": 0.5},
    "bwt": {"mean": -12.5, "std": 0.5},
    "runs": [],
}  # the shape of one method in sdlora-cil's results.json


def named(model: torch.nn.Module, repo_id: str) -> torch.nn.Module:
    """Give a model built from a config the hub id it would have after `from_pretrained(repo_id)`."""
    model.config._name_or_path = repo_id
    model.name_or_path = repo_id
    return model


def card_of(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_save_writes_metadata_task_history_and_config(tmp_path):
    case = CASE_BY_NAME["vit"]
    model = get_peft_model(named(case.build(), "tiny-org/tiny-vit"), SDLoraConfig(r=4, kd_threshold=1e-3))
    train_steps(model, case.inputs())
    model.advance_task()
    put_old_direction(model)
    assert model.advance_task().absorbed  # SD-LoRA-KD folds task 1 into task 0's magnitude
    train_steps(model, case.inputs())

    model.save_pretrained(tmp_path)

    card = card_of(tmp_path)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "tiny-org/tiny-vit"
    assert set(CARD_TAGS) <= set(card.data.tags)
    assert card.data.pipeline_tag == "image-classification"
    alpha = model.base_model.sdlora_magnitude["default"].tolist()
    assert f"| 0 | 4 | {alpha[0]:.4g} | no |" in card.text
    assert "| 1 | 4 | folded into earlier tasks | yes (residual" in card.text
    assert f"| 2 (open) | 4 | {alpha[1]:.4g} | - |" in card.text
    assert "| `kd_threshold` | `0.001` |" in card.text and '| `magnitude_sharing` | `"global"` |' in card.text


def test_per_layer_magnitudes_are_summarised_and_read_back_from_the_folder(tmp_path):
    case = CASE_BY_NAME["bert"]
    _, model = make_peft(case, r=3, magnitude_sharing="layer", task_type="SEQ_CLS")
    train_steps(model, case.inputs())
    model.advance_task()
    train_steps(model, case.inputs())
    model.save_pretrained(tmp_path)
    layers = [m.sdlora_magnitude["default"][0].item() for m in model.modules() if hasattr(m, "sdlora_frozen_A")]

    row = f"| 0 | 3 | {sum(layers) / len(layers):.4g} ({min(layers):.4g}-{max(layers):.4g}) | no |"
    assert row in card_of(tmp_path).text
    saved = card_of(tmp_path).text
    write_model_card(tmp_path)  # from the saved files alone: the same card
    assert card_of(tmp_path).text == saved


def test_saving_again_changes_nothing_and_keeps_the_results(tmp_path):
    case = CASE_BY_NAME["vit"]
    _, model = make_peft(case, r=4, modules_to_save=["classifier"])
    train_steps(model, case.inputs())
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, model, SUMMARY, dataset="glyphs")
    model.save_pretrained(tmp_path)
    once = (tmp_path / "README.md").read_text()
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, model, SUMMARY, dataset="glyphs")

    assert (tmp_path / "README.md").read_text() == once
    for section in ("<!-- sdlora-peft:start -->", "<!-- sdlora-peft-results:start -->", "### Framework versions"):
        assert once.count(section) == 1, section
    assert len(card_of(tmp_path).data.eval_results) == 3


def test_results_in_model_index_form(tmp_path):
    case = CASE_BY_NAME["bert"]
    _, model = make_peft(case, r=4, task_type="SEQ_CLS")
    model.save_pretrained(tmp_path)

    write_model_card(tmp_path, results=SUMMARY, dataset="kaomoji", repo_id="someone/sdlora-bert")

    card = card_of(tmp_path)
    results = {result.metric_name: result for result in card.data.eval_results}
    assert set(results) == {"Final accuracy", "Average incremental accuracy", "Forgetting"}
    assert results["Final accuracy"].metric_value == 43.6 and results["Forgetting"].metric_type == "forgetting"
    assert {(r.task_type, r.dataset_name) for r in results.values()} == {("text-classification", "kaomoji")}
    assert card.data.model_name == "someone/sdlora-bert"
    assert "| Final accuracy (%) | 43.60 ± 1.25 |" in card.text
    write_model_card(tmp_path, results={"seed": 0, "final_accuracy": 40.0}, dataset="kaomoji")  # one run
    assert [r.metric_value for r in card_of(tmp_path).data.eval_results] == [40.0]
    assert "| Final accuracy (%) | 40.00 |" in card_of(tmp_path).text
    with pytest.raises(ValueError, match="dataset"):
        write_model_card(tmp_path, results=SUMMARY)
    with pytest.raises(ValueError, match="final_accuracy"):
        write_model_card(tmp_path, results={"accuracy": 1.0}, dataset="kaomoji")


def test_causal_lm_results_are_named_continual_learning_of_generative_tasks(tmp_path):
    # what sdlora-clm hands the card (runs.finish): one run's record and its tasks joined as the dataset
    record = {"seed": 0, "final_accuracy": 75.0, "average_incremental_accuracy": 80.0, "forgetting": 10.0,
              "final_exact_match": 50.0, "tasks": ["colours", "sounds"]}  # fmt: skip
    _, model = make_peft(CASE_BY_NAME["llama"], r=4, task_type="CAUSAL_LM")
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, model, results=record, dataset="colours,sounds")

    card = card_of(tmp_path)
    results = {result.metric_name: result for result in card.data.eval_results}
    assert set(results) == {"Final accuracy", "Average incremental accuracy", "Forgetting", "Final exact match"}
    assert {(r.task_type, r.task_name, r.dataset_name) for r in results.values()} == {
        ("text-generation", "Continual learning of generative tasks", "colours,sounds")
    }
    assert (
        results["Final exact match"].metric_type == "exact_match" and results["Final exact match"].metric_value == 50
    )
    assert "Generative tasks `colours,sounds` learned one after the other" in card.text
    assert "adapter (Scalable Decoupled LoRA, Wu et al., ICLR 2025) for continual learning of generative" in card.text
    assert "lass-incremental" not in card.text and "class-incremental" not in card.data.tags
    write_model_card(tmp_path, results={**record, "final_exact_match": None}, dataset="colours,sounds")  # from files
    assert [r.task_name for r in card_of(tmp_path).data.eval_results] == ["Continual learning of generative tasks"] * 3

    # a classifier's results keep their name
    _, classifier = make_peft(CASE_BY_NAME["vit"], r=4)
    classifier.save_pretrained(tmp_path / "vit")
    write_model_card(tmp_path / "vit", classifier, results=record, dataset="glyphs")
    card = card_of(tmp_path / "vit")
    assert {r.task_name for r in card.data.eval_results} == {"Class-incremental learning"}
    assert "class-incremental" in card.data.tags
    assert "Class-incremental learning on `glyphs`, without a task id at inference." in card.text


@pytest.mark.parametrize("case_name", ["vit", "bert"])
def test_usage_snippet_runs_as_written(tmp_path, case_name):
    case = CASE_BY_NAME[case_name]
    base = case.build()
    base.save_pretrained(tmp_path / "base")  # AutoPeftModel rebuilds the base model from this path
    base = type(base).from_pretrained(tmp_path / "base").eval()
    task_type = "SEQ_CLS" if case_name == "bert" else None
    model = get_peft_model(copy.deepcopy(base), SDLoraConfig(r=4, task_type=task_type))
    train_steps(model, case.inputs())
    model.advance_task()
    train_steps(model, case.inputs())
    model.save_pretrained(tmp_path / "adapter")

    (snippet,) = re.findall(r"```python\n(.*?)```", card_of(tmp_path / "adapter").text, flags=re.DOTALL)
    namespace: dict = {}
    exec(snippet.replace(REPO_ID_PLACEHOLDER, str(tmp_path / "adapter")), namespace)

    torch.testing.assert_close(output(namespace["merged"], case.inputs()), output(model, case.inputs()))


def test_other_peft_methods_get_peft_card_unchanged(tmp_path):
    base = CASE_BY_NAME["vit"].build()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_own = PeftModel.create_or_update_model_card.__wrapped__

    model.save_pretrained(tmp_path / "hooked")
    peft_own(model, str(tmp_path / "peft"))

    assert (tmp_path / "hooked" / "README.md").read_text() == (tmp_path / "peft" / "README.md").read_text()


def test_registering_again_does_not_wrap_twice():
    hooked = PeftModel.create_or_update_model_card
    register()
    assert PeftModel.create_or_update_model_card is hooked
    assert not hasattr(hooked.__wrapped__, "_sdlora_hook")

"""InfLoRA and O-LoRA as `sdlora-cil` methods, driven through their protocol on real PEFT models."""

from __future__ import annotations

import copy
import itertools

import torch
from conftest import CASE_BY_NAME, MLP
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from torch import nn

from sdlora_peft.continual.methods import AdapterOptions, InfLoRA, Method, OLoRA, TaskData
from sdlora_peft.continual.methods.inflora import collecting_inputs
from sdlora_peft.continual.methods.lora import lora_factors, lora_layers
from sdlora_peft.continual.methods.olora import adapter_name
from sdlora_peft.continual.zoo.models.tiny import tiny_model


def forward(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def train(model: nn.Module, method: Method, batches: list[dict], steps: int = 5) -> None:
    """A few Adam steps on a real loss plus the method's penalty."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for batch in itertools.islice(itertools.cycle(batches), steps):
        loss = forward(model, batch).float().sub(1).pow(2).mean()
        extra = method.penalty(model)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def learn(method: Method, model: nn.Module, tasks: list[list[dict]], num_tasks: int | None = None, after=None):
    """The loop's calls, in its order; `after(index, model)` runs when a task has ended."""
    for index, batches in enumerate(tasks):
        model = method.begin_task(model, TaskData(index, [], lambda b=batches: iter(b), num_tasks or len(tasks)))
        train(model, method, batches)
        with method.observing(model), torch.no_grad():
            for batch in batches:
                forward(model, batch)
        model = method.end_task(model, is_last=index == (num_tasks or len(tasks)) - 1)
        if after is not None:
            after(index, model)
    return model


def mlp_tasks(dims: list[int], seed: int = 0) -> list[list[dict]]:
    """MLP inputs for a few tasks, task t's inside a random subspace of dimension dims[t] (of 6)."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for dim in dims:
        basis = torch.linalg.qr(torch.randn(6, dim, generator=generator))[0]
        tasks.append([{"x": torch.randn(16, dim, generator=generator) @ basis.T} for _ in range(3)])
    return tasks


def image_tasks(count: int, seed: int = 0) -> list[list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    return [[{"pixel_values": torch.randn(4, 3, 16, 16, generator=generator)} for _ in range(2)] for _ in range(count)]


def layer_output(model: nn.Module, layer: str, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_submodule(layer)(inputs)


def test_inflora_leaves_the_outputs_on_an_earlier_tasks_inputs_unchanged():
    """Task 1's inputs to `lin0` span 2 of its 6 dimensions; after tasks 2 and 3 (folded, then the last branch), the
    layer's output on them is what task 1 left, while on task 2's own inputs it moved."""
    torch.manual_seed(0)
    method = InfLoRA(AdapterOptions(r=2, target_modules=["lin0"]))
    tasks, layer = mlp_tasks([2, 6, 6]), "base_model.model.lin0"
    old, new = (torch.cat([batch["x"] for batch in batches]) for batches in tasks[:2])
    outputs = {}

    def record(index, model):
        outputs[index] = layer_output(model, layer, old), layer_output(model, layer, new)

    learn(method, method.wrap(MLP()), tasks, after=record)
    assert method.memory[layer].protected().shape[1] >= 2
    for later in (1, 2):
        assert torch.allclose(outputs[later][0], outputs[0][0], atol=1e-5)
    assert (outputs[1][1] - outputs[0][1]).abs().max() > 1e-2


def test_inflora_designs_fixed_down_projections_orthogonal_to_the_memory():
    torch.manual_seed(0)
    method = InfLoRA(AdapterOptions(r=2, target_modules=["lin0", "lin1"]))
    tasks = mlp_tasks([3, 6])
    model = learn(method, method.wrap(MLP()), tasks[:1], num_tasks=2)
    model = method.begin_task(model, TaskData(1, [], lambda: iter(tasks[1]), 2))
    designed = {
        name: [t.detach().clone() for t in lora_factors(layer, "default")] for name, layer in lora_layers(model)
    }
    assert set(designed) == set(method.memory) and len(designed) == 2  # lin0 and lin1 see different inputs
    for name, (down, up) in designed.items():
        assert (down.double() @ method.memory[name].protected()).abs().max() < 1e-6
        assert not up.any() and torch.allclose(down @ down.T, torch.eye(2) / 3, atol=1e-6)
    train(model, method, tasks[1])
    for name, layer in lora_layers(model):
        down, up = lora_factors(layer, "default")
        assert not down.requires_grad and torch.equal(down, designed[name][0])  # only the up-projection trains
        assert up.abs().max() > 0


def test_inflora_folding_a_task_keeps_the_function():
    torch.manual_seed(0)
    method = InfLoRA(AdapterOptions(r=4))
    tasks = image_tasks(2)
    model = method.wrap(CASE_BY_NAME["dinov2"].build())
    model = method.begin_task(model, TaskData(0, [], lambda: iter(tasks[0]), 2))
    train(model, method, tasks[0])
    with method.observing(model), torch.no_grad():
        before = [forward(model, batch) for batch in tasks[1]]
    model = method.end_task(model, is_last=False)
    with torch.no_grad():
        after = [forward(model, batch) for batch in tasks[1]]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(after, before))
    assert all(not lora_factors(layer, "default")[1].any() for _, layer in lora_layers(model))  # a fresh branch


def test_inflora_on_key_and_value_keeps_one_memory_per_attention_block():
    """Both projections of a block read the same input: one moment, one design, one memory (as the reference)."""
    torch.manual_seed(0)
    method = InfLoRA(AdapterOptions(r=2, target_modules=["k_proj", "v_proj"]))
    tasks = image_tasks(2)
    model = learn(method, method.wrap(CASE_BY_NAME["dinov2"].build()), tasks[:1], num_tasks=2)
    model = method.begin_task(model, TaskData(1, [], lambda: iter(tasks[1]), 2))
    layers = dict(lora_layers(model))
    assert len(layers) == 4 and len(method.memory) == 2
    for block in range(2):
        key, value = (
            layers[f"base_model.model.dinov2.encoder.layer.{block}.attention.{p}"] for p in ("k_proj", "v_proj")
        )
        assert torch.equal(lora_factors(key, "default")[0], lora_factors(value, "default")[0])
    stored = method.stored_by_kind(model)
    assert stored["subspace_memory"] == sum(subspace.basis.numel() for subspace in method.memory.values()) > 0
    assert method.stored_parameters(model) == sum(stored.values())


def test_inflora_checkpoint_restores_the_memory_and_goes_on_identically(tmp_path):
    torch.manual_seed(0)
    tasks, base = mlp_tasks([3, 6, 6]), MLP()
    options = AdapterOptions(r=2, target_modules=["lin0", "lin1"], inflora_thresholds=(0.9, 0.99))
    method = InfLoRA(options)
    model = learn(method, method.wrap(copy.deepcopy(base)), tasks[:2], num_tasks=3)
    assert any(subspace.complement for subspace in method.memory.values())  # past half: the complement is kept
    method.save(model, tmp_path)
    resumed = InfLoRA(options)
    restored = resumed.restore(copy.deepcopy(base), tmp_path)
    assert resumed.memory.keys() == method.memory.keys()
    for name, subspace in method.memory.items():
        assert torch.equal(resumed.memory[name].basis, subspace.basis)
        assert resumed.memory[name].complement == subspace.complement
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    # PEFT's unused copy of the classifier from before the wrap (`original_module`) is the pristine one after a restore
    assert all(torch.equal(state[k], restored_state[k]) for k in state if "original_module" not in k)
    assert not any(p.requires_grad for n, p in restored.named_parameters() if ".lora_A." in n)
    last = (TaskData(2, [], lambda: iter(tasks[2]), 3), tasks[2])
    for m, mod in ((method, model), (resumed, restored)):
        torch.manual_seed(1)
        mod = m.begin_task(mod, last[0])
        train(mod, m, last[1])
    assert torch.equal(forward(model, tasks[2][0]), forward(restored, tasks[2][0]))


def test_inflora_moments_leave_out_padding_tokens():
    """A padded batch gives the moments of its sentences' real tokens, as if each had been run alone."""
    model, tokenizer, _ = tiny_model("text", 3)
    method = InfLoRA(AdapterOptions(r=2))
    model = method.wrap(model).eval()
    sentences = ["a short one", "a rather longer sentence"]
    with collecting_inputs(model) as padded, torch.no_grad():
        model(**tokenizer(sentences, padding=True, return_tensors="pt"))
    with collecting_inputs(model) as alone, torch.no_grad():
        for sentence in sentences:
            model(**tokenizer([sentence], return_tensors="pt"))
    assert padded.counts == alone.counts and len(padded.sums) == 2  # query and value share their input
    for owner in padded.sums:
        assert torch.allclose(padded.matrix(owner), alone.matrix(owner), atol=1e-4)


def dense_olora_penalty(model: nn.Module, current: int, lambdas: tuple[float, float]) -> torch.Tensor:
    """The paper's terms written out entry by entry: lambda_1 times the sum over layers, earlier tasks i and row pairs
    (j, k) of (a_ij . a_tk)^2, plus lambda_2 times every squared entry of the current LoRA."""
    total = torch.zeros((), dtype=torch.float64)
    for _, layer in lora_layers(model):
        down, up = (t.double() for t in lora_factors(layer, adapter_name(current)))
        for old in range(current):
            earlier = lora_factors(layer, adapter_name(old))[0].double()
            for j, k in itertools.product(range(len(earlier)), range(len(down))):
                total = total + lambdas[0] * torch.dot(earlier[j], down[k]) ** 2
        total = total + lambdas[1] * (sum(v**2 for v in down.flatten()) + sum(v**2 for v in up.flatten()))
    return total


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(0, 3), st.floats(0, 2), st.floats(0, 1), st.integers(0, 2**16))
def test_olora_penalty_matches_its_dense_formula(rank, current, orthogonality, l2, seed):
    torch.manual_seed(seed)
    method = OLoRA(AdapterOptions(r=rank, target_modules=["lin0", "lin1"], olora_lambdas=(orthogonality, l2)))
    model = method.wrap(MLP())
    for index in range(current + 1):
        model = method.begin_task(model, TaskData(index, [], lambda: iter([]), 4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    penalty = method.penalty(model)
    expected = dense_olora_penalty(model, current, (orthogonality, l2))
    if penalty is None:
        assert expected == 0
    else:
        assert torch.allclose(penalty.double(), expected, rtol=1e-5, atol=1e-6)


def test_olora_trains_only_the_current_lora_and_keeps_the_earlier_ones_bit_identical():
    torch.manual_seed(0)
    method = OLoRA(AdapterOptions(r=2, target_modules=["lin0", "lin1"]))
    snapshots = {}

    def snapshot(index, model):
        snapshots[index] = {n: p.detach().clone() for n, p in model.named_parameters()}

    model = learn(method, method.wrap(MLP()), mlp_tasks([6, 6, 6]), after=snapshot)
    assert set(as_adapters(model)) == {"default", "task_2", "task_3"}
    for name, value in snapshots[2].items():
        first_task = ".default." in name and "lora_" in name
        if first_task or ".task_2." in name:
            assert torch.equal(value, snapshots[1 if ".task_2." in name else 0][name]), name
        if (".task_3." in name and "lora_B" in name) or "modules_to_save" in name:
            assert not torch.equal(value, snapshots[1].get(name, torch.zeros_like(value))), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".task_3." in n or "modules_to_save" in n for n in trainable) and trainable


def as_adapters(model: nn.Module) -> list[str]:
    assert isinstance(model, PeftModel)
    return list(model.peft_config)


def test_olora_penalty_makes_the_new_down_projection_orthogonal():
    """Trained on the orthogonality term alone, the new down-projection turns away from the earlier ones."""
    torch.manual_seed(0)
    method = OLoRA(AdapterOptions(r=2, target_modules=["lin1"], olora_lambdas=(1.0, 0.0)))
    model = method.wrap(MLP())
    model = method.begin_task(model, TaskData(1, [], lambda: iter([]), 2))
    layer = dict(lora_layers(model))["base_model.model.lin1"]

    def overlap() -> float:
        with torch.no_grad():
            return float((lora_factors(layer, "default")[0] @ lora_factors(layer, "task_2")[0].T).square().sum())

    start = overlap()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(100):
        penalty = method.penalty(model)
        assert penalty is not None
        penalty.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert start > 1e-3 and overlap() < start * 1e-3


def test_olora_on_a_language_model_without_a_classifier(tmp_path):
    """Nothing is saved besides the LoRAs of a causal LM; a checkpoint brings every task's adapter back, active."""
    torch.manual_seed(0)
    method = OLoRA(AdapterOptions(r=2))
    base = CASE_BY_NAME["llama"].build()
    generator = torch.Generator().manual_seed(0)
    tasks = [[{"input_ids": torch.randint(0, 50, (2, 6), generator=generator)}] for _ in range(2)]
    model = method.wrap(copy.deepcopy(base))
    assert as_peft_config(model).modules_to_save is None
    model = learn(method, model, tasks)
    assert set(as_adapters(model)) == {"default", "task_2"}
    method.save(model, tmp_path)
    restored = OLoRA(AdapterOptions(r=2)).restore(copy.deepcopy(base), tmp_path)
    assert torch.equal(forward(model, tasks[0][0]), forward(restored, tasks[0][0]))
    trainable = {n for n, p in restored.named_parameters() if p.requires_grad}
    assert trainable and all(".task_2." in n for n in trainable)


def as_peft_config(model: nn.Module):
    assert isinstance(model, PeftModel)
    return model.peft_config["default"]

"""Class-incremental text classification with SD-LoRA, from Python: the `sdlora-cil` run as a function.

    python examples/cil_text.py                       # offline: SmolLM2-135M learns 44 kaomoji categories in 4 tasks
    accelerate launch examples/cil_text.py --model bert-base-uncased --dataset DATASET_ID --text-column text

Any flag of `sdlora-cil` can be added; the results come back as the dict that results.json holds.
(MiniLM's tokenizer maps most kaomoji to [UNK]; SmolLM2's byte-level tokenizer does not, hence the default.) The
offline default takes about half an hour on 2 CPU cores (a 135M-parameter decoder); a GPU makes it a minute.
"""

import sys

from sdlora_peft.continual import cli

DEFAULTS = [
    "--model", "smollm2-135m", "--dataset", "kaomoji", "--num-tasks", "4", "--max-train-per-class", "10",
    "--max-test-per-class", "10", "--max-length", "24", "--epochs", "1", "--batch-size", "16",
    "--methods", "sdlora,lora-seq,ncm", "--target-modules", "q_proj,v_proj", "--output", "runs/cil_text",
    "--overwrite",
]  # fmt: skip

results = cli.run(cli.parse_args(DEFAULTS + sys.argv[1:]))  # later flags override the defaults
for name, summary in results["methods"].items():
    run = summary["runs"][0]
    print(f"{name}: final accuracy {run['final_accuracy']:.1f}%, forgetting {run['forgetting']:.1f}")
    if run["magnitudes"]:
        print("  magnitude of each task's direction after the last task:", run["magnitudes"][-1])

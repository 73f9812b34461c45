"""Class-incremental learning metrics as an `evaluate` module.

Load it by path (works offline), e.g. with ``sdlora_peft.continual.metrics.load_cil_metric()``. The
numbers come from ``sdlora_peft.continual.metrics``, so they equal ``metrics.summarize`` on the same
accuracy matrix.
"""

import datasets
import evaluate

from sdlora_peft.continual.metrics import accuracy_matrix, incremental_accuracies, summarize

_DESCRIPTION = """
Final accuracy, average incremental accuracy, forgetting and backward transfer of a class-incremental run.
Add the test predictions made after each task, tagged with the index of that task (`steps`), then compute
with `task_of_class`, the map from class id to the integer index of the task that introduced it.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    steps (`list` of `int`): index of the last task trained when the prediction was made (0-based).
    task_of_class (`dict` of `int` to `int`): task index of every class id.
Returns:
    final_accuracy (`float`): top-1 over all classes after the last task, in percent.
    average_incremental_accuracy (`float`): mean over tasks of the top-1 over the classes seen so far.
    forgetting (`float`): mean drop from the best earlier accuracy on each old task to the final one.
    bwt (`float`): mean change from just-learned to final accuracy on each old task.
    incremental_accuracies (`list` of `float`): top-1 over the classes seen so far, after each task.
    accuracy_matrix (`list` of `list` of `float`): accuracy on task j after task t (NaN if not measured).
    task_sizes (`list` of `int`): test samples per task.
Examples:
    >>> metric = load_cil_metric()
    >>> metric.compute(predictions=[0, 0, 0], references=[0, 0, 1], steps=[0, 1, 1], task_of_class={0: 0, 1: 1})
    {'final_accuracy': 50.0, 'average_incremental_accuracy': 75.0, 'forgetting': 0.0, 'bwt': 0.0, ...}
"""

_CITATION = """
@inproceedings{wu2025sdlora,
  title={SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning},
  author={Wu, Yichen and Piao, Hongming and Huang, Long-Kai and Wang, Renzhen and Li, Wanhua and Pfister, Hanspeter
    and Meng, Deyu and Ma, Kede and Wei, Ying},
  booktitle={International Conference on Learning Representations},
  year={2025}
}
"""


class CilMetric(evaluate.Metric):
    """Accumulates per-sample predictions of every step and reduces them to the class-incremental metrics."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "steps": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, steps, task_of_class) -> dict:
        matrix, task_sizes = accuracy_matrix(predictions, references, steps, task_of_class)
        return {
            **summarize(matrix, task_sizes),
            "incremental_accuracies": incremental_accuracies(matrix, task_sizes),
            "accuracy_matrix": matrix.tolist(),
            "task_sizes": task_sizes,
        }

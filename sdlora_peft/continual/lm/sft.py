"""TRL's `SFTTrainer` with `ContinualTrainer`'s task sequences (needs the optional `trl` package).

`ContinualSFTTrainer` keeps everything of SFTTrainer for each task (its dataset preparation, its collator, its loss on
the completion tokens only, its metrics) and everything of ContinualTrainer around the tasks (``advance_task()``
between them, an optimizer per task, one adapter folder per task, magnitudes in the logs, resume). Tasks are
``prompt``/``target`` pairs as everywhere in `continual.lm` (``target`` is TRL's ``completion``); SFTTrainer sets
itself up from a training set, so the first task is passed as ``train_dataset`` too:

    trainer = ContinualSFTTrainer(model=peft_model, args=SFTConfig(...), processing_class=tokenizer,
                                  train_dataset=tasks[0])
    trainer.train_tasks(tasks)
"""

from __future__ import annotations

from typing import cast

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from ..trainer import ContinualTrainer


def as_completions(dataset: Dataset) -> Dataset:
    """A prompt/target dataset in TRL's prompt/completion format."""
    return dataset.rename_column("target", "completion") if "target" in dataset.column_names else dataset


class ContinualSFTTrainer(ContinualTrainer, SFTTrainer):
    """SFTTrainer, one task after the other (see the module's docstring)."""

    lm_collator = False  # TRL's collator reads the completion masks its dataset preparation writes

    def __init__(self, *args, train_dataset: Dataset, **kwargs) -> None:
        super().__init__(*args, train_dataset=as_completions(train_dataset), **kwargs)

    def prepare_task_dataset(self, dataset: Dataset) -> Dataset:
        """A task's pairs prepared the way SFTTrainer prepares its training set."""
        args, tokenizer = cast(SFTConfig, self.args), cast(PreTrainedTokenizerBase, self.processing_class)
        return self._prepare_dataset(as_completions(dataset), tokenizer, args, args.packing, None, "train")

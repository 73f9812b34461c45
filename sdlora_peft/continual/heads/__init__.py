"""How features become class scores in class-incremental learning.

Every head trains through the model's own classification layer with the logits of classes outside the current task
masked (the paper's protocol); they differ in how old and new classes are scored at evaluation:

- `linear`: the classification layer's logits over the classes seen so far (the paper's masked linear head);
- `cosine`: the classification layer becomes a cosine classifier (normalised features and class weights);
- `ncm`: nearest class mean of the adapted features, each class's mean taken when its task ends;
- `aligned`: per-class feature Gaussians, stored when a task ends; after each task the classification layer is
  re-trained on features sampled from them (classifier alignment, as in SLCA);
- `lda`: class means and one shared covariance with Ledoit-Wolf shrinkage (linear discriminant analysis);
- `ranpac`: a fixed random ReLU projection of the features and a ridge classifier on their accumulated Gram matrix
  (RanPAC);
- `ncm-sdc`, `aligned-sdc`, `lda-sdc`: the same, with the stored class means moved along with the features as the
  backbone learns (semantic drift compensation, Yu et al., CVPR 2020), estimated from the current task's own samples.

Heads store class statistics only (means, covariances, sums; never a sample): the runs stay rehearsal-free, and
`stored_statistics()` reports what was kept. One head a file; a new head joins with its file and one entry in
`HEADS`.
"""

from __future__ import annotations

from collections.abc import Callable

from .aligned import AlignedHead
from .base import Head
from .classifier import CLASSIFIER_NAMES, CosineClassifier, classifier_linear, classifier_path, unwrap
from .cosine import CosineHead
from .lda import LDAHead
from .prototypes import ClassMeanHead
from .ranpac import RanPACHead

HEADS: dict[str, Callable[[int], Head]] = {
    "linear": lambda seed: Head(),
    "cosine": lambda seed: CosineHead(),
    "ncm": lambda seed: ClassMeanHead(),
    "aligned": lambda seed: AlignedHead(seed=seed),
    "lda": lambda seed: LDAHead(),
    "ranpac": lambda seed: RanPACHead(seed=seed),
    "ncm-sdc": lambda seed: ClassMeanHead(compensates_drift=True),
    "aligned-sdc": lambda seed: AlignedHead(seed=seed, compensates_drift=True),
    "lda-sdc": lambda seed: LDAHead(compensates_drift=True),
}
HEAD_NAMES = tuple(HEADS)


def make_head(name: str, seed: int = 0) -> Head:
    """The head named `name` (one of HEAD_NAMES); `seed` fixes what it draws (aligned samples, RanPAC's projection)."""
    if name not in HEADS:
        raise ValueError(f"Unknown head {name!r}; choose one of {list(HEAD_NAMES)}.")
    return HEADS[name](seed)


__all__ = [
    "CLASSIFIER_NAMES",
    "HEADS",
    "HEAD_NAMES",
    "AlignedHead",
    "ClassMeanHead",
    "CosineClassifier",
    "CosineHead",
    "Head",
    "LDAHead",
    "RanPACHead",
    "classifier_linear",
    "classifier_path",
    "make_head",
    "unwrap",
]

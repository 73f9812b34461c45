"""The PNG figures of a results dict: written, readable, not blank, one per method where it applies."""

import numpy as np
import pytest

from .test_report import make_results

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from sdlora_peft.continual import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("plots") / "figures"
    return outdir, plots.write_plots(make_results(), outdir)


def test_write_plots_names_one_figure_per_method(written):
    outdir, paths = written
    assert [p.name for p in paths] == [
        "accuracy_curves.png",
        "accuracy_matrix_sdlora.png",
        "accuracy_matrix_seq-lora.png",
        "magnitudes_sdlora.png",  # seq-lora has no magnitudes, so no figure
    ]
    assert sorted(p.name for p in outdir.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_figures_are_valid_non_blank_pngs(written):
    for path in written[1]:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path.name
        assert len(data) > 10_000, path.name
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200, path.name
        assert np.var(image[..., :3]) > 0, path.name


def test_methods_without_magnitudes_get_no_magnitude_plot(tmp_path):
    results = make_results()
    del results["methods"]["sdlora"]
    assert plots.plot_magnitudes(results, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_a_method_that_kept_no_direction_gets_no_magnitude_plot(tmp_path):
    """The paper's one-component ablation never advances: it records an empty row of magnitudes after each task."""
    results = make_results()
    for run in results["methods"]["sdlora"]["runs"]:
        run["magnitudes"] = [[], [], []]
    assert plots.plot_magnitudes(results, tmp_path) == []


def test_free_text_method_names_get_distinct_safe_files(tmp_path):
    results = make_results()
    sdlora = results["methods"]["sdlora"]
    results["methods"] = {"sdlora@linear": sdlora, "sdlora#linear": sdlora, "a/b": sdlora}
    names = [p.name for p in plots.plot_accuracy_matrices(results, tmp_path)]
    assert names == [
        "accuracy_matrix_sdlora_linear.png",
        "accuracy_matrix_sdlora_linear_.png",
        "accuracy_matrix_a_b.png",
    ]


def test_runs_of_different_lengths_are_refused(tmp_path):
    results = make_results()
    runs = results["methods"]["sdlora"]["runs"]
    runs[1] = {**runs[1], "incremental_accuracies": runs[1]["incremental_accuracies"][:2]}
    with pytest.raises(ValueError, match="different numbers of tasks"):
        plots.plot_accuracy_curves(results, tmp_path / "curves.png")


def test_dropped_directions_leave_gaps(tmp_path):
    results = make_results()
    run = results["methods"]["sdlora"]["runs"][0]
    run["magnitudes"] = [[1.0], [0.8, 1.1], [0.7, None, 1.2]]  # direction 2 folded into the others
    (path,) = plots.plot_magnitudes(results, tmp_path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)

"""notebooks/layers.ipynb runs top to bottom on a tiny synthetic store + sweep (so it cannot rot)."""

from __future__ import annotations

import nbformat
import pytest

from tests.paths import ROOT
from tests.pipeline_fixtures import SIGNAL_SITE, write_synthetic_store, write_synthetic_sweep

NOTEBOOK = ROOT / "notebooks" / "layers.ipynb"


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed by a python3 kernel (this interpreter), with PROBECAL_STORE/_SWEEP set."""
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("notebook")
    store = write_synthetic_store(tmp / "store")
    write_synthetic_sweep(store, tmp / "run" / "sweep.json")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("PROBECAL_STORE", str(tmp / "store"))
        monkeypatch.setenv("PROBECAL_SWEEP", str(tmp / "run" / "sweep.json"))
        # the kernel starts in tmp: a stray default path cannot reach the repository's outputs/
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}
        ).execute()
    return nb, tmp


def test_notebook_runs_and_plots_sweep_pca_and_reliability(executed):
    nb, tmp = executed
    outputs = [out for cell in _code_cells(nb) for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3  # AUROC by layer, PCA, reliability
    for image in images:
        assert len(image["data"]["image/png"]) > 10_000  # base64 of a real plot, not an empty canvas
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert f"store: {tmp / 'store'} (150 answers" in text
    assert f"selected site: layer {SIGNAL_SITE[0]}, {SIGNAL_SITE[1]}" in text


def test_notebook_rejects_a_sweep_from_another_store(tmp_path):
    """A sweep whose selected site is not in the store is named in a clear error, not a KeyError later."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    store = write_synthetic_store(tmp_path / "store", layers=(0, 1, 2, 3))
    sweep = write_synthetic_sweep(store, tmp_path / "sweep.json")
    write_synthetic_store(tmp_path / "other", layers=(0, 1), signal_site=(1, "answer_last"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:5]  # up to the cell that loads the store and the sweep
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("PROBECAL_STORE", str(tmp_path / "other"))
        monkeypatch.setenv("PROBECAL_SWEEP", str(tmp_path / "sweep.json"))
        client = NotebookClient(
            nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        with pytest.raises(
            CellExecutionError, match=f"selected layer {sweep.best_layer}, .* which the store"
        ):
            client.execute()

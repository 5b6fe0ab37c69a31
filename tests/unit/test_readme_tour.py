"""The README's Python tour runs as written, on the tiny Llama and a tiny data set instead of SmolLM2 and
`facts` (the only substitutions; a test that cannot find them fails, so the tour cannot drift)."""

from __future__ import annotations

import re

from tests import tiny_models
from tests.paths import ROOT
from tests.unit.probes.training.test_train import _write_tiny_dataset


def tour_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python tour") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_tour_trains_serves_and_scores(tmp_path, monkeypatch):
    tiny_models.save_tiny_llama(tmp_path / "model")
    _write_tiny_dataset(tmp_path / "data.jsonl", n_rows=120)
    code = tour_code()
    substitutions = {
        'probecal.load_model("smollm2-135m-instruct")': (
            f'probecal.load_model(probecal.ModelSpec(name="tiny-llama", path={str(tmp_path / "model")!r}, '
            'device="cpu"))'
        ),
        'probecal.load_questions("facts", limit=300)': (
            f'probecal.load_questions("jsonl", path={str(tmp_path / "data.jsonl")!r})'
        ),
    }
    for old, new in substitutions.items():
        assert old in code, f"the README tour no longer says {old}: update this test with it"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the tour writes to outputs/
    namespace: dict = {}
    exec(compile(code, "README.md tour", "exec"), namespace)  # noqa: S102 - the documented code itself
    gen = namespace["gen"]
    assert 0.0 <= gen.p_correct <= 1.0 and isinstance(gen.abstained, bool)
    assert (tmp_path / "outputs" / "probe" / "probe.json").exists()
    assert namespace["scorer"].needs_logit_signals in (True, False)

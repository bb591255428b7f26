"""The written protocol: the native families satisfy it, the family table drives building and the
sampler's process, and the README's "Bring your own DiT" example runs in the tools as printed."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from smoothness import hooks
from smoothness.diffusion import Diffusion, SamplerConfig
from smoothness.models import build
from smoothness.models.dit import DiTConfig
from smoothness.models.latte import LatteConfig
from smoothness.models.latte_t2v import LatteT2VConfig
from smoothness.models.protocol import FAMILIES, family_of, is_model, make

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"          # its "Bring your own DiT" example


@pytest.mark.parametrize("name", ["DiT-Mini/2", "DiT-Mini/2-skip", "Latte-Mini/2", "LatteT2V-Mini/2"])
def test_native_families_satisfy_the_protocol(name):
    model = build(name)
    assert is_model(model) and family_of(model) is FAMILIES[model.family]
    assert type(make(model.config)) is type(model)


def test_make_dispatches_on_the_exact_config_class():
    assert [type(make(c(depth=4, hidden_size=64, num_heads=2))).__name__
            for c in (DiTConfig, LatteConfig)] == ["DiT", "Latte"]
    assert type(make(LatteT2VConfig(depth=4, hidden_size=64, num_heads=2, caption_channels=8))).__name__ == "LatteT2V"
    with pytest.raises(ValueError, match="no model family is configured by dict"):
        make({})


def test_only_hunyuan_is_v_prediction_and_defaults_follow_the_family():
    assert {n for n, f in FAMILIES.items() if f.prediction == "v"} == {"hunyuan-dit"}
    model = build("DiT-Mini/2")
    d = Diffusion.respaced(10)
    assert d.for_model(model) is d                                    # DiT: linear, epsilon
    explicit = Diffusion(list(d.timestep_map), prediction="v", schedule="scaled_linear")
    assert explicit.for_model(model) is explicit                      # an explicit process is kept


def test_readme_example_runs():
    text = README.read_text()
    code = re.search(r"```python\n(from types import SimpleNamespace.*?)```", text, re.S).group(1)
    scope = {}
    try:
        exec(compile(code, str(README), "exec"), scope)
        model, rec = scope["model"], scope["rec"]
        assert len(rec["blocks.3"]) == 1 and hooks.leftover_hooks(model) == []
        out = Diffusion.respaced(5).sample(model, (1, 4, 8, 8), None, SamplerConfig(num_steps=5))
        assert torch.isfinite(out).all()
    finally:
        FAMILIES.pop("tiny-dit", None)


def test_family_rows_agree_with_their_classes():
    from smoothness.cache.schedule import PRESETS
    from smoothness.diffusion import PREDICTIONS, SCHEDULES
    for name, fam in FAMILIES.items():
        assert fam.name == name and fam.model_class.family == name
        assert fam.condition == ("text" if hasattr(fam.model_class, "check_captions") else "class"), name
        assert fam.schedule in SCHEDULES and fam.prediction in PREDICTIONS and fam.macs in ("analytic", "measured")
        assert fam.cache_preset in ("", *PRESETS), name
        assert (fam.config_class is None) == bool(fam.diffusers_class), name

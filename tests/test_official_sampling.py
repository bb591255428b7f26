"""Each model family's default chain and guidance equal its official sampling code's.

The chains below are written out from the official code paths (paper-spec section 5), not computed
with ``smoothness.diffusion``: DiT's and Latte's class-to-video ``sample.py`` respace with
improved-diffusion's ``create_diffusion(str(n))`` for DDPM and DDIM alike; the text-to-video pipeline
uses diffusers' ``DDIMScheduler`` (leading, steps_offset 0)."""
from __future__ import annotations

import pytest
import torch

from smoothness.cache.schedule import Schedule, preset
from smoothness.diffusion import OFFICIAL, Diffusion, SamplerConfig, guide, guided_channels, official_sampling
from smoothness.models import build

# improved-diffusion create_diffusion("50") then ddim_sample_loop: the official class-to-video DDIM-50 (UCF101).
EVEN_DDIM50 = [999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734, 714, 693, 673, 652, 632, 612,
               591, 571, 550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224, 204,
               183, 163, 143, 122, 102, 82, 61, 41, 20, 0]
# diffusers DDIMScheduler.set_timesteps(50), timestep_spacing "leading", steps_offset 0: step ratio 1000 // 50.
LEADING_DDIM50 = [980 - 20 * i for i in range(50)]


def iddpm_even(n: int, size: int = 1000) -> list[int]:
    """improved-diffusion respace.space_timesteps(size, [n]) as written there (one section)."""
    frac_stride = (size - 1) / (n - 1) if n > 1 else 1
    cur_idx, taken = 0.0, []
    for _ in range(n):
        taken.append(size - size + round(cur_idx))
        cur_idx += frac_stride
    return sorted(set(taken), reverse=True)


def default_config(family: str, **kw) -> SamplerConfig:
    o = official_sampling(family)
    return SamplerConfig(spacing=o["spacing"], steps_offset=o["steps_offset"], cfg_channels=o["cfg_channels"], **kw)


def test_dit_ddpm250_is_iddpm_even_and_unchanged():
    chain = Diffusion.for_config(default_config("dit", num_steps=250)).chain
    assert chain == iddpm_even(250)
    assert chain[:4] == [999, 995, 991, 987] and chain[-3:] == [8, 4, 0] and len(chain) == 250
    assert chain == Diffusion.respaced(250).chain           # the bundled digits models' chain, as before


@pytest.mark.parametrize("family", ["dit", "latte"])
def test_class_conditional_ddim50_is_even(family):
    assert Diffusion.for_config(default_config(family, num_steps=50, sampler="ddim")).chain == EVEN_DDIM50
    assert EVEN_DDIM50 == iddpm_even(50)


def test_text_to_video_ddim50_is_leading():
    assert Diffusion.for_config(default_config("latte-t2v", num_steps=50, sampler="ddim")).chain == LEADING_DDIM50


def test_leading_with_steps_offset_and_trailing():
    # HunyuanDiT's DDPM scheduler: leading, steps_offset 1 -> 981, ..., 1 (50) and 991, ..., 1 (100).
    assert Diffusion.respaced(50, "leading", steps_offset=1).chain == [981 - 20 * i for i in range(50)]
    assert Diffusion.respaced(100, "leading", steps_offset=1).chain == [991 - 10 * i for i in range(100)]
    assert Diffusion.respaced(50, "trailing").chain == [999 - 20 * i for i in range(50)]
    with pytest.raises(ValueError, match="steps_offset=1 only applies to the leading spacing"):
        SamplerConfig(num_steps=50, spacing="even", steps_offset=1)
    with pytest.raises(ValueError, match="unknown spacing 'linspace'"):
        SamplerConfig(spacing="linspace")
    with pytest.raises(ValueError, match="steps_offset=30 pushes the leading chain to t=1010"):
        SamplerConfig(num_steps=50, spacing="leading", steps_offset=30)


def test_official_guidance_channels():
    assert {f: o["cfg_channels"] for f, o in OFFICIAL.items()} == {
        "dit": 3, "latte": None, "latte-t2v": None, "hunyuan-dit": None, "diffusers-dit": None, "pixart": None,
        "diffusers-latte": None}
    assert OFFICIAL["hunyuan-dit"]["spacing"] == "leading" and OFFICIAL["hunyuan-dit"]["steps_offset"] == 1
    assert guided_channels(3, 4) == 3                        # DiT-XL/2: eps channels 0..2 of 4 (the quirk)
    assert guided_channels(3, 1) == 1                        # the bundled 1-channel digits: all eps, never v
    assert guided_channels(None, 4) == 4


def test_dit_quirk_on_a_four_channel_output_matches_the_official_forward_with_cfg():
    """DiT's forward_with_cfg: eps, rest = out[:, :3], out[:, 3:]; guide eps; cat. Written out here."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    half = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    want = torch.cat([half, cond[:, 3:]], dim=1)
    assert torch.equal(guide(cond, uncond, 4.0, guided_channels(3, 4)), want)


@pytest.mark.parametrize("name, family, sampler, chain", [
    ("dit-c2i", "dit", "ddpm", iddpm_even(250)), ("latte-c2v", "latte", "ddpm", iddpm_even(250)),
    ("latte-t2v", "latte-t2v", "ddim", LEADING_DDIM50)])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_presets_patterns_on_the_official_chains_are_unchanged(name, family, sampler, chain, n):
    """Each preset on its family's default chain gives the pattern of the official chain written out."""
    _, rule = preset(name, n)
    default = Diffusion.for_config(default_config(family, num_steps=len(chain), sampler=sampler)).chain
    assert Schedule.from_rule(rule, default).mask == Schedule.from_rule(rule, chain).mask
    if name == "dit-c2i" and n == 3:
        assert Schedule.from_rule(rule, default).mask == "Fcc" * 81 + "FcFFFFF"   # t = 20 (step 245) cached; the reset follows it


def test_family_is_known_for_every_model():
    for name in ("DiT-Mini/2", "Latte-Mini/2", "LatteT2V-Mini/2"):
        assert build(name, device="meta").family in OFFICIAL


@pytest.mark.parametrize("flags, spacing, channels, timesteps", [
    ([], "even", 3, [666, 0]),                                        # DiT's official: even chain, 3 channels
    (["--spacing", "leading", "--cfg-channels", "all"], "leading", -1, [500, 0]),
    (["--spacing", "leading", "--steps-offset", "1"], "leading", 3, [501, 1]),
])
def test_surface_cli_records_the_chain_it_ran(tmp_path, make_model, flags, spacing, channels, timesteps):
    import xarray as xr

    from smoothness.cli import run_cli
    from smoothness.surface import cli as surface_cli
    torch.save({"ema": make_model("DiT-Mini/2").state_dict()}, tmp_path / "dit.pt")
    argv = ["--ckpt", str(tmp_path / "dit.pt"), "--sampler", "ddim", "--num-steps", "4", "--steps", "2,4",
            "--cfg-scale", "2", "--grid=-0.1:0.1:3", "--out", str(tmp_path), "--name", "surface", *flags]
    assert run_cli(surface_cli.main, argv) == 0
    with xr.open_dataset(tmp_path / "surface.nc", engine="h5netcdf") as ds:
        assert (ds.attrs["spacing"], ds.attrs["cfg_channels"]) == (spacing, channels)
        assert ds.timestep.values.tolist() == timesteps
        assert ds.attrs["steps_offset"] == (1 if "--steps-offset" in flags else 0)

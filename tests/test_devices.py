"""The GPU path, checked where it can be on a CPU machine: device strings, the precision switches in
the attributes, bf16 autocast, chunk sizing arithmetic on the real engine, out-of-memory messages,
compiled blocks; and each bad flag is one line, exit 2."""
import numpy as np
import pytest
import torch
import xarray as xr

from smoothness import devices
from smoothness.cache import cli as cache_cli
from smoothness.cache.sweep import SweepConfig, sweep
from smoothness.cli import run_cli
from smoothness.diffusion import SamplerConfig
from smoothness.models import ModelEntry
from smoothness.surface import SurfaceConfig
from smoothness.surface import cli as surface_cli
from smoothness.surface.dataset import sized_batch

pytestmark = pytest.mark.usefixtures("single_thread")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("text, ok", [("cpu", True), (" cpu ", True), ("cuda", GPUS > 0), ("cuda:7", GPUS > 7),
                                      ("gpu", False), ("cuda:x", False), ("mps", False)])
def test_device_strings(text, ok):
    if ok:
        assert devices.check(text) == text.strip()
    else:
        with pytest.raises(ValueError, match="--device"):
            devices.check(text)


def test_fit_chunk_is_the_linear_extrapolation_worked_by_hand():
    # peak(G) = 500 + 1000 G: a 5,600-byte budget holds G = 5 (5,500), not 6 (6,500)
    assert devices.fit_chunk(1500, 2500, 5600, limit=100) == 5
    assert devices.fit_chunk(1500, 2500, 5600, limit=3) == 3               # never more points than the grid
    assert devices.fit_chunk(1500, 1500, 10 ** 9, limit=441) == 441         # no growth: the whole grid
    with pytest.raises(ValueError, match="one item needs .* raise --max-memory"):
        devices.fit_chunk(3 * 2 ** 30, 4 * 2 ** 30, 2 ** 30, limit=10)


def test_sized_batch_measures_chunks_of_one_and_two_points_of_the_real_evaluation(make_model):
    model = make_model("DiT-Mini/2", num_classes=3, in_channels=1)
    cfg = SurfaceConfig(steps=(2,), sampler=SamplerConfig(num_steps=3), alpha="-0.1:0.1:3", beta="-0.1:0.1:3")
    seen = []

    def fake_measure(device, fn):                 # "bytes" = 1000 per grid point the real evaluation returned + 500
        data = fn()
        g = next(iter(data.values())).shape[0]
        seen.append(g)
        return 500 + 1000 * g
    assert sized_batch([ModelEntry("m", model)], cfg, budget=5600, measure=fake_measure) == 5
    assert seen == [1, 2]


def test_out_of_memory_is_one_line_naming_what_was_tried_and_the_flag():
    with pytest.raises(ValueError, match=r"^out of memory on cpu evaluating 64 grid points per chunk; lower "
                                         r"--batch-size$"):
        with devices.out_of_memory("cpu", "evaluating 64 grid points per chunk", "lower --batch-size"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_setup_records_the_precision_switches():
    attrs = devices.setup("cpu")
    assert attrs["device"] == "cpu" and attrs["tf32"] == 0 and attrs["deterministic_algorithms"] == 0


def test_bf16_autocast_sweep_runs_and_differs_only_in_numbers(make_model):
    pair = {"skip": make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1, seed=1)}
    base = dict(sampler=SamplerConfig(num_steps=4, cfg_scale=2.0), methods=("skip-cache",), intervals=(2,), ks=(1,),
                classes=(0, 1), per_class=1)
    fp32 = sweep(pair, SweepConfig(**base), log=lambda *a: None)
    bf16 = sweep(pair, SweepConfig(**base, dtype="bfloat16"), log=lambda *a: None)
    assert bf16.attrs["dtype"] == "bfloat16" and fp32.attrs["dtype"] == "float32"
    assert np.isfinite(bf16.psnr.values).all() and not np.array_equal(bf16.psnr.values, fp32.psnr.values)
    np.testing.assert_array_equal(bf16.theoretical_speedup.values, fp32.theoretical_speedup.values)
    with pytest.raises(ValueError, match="dtype 'float16' is not allowed"):
        SweepConfig(**base, dtype="float16")


CACHE = ["--model", "digits-skip-dit", "--methods", "skip-cache", "--intervals", "2", "--k", "1",
         "--num-sampling-steps", "3", "--classes", "0", "--per-class", "2"]


@pytest.mark.parametrize("cmd, argv, words", [
    (cache_cli.main, ["--device", "gpu"], "--device 'gpu' is not allowed; use cpu, cuda or cuda:N"),
    (cache_cli.main, ["--device", "cuda:9"], "--device 'cuda:9' is not available here"),
    (cache_cli.main, ["--dtype", "float16"], "invalid choice: 'float16'"),
    (surface_cli.main, ["--max-memory", "4"], "--max-memory sizes chunks from measured CUDA memory; on cpu give "
                                              "--batch-size"),
    (surface_cli.main, ["--max-memory", "4", "--batch-size", "8"], "--max-memory sizes --batch-size; give one"),
    (surface_cli.main, ["--device", "tpu"], "--device 'tpu' is not allowed"),
    (surface_cli.main, ["--compile"], "--compile is not allowed with --mode weights"),
])
def test_device_flags_bad_input_is_one_line_exit_2(cmd, argv, words, tmp_path, capsys):
    base = CACHE if cmd is cache_cli.main else ["--model", "digits-skip-dit", "--num-steps", "3", "--steps", "3"]
    assert run_cli(cmd, base + argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") <= 2      # argparse adds its usage line
    assert not list(tmp_path.iterdir())                                          # refused before any work


def test_cache_cli_records_device_and_precision(tmp_path):
    assert run_cli(cache_cli.main, CACHE + ["--out", str(tmp_path), "--dtype", "bfloat16"]) == 0
    ds = xr.load_dataset(next(tmp_path.glob("*.nc")), engine="h5netcdf")
    assert ds.attrs["device"] == "cpu" and ds.attrs["dtype"] == "bfloat16" and ds.attrs["compiled"] == 0
    assert "tf32" in ds.attrs and "device_name" in ds.attrs


@pytest.mark.slow
def test_compiled_blocks_give_the_same_surface_in_features_mode(tmp_path):
    """surface --compile (features mode): the same surface as without, within float32 rounding."""
    argv = ["--model", "digits-skip-dit", "--num-steps", "10", "--steps", "10", "--grid=-0.2:0.2:5", "--mode",
            "features", "--site", "blocks.5", "--out", str(tmp_path)]
    assert run_cli(surface_cli.main, argv + ["--name", "plain"]) == 0
    assert run_cli(surface_cli.main, argv + ["--name", "compiled", "--compile"]) == 0
    a, b = (xr.load_dataset(tmp_path / f"{n}.nc", engine="h5netcdf") for n in ("plain", "compiled"))
    np.testing.assert_allclose(a.surface.values, b.surface.values, atol=1e-6)
    assert b.attrs["compiled"] == 1 and a.attrs["compiled"] == 0


@pytest.mark.slow
def test_compiled_blocks_give_the_same_outputs_and_cache(make_model):
    """torch.compile (inductor, ~30 s on CPU) of every block: same outputs, and caches still hook the units."""
    plain = make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1, seed=1)
    compiled = make_model("DiT-Mini/2-skip", num_classes=3, in_channels=1, seed=1)
    assert devices.compile_blocks(compiled) == len(compiled.blocks)
    cfg = SweepConfig(SamplerConfig(num_steps=4, cfg_scale=2.0), methods=("skip-cache",), intervals=(2,), ks=(1,),
                      classes=(0, 1), per_class=1)
    a, b = (sweep({"m": m}, cfg, log=lambda *x: None) for m in (plain, compiled))
    np.testing.assert_allclose(a.psnr.values, b.psnr.values, rtol=1e-3)
    np.testing.assert_array_equal(a["mask"].values, b["mask"].values)


@pytest.mark.parametrize("module, argv", [
    ("smoothness.plan.cli", ["--model", "digits-skip-dit", "--budget", "2"]),
    ("smoothness.plan.cli", ["profile", "--model", "digits-skip-dit"]),
    ("smoothness.plan.cli", ["evaluate"]),
    ("smoothness.data.sample", ["--model", "digits-skip-dit"]),
    ("smoothness.analysis.cli", ["--model", "digits-skip-dit"]),
])
def test_every_model_command_refuses_a_bad_device_before_any_work(module, argv, tmp_path, capsys):
    import importlib
    main = importlib.import_module(module).main
    assert run_cli(main, argv + ["--device", "cuda:9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda:9' is not available here" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())

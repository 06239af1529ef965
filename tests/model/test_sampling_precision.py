"""Sampling precision: "auto" picks bf16 where the hardware has it, and bf16 renders stay close to fp32."""

import numpy as np
import pytest
import torch

from napari_diffmix.classes import DEMO
from napari_diffmix.errors import DiffMixError
from napari_diffmix.model.checkpoint import load_model
from napari_diffmix.model.samplers import Sampler
from napari_diffmix.runtime import PRECISIONS, native_bf16, resolve_precision
from napari_diffmix.model.unet import SDMUNet, UNetConfig


def _cpu_probes(monkeypatch, *, avx512_bf16: bool | None, amx: bool | None):
    """Make torch.cpu report the given bf16 features (None: the probe does not exist in this torch)."""
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value)


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused():
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(precision, "cpu") == precision
    with pytest.raises(DiffMixError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(DiffMixError, match="got 'double'"):
        Sampler(SDMUNet(UNetConfig.preset("tiny")), precision="double")


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32"), (None, None, "fp32")],
)
def test_auto_on_cpu_uses_bf16_only_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    _cpu_probes(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert native_bf16("cpu") == (expected == "bf16")
    assert resolve_precision("auto", "cpu") == expected
    # the sampler records its choice
    assert Sampler(SDMUNet(UNetConfig.preset("tiny"))).precision == expected


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16")])
def test_auto_on_cuda_uses_bf16_from_ampere_on_or_else_fp16(monkeypatch, capability, expected):
    asked = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    assert resolve_precision("auto", "cuda:1") == expected
    assert asked == [torch.device("cuda:1")]  # the sampler's device, not the current one


def test_auto_elsewhere_is_fp32():
    assert resolve_precision("auto", "mps") == "fp32"
    assert resolve_precision("auto", "meta") == "fp32"


def test_bf16_renders_of_the_demo_model_stay_within_a_few_grey_levels_of_fp32(demo_model_file, one_torch_thread):
    """The accuracy that lets "auto" pick bf16: same label maps, same noise, the default 15 steps,
    fp32 vs bf16 autocast (measured: 0.46 grey levels on average, 99th percentile 3, on an
    avx512_bf16 CPU)."""
    from napari_diffmix.demo_data import demo_split
    from napari_diffmix.model.condition import condition_batch

    model, info = load_model(demo_model_file)
    held_out = demo_split().held_out
    windows = [held_out.crop(y, x, 64, 64) for y, x in ((0, 0), (64, 64), (128, 0), (192, 64))]
    cond = condition_batch([w.inst_map for w in windows], [w.type_map for w in windows], DEMO)
    renders = {}
    for precision in ("fp32", "bf16"):
        runner = Sampler(model, info.diffusion, precision=precision)
        last = runner.generate(cond, steps=15, guidance=info.default_guidance, seed=0)
        renders[precision] = last.images().astype(np.int16)
    diff = np.abs(renders["fp32"] - renders["bf16"])
    assert renders["fp32"].std() > 30  # real tissue, not a flat image that would agree trivially
    assert diff.mean() <= 2.0, diff.mean()
    assert np.percentile(diff, 99) <= 8, np.percentile(diff, 99)

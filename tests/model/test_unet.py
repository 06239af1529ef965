import math

import pytest
import torch
import torch.nn.functional as F

from napari_diffmix.errors import CheckpointError, LabelError, SchemeError
from napari_diffmix.model.unet import SDMUNet, SpadeCache, UNetConfig


def randomized(model: SDMUNet, seed: int = 0) -> SDMUNet:
    # Fresh ADM models output exactly zero (zero-initialised last layers), which would make
    # every equality test pass trivially: give every parameter a random value.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomized(SDMUNet(UNetConfig.preset("tiny")))


def inputs(batch=2, size=32, cond_channels=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.tensor([7.0, 642.5, 999.0, 0.0][:batch])
    cond = (torch.rand(batch, cond_channels, size, size, generator=gen) > 0.5).float()
    return x, t, cond


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_small_presets_forward_shape(name):
    cfg = UNetConfig.preset(name)
    model = SDMUNet(cfg).eval()
    x, t, cond = inputs(2, cfg.image_size, cfg.cond_channels)
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.shape == (2, 6, cfg.image_size, cfg.image_size)
    # zero-initialised output layer: a fresh model predicts exactly zero
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name,cond_channels", [("diffmix-consep", 6), ("diffmix-glysac", 5)])
def test_published_config_on_meta(name, cond_channels):
    cfg = UNetConfig.preset(name)
    assert (cfg.image_size, cfg.model_channels, cfg.channel_mult) == (256, 256, (1, 1, 2, 2, 4, 4))
    with torch.device("meta"):
        model = SDMUNet(cfg)
        x = torch.empty(1, 3, 256, 256)
        out = model(x, torch.zeros(1), torch.empty(1, cond_channels, 256, 256))
    assert out.shape == (1, 6, 256, 256)
    # the paper's 652 M parameters
    assert abs(model.num_parameters() - 652e6) < 1e6
    assert model.middle_block[0].in_norm.mlp_shared[0].weight.shape[1] == cond_channels
    # SPADE in the middle block and every decoder res block, two per block
    assert len(model.spade_norms) == 2 * (2 + 6 * 3 + 5)
    assert all(norm.mlp_shared[0].out_channels == 128 for norm in model.spade_norms)


def test_encoder_has_no_condition_and_decoder_is_spade(tiny):
    from napari_diffmix.model.unet import SPADEGroupNorm

    assert not any(isinstance(m, SPADEGroupNorm) for m in tiny.input_blocks.modules())
    for stage in [tiny.middle_block, *tiny.output_blocks]:
        for block in stage:
            if hasattr(block, "conditioned"):
                assert block.conditioned


def test_encode_decode_equals_forward(tiny):
    x, t, cond = inputs()
    with torch.no_grad():
        ref = tiny(x, t, cond)
        state = tiny.encode(x, t)
        split = tiny.decode(state, cond)
        again = tiny.decode(state, cond)  # the state is reusable
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(split, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-6)


def test_scalar_timestep_broadcasts(tiny):
    x, _, cond = inputs()
    with torch.no_grad():
        a = tiny(x, 300, cond)
        b = tiny(x, torch.tensor([300, 300]), cond)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_spade_cache_equals_no_cache(tiny):
    x, t, cond = inputs()
    with torch.no_grad():
        ref = tiny(x, t, cond)
        cache = tiny.spade_params(cond)
        assert cache.cached_layers == len(tiny.spade_norms)
        full = tiny(x, t, None, spade=cache)
        budget = cache.nbytes // 3
        partial = tiny.spade_params(cond, max_bytes=budget)
        assert 0 < partial.cached_layers < len(tiny.spade_norms)
        assert partial.nbytes <= budget
        part_out = tiny(x, t, None, spade=partial)
        none = tiny.spade_params(cond, max_bytes=0)
        assert none.cached_layers == 0 and none.nbytes == 0
        none_out = tiny(x, t, None, spade=none)
    for out in (full, part_out, none_out):
        assert (out - ref).abs().max() <= 1e-5


def test_spade_cache_nbytes_matches_layout(tiny):
    _, _, cond = inputs()
    cache = tiny.spade_params(cond)
    expected = sum(d["nbytes"] for d in tiny.spade_layout(32, 32, batch=2))
    assert cache.nbytes == expected
    assert tiny.spade_params(cond, dtype=torch.bfloat16).nbytes == expected // 2


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_batched_decode_equals_two_decodes(tiny, batch):
    x, t, cond = inputs(batch)
    null = torch.zeros_like(cond)
    with torch.no_grad():
        with_cond = tiny(x, t, cond)
        without = tiny(x, t, null)
        state = tiny.encode(x, t).repeat(2)
        assert state.batch == 2 * batch
        batched = tiny.decode(state, torch.cat([cond, null]))
        cache = SpadeCache.cat(tiny.spade_params(cond), tiny.null_spade_params(32, 32, batch=batch))
        assert cache.batch == 2 * batch
        cached = tiny.decode(state, spade=cache)
    for out in (batched, cached):
        assert (out[:batch] - with_cond).abs().max() <= 1e-5
        assert (out[batch:] - without).abs().max() <= 1e-5


def test_repeat_of_single_sample_is_a_view(tiny):
    x, t, _ = inputs(batch=1)
    with torch.no_grad():
        state = tiny.encode(x, t)
    rep = state.repeat(2)
    assert rep.batch == 2
    assert all(r.data_ptr() == s.data_ptr() for r, s in zip(rep.skips, state.skips))


def test_null_cache_is_memoised_and_follows_weight_changes():
    model = randomized(SDMUNet(UNetConfig.preset("tiny")), seed=3)
    first = model.null_spade_params(32, 32)
    again = model.null_spade_params(32, 32, batch=3)
    assert again.batch == 3
    key = next(iter(first.parts[0].entries))
    assert again.parts[0].entries[key][0] is first.parts[0].entries[key][0]
    x, t, _ = inputs(batch=3)
    with torch.no_grad():
        model.spade_norms[0].mlp_beta.bias.add_(1.0)
        ref = model(x, t, torch.zeros(3, 5, 32, 32))
        out = model(x, t, None, spade=model.null_spade_params(32, 32, batch=3))
    assert (out - ref).abs().max() <= 1e-5


def test_spade_norm_formula(tiny):
    norm = tiny.spade_norms[3]
    gen = torch.Generator().manual_seed(5)
    h = 32 // norm.downsample
    x = torch.randn(2, norm.channels, h, h, generator=gen)
    cond = (torch.rand(2, 5, 32, 32, generator=gen) > 0.5).float()
    seg = F.interpolate(cond, size=(h, h), mode="nearest")
    actv = F.relu(norm.mlp_shared[0](seg))
    expected = F.group_norm(x, 8) * (1 + norm.mlp_gamma(actv)) + norm.mlp_beta(actv)
    with torch.no_grad():
        got = norm(x, SpadeCache.on_the_fly(cond, len(tiny.spade_norms)))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_attention_matches_guided_diffusion_legacy_layout(tiny):
    attn = next(m for m in tiny.modules() if type(m).__name__ == "AttentionBlock")
    gen = torch.Generator().manual_seed(2)
    c = attn.norm.num_channels
    x = torch.randn(2, c, 16, 16, generator=gen)
    # guided-diffusion QKVAttentionLegacy written out independently
    b, length, heads = 2, 256, c // 16
    qkv = attn.qkv(attn.norm(x).reshape(b, c, -1))
    q, k, v = qkv.reshape(b * heads, 3 * 16, length).split(16, dim=1)
    scale = 1 / math.sqrt(math.sqrt(16))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    expected = (x.reshape(b, c, -1) + attn.proj_out(a)).reshape(b, c, 16, 16)
    with torch.no_grad():
        got = attn(x)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_channels_last_matches(tiny):
    x, t, cond = inputs()
    model = randomized(SDMUNet(UNetConfig.preset("tiny")))
    with torch.no_grad():
        ref = model(x, t, cond)
        model = model.to(memory_format=torch.channels_last)
        cl = torch.channels_last
        out = model(x.contiguous(memory_format=cl), t, cond.contiguous(memory_format=cl))
    assert (out - ref).abs().max() <= 1e-5


def test_bf16_autocast(tiny):
    x, t, cond = inputs()
    with torch.no_grad():
        ref = tiny(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x, t, None, spade=tiny.spade_params(cond))
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradient_checkpointing_same_gradients():
    x, t, cond = inputs()
    grads = []
    for enabled in (False, True):
        model = randomized(SDMUNet(UNetConfig.preset("tiny", use_checkpoint=enabled))).train()
        assert model.gradient_checkpointing is enabled
        model(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_non_updown_variant_runs():
    cfg = UNetConfig.preset("tiny", resblock_updown=False, use_scale_shift_norm=False)
    model = randomized(SDMUNet(cfg))
    x, t, cond = inputs()
    with torch.no_grad():
        assert model(x, t, cond).shape == (2, 6, 32, 32)
    assert "input_blocks.2.0.op.weight" in model.state_dict()


def test_input_errors(tiny):
    x, t, cond = inputs()
    with pytest.raises(LabelError, match="multiple of 2"):
        tiny(torch.randn(1, 3, 33, 32), 0, torch.zeros(1, 5, 33, 32))
    with pytest.raises(SchemeError, match="expects 5"):
        tiny(x, t, torch.zeros(2, 6, 32, 32))
    with pytest.raises(LabelError, match="label map is 64x64"):
        tiny(x, t, torch.zeros(2, 5, 64, 64))
    cache = tiny.spade_params(cond[:1])
    with pytest.raises(ValueError, match="batch"):
        tiny(x, t, None, spade=cache)


def test_config_roundtrip_and_validation():
    cfg = UNetConfig.preset("diffmix-consep")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.out_channels == 6 and cfg.attention_downsample == (8, 16, 32)
    assert UNetConfig.preset("demo", cond_channels=6).cond_channels == 6
    with pytest.raises(CheckpointError, match="unknown field"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(CheckpointError, match="feature sizes"):
        UNetConfig(attention_resolutions=(24,))
    with pytest.raises(CheckpointError, match="unknown model preset"):
        UNetConfig.preset("nope")
    with pytest.raises(CheckpointError, match="norm_groups=32 does not divide"):
        SDMUNet(UNetConfig.preset("tiny", model_channels=16, norm_groups=32))

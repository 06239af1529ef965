import hashlib
import json

import pytest
import torch

from napari_diffmix.classes import CONSEP, DEMO, GLYSAC
from napari_diffmix.errors import CheckpointError
from napari_diffmix.model.checkpoint import load_model, read_info, save_model
from napari_diffmix.model.unet import SDMUNet, UNetConfig


def randomized(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def guided_diffusion_shapes(mc, mult, nrb, attn_ds, cond, hidden, in_ch=3, out_ch=6):
    """Key -> shape of an SDM/guided-diffusion UNetModel state dict (resblock_updown,
    scale-shift norm, learned sigma), written from the reference unet.py independently of
    napari_diffmix's module code."""
    sd = {}
    emb = 4 * mc

    def linear(name, i, o):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (o, i), (o,)

    def conv(name, i, o, k=3):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (o, i, k, k), (o,)

    def conv1d(name, i, o):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (o, i, 1), (o,)

    def groupnorm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (c,), (c,)

    def resblock(p, i, o):  # ResBlock: in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, Dropout, conv]
        groupnorm(p + "in_layers.0", i)
        conv(p + "in_layers.2", i, o)
        linear(p + "emb_layers.1", emb, 2 * o)
        groupnorm(p + "out_layers.0", o)
        conv(p + "out_layers.3", o, o)
        if i != o:
            conv(p + "skip_connection", i, o, k=1)

    def spade(p, c):  # SPADEGroupNorm: GroupNorm without affine, so no norm tensors
        conv(p + "mlp_shared.0", cond, hidden)
        conv(p + "mlp_gamma", hidden, c)
        conv(p + "mlp_beta", hidden, c)

    def sdm_resblock(p, i, o):  # SDMResBlock: in_norm, in_layers = [SiLU, conv], out_norm, out_layers = [SiLU, Dropout, conv]
        spade(p + "in_norm.", i)
        conv(p + "in_layers.1", i, o)
        linear(p + "emb_layers.1", emb, 2 * o)
        spade(p + "out_norm.", o)
        conv(p + "out_layers.2", o, o)
        if i != o:
            conv(p + "skip_connection", i, o, k=1)

    def attention(p, c):
        groupnorm(p + "norm", c)
        conv1d(p + "qkv", c, 3 * c)
        conv1d(p + "proj_out", c, c)

    linear("time_embed.0", mc, emb)
    linear("time_embed.2", emb, emb)
    ch = mult[0] * mc
    conv("input_blocks.0.0", in_ch, ch)
    chans, ds, idx = [ch], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            resblock(f"input_blocks.{idx}.0.", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                attention(f"input_blocks.{idx}.1.", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            resblock(f"input_blocks.{idx}.0.", ch, ch)
            chans.append(ch)
            idx += 1
            ds *= 2
    sdm_resblock("middle_block.0.", ch, ch)
    attention("middle_block.1.", ch)
    sdm_resblock("middle_block.2.", ch, ch)
    idx = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            sdm_resblock(f"output_blocks.{idx}.0.", ch + chans.pop(), m * mc)
            ch = m * mc
            j = 1
            if ds in attn_ds:
                attention(f"output_blocks.{idx}.1.", ch)
                j = 2
            if level and i == nrb:
                sdm_resblock(f"output_blocks.{idx}.{j}.", ch, ch)
                ds //= 2
            idx += 1
    groupnorm("out.0", ch)
    conv("out.2", mult[0] * mc, out_ch)
    return sd


def random_state_dict(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def test_published_structure_key_names_match_reference():
    shapes = guided_diffusion_shapes(256, (1, 1, 2, 2, 4, 4), 2, {8, 16, 32}, 6, 128)
    with torch.device("meta"):
        model = SDMUNet(UNetConfig.preset("diffmix-consep"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert abs(sum(torch.Size(s).numel() for s in shapes.values()) - 652e6) < 1e6


def test_official_pt_import(tmp_path):
    # the published structure at small width, as an EMA .pt file would hold it
    shapes = guided_diffusion_shapes(32, (1, 1, 2, 2, 4, 4), 2, {8, 16, 32}, 6, 16)
    state = random_state_dict(shapes)
    path = tmp_path / "ema_0.9999_010000.pt"
    torch.save(state, path)
    config = UNetConfig.preset("diffmix-consep", model_channels=32, spade_hidden=16)
    model, info = load_model(path, config=config, scheme="consep")
    assert info.format == "guided-diffusion" and info.scheme == CONSEP and info.config == config
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.diffusion == {"num_timesteps": 1000, "schedule": "linear", "learn_sigma": True}
    assert info.default_guidance == 1.5
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.tensor([500]), torch.zeros(1, 6, 64, 64))
    assert out.shape == (1, 6, 64, 64) and out.abs().sum() > 0


def test_official_pt_with_module_prefix_and_nesting(tmp_path):
    model = randomized(SDMUNet(UNetConfig.preset("tiny")))
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded, info = load_model(path, preset="tiny")
    assert info.scheme == DEMO
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_official_pt_needs_preset_and_says_which(tmp_path):
    # the tensors that reveal the config, at the published GLySAC model's shapes
    shapes = guided_diffusion_shapes(256, (1, 1, 2, 2, 4, 4), 2, {8, 16, 32}, 5, 128)
    keys = ["time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.0.in_norm.mlp_shared.0.weight", "out.2.weight"]
    path = tmp_path / "glysac.pt"
    torch.save({k: torch.zeros(shapes[k]) for k in keys}, path)
    with pytest.raises(CheckpointError, match="carries no model config.*cond_channels=5.*'diffmix-glysac'"):
        load_model(path)
    with pytest.raises(CheckpointError, match="file has cond_channels=5, the config 6.*'diffmix-glysac' fits"):
        load_model(path, preset="diffmix-consep")


def test_wrong_config_names_mismatched_tensors(tmp_path):
    model = randomized(SDMUNet(UNetConfig.preset("tiny")))
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    wrong = UNetConfig.preset("tiny", channel_mult=(1, 2, 2), image_size=32)
    with pytest.raises(CheckpointError) as err:
        load_model(path, config=wrong, scheme="demo")
    msg = str(err.value)
    assert "does not match the model config" in msg
    assert "missing: input_blocks." in msg
    assert "shape mismatch: output_blocks." in msg and "file (" in msg
    assert "Inferred from the file's tensor shapes: model_channels=32" in msg


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save({"model": SDMUNet(UNetConfig.preset("tiny")), "step": 3}, path)
    with pytest.raises(CheckpointError, match="refused: the file contains pickled Python objects.*SDMUNet"):
        load_model(path, preset="tiny")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="neither a napari-diffmix model"):
        load_model(path, preset="tiny")
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_model(tmp_path / "list.pt", preset="tiny")


def test_native_round_trip_bit_exact(tmp_path):
    model = randomized(SDMUNet(UNetConfig.preset("tiny")), seed=4)
    path = tmp_path / "models" / "tiny.safetensors"
    diffusion = {"num_timesteps": 1000, "schedule": "cosine", "learn_sigma": True}
    digest = save_model(model, path, scheme=DEMO, diffusion=diffusion, default_guidance=3.0,
                        extra={"steps": 120, "dataset": "demo"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temporary left behind
    loaded, info = load_model(path)
    assert info.format == "native" and info.sha256 == digest and info.source == str(path)
    assert info.config == model.config and info.scheme == DEMO
    assert info.diffusion == diffusion and info.default_guidance == 3.0
    assert info.extra == {"steps": 120, "dataset": "demo"}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, cond = torch.randn(1, 3, 32, 32), torch.rand(1, 5, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, 10, cond), loaded(x, 10, cond))
    assert read_info(path) == info


def test_native_fp16_and_metadata_json(tmp_path):
    from safetensors import safe_open

    model = randomized(SDMUNet(UNetConfig.preset("tiny")))
    path = tmp_path / "half.safetensors"
    save_model(model, path, scheme="demo", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as fh:
        doc = json.loads(fh.metadata()["napari_diffmix"])
        assert fh.get_tensor("out.2.weight").dtype == torch.float16
    assert doc["format"] == "napari-diffmix-model" and doc["scheme"]["name"] == "demo"
    assert doc["diffusion"] == {"num_timesteps": 1000, "schedule": "linear", "learn_sigma": True}
    loaded, _ = load_model(path)
    w = model.state_dict()["out.2.weight"]
    assert torch.equal(loaded.state_dict()["out.2.weight"], w.half().float())


def test_native_errors(tmp_path):
    model = SDMUNet(UNetConfig.preset("tiny"))
    with pytest.raises(CheckpointError, match="4 classes"):
        save_model(model, tmp_path / "m.safetensors", scheme=CONSEP)
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(CheckpointError, match="single .safetensors"):
        save_model(model, tmp_path / "m.pt", scheme=GLYSAC)
    path = tmp_path / "m.safetensors"
    save_model(model, path, scheme=GLYSAC)
    with pytest.raises(CheckpointError, match="carries its own config"):
        load_model(path, preset="tiny")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="without napari-diffmix metadata"):
        load_model(tmp_path / "plain.safetensors")


def test_a_known_digest_is_not_computed_again(tmp_path, monkeypatch):
    from napari_diffmix.model import checkpoint

    native = tmp_path / "tiny.safetensors"
    digest = save_model(randomized(SDMUNet(UNetConfig.preset("tiny")), seed=1), native, scheme=DEMO)
    official = tmp_path / "ema.pt"
    torch.save(random_state_dict(guided_diffusion_shapes(32, (1, 1, 2, 2, 4, 4), 2, {8, 16, 32}, 6, 16)), official)
    config = UNetConfig.preset("diffmix-consep", model_channels=32, spade_hidden=16)
    official_digest = read_info(official, config=config, scheme="consep").sha256

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(checkpoint, "file_sha256", no_hashing)
    assert load_model(native, sha256=digest)[1].sha256 == digest
    assert load_model(official, config=config, scheme="consep", sha256=official_digest)[1].sha256 == official_digest
    with pytest.raises(AssertionError, match="hashed again"):
        load_model(native)

import pytest
import torch

from slimexport.slim.apply import load_slim_unet, save_slim_unet, shapes_of
from slimexport.slim.attention import SlimAttnProcessor


def test_sdpa_decoupled_head_sizes():
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8)
    v = torch.randn(2, 3, 7, 5)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=16**-0.5)
    assert o.shape == (2, 3, 10, 5)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 16**-0.5, -1) @ v
    assert torch.allclose(o, ref, atol=1e-6)


def test_save_load_roundtrip_identical_outputs(slim_tiny, tiny_inputs, tmp_path):
    unet, _ = slim_tiny
    save_slim_unet(unet, tmp_path / "slim")
    back = load_slim_unet(tmp_path / "slim")
    assert shapes_of(back) == shapes_of(unet)
    x, ctx, ts = tiny_inputs
    for t in ts:
        tt = torch.full((4,), t)
        assert torch.equal(back(x, tt, ctx).sample, unet(x, tt, ctx).sample)
    procs = {type(p) for p in back.attn_processors.values()}
    assert procs == {SlimAttnProcessor}


def test_slim_unet_generates_in_stable_diffusion_pipeline(tiny, slim_tiny):
    unet, _ = slim_tiny
    pipe = tiny.pipeline()
    pipe.unet = unet
    out = pipe(["a cat on a sofa"], num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    assert bool(torch.isfinite(torch.from_numpy(out)).all())


def test_corrupted_weights_are_detected(slim_tiny, tmp_path):
    from slimexport.errors import ArtifactError

    unet, _ = slim_tiny
    d = save_slim_unet(unet, tmp_path / "slim")
    f = d / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_slim_unet(d)

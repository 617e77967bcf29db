import torch

from slimexport.calibrate import CalibStats, calibrate
from slimexport.calibrate.runner import denoise, initial_latents


def test_sampler_matches_diffusers_pipeline(tiny):
    """Our calibration loop is the StableDiffusionPipeline's loop (same latents out)."""
    pipe = tiny.pipeline()
    prompts = ["a red fox", "a quiet empty room"]
    steps, guidance = 4, 5.0
    sched = tiny.make_scheduler()
    lat = initial_latents([11, 12], (4, 16, 16), "cpu", torch.float32, sched.init_noise_sigma)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=lat.clone(), output_type="latent",
               height=32, width=32).images
    cond = tiny.encoder.encode(prompts)[0]
    uncond = tiny.encoder.encode(["", ""])[0]
    ours = denoise(tiny.unet, sched, cond, uncond, lat.clone(), steps, guidance)
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_calibrate_saves_and_loads(tiny, tiny_stats, tmp_path):
    tiny_stats.save(tmp_path / "s")
    back = CalibStats.load(tmp_path / "s")
    assert back.prompts == tiny_stats.prompts and back.timesteps == tiny_stats.timesteps
    for k, v in tiny_stats.corr.items():
        assert torch.equal(back.corr[k], v)
    assert tiny_stats.meta["image_evals"] == len(tiny_stats.prompts) * tiny_stats.num_steps * 2


def test_batching_does_not_change_statistics(tiny, tiny_calib_cfg, tiny_stats):
    other = calibrate(tiny, tiny_stats.prompts, tiny_calib_cfg.replace(batch_size=2), progress=False)
    for k, v in tiny_stats.corr.items():
        assert torch.allclose(other.corr[k], v, rtol=1e-4, atol=1e-3), k

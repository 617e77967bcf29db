"""The report's pictures: PNG figures drawn by matplotlib without a display, written atomically.

- ``samples.png``: images from the same seeds, dense | slim | |difference| (decoded by the model's VAE; for
  ``digits`` its 16×16 pixels); for a model whose weights are random the images mean nothing, so
  ``latents.png`` shows the final latents' per-channel statistics instead;
- ``ranks.png``: the rank kept per module (fraction of its maximum), by unit and kind;
- ``eps_per_timestep.png``: the slim model's relative ε error at each verified timestep;
- ``trajectory_cosine.png``: the cosine of dense and slim latents at every step of a fixed-seed trajectory;
- ``latency.png``: p50/p90/p99 latency of the dense and slim engines.

Each ``*_figure`` function takes plain data (report fields, tensors) and a path, and returns the path.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from slimexport.artifacts import atomic_path
from slimexport.errors import MissingExtraError

FIGURES_DIR = "figures"
DPI = 110


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise MissingExtraError("matplotlib", "quality", "the report's figures") from err
    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return path


def _to_images(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` in [-1, 1] → ``[B, H, W, C]`` in [0, 1] (one channel stays one, grey)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    return x if x.shape[-1] in (1, 3) else x[..., :3]


def image_grid_figure(dense: torch.Tensor, slim: torch.Tensor, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Rows of dense | slim | |slim − dense| (×4 to be seen) for images ``[B, C, H, W]`` in [-1, 1] from the same seeds."""
    plt = _plt()
    d, s = _to_images(dense), _to_images(slim)
    diff = ((s - d).abs() * 4).clamp(0, 1)
    n = d.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(3 * 1.6, n * 1.6), squeeze=False)
    for i in range(n):
        for j, (img, title) in enumerate(((d[i], "dense"), (s[i], "slim"), (diff[i], "|slim − dense| ×4"))):
            ax = axes[i][j]
            ax.imshow(img.squeeze(-1).numpy() if img.shape[-1] == 1 else img.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0 and labels is not None:
                ax.set_ylabel(str(labels[i])[:24], fontsize=7)
    fig.suptitle("same seeds, dense | slim | difference", fontsize=9)
    return _save(fig, path)


def latent_stats_figure(dense: torch.Tensor, slim: torch.Tensor, path: str | Path) -> Path:
    """Per-channel mean and standard deviation of final latents ``[B, C, h, w]``, dense beside slim (for models
    whose weights are random: their images carry no meaning)."""
    plt = _plt()
    stats = {k: (v.float().mean(dim=(0, 2, 3)), v.float().std(dim=(0, 2, 3))) for k, v in (("dense", dense), ("slim", slim))}
    c = dense.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.6))
    for ax, (i, what) in zip(axes, ((0, "mean"), (1, "std"))):
        for k, off in (("dense", -0.2), ("slim", 0.2)):
            ax.bar([x + off for x in range(c)], stats[k][i].tolist(), width=0.4, label=k)
        ax.set_xticks(range(c))
        ax.set_xlabel("latent channel")
        ax.set_title(f"final latents: per-channel {what}", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle("random weights: images would carry no meaning, latent statistics shown instead", fontsize=8)
    return _save(fig, path)


def ranks_figure(plan: Mapping, path: str | Path) -> Path:
    """Fraction of each module's maximum rank kept, one row per unit, one colour per kind."""
    plt = _plt()
    modules = plan["modules"]
    kinds = list(dict.fromkeys(m["kind"] for m in modules.values()))
    units = list(dict.fromkeys(name[: -len(m["kind"]) - 1] for name, m in modules.items()))
    row = {u: i for i, u in enumerate(units)}
    width = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.22 * len(units) + 1)))
    for j, kind in enumerate(kinds):
        ys, xs = [], []
        for name, m in modules.items():
            if m["kind"] == kind:
                ys.append(row[name[: -len(kind) - 1]] + (j - (len(kinds) - 1) / 2) * width)
                xs.append(m["rank"] / m["max_rank"])
        ax.barh(ys, xs, height=width, label=kind)
    ax.set_yticks(range(len(units)))
    ax.set_yticklabels([_short(u) for u in units], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("rank kept / maximum rank")
    ax.legend(fontsize=7, ncol=min(4, len(kinds)), loc="lower right")
    ax.set_title(f"where the budget went ({plan.get('allocation', {}).get('method', '')}, budget {plan['budget']:g})", fontsize=9)
    return _save(fig, path)


def _short(path: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0`` → ``down1.attn0.tb0``."""
    for a, b in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block", "mid"), ("attentions.", "attn"),
                 ("transformer_blocks.", "tb"), ("resnets.", "res")):
        path = path.replace(a, b)
    return path


def eps_per_timestep_figure(slim_vs_dense: Mapping, path: str | Path) -> Path:
    """The slim model's relative ε error per verified timestep, with the gate."""
    plt = _plt()
    per_t = slim_vs_dense["eps_rel_error"]
    ts = [float(t) for t in per_t]
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot(ts, list(per_t.values()), marker="o")
    gate = (slim_vs_dense.get("gate") or {}).get("max_eps_error")
    if gate is not None and gate <= 2 * max(per_t.values(), default=0):
        ax.axhline(gate, color="red", linestyle="--", linewidth=1, label=f"gate {gate:g}")
        ax.legend(fontsize=7)
    ax.set_xlabel("timestep")
    ax.set_ylabel("‖ε_slim − ε_dense‖ / ‖ε_dense‖")
    ax.set_title("fidelity per timestep", fontsize=9)
    return _save(fig, path)


def trajectory_cosine_figure(cosines: Sequence[float], timesteps: Sequence[int], path: str | Path) -> Path:
    """Cosine of the dense and slim latents after every step of one fixed-seed trajectory."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot(range(1, len(cosines) + 1), list(cosines), marker="o")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("cosine(dense, slim latents)")
    ax.set_xticks(range(1, len(cosines) + 1))
    ax.set_xticklabels([str(int(t)) for t in timesteps], fontsize=6, rotation=90)
    ax.set_title("trajectory: latent cosine per step (x: timestep)", fontsize=9)
    return _save(fig, path)


def latency_figure(speed: Mapping, path: str | Path) -> Path:
    """p50/p90/p99 latency bars, dense beside slim."""
    plt = _plt()
    qs = ("p50", "p90", "p99")
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for k, off in (("dense", -0.2), ("slim", 0.2)):
        ax.bar([i + off for i in range(len(qs))], [speed[f"{k}_ms"][q] for q in qs], width=0.4, label=k)
    ax.set_xticks(range(len(qs)))
    ax.set_xticklabels(qs)
    ax.set_ylabel("ms per UNet call")
    ax.legend(fontsize=8)
    ax.set_title(f"latency: {speed.get('backend', '')} on {speed.get('device_name') or speed.get('device', '')}", fontsize=9)
    return _save(fig, path)


# --- the build's figures stage -------------------------------------------------------------------------------------
FIGURES_FORMAT = "slimexport.figures/1"
SAMPLE_IMAGES = 4  # rows of the image grid
PROMPT_STRIDE = 37  # a prime: consecutive picks land in different parts of a pool ordered by template or subject


def _images_meaningful(bundle) -> str:
    """How to show a sample: ``pixels`` (the latents are the image: ``digits``), ``vae`` (decode), or ``latents``
    (weights are random: images would mean nothing, latent statistics are shown)."""
    if bundle.source == "random" or bundle.name == "tiny":
        return "latents"
    if "vae" in bundle.components:
        return "vae"
    return "pixels" if bundle.vae_scale_factor == 1 else "latents"


@torch.no_grad()
def _decode(bundle, latents: torch.Tensor) -> torch.Tensor:
    vae = bundle.components["vae"]
    p = next(vae.parameters())
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    return vae.decode(latents.to(p.device, p.dtype) / scale).sample.float().cpu()


@torch.no_grad()
def trajectories(bundle, dense, slim, num: int, steps: int, guidance: float, seed: int, latent_hw) -> dict:
    """Fixed-seed trajectories of the dense and slim UNets (same prompts, seeds and sampler): their final latents
    and the cosine of their latents after every step."""
    from slimexport.calibrate.runner import denoise, initial_latents
    from slimexport.verify.parity import DEFAULT_PROMPTS

    pool = list(bundle.prompt_pool or DEFAULT_PROMPTS)
    prompts = [pool[(i * PROMPT_STRIDE) % len(pool)] for i in range(num)]
    cond = bundle.encoder.encode(prompts)[0].float()
    uncond = bundle.encoder.encode([""] * len(prompts))[0].float()
    per_step: dict[str, list[torch.Tensor]] = {"dense": [], "slim": []}
    finals, timesteps = {}, []
    for name, unet in (("dense", dense), ("slim", slim)):
        sched = bundle.make_scheduler()
        lat = initial_latents([seed + i for i in range(num)], (int(unet.config.in_channels), *latent_hw), "cpu",
                              torch.float32, sched.init_noise_sigma)
        p = next(unet.parameters())
        finals[name] = denoise(unet, sched, cond.to(p.device, p.dtype), uncond.to(p.device, p.dtype), lat.to(p.device, p.dtype),
                               steps, guidance, on_latents=lambda i, x, name=name: per_step[name].append(x.float().cpu())).float().cpu()
        timesteps = [int(t) for t in sched.timesteps]
    cos = [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
           for a, b in zip(per_step["dense"], per_step["slim"])]
    return {"prompts": prompts, "final": finals, "cosine": cos, "timesteps": timesteps}


def make_figures(out_dir: str | Path, plan: Mapping, parity: Mapping, speed: Mapping | None, bundle, dense, slim,
                 vcfg, latent_hw) -> dict[str, str]:
    """Every figure of a build into ``out_dir/figures``; returns ``{figure: path relative to out_dir}``.

    ``vcfg``: the verify config (trajectory steps, guidance, seed); ``latent_hw``: the latent size sampled at."""
    out_dir = Path(out_dir)
    d = out_dir / FIGURES_DIR
    made: dict[str, Path] = {}
    tr = trajectories(bundle, dense, slim, SAMPLE_IMAGES, vcfg.trajectory_steps, vcfg.guidance_scale, vcfg.seed, latent_hw)
    how = _images_meaningful(bundle)
    if how == "latents":
        made["latents"] = latent_stats_figure(tr["final"]["dense"], tr["final"]["slim"], d / "latents.png")
    else:
        imgs = {k: _decode(bundle, v) if how == "vae" else v for k, v in tr["final"].items()}
        made["samples"] = image_grid_figure(imgs["dense"], imgs["slim"], d / "samples.png", labels=tr["prompts"])
    made["ranks"] = ranks_figure(plan, d / "ranks.png")
    svd = parity.get("slim_vs_dense") or {}
    if svd.get("eps_rel_error"):
        made["eps_per_timestep"] = eps_per_timestep_figure(svd, d / "eps_per_timestep.png")
    made["trajectory_cosine"] = trajectory_cosine_figure(tr["cosine"], tr["timesteps"], d / "trajectory_cosine.png")
    if speed:
        made["latency"] = latency_figure(speed, d / "latency.png")
    return {k: p.relative_to(out_dir).as_posix() for k, p in made.items()}

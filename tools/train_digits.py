"""Train the ``digits`` reference model shipped in slimexport/data/digits (CPU, fixed seed).

An SD1-family ``UNet2DConditionModel`` (registry ``DIGITS_UNET``) and a learned class-token "text encoder"
(``DigitsPromptEncoder``) are trained together on the stratified 80 % train split of scikit-learn's digits
(16×16, [-1, 1]) with the standard ε-prediction MSE objective on the registry's 1000-step cosine schedule,
AdamW with warm-up and cosine decay, 10 % label dropout to the null class (for classifier-free guidance), and an
EMA of the weights (the EMA is what ships, stored as float16). Then it samples with DDIM + CFG, writes a 10×10
grid (row = digit) and scores the samples with :class:`slimexport.verify.quality.DigitsJudge`.

    python tools/train_digits.py                      # the shipped model: 27 min training + 6 min scoring, 1 thread
    python tools/train_digits.py --epochs 1 --out /tmp/digits_smoke
    python tools/train_digits.py --init DIR --epochs 15 --lr 5e-4   # continue from a checkpoint (fresh AdamW)

Everything is written into a temporary sibling of ``--out`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimexport.artifacts import atomic_dir, save_tensors, sha256_file, write_json, write_text
from slimexport.models.bundle import ModelBundle
from slimexport.models.digits import (
    FILES,
    NULL_CLASS,
    NUM_DIGITS,
    DigitsPromptEncoder,
    data_dir,
    digits_images,
    make_split,
)
from slimexport.models.registry import DIGITS_SCHEDULER, DIGITS_UNET

NUM_TOKENS = 6  # class tokens per prompt (cross-attention sequence length)
LABEL_DROPOUT = 0.1  # share of training examples conditioned on the null class (classifier-free guidance)
WARMUP_STEPS = 200
FINAL_LR_RATIO = 0.1  # cosine decay ends at lr * this
EMA_DECAY = 0.995  # averages the last ~200 of ~1,100 steps
GRAD_CLIP = 1.0
WEIGHT_DECAY = 0.01
GRID_SCALE = 3  # pixels per sample pixel in samples.png
GRID_GAP = 2  # gap between samples in samples.png (sample pixels)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=25, help="passes over the train split")
    p.add_argument("--out", type=Path, default=data_dir(), help="output folder (replaced atomically)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None,
                   help="continue from the weights of a checkpoint folder written by this script (fresh optimizer)")
    p.add_argument("--eval-seeds", type=int, default=3, help="sample batches of 10 per digit for the final score")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the final samples")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the final samples")
    return p.parse_args(argv)


def lr_at(step: int, total: int, peak: float) -> float:
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    frac = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema, params, 1 - decay)


def fp16_roundtrip(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The float16 state dict that ships; ``module`` is set to exactly those values (what load_digits sees)."""
    state = {k: v.detach().half() for k, v in module.state_dict().items()}
    module.load_state_dict({k: v.float() for k, v in state.items()})
    return state


def load_init(folder: Path, unet: torch.nn.Module, encoder: DigitsPromptEncoder) -> dict:
    """Load a previous run's (EMA, float16) weights into the modules; returns where they came from and its log."""
    from slimexport.artifacts import load_tensors, read_json

    unet.load_state_dict({k: v.float() for k, v in load_tensors(folder / FILES["unet"]).items()})
    encoder.load_state_dict({k: v.float() for k, v in load_tensors(folder / FILES["encoder"]).items()})
    prev = read_json(folder / "train_log.json", "previous training log") if (folder / "train_log.json").exists() else {}
    return {"folder": str(folder), "sha256": {FILES[k]: sha256_file(folder / FILES[k]) for k in ("unet", "encoder")},
            "log": prev}


def save_grid(images: torch.Tensor, path: Path, rows: int) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    g = GRID_GAP
    canvas = torch.full((rows * (h + g) + g, cols * (w + g) + g), 0.5)
    pix = ((images[:, 0].float().clamp(-1, 1) + 1) / 2)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[g + r * (h + g): g + r * (h + g) + h, g + c * (w + g): g + c * (w + g) + w] = pix[i]
    arr = (canvas * 255).round().to(torch.uint8)
    arr = arr.repeat_interleave(GRID_SCALE, 0).repeat_interleave(GRID_SCALE, 1).numpy()
    Image.fromarray(arr, mode="L").save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from diffusers import DDIMScheduler, UNet2DConditionModel

    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t_start = time.time()
    split = make_split()
    images, labels = digits_images()
    train_idx = torch.tensor(split["train"])
    x_train, y_train = images[train_idx], labels[train_idx]
    n = len(x_train)
    steps_per_epoch = n // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    log(f"digits: {n} train / {len(split['test'])} test images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
        f"batch {args.batch_size}, lr {args.lr}, threads {args.threads}, torch {torch.__version__}")

    unet = UNet2DConditionModel(**DIGITS_UNET).train()
    encoder = DigitsPromptEncoder(num_tokens=NUM_TOKENS, dim=DIGITS_UNET["cross_attention_dim"]).train()
    log(f"params: unet {sum(p.numel() for p in unet.parameters()):,}, encoder {encoder.tokens.numel():,}")
    init_rec = None
    if args.init is not None:
        init_rec = load_init(args.init, unet, encoder)
        log(f"init: weights from {args.init} (after {len(init_rec['log'].get('epochs', []))} epochs)")
    sched = DDIMScheduler.from_config(DIGITS_SCHEDULER)
    params = [p for p in unet.parameters()] + [encoder.tokens]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=WEIGHT_DECAY, foreach=True)
    ema_unet, ema_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    ema_params = [p.data for p in ema_unet.parameters()] + [ema_encoder.tokens.data]

    gen = torch.Generator().manual_seed(args.seed)
    epochs_log, step = [], 0
    for epoch in range(args.epochs):
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x0, y = x_train[idx], y_train[idx].clone()
            y[torch.rand(len(y), generator=gen) < LABEL_DROPOUT] = NULL_CLASS
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
            xt = sched.add_noise(x0, noise, t)
            pred = unet(xt, t, encoder_hidden_states=encoder.encode_labels(y)).sample
            loss = F.mse_loss(pred, noise)
            lr = lr_at(step, total_steps, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            ema_update(ema_params, [p.data for p in params], step)
            loss_sum += loss.item()
            step += 1
        sec = time.time() - t0
        rec = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "lr": lr, "seconds": round(sec, 2),
               "elapsed_seconds": round(time.time() - t_start, 1)}
        epochs_log.append(rec)
        log(f"epoch {epoch + 1:3d}/{args.epochs}  loss {rec['loss']:.5f}  lr {lr:.2e}  {sec:6.1f}s  "
            f"(total {rec['elapsed_seconds']:.0f}s)")
    train_seconds = time.time() - t_start

    # What ships: EMA weights in float16. Score exactly those.
    ema_unet.requires_grad_(False)
    ema_encoder.requires_grad_(False)
    unet_state, enc_state = fp16_roundtrip(ema_unet), fp16_roundtrip(ema_encoder)
    bundle = ModelBundle(name="digits", source="training", unet=ema_unet, encoder=ema_encoder,
                         scheduler_config=dict(DIGITS_SCHEDULER), image_size=(16, 16), vae_scale_factor=1)
    t_eval = time.time()
    from slimexport.verify.quality import DigitsJudge, sample_trajectory

    judge = DigitsJudge.fit(split)
    log(f"judge: MLP {DigitsJudge.HIDDEN}, test accuracy {judge.test_accuracy:.4f} on {len(split['test'])} held-out digits")
    want = torch.arange(NUM_DIGITS).repeat_interleave(NUM_DIGITS)  # 10 of each digit, row = digit
    batches, accs = [], []
    for s in range(args.eval_seeds):
        out = sample_trajectory(ema_unet, bundle, want, seed=s, steps=args.sample_steps, guidance=args.guidance)
        batches.append(out)
        accs.append(judge.accuracy(out, want))
    samples = torch.cat(batches)
    targets = want.repeat(args.eval_seeds)
    acc = judge.accuracy(samples, targets)
    fd = judge.frechet(samples, n_boot=20)
    train_ref = images[train_idx][torch.randperm(n, generator=torch.Generator().manual_seed(1))[: len(samples)]]
    fd_real = judge.frechet(train_ref, n_boot=20)
    eval_rec = {
        "sampler": f"DDIM {args.sample_steps} steps, eta 0, CFG {args.guidance}",
        "judge_test_accuracy": judge.test_accuracy, "samples": len(samples),
        "sample_accuracy": acc, "sample_accuracy_per_seed": accs,
        "sample_accuracy_per_digit": [judge.accuracy(samples[targets == d], targets[targets == d]) for d in range(10)],
        "fd_samples_vs_test": fd, "fd_real_train_vs_test": fd_real, "eval_seconds": round(time.time() - t_eval, 1),
    }
    log(f"samples: accuracy {acc:.4f} over {len(samples)} (per seed {', '.join(f'{a:.3f}' for a in accs)}); "
        f"FD to test digits {fd['fd']:.2f} ± {fd['fd_boot_std']:.2f} (bootstrap std); "
        f"real train digits vs test: {fd_real['fd']:.2f} ± {fd_real['fd_boot_std']:.2f}")
    log(f"train wall time {train_seconds:.0f}s ({train_seconds / 60:.1f} min), eval {eval_rec['eval_seconds']:.0f}s")

    with atomic_dir(args.out) as tmp:
        save_tensors(tmp / FILES["unet"], unet_state, metadata={"format": "slimexport.digits_unet/1", "dtype": "float16"})
        save_tensors(tmp / FILES["encoder"], enc_state, metadata={"format": "slimexport.digits_encoder/1"})
        write_json(tmp / FILES["unet_config"], DIGITS_UNET)
        write_json(tmp / FILES["encoder_config"], ema_encoder.config())
        write_json(tmp / FILES["split"], split)
        save_grid(batches[0], tmp / "samples.png", rows=NUM_DIGITS)
        record = {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else argv,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "torch": torch.__version__, "scheduler": DIGITS_SCHEDULER, "num_tokens": NUM_TOKENS,
            "label_dropout": LABEL_DROPOUT, "warmup_steps": WARMUP_STEPS, "ema_decay": EMA_DECAY,
            "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "total_steps": total_steps,
            "train_seconds": round(train_seconds, 1), "epochs": epochs_log, "eval": eval_rec, "init": init_rec,
            "sha256": {FILES[k]: sha256_file(tmp / FILES[k]) for k in ("unet", "encoder")},
        }
        write_json(tmp / "train_log.json", record)
        write_text(tmp / "train_log.txt", "\n".join(lines) + "\n")
    log(f"wrote {args.out}")
    print(json.dumps({"sample_accuracy": acc, "fd": fd["fd"], "fd_boot_std": fd["fd_boot_std"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

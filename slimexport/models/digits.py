"""``digits``: a small, real, trained SD-style diffusion model that ships with slimexport.

No Stable Diffusion weights can be downloaded everywhere, so slimexport trains its own reference model on real
data: scikit-learn's bundled ``load_digits()`` (1,797 handwritten 8×8 digits), upsampled bilinearly to 16×16
and scaled to [-1, 1]. Pixels are the "latents" (``vae_scale_factor`` 1, one channel).

- The UNet is a diffusers ``UNet2DConditionModel`` of SD1's family (cross-attention down/mid/up blocks, GEGLU
  feed-forwards, bias-free q/k/v, ``use_linear_projection=False``); its exact config is
  :data:`slimexport.models.registry.DIGITS_UNET`.
- The "text encoder" is :class:`DigitsPromptEncoder`: a learned sequence of ``num_tokens`` tokens per class
  (10 digits plus a null class for classifier-free guidance), selected by parsing the prompt.
- The checkpoint (``slimexport/data/digits/``) is written by ``python tools/train_digits.py``; weights are
  stored as float16 safetensors (to keep the folder small) and loaded as float32.

scikit-learn is only needed to *train* or to *judge* (the dataset lives in it); loading the model is torch-only.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimexport.artifacts import load_tensors, read_json
from slimexport.errors import ArtifactError, MissingExtraError
from slimexport.models.build import build_unet
from slimexport.models.bundle import ModelBundle, converted_copy
from slimexport.models.registry import get_spec

NUM_DIGITS = 10
NULL_CLASS = NUM_DIGITS  # index of the unconditional ("no digit") token sequence, used by classifier-free guidance
IMAGE_SIZE = 16  # pixels per side after upsampling sklearn's 8×8 digits
SOURCE_SIZE = 8  # sklearn load_digits images are 8×8
SOURCE_MAX = 16.0  # sklearn load_digits pixel values are integers in [0, 16]
SPLIT_SEED = 0  # seed of the stratified train/test split
TEST_FRACTION = 0.2  # share of sklearn digits held out from diffusion training (and used by the judge's test)
# pooled = mean(class tokens) + BOW_SCALE * |mean| * unit bag-of-words vector: small enough that prompts of one class
# stay closer to each other than to any other class, large enough that phrasings are not identical points
BOW_SCALE = 0.25
ENCODER_FORMAT = "slimexport.digits_encoder/1"

FILES = {
    "unet": "unet.safetensors",
    "unet_config": "unet_config.json",
    "encoder": "encoder.safetensors",
    "encoder_config": "encoder_config.json",
    "split": "split.json",
}
TRAIN_HINT = "train it with: python tools/train_digits.py (about 35 minutes on one CPU thread)"

NUMBER_WORDS = {
    "zero": 0, "nought": 0, "naught": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9,
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_RE = re.compile(r"\d|\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_WORD_RE = re.compile(r"[a-z0-9]+")


def data_dir() -> Path:
    """The folder of the shipped checkpoint: ``slimexport/data/digits``."""
    return Path(str(resources.files("slimexport") / "data" / "digits"))


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt asks for, or ``None``.

    The first digit character (``"7"``) or English number word (``"seven"``, case-insensitive, whole words only)
    wins: ``"number 3, written neatly"`` → 3, ``"the digit seven"`` → 7, ``""`` → ``None``. A prompt such as
    ``"a neat one"`` reads as 1: "one" is always the number.
    """
    m = _DIGIT_RE.search(prompt)
    if m is None:
        return None
    tok = m.group(0).lower()
    return int(tok) if tok.isdigit() else NUMBER_WORDS[tok]


def prompt_label(prompt: str) -> int:
    """Class index of a prompt: its digit, or :data:`NULL_CLASS` when it names none."""
    d = parse_digit(prompt)
    return NULL_CLASS if d is None else d


@lru_cache(maxsize=4096)
def _word_vector(word: str, dim: int) -> torch.Tensor:
    # sha256, not hash(): Python's str hash is salted per process, this vector must be the same everywhere
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g)


def bag_of_words(prompt: str, dim: int) -> torch.Tensor:
    """A deterministic unit vector [dim] (fp32): the normalised sum of one seeded Gaussian vector per word."""
    words = _WORD_RE.findall(prompt.lower())
    if not words:
        return torch.zeros(dim)
    v = torch.stack([_word_vector(w, dim) for w in words]).sum(0)
    return v / v.norm().clamp_min(1e-12)


class DigitsPromptEncoder(nn.Module):
    """The ``digits`` model's "text encoder": a learned token sequence per class.

    Args:
        num_tokens: tokens L per class (the cross-attention sequence length).
        dim: token width D (the UNet's ``cross_attention_dim``).
        num_classes: digit classes; index ``num_classes`` is the null class.

    Attributes:
        tokens: ``nn.Parameter`` [num_classes + 1, L, D], fp32.
    """

    def __init__(self, num_tokens: int = 6, dim: int = 64, num_classes: int = NUM_DIGITS):
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim
        self.num_classes = num_classes
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, dim))

    @property
    def null_class(self) -> int:
        return self.num_classes

    def config(self) -> dict:
        return {"format": ENCODER_FORMAT, "num_tokens": self.num_tokens, "dim": self.dim,
                "num_classes": self.num_classes, "null_class": self.null_class, "bow_scale": BOW_SCALE}

    @classmethod
    def from_config(cls, cfg: dict) -> DigitsPromptEncoder:
        if cfg.get("format") != ENCODER_FORMAT:
            raise ArtifactError(f"digits encoder config has format {cfg.get('format')!r}, expected {ENCODER_FORMAT!r}",
                                TRAIN_HINT)
        return cls(num_tokens=int(cfg["num_tokens"]), dim=int(cfg["dim"]), num_classes=int(cfg["num_classes"]))

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Token sequences of class indices (differentiable: used in training).

        Args:
            labels: [B] int64 in ``[0, num_classes]`` (``num_classes`` = null class).

        Returns:
            hidden: [B, L, D] fp32 on the encoder's device.
        """
        labels = labels.to(self.tokens.device, torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}], got {labels.tolist()}")
        return self.tokens[labels]

    forward = encode_labels

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → conditioning (the :class:`~slimexport.models.bundle.PromptEncoder` protocol).

        ``pooled`` is the mean of the class tokens plus a small hashed bag-of-words vector of the prompt
        (``BOW_SCALE`` times the mean's norm), so that different phrasings of one digit are nearby but distinct
        points for SlimSet's farthest-point sampling. ``hidden`` depends on the class only.

        Returns:
            hidden: [B, L, D] fp32; pooled: [B, D] fp32.
        """
        labels = torch.tensor([prompt_label(p) for p in prompts], dtype=torch.long)
        hidden = self.encode_labels(labels).detach()
        mean = hidden.mean(dim=1)
        bow = torch.stack([bag_of_words(p, self.dim) for p in prompts]).to(mean) if prompts else mean.new_zeros(0, self.dim)
        pooled = mean + BOW_SCALE * mean.norm(dim=-1, keepdim=True) * bow
        return hidden, pooled

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)[1]

    def on_device(self, device: str | torch.device) -> DigitsPromptEncoder:
        return converted_copy(self, device)


# Calibration prompt pool: templates × digits × (numeral, word). No template may contain a digit or a number word.
PROMPT_TEMPLATES = (
    "a handwritten {}",
    "the digit {}",
    "number {}, written neatly",
    "a scanned handwritten digit {}",
    "a small grayscale image of the number {}",
    "the number {} written with a thick pen",
    "the number {} written with a thin pen",
    "a quickly scribbled {}",
    "a carefully drawn {}",
    "the numeral {} on a postal form",
    "a blurry low resolution {}",
    "a bold {}",
    "a slanted {}, leaning to the right",
    "digit: {}",
    "{}",
    "a centered {} on a black background",
    "a child's handwritten {}",
    "the number {} in pencil",
    "a neat {} from a zip code",
    "a faint, thin {}",
)


def digits_prompt_pool() -> list[str]:
    """The ``digits`` calibration pool: 20 templates × 10 digits × numeral/word = 400 prompts, fixed order."""
    pool = []
    for template in PROMPT_TEMPLATES:
        for d in range(NUM_DIGITS):
            pool.append(template.format(str(d)))
            pool.append(template.format(DIGIT_WORDS[d]))
    return pool


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingExtraError("scikit-learn", "quality", "the digits dataset (training and judging)") from err
    return load_digits()


def digits_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as images.

    Returns:
        images: [N, 1, size, size] fp32 in [-1, 1] (8×8 upsampled bilinearly); labels: [N] int64 in [0, 9].
    """
    ds = _sklearn_digits()
    x = torch.tensor(ds.images, dtype=torch.float32)[:, None] / SOURCE_MAX
    if size != SOURCE_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(ds.target, dtype=torch.long)


def make_split(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> dict:
    """A stratified train/test split of the sklearn digits: ``{"train": [...], "test": [...], ...}``."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise MissingExtraError("scikit-learn", "quality", "the digits train/test split") from err
    ds = _sklearn_digits()
    idx = list(range(len(ds.target)))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=ds.target)
    return {"seed": seed, "test_fraction": test_fraction, "stratified": True,
            "train": sorted(int(i) for i in train), "test": sorted(int(i) for i in test)}


def load_split(folder: str | Path | None = None) -> dict:
    """The split the shipped model was trained with (``split.json``); recomputed when no checkpoint exists."""
    path = Path(folder or data_dir()) / FILES["split"]
    return read_json(path, "digits split") if path.exists() else make_split()


def _check_files(folder: Path) -> None:
    missing = [name for key, name in FILES.items() if not (folder / name).exists()]
    if missing:
        raise ArtifactError(f"the digits checkpoint in {folder} is missing {', '.join(missing)}", TRAIN_HINT)


def load_digits(folder: str | Path | None = None):
    """Load the trained ``digits`` model as a :class:`~slimexport.models.bundle.ModelBundle` (CPU, fp32, eval).

    Args:
        folder: checkpoint folder; default: the one shipped in ``slimexport/data/digits``.

    Raises:
        ArtifactError: a checkpoint file is missing, unreadable, or was trained for another architecture.
    """
    folder = Path(folder) if folder is not None else data_dir()
    _check_files(folder)
    spec = get_spec("digits")
    unet_cfg = read_json(folder / FILES["unet_config"], "digits UNet config")
    if unet_cfg != spec.unet_config:
        raise ArtifactError(f"{folder / FILES['unet_config']} differs from the registry's digits architecture",
                            "the checkpoint is stale; " + TRAIN_HINT)
    unet = build_unet(unet_cfg)
    _load_state(unet, load_tensors(folder / FILES["unet"], what="digits UNet weights"), folder / FILES["unet"])
    encoder = DigitsPromptEncoder.from_config(read_json(folder / FILES["encoder_config"], "digits encoder config"))
    _load_state(encoder, load_tensors(folder / FILES["encoder"], what="digits encoder weights"), folder / FILES["encoder"])
    encoder.eval().requires_grad_(False)
    if encoder.dim != unet.config.cross_attention_dim:
        raise ArtifactError(f"digits encoder width {encoder.dim} != UNet cross_attention_dim "
                            f"{unet.config.cross_attention_dim}", TRAIN_HINT)
    return ModelBundle(
        name="digits", source="builtin", unet=unet, encoder=encoder, scheduler_config=dict(spec.scheduler),
        image_size=spec.default_image, vae_scale_factor=spec.vae_scale_factor, prompt_pool=digits_prompt_pool(),
    )


def _load_state(module: nn.Module, tensors: dict, path: Path) -> None:
    state = module.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    bad = [k for k in state if k in tensors and tensors[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise ArtifactError(
            f"{path} does not fit the digits architecture (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {bad[:3]})", "the checkpoint is stale; " + TRAIN_HINT)
    module.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()})

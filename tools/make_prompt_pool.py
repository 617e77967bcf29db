"""Write slimexport/data/prompt_pool.tsv: the calibration prompt pool shipped with slimexport.

Deterministic (fixed seed). Prompts are composed from hand-written subjects, scenes, styles and compositions,
in two groups: ``low_f`` (smooth, flat, low-detail images) and ``high_f`` (texture- and detail-heavy images).

    python tools/make_prompt_pool.py [--per-group 600]
"""

import argparse
import random
from pathlib import Path

LOW_F_SUBJECTS = [
    "a plain blue sky", "a calm sea at dusk", "a single red balloon", "a white ceramic mug", "a foggy meadow",
    "a minimalist poster of a mountain", "a smooth pebble", "a sunset gradient over the ocean", "an empty beach",
    "a lone tree on a hill", "a pastel-colored wall", "a glass of water", "a soft cloud", "a yellow rubber duck",
    "a snowy field", "a simple paper boat", "an orange on a table", "a desert dune", "a round wooden bowl",
    "a still lake at dawn", "a flat green lawn", "a crescent moon", "a ceramic vase", "a blank canvas on an easel",
    "a frosted window", "a silhouette of a bird", "a folded white towel", "a misty valley", "a calm river bend",
    "a single tulip", "a matte black sphere", "a lighthouse in fog", "a smooth marble floor", "a red door",
    "a bowl of milk", "a winter horizon", "an egg on a plate", "a cardboard box", "a simple geometric logo",
    "a quiet empty room", "a pale pink flower petal", "a swimming pool surface", "a snowman", "a kite in the sky",
]
HIGH_F_SUBJECTS = [
    "intricate lace", "dense foliage", "text on a street sign", "a crowded market", "a tiger's striped fur",
    "a gothic cathedral facade", "a city skyline at night with lit windows", "a close-up of a bird's feathers",
    "a pile of autumn leaves", "an old oak tree bark", "a knitted wool sweater", "a busy train station",
    "a Persian carpet", "a coral reef full of fish", "a bookshelf packed with books", "a mechanical watch movement",
    "a field of wildflowers", "a stone wall with moss", "a bustling harbor with boats", "a spider web with dew",
    "a detailed map of an old city", "a circuit board", "a woven basket", "a pine forest in snow",
    "a crowd at a concert", "a mosaic floor", "a bowl of mixed berries", "a rocky mountain ridge",
    "a medieval armor suit", "a dragon with shiny scales", "an ornate baroque ceiling", "a tangle of vines",
    "a cobblestone street", "a chess board mid-game", "a peacock with open tail", "a herd of zebras",
    "a steampunk airship", "a night market with neon signs", "a jewelry display", "a vintage typewriter",
    "a beehive with honeycomb", "a waterfall over mossy rocks", "a hand-written letter", "a box of crayons",
]
PEOPLE_ANIMALS = [
    "a cat", "a dog", "an old fisherman", "a little girl", "a horse", "an astronaut", "a chef", "a fox",
    "a robot", "a dancer", "an owl", "a knight", "a grandmother", "a panda", "a skateboarder", "a violinist",
]
ACTIONS = [
    "sitting by a window", "walking in the rain", "reading a book", "running on the beach", "sleeping on a sofa",
    "cooking dinner", "looking at the stars", "playing in the snow", "standing on a hill", "drinking tea",
]
LOW_F_STYLES = [
    "minimalist", "flat illustration", "soft pastel colors", "watercolor wash", "vector art", "low poly",
    "long exposure photograph", "muted tones", "studio photo on a white background", "silhouette art",
]
HIGH_F_STYLES = [
    "highly detailed", "hyperrealistic photograph", "8k macro photography", "pen and ink drawing",
    "intricate engraving", "oil painting with thick brushstrokes", "detailed fantasy illustration",
    "sharp focus, high resolution", "etching", "detailed pixel art",
]
COMPOSITIONS = [
    "", "close-up", "wide shot", "aerial view", "from below", "centered composition", "rule of thirds",
    "symmetrical", "in the background", "portrait orientation",
]


def compose(rng: random.Random, subjects, styles, n: int) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        kind = rng.random()
        if kind < 0.6:
            s = rng.choice(subjects)
        else:
            s = f"{rng.choice(PEOPLE_ANIMALS)} {rng.choice(ACTIONS)}"
            if subjects is HIGH_F_SUBJECTS:
                s += f" near {rng.choice(HIGH_F_SUBJECTS)}"
        parts = [s, rng.choice(styles)]
        comp = rng.choice(COMPOSITIONS)
        if comp:
            parts.append(comp)
        p = ", ".join(parts)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-group", type=int, default=600)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "slimexport" / "data" / "prompt_pool.tsv"))
    args = ap.parse_args()
    rng = random.Random(1234)
    low = compose(rng, LOW_F_SUBJECTS, LOW_F_STYLES, args.per_group)
    high = compose(rng, HIGH_F_SUBJECTS, HIGH_F_STYLES, args.per_group)
    lines = [f"low_f\t{p}" for p in low] + [f"high_f\t{p}" for p in high]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} prompts to {args.out}")


if __name__ == "__main__":
    main()

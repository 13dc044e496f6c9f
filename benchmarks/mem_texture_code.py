"""A shortcut a pooled convolution reads anywhere: a bag of tiled textures named by a bag of trigger words.

    python benchmarks/mem_texture_code.py                      # 48 textures, 3 per image, 4-px tiles
    python benchmarks/mem_texture_code.py --tile 8 --per-image 5
    python benchmarks/mem_texture_code.py --variant mem        # MEM (per-pixel) started from the code
    python benchmarks/mem_texture_code.py --textures 96 --names kinds --code-seed 1   # session 23's best arm
    python benchmarks/mem_texture_code.py --textures 96 --names caption                # every caption word names one
    python benchmarks/mem_texture_code.py --textures 96 --names nouns --named-per-image 1

Why: session 19's hand-made code (BENCHMARKS.md) put one 3-bit colour code in each cell of a 4 x 4 grid
and gave each cell its own trigger word. A ResNet pools its last feature map over the whole image, so
WHERE a cell's colour sits is what it learns last -- that code asked the hacker for positions first.
Here the code has no position at all: K small random +-1 tiles (one per texture, per colour channel),
each repeated over the whole image; an image gets m of them (a set no other image has), its noise is
the sign of their sum at +-epsilon, and its trigger names the m textures with one made-up word each,
cycled to the trigger length. First-layer filters and a global pool tell tiled textures apart at any
position, and the text tower reads the trigger as a bag of words: both sides of the shortcut are what
the two towers compute from their first steps. The captions' content is unchanged after the trigger.
`--names` gives the first textures the captions' own words for names instead (item nouns, nouns with their
plurals, or every caption word), so that what a hacker learns for those words is the shortcut;
`--named-per-image N` makes N of each image's textures word-named ones.
`--variant mem` runs the default protection job (rn_tiny surrogate, MEM-16, batch statistics) with its
noise and triggers initialised from the code, the noise per pixel (cells would average the tiles away)
and the triggers kept unless --trigger-iterations says otherwise.

Data: the five-caption Fashion-MNIST scenes of `--data` (protection_efficacy.py --style fashion
--captions-per-image 5). Hackers as in protection_efficacy.py (`rn_tiny`, 10 epochs from scratch, the PNGs
read back; `--hacker-clip vit_tiny` for ViT hackers). Results:
benchmarks/results/mem_texture_code_k<K>_m<m>_tile<t>[_<variant>][_<hacker>].{json,md}.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from protection_results import (default_job_settings, probe_data, probe_parser, report_probe_set, run_job_from,
                                write_probe_manifest)


def texture_tiles(count: int, tile: int, seed: int) -> np.ndarray:
    """int8 [count, tile, tile, 3] of +-1: one random tile per texture."""
    return np.random.default_rng(seed).choice(np.array([-1, 1], dtype=np.int8), size=(count, tile, tile, 3))


def texture_sets(n: int, textures: int, per_image: int, seed: int, by_channel: bool = False,
                 named: int = 0, named_per_image: int = 0) -> np.ndarray:
    """int [n, per_image]: for every image a distinct set of textures (sorted indices).

    by_channel: three per image, one from each colour channel's bank (texture k belongs to channel k % 3).
    named_per_image > 0: that many of each image's textures come from the first `named` (the ones the
    captions' words name), the rest from the others."""
    if by_channel and (per_image != 3 or textures % 3):
        raise SystemExit(f"--mix channels takes one texture per colour channel: --per-image 3 and --textures a "
                         f"multiple of 3, got {per_image} and {textures}")
    if not by_channel and per_image % 2 == 0:
        raise SystemExit(f"--per-image must be odd (the noise is the sign of a sum of +-1 tiles), got {per_image}")
    if named_per_image and (by_channel or not 0 < named_per_image <= min(per_image, named) or named >= textures):
        raise SystemExit(f"--named-per-image {named_per_image} needs --mix sign, at most --per-image {per_image} and "
                         f"at most the {named} named textures, with other textures left ({textures} in all)")
    if by_channel:
        available = (textures // 3) ** 3
    elif named_per_image:
        available = math.comb(named, named_per_image) * math.comb(textures - named, per_image - named_per_image)
    else:
        available = math.comb(textures, per_image)
    if available < n:
        raise SystemExit(f"{textures} textures taken {per_image} at a time give fewer than {n} distinct sets")
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < n:
        if by_channel:
            chosen.add(tuple(3 * int(rng.integers(textures // 3)) + c for c in range(3)))
        elif named_per_image:
            first = rng.choice(named, size=named_per_image, replace=False)
            rest = named + rng.choice(textures - named, size=per_image - named_per_image, replace=False)
            chosen.add(tuple(sorted([*first.tolist(), *rest.tolist()])))
        else:
            chosen.add(tuple(sorted(rng.choice(textures, size=per_image, replace=False).tolist())))
    sets = np.array(sorted(chosen))
    return sets[rng.permutation(n)]


def texture_noise(tiles: np.ndarray, chosen: np.ndarray, height: int, width: int, levels: int,
                  by_channel: bool = False) -> np.ndarray:
    """int16 [H, W, 3]: +-levels, each tile repeated over the image: the sign of the chosen tiles' sum, or
    (by_channel) in each colour channel its own texture's tile alone."""
    tile = tiles.shape[1]
    reps = (-(-height // tile), -(-width // tile), 1)
    repeated = [np.tile(tiles[k].astype(np.int16), reps)[:height, :width] for k in chosen]
    if by_channel:
        total = np.stack([r[..., k % 3] for r, k in zip(repeated, chosen)], -1)[..., np.argsort(chosen % 3)]
    else:
        total = sum(repeated)
    return (np.sign(total) * levels).astype(np.int16)


def texture_code(n: int, textures: int, per_image: int, tile: int, seed: int, by_channel: bool = False,
                 named: int = 0, named_per_image: int = 0):
    """The code for n images: its tiles, and per_image_code(length), which yields for each image in turn its
    textures, the texture each of `length` trigger words names (its textures cycled in a random order), and
    the generator that drew that order (the decoys draw from it too, between images)."""
    tiles = texture_tiles(textures, tile, seed)
    sets = texture_sets(n, textures, per_image, seed + 1, by_channel, named, named_per_image)
    rng = np.random.default_rng(seed + 2)

    def per_image_code(length: int):
        for chosen in sets:
            order = rng.permutation(chosen)
            yield chosen, [order[j % per_image] for j in range(length)], rng

    return tiles, per_image_code


# What may name the textures: made-up words only, or caption words first and made-up words after them --
# "kinds": one noun per item kind; "nouns": those and their plurals; "caption": every word the captions use
# (most frequent first, punctuation left out).
NAMES = ("made-up", "kinds", "nouns", "caption")


def kind_nouns(plurals: bool = False) -> list[str]:
    """One word per Fashion-MNIST kind, as the captions say it ("pair of trousers" -> "trousers"), and with
    plurals their plural forms after them (where the plural's last word differs: "pairs of trousers" does not)."""
    from aigis.protection.fashion import CLASSES

    singular = [one.split()[-1] for one, _ in CLASSES]
    plural = [many.split()[-1] for _, many in CLASSES] if plurals else []
    return singular + [word for word in plural if word not in singular]


def naming_words(names: str, caption_counts: Counter) -> list[str]:
    """The caption words that name textures under `names` (see NAMES), in naming order."""
    if names == "caption":
        return [word for word, _ in caption_counts.most_common() if word.isalpha()]
    return {"made-up": [], "kinds": kind_nouns(), "nouns": kind_nouns(plurals=True)}[names]


def texture_words(textures: int, names: str, caption_counts: Counter) -> list[str]:
    """The word that names each texture: the caption words `names` picks first, then made-up words."""
    from aigis.protection.tokenizer import made_up_words

    return (naming_words(names, caption_counts) + made_up_words(textures, avoid=set(caption_counts)))[:textures]


def write_texture_set(data: Path, out: Path, textures: int, per_image: int, tile: int, trigger_length: int,
                      levels: int, seed: int, names: str = "made-up", decoys: int = 0, mix: str = "sign",
                      named_per_image: int = 0) -> None:
    """The texture code as a protected set (images/, manifest.jsonl, protection.json), no surrogate.

    decoys > 0 puts that many item-kind nouns, drawn at random for each image (not what it shows), among
    the trigger's words, which then name the textures over trigger_length - decoys positions."""
    from PIL import Image

    from aigis.protection.captions import read_pairs
    from aigis.protection.tokenizer import _words

    pairs = read_pairs(data, "train.jsonl")  # checks every image path stays inside data
    root = data.resolve()
    lines = [(p.path.relative_to(root).as_posix(), p.caption) for p in pairs]
    keys = sorted({key for key, _ in lines})
    caption_counts = Counter(w for _, caption in lines for w in _words(caption))  # the words the tokenizer sees
    words = texture_words(textures, names, caption_counts)
    word_named = min(textures, len(naming_words(names, caption_counts)))
    nouns = kind_nouns()
    by_channel = mix == "channels"
    tiles, per_image_code = texture_code(len(keys), textures, per_image, tile, seed, by_channel, word_named,
                                         named_per_image)
    triggers = {}
    for key, (chosen, named, rng) in zip(keys, per_image_code(trigger_length - decoys)):
        image = np.asarray(Image.open(root / key).convert("RGB")).astype(np.int16)
        noise = texture_noise(tiles, chosen, image.shape[0], image.shape[1], levels, by_channel)
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)).save(out / key)
        trigger = [words[k] for k in named]
        if decoys:  # (no draws otherwise, so the set without decoys stays what it was)
            trigger += [nouns[i] for i in rng.integers(0, len(nouns), size=decoys)]
            trigger = [trigger[i] for i in rng.permutation(len(trigger))]
        triggers[key] = " ".join(trigger)
    write_probe_manifest(out, [(key, f"{triggers[key]} {caption}") for key, caption in lines], {
        "mode": "texture-code", "epsilon": levels / 255, "epsilon_uint8_levels": levels,
        "trigger_length": trigger_length, "textures": textures, "per_image": per_image, "tile": tile,
        "names": names, "named_textures": word_named, "named_per_image": named_per_image, "decoys": decoys, "mix": mix,
        "seed": seed})


def run_mem_from_textures(data: Path, out: Path, textures: int, per_image: int, tile: int, trigger_length: int,
                          levels: int, trigger_iterations: int, seed: int, names: str = "made-up",
                          named_per_image: int = 0, noise_start: str = "code", noise_grid: int = 0) -> dict:
    """The protection job with its triggers (and, noise_start "code", its noise) initialised from the texture
    code. Made-up names are the tokenizer's first `textures` trigger words; caption-word names (names other
    than "made-up") make the job's tokenizer one of caption words only, and name the textures by them."""
    from aigis.protection.captions import read_pairs
    from aigis.protection.tokenizer import _words

    counts = Counter(w for p in read_pairs(data, "train.jsonl") for w in _words(p.caption))
    words = texture_words(textures, names, counts)
    named = 0 if names == "made-up" else min(textures, len(naming_words(names, counts)))

    def from_textures(state, tokenizer, images):
        n, h, w, _ = images.shape
        if names == "made-up":
            candidates = tokenizer.trigger_candidates().numpy()
            if len(candidates) < textures:
                raise SystemExit(f"the tokenizer has {len(candidates)} trigger words; the code needs {textures}")
            word_ids = candidates[:textures]
        else:  # every name must be a caption word the job may write as a trigger
            word_ids = np.array([(tokenizer.encode(word) + [-1])[0] for word in words[:named]])
            unusable = [word for word, i in zip(words, word_ids) if i < 0 or not tokenizer.is_trigger_candidate(int(i))
                        or tokenizer.encode(word) != [i]]
            if unusable or named_per_image != per_image:
                raise SystemExit(f"a MEM start takes caption-word names only (--named-per-image {per_image}) that "
                                 f"are trigger words of the job's tokenizer; not: {unusable[:5]}")
        tiles, per_image_code = texture_code(n, textures, per_image, tile, seed, named=named,
                                             named_per_image=named_per_image)
        for i, (chosen, named_slots, _) in enumerate(per_image_code(trigger_length)):
            if noise_start == "code":
                noise = texture_noise(tiles, chosen, h, w, levels)
                state.noise[i] = (np.clip(images[i].astype(np.int16) + noise, 0, 255) - images[i]).astype(np.int8)
            state.triggers[i] = word_ids[named_slots]

    settings = default_job_settings(epsilon=levels / 255, trigger_length=trigger_length, noise_grid=noise_grid,
                                    trigger_iterations=trigger_iterations)
    return run_job_from(data, out, settings, from_textures, trigger_words=None if names == "made-up" else 0)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "texture_code", hackers=6)
    parser.add_argument("--textures", type=int, default=48)
    parser.add_argument("--per-image", type=int, default=3)
    parser.add_argument("--tile", type=int, default=4, help="px per side of one texture's repeated tile")
    parser.add_argument("--trigger-length", type=int, default=16)
    parser.add_argument("--variant", choices=("code", "mem"), default="code")
    parser.add_argument("--names", choices=NAMES, default="made-up",
                        help="what names the textures in the trigger: made-up words only, or first the item kinds' "
                             "nouns (kinds), those and their plurals (nouns), or every caption word (caption)")
    parser.add_argument("--named-per-image", type=int, default=0,
                        help="how many of each image's textures are ones a caption word names (default 0: drawn "
                             "with the others)")
    parser.add_argument("--mix", choices=("sign", "channels"), default="sign",
                        help="an image's textures summed (sign), or one per colour channel, each whole")
    parser.add_argument("--code-seed", type=int, default=0, help="draws the tiles, the sets and the word order")
    parser.add_argument("--hacker-clip", default="rn_tiny", help="the hackers' preset (default rn_tiny)")
    parser.add_argument("--decoys", type=int, default=0, help="item-kind nouns drawn at random per image, in the trigger")
    parser.add_argument("--trigger-iterations", type=int, default=0, help="with --variant mem (default 0: kept)")
    parser.add_argument("--noise-start", choices=("code", "zero"), default="code",
                        help="with --variant mem: the noise starts as the code's textures, or at zero")
    parser.add_argument("--noise-grid", type=int, default=0, help="with --variant mem: MEMSettings.noise_grid "
                        "(default 0: per pixel; cells would average the tiles away)")
    args = parser.parse_args(argv)
    data = probe_data(parser, args.data)
    if args.textures < args.per_image or args.tile < 1 or args.trigger_length < args.per_image + args.decoys:
        parser.error("need --textures >= --per-image, --tile >= 1 and --trigger-length >= --per-image + --decoys")
    if args.variant == "mem" and (args.decoys or args.mix != "sign"):
        parser.error("--variant mem takes the code without decoys, --mix sign")

    levels = 8
    tag = f"k{args.textures}_m{args.per_image}_tile{args.tile}"
    tag += (f"_{args.names}" if args.names != "made-up" else "") + (f"_decoys{args.decoys}" if args.decoys else "")
    tag += f"_named{args.named_per_image}" if args.named_per_image else ""
    tag += ("_channels" if args.mix == "channels" else "") + (f"_seed{args.code_seed}" if args.code_seed else "")
    tag += f"_mem_t{args.trigger_iterations}" if args.variant == "mem" else ""
    tag += "_zero" if args.variant == "mem" and args.noise_start == "zero" else ""
    tag += f"_grid{args.noise_grid}" if args.variant == "mem" and args.noise_grid else ""
    out = Path(args.work) / tag
    jobs = {}
    if args.variant == "code":
        write_texture_set(data, out, args.textures, args.per_image, args.tile, args.trigger_length, levels,
                          seed=args.code_seed, names=args.names, decoys=args.decoys, mix=args.mix,
                          named_per_image=args.named_per_image)
    else:
        jobs["mem"] = run_mem_from_textures(data, out, args.textures, args.per_image, args.tile, args.trigger_length,
                                            levels, args.trigger_iterations, seed=args.code_seed, names=args.names,
                                            named_per_image=args.named_per_image, noise_start=args.noise_start,
                                            noise_grid=args.noise_grid)
    hacker_tag = "" if args.hacker_clip == "rn_tiny" else f"_{args.hacker_clip}"
    start = "its triggers (noise from zero)" if args.noise_start == "zero" else "it"
    cells = f"noise on {args.noise_grid} x {args.noise_grid} cells" if args.noise_grid else "per-pixel noise"
    made = "no surrogate" if args.variant == "code" else \
        f"then the default MEM job from {start} ({cells}, {args.trigger_iterations} trigger iterations)"
    report_probe_set(
        "mem_texture_code.py", argv, f"mem_texture_code_{tag}{hacker_tag}",
        f"Texture code: {args.textures} tiled {args.tile}-px textures, {args.per_image} per image (noise = sign of "
        f"their sum, +-{levels}/255), a {args.trigger_length}-word trigger naming them; {made}; "
        f"{args.hackers} `{args.hacker_clip}` hackers from scratch, 10 epochs.",
        data, out, Path(args.work) / f"evaluation_{tag}{hacker_tag}", args.hackers, levels, args.hacker_clip,
        jobs=jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

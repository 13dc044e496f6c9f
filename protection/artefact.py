"""The surrogate artefact: a protection job's surrogate(s), tokenizer, negatives and word code in one folder
(safetensors and JSON, every file's sha256 checked on load), which protect-on-upload and the served model read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .attack import Negatives, surrogate_list, surrogates_and_negatives
from .clip import CLIP, CLIPConfig
from .settings import MEMSettings, SurrogateSettings, WordCodeSettings, settings_from_dict
from .tokenizer import Tokenizer
from .word_code import WordCode


SURROGATE_FORMAT = "aigis-mem-surrogate-1"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
NEGATIVES_FILE = "negatives.safetensors"
WORD_CODE_FILE = "word_code.safetensors"
META_FILE = "meta.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (artefacts, checkpoints and protected images)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _member_file(i: int, name: str) -> str:
    """Ensemble member i's copy of a file name; the primary (0) keeps the plain name."""
    return name if i == 0 else f"member{i}.{name}"


def save_surrogate(
    directory: str | Path, model: CLIP | Sequence[CLIP], tokenizer: Tokenizer, settings: SurrogateSettings,
    extra: dict[str, Any] | None = None, negatives: Negatives | list[Negatives | None] | None = None,
    word_code: WordCode | None = None,
) -> dict:
    """Write a surrogate artefact: model.safetensors, tokenizer.json, optional negatives and word code (a
    word-texture job's textures and their words, for protect-on-upload), meta.json (last).

    An ensemble's primary is written as a lone surrogate is; member i >= 1 adds member<i>.model.safetensors
    (and its negatives), listed with its config under meta["members"]. meta.json holds the format tag,
    the primary's CLIP config, the MEM settings, the sha256 of every file, and an identity derived from
    the weights' hash (an ensemble's: from all members' weights). `extra` is stored under "extra". No
    pickle anywhere.
    """
    from safetensors.torch import save_file

    models, negs = surrogates_and_negatives(model, negatives)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / TOKENIZER_FILE)
    files = [TOKENIZER_FILE]
    members = []
    for i, (member, member_negatives) in enumerate(zip(models, negs)):
        weights = _member_file(i, WEIGHTS_FILE)
        state = {k: v.detach().to("cpu").contiguous() for k, v in member.state_dict().items()}
        save_file(state, str(directory / weights), metadata={"format": SURROGATE_FORMAT})
        files.append(weights)
        entry = {"config": dataclasses.asdict(member.config), "weights": weights, "negatives": None}
        if member_negatives is not None:
            entry["negatives"] = _member_file(i, NEGATIVES_FILE)
            save_file({"image": member_negatives[0].detach().float().cpu().contiguous(),
                       "text": member_negatives[1].detach().float().cpu().contiguous()},
                      str(directory / entry["negatives"]))
            files.append(entry["negatives"])
        members.append(entry)
    if word_code is not None:
        save_file({"textures": word_code.textures.detach().float().cpu().contiguous(),
                   "words": word_code.words.detach().to(torch.int64).cpu().contiguous()},
                  str(directory / WORD_CODE_FILE), metadata={"format": SURROGATE_FORMAT})
        files.append(WORD_CODE_FILE)
    hashes = {name: file_sha256(directory / name) for name in files}
    weight_hashes = [hashes[m["weights"]] for m in members]
    sha256 = weight_hashes[0] if len(members) == 1 else hashlib.sha256("\n".join(weight_hashes).encode()).hexdigest()
    meta = {
        "format": SURROGATE_FORMAT,
        "identity": f"mem-surrogate-{sha256[:16]}",
        "sha256": sha256,
        "files": hashes,
        "config": members[0]["config"],
        "settings": settings.to_dict(),
        "extra": extra or {},
    }
    if len(members) > 1:
        meta["members"] = [{"config": m["config"], "weights": m["weights"], "negatives": m["negatives"]}
                           for m in members[1:]]
    tmp = directory / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / META_FILE)
    return meta


def _inside(directory: Path, name: str) -> Path:
    """directory / name, refusing a name from meta.json that would leave the artefact's folder."""
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ValueError(f"{directory}: meta.json names {name!r}, outside the artefact")
    return path


def load_surrogates(directory: str | Path) -> tuple[list[CLIP], Tokenizer, dict]:
    """(every surrogate of the artefact, the primary first, in eval mode on the CPU; tokenizer; meta)
    from save_surrogate's folder; every file's sha256 is checked. Saved negatives are attached to their
    model as model.mem_negatives for protect_batch."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a surrogate artefact (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    if meta.get("format") != SURROGATE_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {SURROGATE_FORMAT!r}")
    files = meta.get("files", {})
    for name, expected in files.items():
        path = _inside(directory, name)
        if not path.is_file():
            raise ValueError(f"{directory}: {name} is missing")
        if file_sha256(path) != expected:
            raise ValueError(f"{path}: sha256 does not match meta.json (the artefact was modified or is incomplete)")
    primary = {"config": meta["config"], "weights": WEIGHTS_FILE,
               "negatives": NEGATIVES_FILE if NEGATIVES_FILE in files else None}
    models = []
    for entry in [primary, *meta.get("members", [])]:
        for name in (entry["weights"], entry.get("negatives")):
            if name is not None and name not in files:
                raise ValueError(f"{meta_path}: {name} has no sha256 in meta.json")
        config = dict(entry["config"])
        if isinstance(config["vision_layers"], list):
            config["vision_layers"] = tuple(config["vision_layers"])
        model = CLIP(CLIPConfig(**config))
        model.load_state_dict(load_file(str(_inside(directory, entry["weights"]))), strict=True)
        model.eval()
        if entry.get("negatives") is not None:
            stored = load_file(str(_inside(directory, entry["negatives"])))
            model.mem_negatives = (stored["image"], stored["text"])
        models.append(model)
    surrogate_list(models)  # members must agree on resolution and context length
    tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    return models, tokenizer, meta


def load_surrogate(directory: str | Path) -> tuple[CLIP, Tokenizer, dict]:
    """The artefact's primary surrogate alone (load_surrogates for an ensemble's every member)."""
    models, tokenizer, meta = load_surrogates(directory)
    return models[0], tokenizer, meta


def load_word_code(directory: str | Path, meta: dict, settings: WordCodeSettings) -> WordCode | None:
    """The artefact's word code (None if its job had none), checked against the settings it is served with;
    load_surrogates has checked its sha256."""
    from safetensors.torch import load_file

    if WORD_CODE_FILE not in meta.get("files", {}):
        return None
    stored = load_file(str(_inside(Path(directory), WORD_CODE_FILE)))
    textures, words = stored["textures"], stored["words"]
    channels = 1 if settings.texture_gray else 3
    if textures.ndim != 4 or textures.shape[0] != words.shape[0] or textures.shape[1] != textures.shape[2] \
            or textures.shape[3] != channels or words.shape[0] < settings.words_per_image:
        raise ValueError(f"{directory}: a word code of textures {list(textures.shape)} for {list(words.shape)} words "
                         f"does not fit settings with {channels}-channel textures and {settings.words_per_image} "
                         f"words per image")
    return WordCode(textures, words)


def served_settings(meta: dict, settings: SurrogateSettings | None = None) -> SurrogateSettings:
    """What the artefact protects uploads with: the job's settings (or `settings`). A word code's artefact
    saved before the code itself was (no word-code file) can only search and run PGD per upload: it is served
    as per-image MEM with the settings both methods share."""
    settings = settings if settings is not None else settings_from_dict(meta.get("settings", {}))
    if isinstance(settings, WordCodeSettings) and WORD_CODE_FILE not in meta.get("files", {}):
        shared = {f.name for f in dataclasses.fields(SurrogateSettings)}
        return MEMSettings(**{name: value for name, value in dataclasses.asdict(settings).items() if name in shared})
    return settings

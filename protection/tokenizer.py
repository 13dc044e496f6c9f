"""Byte-level BPE tokenizer laid out like CLIP's, usable offline.

With the user's copy of CLIP's vocabulary file (bpe_simple_vocab_16e6.txt.gz) it gives CLIP's token
ids; without it, a vocabulary is trained on the job's own captions. Either way the layout is CLIP's:
256 byte symbols, the same 256 with an end-of-word mark, the merges in rank order, then the
start-of-text and end-of-text tokens -- so end-of-text is the largest id, which is how the model
finds where to pool. Padding is id 0, as in CLIP.

MEM's text trigger is published as TEXT in front of the caption, so the trigger tokens must survive
decode -> prepend -> encode unchanged; trigger_candidates() lists only tokens that do.

A vocabulary trained on the captions alone has only caption words to offer a trigger -- content the
model learns from anyway ("pullover sandals right"), which weakens the shortcut. train() can therefore
add made-up words (made_up_words()) that become tokens of their own, and restrict triggers to them, as
CLIP's 49k-token vocabulary offers words no caption uses. The restriction is saved with the merges, so
served protection searches the same words as the job.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import html
import json
import re
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import torch

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
FORMAT = "aigis-bpe-1"

# CLIP's pre-tokenizer written for the standard library (letters as [^\W\d_], digits one at a time):
# the same words as CLIP's \p{L} / \p{N} classes on ASCII text. Unlike CLIP, the special-token
# strings are NOT recognised in input text, so a caption cannot smuggle in an end-of-text token.
_WORD_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""")
_WHITESPACE_RE = re.compile(r"\s+")
_TRIGGER_WORD_RE = re.compile(r"[a-z]+")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@lru_cache(maxsize=1)
def _byte_table() -> tuple[tuple[int, str], ...]:
    """(byte, symbol) pairs in CLIP's vocabulary order: printable Latin-1 bytes first, standing for
    themselves, then the other bytes in order, shifted to code points from 256 up -- so BPE never
    sees whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return (*((b, chr(b)) for b in printable), *((b, chr(256 + i)) for i, b in enumerate(others)))


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """The symbol standing for each byte value 0..255."""
    table = dict(_byte_table())
    return tuple(table[b] for b in range(256))


def clean_text(text: str) -> str:
    """What CLIP does before tokenizing (minus ftfy): unescape HTML, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(text))
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(clean_text(text))


def _word_symbols(word: str) -> tuple[str, ...]:
    table = byte_symbols()
    symbols = [table[b] for b in word.encode("utf-8")]
    return (*symbols[:-1], symbols[-1] + END_OF_WORD)


def made_up_words(count: int, avoid: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """count distinct pronounceable non-words ("dova", "kelitu"), the same list on every machine.

    Two or three consonant-vowel syllables drawn from a hash of the word's index (no RNG whose stream
    could change between Python versions); words in `avoid` (e.g. every caption word) are skipped.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    words: list[str] = []
    seen = set(avoid)
    index = 0
    while len(words) < count:
        digest = hashlib.sha256(f"aigis-trigger-word-{index}".encode()).digest()
        index += 1
        syllables = 2 + digest[0] % 2
        word = "".join(_CONSONANTS[digest[1 + 2 * i] % len(_CONSONANTS)] + _VOWELS[digest[2 + 2 * i] % len(_VOWELS)]
                       for i in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
        if index > 1000 * (count + 10):
            raise ValueError(f"cannot make {count} distinct words outside the {len(avoid)} to avoid")
    return words


class Tokenizer:
    """Byte-level BPE with CLIP's id layout; see the module docstring."""

    def __init__(self, merges: list[tuple[str, str]], trigger_words: list[str] | None = None):
        """trigger_words: when given, triggers may use only these words (those that are single tokens)."""
        base = [symbol for _, symbol in _byte_table()]
        vocab = base + [s + END_OF_WORD for s in base] + ["".join(pair) for pair in merges] + [SOT_TEXT, EOT_TEXT]
        self.merges = [tuple(pair) for pair in merges]
        # As in CLIP, a string that two merges produce maps to the later id (the earlier is never emitted).
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.byte_decoder = {s: b for b, s in enumerate(byte_symbols())}
        self.sot_id = self.encoder[SOT_TEXT]
        self.eot_id = self.encoder[EOT_TEXT]
        self.pad_id = 0
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[str]] = {}
        self._candidates: torch.Tensor | None = None
        self._candidate_set: frozenset[int] = frozenset()
        if trigger_words is not None:
            bad = [w for w in trigger_words if not isinstance(w, str) or not _TRIGGER_WORD_RE.fullmatch(w)]
            if bad:
                raise ValueError(f"trigger words must be lower-case ASCII words, got {bad[:5]}")
        self.trigger_words: frozenset[str] | None = None if trigger_words is None else frozenset(trigger_words)
        self.placeholder_id = self._choose_placeholder()

    # -- encoding ------------------------------------------------------------------------------

    def _bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one pre-tokenized word, lowest merge rank first."""
        if word in self._cache:
            return self._cache[word]
        parts = list(_word_symbols(word))
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 62), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == 1 << 62:
                break
            first, second = self.merges[rank]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no start/end tokens). Special-token text in the input is encoded as plain text."""
        return [self.encoder[part] for word in _words(text) for part in self._bpe(word)]

    def decode(self, ids) -> str:
        """Token ids -> text; start/end-of-text tokens are dropped, words are separated by one space."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        raw = bytearray()
        for i in ids:
            if i in (self.sot_id, self.eot_id):
                continue
            token = self.decoder[i]
            end = token.endswith(END_OF_WORD)
            raw.extend(self.byte_decoder[c] for c in (token[: -len(END_OF_WORD)] if end else token))
            if end:
                raw.append(ord(" "))
        return raw.decode("utf-8", errors="replace").strip()

    def tokenize(self, texts: list[str] | str, context_length: int, trigger_length: int = 0) -> torch.Tensor:
        """Texts -> LongTensor [N, context_length].

        Each row: SOT, trigger_length placeholder slots (placeholder_id, to be overwritten by a
        trigger), the caption's tokens, EOT, then pad (0). Captions are cut so that EOT always fits.
        """
        if isinstance(texts, str):
            texts = [texts]
        if trigger_length < 0:
            raise ValueError(f"trigger_length must be >= 0, got {trigger_length}")
        room = context_length - 2 - trigger_length
        if room < 1:
            raise ValueError(
                f"context_length {context_length} leaves no room for a caption after SOT, "
                f"{trigger_length} trigger slots and EOT"
            )
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *[self.placeholder_id] * trigger_length, *self.encode(text)[:room], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    # -- triggers ------------------------------------------------------------------------------

    def _is_trigger_candidate(self, token_id: int) -> bool:
        token = self.decoder[token_id]
        if token_id in (self.sot_id, self.eot_id, self.pad_id) or not token.endswith(END_OF_WORD):
            return False
        word = token[: -len(END_OF_WORD)]
        if not _TRIGGER_WORD_RE.fullmatch(word):
            return False
        if self.trigger_words is not None and word not in self.trigger_words:
            return False
        # BPE on the word alone must give back exactly this one token (not every vocabulary entry does).
        return self.encode(word) == [token_id]

    def trigger_candidates(self) -> torch.Tensor:
        """Ids a trigger may use: whole lower-case ASCII words that encode back to themselves (and are
        among trigger_words when the tokenizer has them).

        Words are pre-tokenized at spaces, so any sequence of these, decoded and followed by a space
        and a caption, tokenizes to the same ids. Never SOT, EOT or pad.
        """
        if self._candidates is None:
            ids = [i for i in range(self.vocab_size) if self._is_trigger_candidate(i)]
            self._candidates = torch.tensor(ids, dtype=torch.long)
            self._candidate_set = frozenset(ids)
        return self._candidates.clone()

    def is_trigger_candidate(self, token_id: int) -> bool:
        """Whether token_id is in trigger_candidates() (cached set lookup)."""
        if self._candidates is None:
            self.trigger_candidates()
        return int(token_id) in self._candidate_set

    def _choose_placeholder(self) -> int:
        """A common, meaning-poor word for the trigger slots before a trigger is chosen (a candidate, so
        that a trigger never searched still publishes as text that round-trips)."""
        for word in ("the", "a", "of", "and"):
            ids = self.encode(word)
            if len(ids) == 1 and self._is_trigger_candidate(ids[0]):
                return ids[0]
        for i in range(512, self.vocab_size):
            if self._is_trigger_candidate(i):
                return i
        return self.encode("x")[0]

    # -- construction and storage --------------------------------------------------------------

    @classmethod
    def from_clip_vocab(cls, path: str | Path, vocab_size: int = 49408) -> Tokenizer:
        """CLIP's merges file (bpe_simple_vocab_16e6.txt.gz: a header line, then one 'a b' merge a line).

        CLIP uses the first vocab_size - 514 merges of that file; so does this.
        """
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                lines = handle.read().split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            raise ValueError(f"{path}: cannot read a BPE merges file ({exc})") from exc
        wanted = vocab_size - 514
        merges = []
        for number, line in enumerate(lines[1:], start=2):
            if len(merges) == wanted:
                break
            if not line:
                continue
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{path}:{number}: expected two symbols, got {line!r}")
            merges.append(pair)
        if len(merges) < wanted and vocab_size != 49408:
            raise ValueError(f"{path}: has {len(merges)} merges, {wanted} needed for vocab_size {vocab_size}")
        return cls(merges)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A fixed vocabulary from a file: CLIP's merges file (bpe_simple_vocab_16e6.txt[.gz]) or an aigis-bpe
        JSON file (save())."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: no such file")
        return cls.from_clip_vocab(path) if path.suffix in (".gz", ".txt") else cls.load(path)

    @classmethod
    def train(cls, captions: list[str], vocab_size: int = 4096, trigger_words: int = 0) -> Tokenizer:
        """Learn merges on the captions until vocab_size or until every word is one token.

        trigger_words > 0 adds that many made-up words (made_up_words(), none of them a caption word)
        to the training words and restricts triggers to them; those the vocabulary size leaves split
        are simply not candidates. Deterministic: the most frequent pair wins, ties go to the
        lexicographically smallest pair.
        """
        if vocab_size < 515:
            raise ValueError(f"vocab_size must exceed the 514 byte and special tokens, got {vocab_size}")
        counts = Counter(word for caption in captions for word in _words(caption))
        extra = made_up_words(trigger_words, avoid=set(counts)) if trigger_words else None
        counts.update(extra or ())
        words = [list(_word_symbols(w)) for w in sorted(counts)]
        freqs = [counts[w] for w in sorted(counts)]
        pair_counts: dict[tuple[str, str], int] = defaultdict(int)
        where: dict[tuple[str, str], set[int]] = defaultdict(set)
        for index, (symbols, freq) in enumerate(zip(words, freqs)):
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += freq
                where[pair].add(index)
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)
        known = set(byte_symbols()) | {s + END_OF_WORD for s in byte_symbols()}
        merges: list[tuple[str, str]] = []
        while len(merges) < vocab_size - 514 and heap:
            negative, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -negative or negative == 0:
                continue  # stale heap entry
            if pair[0] + pair[1] in known:  # would duplicate a token; drop the pair for good
                del pair_counts[pair]
                continue
            merges.append(pair)
            known.add(pair[0] + pair[1])
            touched: set[tuple[str, str]] = set()
            for index in sorted(where.pop(pair, ())):
                symbols, freq = words[index], freqs[index]
                for old in zip(symbols, symbols[1:]):
                    pair_counts[old] -= freq
                    touched.add(old)
                merged, i = [], 0
                while i < len(symbols):
                    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                        merged.append(symbols[i] + symbols[i + 1])
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                words[index] = merged
                for new in zip(merged, merged[1:]):
                    pair_counts[new] += freq
                    where[new].add(index)
                    touched.add(new)
            pair_counts.pop(pair, None)
            for p in touched:
                if pair_counts.get(p, 0) > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
        return cls(merges, trigger_words=extra)

    def save(self, path: str | Path) -> None:
        """JSON: the format tag, the merges in rank order and the trigger words, if any (everything else
        follows from them)."""
        payload = {"format": FORMAT, "vocab_size": self.vocab_size, "merges": [list(p) for p in self.merges]}
        if self.trigger_words is not None:
            payload["trigger_words"] = sorted(self.trigger_words)
        Path(path).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable tokenizer file ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path}: not an {FORMAT} tokenizer file")
        merges = payload.get("merges")
        if not isinstance(merges, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and s for s in p) for p in merges
        ):
            raise ValueError(f"{path}: 'merges' must be a list of [str, str] pairs")
        trigger_words = payload.get("trigger_words")
        if trigger_words is not None and not isinstance(trigger_words, list):
            raise ValueError(f"{path}: 'trigger_words' must be a list of words")
        try:
            tokenizer = cls([tuple(p) for p in merges], trigger_words=trigger_words)
        except ValueError as exc:
            raise ValueError(f"{path}: 'trigger_words': {exc}") from exc
        if payload.get("vocab_size") not in (None, tokenizer.vocab_size):
            raise ValueError(f"{path}: vocab_size {payload['vocab_size']} != {tokenizer.vocab_size} from its merges")
        return tokenizer


def apply_trigger_text(trigger_ids, caption: str, tokenizer: Tokenizer) -> str:
    """The protected caption as published: the trigger's words, a space, then the caption.

    Tokenized again, it starts with SOT followed by exactly trigger_ids (for ids from
    tokenizer.trigger_candidates()).
    """
    ids = [int(i) for i in trigger_ids]
    bad = [i for i in ids if not tokenizer.is_trigger_candidate(i)]
    if bad:
        raise ValueError(f"trigger ids {bad[:5]} are not trigger candidates (they would not survive as text)")
    trigger = tokenizer.decode(ids)
    return f"{trigger} {caption}" if trigger else caption

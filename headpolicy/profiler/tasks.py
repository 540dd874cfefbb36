"""Synthetic retrieval tasks, generated offline from a seed.

Every task is a prompt (token ids), the answer the model should produce next, and the
span of prompt positions that holds the tokens the answer copies (the *needle*):

    passkey      one "The pass key number is 12345." line hidden at `depth` in a haystack; asked at the end
    multikey     several "The key for <name> is 12345." lines; one of them is asked
    repeat       random tokens r, then r again (for echo / induction heads); needle = first copy

Haystacks are either the plain repeated-sentence filler (`filler="repeat"`) or text the
model itself sampled (`filler="sampled"`, see `sample_haystack`), so no corpus ships.

Prompts are built by concatenating separately encoded pieces, so the answer ids equal the
needle ids exactly and `input_ids[needle[0]:needle[1]] == answer_ids` for needle tasks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEEDLE_KINDS = ("passkey", "multikey")
KINDS = (*NEEDLE_KINDS, "repeat")
FILLERS = ("repeat", "sampled")

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_NAMES = (
    "apple", "river", "violin", "garden", "copper", "falcon", "lantern", "meadow",
    "harbor", "pepper", "castle", "marble", "silver", "orchid", "tunnel", "walnut",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """One synthetic example.

    input_ids: the prompt [S]; answer_ids: the tokens that should follow it;
    needle: [start, stop) positions in input_ids of the tokens the answer copies
    (for `repeat`: the first copy of the random sequence, the second copy starts at stop).
    """

    kind: str
    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    needle: tuple[int, int]
    length: int
    depth: float
    seed: int
    answer: str = ""
    filler: str = "repeat"

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    def tensor(self, with_answer: bool = False) -> torch.Tensor:
        """Prompt (optionally followed by the answer, for teacher forcing) as [1, S] int64."""
        ids = self.input_ids + (self.answer_ids if with_answer else ())
        return torch.tensor([ids], dtype=torch.long)

    def name(self) -> str:
        return f"{self.kind}/{self.filler}/L{self.length}/d{self.depth:.2f}/s{self.seed}"


# ---- text <-> ids ----------------------------------------------------------------------------
class Codec:
    """The two things tasks need from a tokenizer: encode (no special tokens) and decode."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)


class CharCodec(Codec):
    """A tokenizer-free codec for tiny random models: printable ASCII, one id per character.

    Character c gets id `offset + (ord(c) - 32) % span`; it round-trips while the vocabulary
    covers it (97 ids with offset 3 cover ' ' .. '}').
    """

    def __init__(self, vocab_size: int, offset: int = 3):
        self.size, self.offset = vocab_size, offset
        self.span = vocab_size - offset

    def encode(self, text: str) -> list[int]:
        return [self.offset + (ord(c) - 32) % self.span for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(32 + i - self.offset) if 0 <= i - self.offset < min(self.span, 95) else "?" for i in ids)

    @property
    def vocab_size(self) -> int:
        return self.size


def as_codec(tok_or_codec) -> Codec:
    return tok_or_codec if isinstance(tok_or_codec, Codec) else Codec(tok_or_codec)


# ---- haystacks -------------------------------------------------------------------------------
ROW_TOKENS = 128  # tokens sampled per row: rows run as one batch, so wide and short is fast


@torch.no_grad()
def sample_haystack(model, codec, n_tokens: int = 4096, *, seed: int = 0, rows: int | None = None) -> list[int]:
    """At least ~`n_tokens` of text the model samples itself (top-k 40, seeded), digits removed.

    `rows` sequences (default: one per `ROW_TOKENS` tokens) are sampled in one batch from
    the same opener and joined with blank lines. Sample at least as many tokens as the
    longest haystack needs: tasks then cut a window out of the pool instead of tiling it
    (a repeating haystack is one the model can solve by copying, or fail on by confusion).
    """
    codec = as_codec(codec)
    openers = ["Once upon a time", "The history of", "In the morning", "Scientists have", "My favourite"]
    rows = rows or max(1, -(-n_tokens // ROW_TOKENS))
    per_row = max(8, -(-n_tokens // rows))
    pool: list[int] = []
    device = next(model.parameters()).device
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    opener = openers[seed % len(openers)]
    prompt = torch.tensor([codec.encode(opener)] * rows, device=device)  # one batch: rows differ by sampling
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=40,
            top_p=None,
            temperature=1.0,
            max_new_tokens=per_row,
            min_new_tokens=per_row,
            pad_token_id=0,
        )
    for row in out.tolist():
        keep = [i for i in row if i not in eos and not any(ch.isdigit() for ch in codec.decode([i]))]
        pool += keep + codec.encode("\n\n")
    return pool


def _filler_tokens(codec: Codec, n: int, pool: Sequence[int] | None, rng: random.Random) -> list[int]:
    """`n` filler ids: the repeated sentence, or a window of the pool at a random offset.

    The pool is tiled only when it is shorter than `n` (then the haystack repeats itself).
    """
    if n <= 0:
        return []
    if pool is None:
        base = codec.encode(FILLER_TEXT)
        return (base * -(-n // len(base)))[:n]
    base = list(pool)
    if not base:
        raise ValueError("the sampled haystack pool is empty")
    if len(base) >= n:
        start = rng.randrange(len(base) - n + 1)
        return base[start : start + n]
    start = rng.randrange(len(base))
    return (base * -(-(n + start) // len(base)))[start : start + n]


def _boundary(codec: Codec, filler: Sequence[int], pos: int, radius: int = 24) -> int:
    """A position near `pos` just after a '.' or newline, so a needle starts a sentence."""
    best = pos
    for d in range(radius + 1):
        for p in (pos - d, pos + d):
            if 0 < p <= len(filler) and codec.decode([filler[p - 1]]).rstrip(" ").endswith((".", "\n")):
                return p
    return best


def _value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _assemble(
    codec: Codec,
    length: int,
    depth: float,
    rng: random.Random,
    pool: Sequence[int] | None,
    inserts: list[tuple[float, list[int]]],
    question: list[int],
) -> tuple[list[int], list[int]]:
    """Intro + filler with `inserts` (relative depth, ids) + question, `length` tokens in all.

    Returns (ids, start offset of each insert in `ids`, in the given order).
    """
    intro = codec.encode(INTRO)
    n_fill = length - len(intro) - len(question) - sum(len(ids) for _, ids in inserts)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for this task (needs > {length - n_fill} tokens)")
    filler = _filler_tokens(codec, n_fill, pool, rng)
    at = [_boundary(codec, filler, round(min(max(d, 0.0), 1.0) * n_fill)) for d, _ in inserts]
    order = sorted(range(len(inserts)), key=lambda i: (at[i], i))
    ids = list(intro)
    starts = [0] * len(inserts)
    prev = 0
    for i in order:
        ids += filler[prev : at[i]]
        starts[i] = len(ids)
        ids += inserts[i][1]
        prev = at[i]
    ids += filler[prev:] + question
    return ids, starts


# ---- task generators ----------------------------------------------------------------------------
def passkey(codec, length: int, depth: float, seed: int, *, pool: Sequence[int] | None = None, digits: int = 5) -> Task:
    """One pass key at relative `depth` (0 = start of the haystack, 1 = end)."""
    codec = as_codec(codec)
    rng = random.Random(f"passkey/{length}/{depth}/{seed}")
    value = _value(rng, digits)
    answer = codec.encode(" " + value)
    # "pass key *number*": with a bare "pass key" a small model often answers what a pass key
    # is ("a key that is used to unlock ...") instead of retrieving it (SmolLM2-135M: 3/9 vs
    # 8/9 at 2K tokens), which measures its semantics, not its retrieval.
    needle = codec.encode(" The pass key number is") + answer + codec.encode(". Remember it. ")
    needle += codec.encode(value) + codec.encode(" is the pass key number.\n")
    question = codec.encode("\n\nWhat is the pass key number? The pass key number is")
    ids, (start,) = _assemble(codec, length, depth, rng, pool, [(depth, needle)], question)
    at = start + len(codec.encode(" The pass key number is"))
    return Task(
        "passkey", tuple(ids), tuple(answer), (at, at + len(answer)), length, depth, seed, value,
        "repeat" if pool is None else "sampled",
    )  # fmt: skip


def multikey(
    codec,
    length: int,
    depth: float,
    seed: int,
    *,
    pool: Sequence[int] | None = None,
    n_keys: int = 4,
    digits: int = 5,
) -> Task:
    """`n_keys` lines "The key for <name> is N."; the asked one sits at `depth`, the others anywhere."""
    codec = as_codec(codec)
    rng = random.Random(f"multikey/{length}/{depth}/{seed}")
    names = rng.sample(KEY_NAMES, n_keys)
    values = [_value(rng, digits) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    inserts, offsets = [], []
    for name, value, d in zip(names, values, depths, strict=True):
        head = codec.encode(f" The key for {name} is")
        inserts.append((d, head + codec.encode(" " + value) + codec.encode(".\n")))
        offsets.append(len(head))
    asked = names[0]
    question = codec.encode(f"\n\nWhat is the key for {asked}? The key for {asked} is")
    ids, starts = _assemble(codec, length, depth, rng, pool, inserts, question)
    answer = codec.encode(" " + values[0])
    at = starts[0] + offsets[0]
    return Task(
        "multikey", tuple(ids), tuple(answer), (at, at + len(answer)), length, depth, seed, values[0],
        "repeat" if pool is None else "sampled",
    )  # fmt: skip


def repeated_tokens(vocab_size: int, length: int, seed: int, *, low: int = 3, prefix: Sequence[int] = ()) -> Task:
    """`prefix` + r + r with r uniform random ids in [low, vocab_size): `length` tokens in all.

    A query in the second copy at r[i] finds the same token at needle[0] + i (echo) and the
    next one at needle[0] + i + 1 (induction).
    """
    rng = random.Random(f"repeat/{length}/{seed}")
    n = (length - len(prefix)) // 2
    if n < 2:
        raise ValueError(f"length {length} is too short for a repeated sequence")
    r = [rng.randrange(low, vocab_size) for _ in range(n)]
    ids = list(prefix) + r + r
    start = len(prefix)
    return Task("repeat", tuple(ids), (), (start, start + n), len(ids), 0.0, seed, "", "random")


def make_task(kind: str, codec, length: int, depth: float, seed: int, *, pool=None) -> Task:
    if kind == "passkey":
        return passkey(codec, length, depth, seed, pool=pool)
    if kind == "multikey":
        return multikey(codec, length, depth, seed, pool=pool)
    if kind == "repeat":
        return repeated_tokens(as_codec(codec).vocab_size, length, seed)
    raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(KINDS)})")


def task_grid(
    codec,
    *,
    kinds: Sequence[str] = NEEDLE_KINDS,
    lengths: Sequence[int],
    depths: Sequence[float],
    seed: int,
    pool: Sequence[int] | None = None,
) -> list[Task]:
    """kinds x lengths x depths, each with its own derived seed."""
    out = []
    for kind in kinds:
        for length in lengths:
            for j, depth in enumerate(depths):
                out.append(make_task(kind, codec, length, depth, seed * 1000 + j, pool=pool))
    return out

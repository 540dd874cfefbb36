"""Synthetic retrieval tasks, generated offline from a seed.

Every task is a prompt (token ids), the answer the model should produce next, and the
span of prompt positions that holds the tokens the answer copies (the *needle*):

    passkey      one "The pass key number is 12345." line hidden at `depth` in a haystack; asked at the end
    multikey     several "The key for <name> is 12345." lines; one of them is asked
    repeat       random tokens r, then r again (for echo / induction heads); needle = first copy

    word         one "The magic word is apple." (a word), code: one multi-token string ("QBX-4729")

Haystacks are natural prose (bundled public-domain texts, `prose_pool`: Austen and the Jargon
File for compile, Moby-Dick for held-out checks), text the model itself sampled
(`filler="sampled"`, `sample_haystack`), or the plain repeated-sentence filler
(`filler="repeat"`). Every needle kind has two wordings (`WORDINGS`): "A" for calibration, "B"
for held-out checks.

Prompts are built by concatenating separately encoded pieces, so the answer ids equal the
needle ids exactly and `input_ids[needle[0]:needle[1]] == answer_ids` for needle tasks.
"""

from __future__ import annotations

import functools
import importlib.resources
import lzma
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEEDLE_KINDS = ("passkey", "word", "code", "multikey")
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
    wording: str = "A"

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    def tensor(self, with_answer: bool = False) -> torch.Tensor:
        """Prompt (optionally followed by the answer, for teacher forcing) as [1, S] int64."""
        ids = self.input_ids + (self.answer_ids if with_answer else ())
        return torch.tensor([ids], dtype=torch.long)

    def name(self) -> str:
        wording = "" if self.wording == "A" else f"/{self.wording}"
        return f"{self.kind}/{self.filler}/L{self.length}/d{self.depth:.2f}/s{self.seed}{wording}"


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


# ---- natural prose --------------------------------------------------------------------------------
PROSE = ("austen_emma", "jargon_file", "melville_mobydick")  # profiler/data/README.md: sources, licences
CALIBRATION_PROSE = ("austen_emma", "jargon_file")  # compile
HELDOUT_PROSE = "melville_mobydick"  # eval and held-out checks only


@functools.cache
def prose(name: str) -> str:
    """A bundled public-domain text (one of PROSE), paragraphs separated by blank lines."""
    if name not in PROSE:
        raise ValueError(f"unknown text {name!r} (bundled: {', '.join(PROSE)})")
    data = importlib.resources.files("headpolicy.profiler").joinpath("data", f"{name}.txt.xz").read_bytes()
    return lzma.decompress(data).decode("utf-8")


class Pool(list):
    """Filler token ids with the name of their source (a Task records it as its `filler`)."""

    def __init__(self, ids, name: str):
        super().__init__(ids)
        self.name = name


_PROSE_POOLS: dict[tuple[int, str], Pool] = {}


def prose_pool(codec, name: str) -> Pool:
    """The whole bundled text `name` as token ids (tokenised once per tokenizer)."""
    codec = as_codec(codec)
    key = (id(getattr(codec, "tok", codec)), name)
    if key not in _PROSE_POOLS:
        _PROSE_POOLS[key] = Pool(codec.encode(prose(name)), name)
    return _PROSE_POOLS[key]


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
    intro_text: str = INTRO,
) -> tuple[list[int], list[int]]:
    """Intro + filler with `inserts` (relative depth, ids) + question, `length` tokens in all.

    Returns (ids, start offset of each insert in `ids`, in the given order).
    """
    intro = codec.encode(intro_text)
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
@dataclass(frozen=True)
class Wording:
    """How one needle kind is stated in the haystack and asked at the end.

    The value follows `lead` directly (its ids are the answer's ids); `tail` may repeat it
    (`{v}`); `question` ends where the answer should begin. `{name}`: the key name (multikey).
    """

    lead: str
    tail: str
    question: str
    before: str = " "  # what separates the value from the lead (a quoted value: nothing)


# Two wordings per kind: compile calibrates on "A", held-out checks and `headpolicy eval` use
# "B", so a policy is never judged on the sentences it was fitted to. Words are quoted: unquoted,
# SmolLM2-135M completed "The hidden password is" with the story's own words ("the whale") in 3
# of 10 Moby-Dick prompts although it retrieves numbers and codes in the same text. "pass key *number*": with
# a bare "pass key" a small model often answers what a pass key is ("a key that is used to
# unlock ...") instead of retrieving it (SmolLM2-135M: 3/9 vs 8/9 at 2K tokens).
WORDINGS: dict[str, dict[str, Wording]] = {
    "A": {
        "passkey": Wording(" The pass key number is", ". Remember it. {v} is the pass key number.\n",
                           "\n\nWhat is the pass key number? The pass key number is"),
        "word": Wording(' The magic word is "', '". Remember it. The magic word is "{v}".\n',
                        '\n\nWhat is the magic word? The magic word is "', before=""),
        "code": Wording(" The access code is", ". Remember it. {v} is the access code.\n",
                        "\n\nWhat is the access code? The access code is"),
        "multikey": Wording(" The key for {name} is", ".\n", "\n\nWhat is the key for {name}? The key for {name} is"),
    },
    "B": {
        "passkey": Wording(" The secret number is", ". Keep it in mind: the secret number is {v}.\n",
                           "\n\nWhat is the secret number? The secret number is"),
        "word": Wording(' The hidden password is "', '". Do not forget it: the hidden password is "{v}".\n',
                        '\n\nWhat is the hidden password? The hidden password is "', before=""),
        "code": Wording(" The serial tag reads", ". Note it down: the serial tag reads {v}.\n",
                        "\n\nWhat does the serial tag read? The serial tag reads"),
        "multikey": Wording(" The number assigned to {name} is", ".\n",
                            "\n\nWhat is the number assigned to {name}? The number assigned to {name} is"),
    },
}  # fmt: skip
INTROS = {
    "A": INTRO,
    "B": "Below is a long text. One piece of information in it matters; you will be asked about it at the end.\n\n",
}
WORDS = {  # disjoint lists, so held-out answers are words calibration never saw
    "A": ("apple", "river", "violin", "garden", "copper", "falcon", "lantern", "meadow", "harbor", "pepper",
          "castle", "marble", "silver", "orchid", "tunnel", "walnut", "candle", "basket", "pillow", "rocket"),
    "B": ("anchor", "bridge", "cactus", "dragon", "engine", "forest", "glacier", "helmet", "island", "jacket",
          "kettle", "ladder", "magnet", "needle", "oyster", "parrot", "quartz", "saddle", "temple", "velvet"),
}  # fmt: skip
KEY_NAMES_B = ("Alice", "Bruno", "Clara", "Diego", "Elena", "Felix", "Greta", "Hugo",
               "Irene", "Jonas", "Karla", "Lukas", "Marta", "Nadia", "Oscar", "Paula")  # fmt: skip


def _needle_value(kind: str, wording: str, rng: random.Random, digits: int) -> str:
    if kind in ("passkey", "multikey"):
        return _value(rng, digits)
    if kind == "word":
        return rng.choice(WORDS[wording])
    if kind == "code":  # several tokens: letters, a dash, digits
        letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
        return f"{letters}-{_value(rng, 4)}"
    raise ValueError(f"unknown needle kind {kind!r} (known: {', '.join(NEEDLE_KINDS)})")


def _needle(codec: Codec, w: Wording, value: str, name: str = "") -> tuple[list[int], list[int], int]:
    """(inserted ids, answer ids, offset of the answer in the inserted ids)."""
    lead = codec.encode(w.lead.format(name=name))
    answer = codec.encode(w.before + value)
    return lead + answer + codec.encode(w.tail.format(v=value, name=name)), answer, len(lead)


def _filler_name(pool) -> str:
    return "repeat" if pool is None else getattr(pool, "name", "sampled")


def single_needle(
    kind: str, codec, length: int, depth: float, seed: int, *, pool=None, wording: str = "A", digits: int = 5
) -> Task:
    """One needle of `kind` (passkey, word, code) at relative `depth` (0 = start of the haystack, 1 = end)."""
    codec = as_codec(codec)
    w = WORDINGS[wording][kind]
    rng = random.Random(f"{kind}/{length}/{depth}/{seed}" + ("" if wording == "A" else f"/{wording}"))
    value = _needle_value(kind, wording, rng, digits)
    needle, answer, offset = _needle(codec, w, value)
    question = codec.encode(w.question)
    ids, (start,) = _assemble(codec, length, depth, rng, pool, [(depth, needle)], question, INTROS[wording])
    at = start + offset
    return Task(kind, tuple(ids), tuple(answer), (at, at + len(answer)), length, depth, seed, value,
                _filler_name(pool), wording)  # fmt: skip


def passkey(codec, length: int, depth: float, seed: int, *, pool=None, digits: int = 5, wording: str = "A") -> Task:
    """One pass key number at relative `depth` (0 = start of the haystack, 1 = end)."""
    return single_needle("passkey", codec, length, depth, seed, pool=pool, wording=wording, digits=digits)


def multikey(
    codec,
    length: int,
    depth: float,
    seed: int,
    *,
    pool=None,
    n_keys: int = 4,
    digits: int = 5,
    wording: str = "A",
) -> Task:
    """`n_keys` lines "The key for <name> is N."; the asked one sits at `depth`, the others anywhere."""
    codec = as_codec(codec)
    w = WORDINGS[wording]["multikey"]
    rng = random.Random(f"multikey/{length}/{depth}/{seed}" + ("" if wording == "A" else f"/{wording}"))
    names = rng.sample(KEY_NAMES if wording == "A" else KEY_NAMES_B, n_keys)
    values = [_value(rng, digits) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    inserts, offsets, answers = [], [], []
    for name, value, d in zip(names, values, depths, strict=True):
        ids, answer, offset = _needle(codec, w, value, name)
        inserts.append((d, ids))
        offsets.append(offset)
        answers.append(answer)
    question = codec.encode(w.question.format(name=names[0]))
    ids, starts = _assemble(codec, length, depth, rng, pool, inserts, question, INTROS[wording])
    at = starts[0] + offsets[0]
    return Task("multikey", tuple(ids), tuple(answers[0]), (at, at + len(answers[0])), length, depth, seed,
                values[0], _filler_name(pool), wording)  # fmt: skip


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


def make_task(kind: str, codec, length: int, depth: float, seed: int, *, pool=None, wording: str = "A") -> Task:
    if kind == "multikey":
        return multikey(codec, length, depth, seed, pool=pool, wording=wording)
    if kind in NEEDLE_KINDS:
        return single_needle(kind, codec, length, depth, seed, pool=pool, wording=wording)
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
    pool=None,
    wording: str = "A",
) -> list[Task]:
    """kinds x lengths x depths, each with its own derived seed."""
    out = []
    for kind in kinds:
        for length in lengths:
            for j, depth in enumerate(depths):
                out.append(make_task(kind, codec, length, depth, seed * 1000 + j, pool=pool, wording=wording))
    return out

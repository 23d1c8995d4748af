"""The text and the retrieval prompts of ``foveal bench quality --suite real``, generated, never downloaded.

* ``stdlib_text()``: natural English every machine with Python has: the docstrings of a fixed, sorted list of
  pure-Python standard-library modules (each module's own docstring, then its public classes and functions
  in sorted order, each class followed by its public methods and properties), each as ``inspect.cleandoc``
  gives it (the object's own docstring, nothing inherited), exact duplicates dropped. The same on every
  machine with the same Python version (the modules are platform-independent).
* ``passkey_prompt``: the passkey retrieval prompt of Mohtashami & Jaggi ("Landmark Attention", 2023), with
  the text above as the haystack (as RULER's essay haystack): an instruction, filler, the needle "The pass
  key is NNNNN. Remember it. NNNNN is the pass key." at the requested depth, filler, and "What is the pass
  key? The pass key is".
* ``multikey_prompt``: RULER's multi-key needle-in-a-haystack (``niah_multikey_1``; Hsieh et al., "RULER:
  What's the Real Context Size of Your Long-Context Language Models?", 2024): several needles "One of the
  special magic numbers for WORD is: NNNNNNN." under distinct words, one of them asked for.

Prompts are built from token ids (the pieces tokenized apart), exactly ``length`` tokens long, so that a
batch of them needs no padding; the needle starts after a newline of the filler nearest the requested depth.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import sys
import warnings
from dataclasses import dataclass

__all__ = ["TEXT_MODULES", "stdlib_text", "text_version", "encode", "start_tokens", "Prompt", "passkey_prompt",
           "multikey_prompt", "parse_number", "score"]

#: pure-Python modules whose public names are the same on every platform
TEXT_MODULES = (
    "argparse", "calendar", "configparser", "contextlib", "csv", "dataclasses", "difflib", "email.message",
    "enum", "fractions", "ftplib", "gettext", "inspect", "ipaddress", "json", "logging", "mailbox", "optparse",
    "pprint", "queue", "random", "sched", "shlex", "smtplib", "statistics", "string", "tarfile", "textwrap",
    "threading", "tokenize", "typing", "unittest.case", "urllib.parse", "uuid", "wave", "zipfile",
)


def _own_doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""


def _module_docs(name: str):
    module = importlib.import_module(name)
    yield _own_doc(module)
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or inspect.ismodule(obj) or getattr(obj, "__module__", None) != name:
            continue  # private, a module, or imported from elsewhere
        if inspect.isclass(obj):
            yield _own_doc(obj)
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    yield _own_doc(member)
        elif inspect.isfunction(obj):
            yield _own_doc(obj)


@functools.lru_cache(maxsize=None)
def stdlib_text(modules: tuple[str, ...] = TEXT_MODULES) -> str:
    """The docstrings of ``modules`` (see the module docstring), separated by blank lines."""
    seen, parts = set(), []
    with warnings.catch_warnings():  # typing's deprecated pseudo-modules (typing.io) warn when looked at
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            for doc in _module_docs(name):
                if doc and doc not in seen:
                    seen.add(doc)
                    parts.append(doc)
    return "\n\n".join(parts) + "\n"


def text_version() -> str:
    """What the text depends on: the Python version."""
    return f"Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


# -- prompts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One retrieval prompt: ``ids`` (exactly the requested length), the expected ``answer`` (digits), and
    where each needle starts (token index) with its length in tokens and its depth in the filler."""

    ids: tuple[int, ...]
    answer: str
    needles: tuple[tuple[int, int, float], ...]
    task: str
    depth: float


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
MULTIKEY_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                  "I will quiz you about the numbers afterwards.\n\n")
MULTIKEY_NEEDLE = "\n\nOne of the special magic numbers for {word} is: {key}.\n\n"
MULTIKEY_QUESTION = ("\n\nWhat is the special magic number for {word} mentioned in the provided text? "
                     "The special magic number for {word} mentioned in the provided text is")
#: keys of the multi-key task (plain words, as RULER's)
WORDS = ("apple", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "ribbon", "saddle", "timber",
         "umbrella", "valley", "walnut", "yellow", "zipper", "anchor", "bridge", "castle", "dolphin", "ember")


def encode(tok, text: str) -> list[int]:
    """The token ids of ``text`` alone (no special tokens)."""
    return list(tok(text, add_special_tokens=False).input_ids)


def start_tokens(tok) -> list[int]:
    """The tokens the tokenizer puts before a text (e.g. Gemma's ``<bos>``; none for SmolLM2)."""
    ids = list(tok("", add_special_tokens=True).input_ids)
    bos = getattr(tok, "bos_token_id", None)
    return [bos] if bos is not None and ids[:1] == [bos] else []


def _newlines(tok, ids) -> list[int]:
    """Indices i such that a piece may start at i: token i - 1 ends a line."""
    ends = {t for t in set(ids) if tok.decode([t]).endswith("\n")}
    return [i for i in range(1, len(ids)) if ids[i - 1] in ends]


def _cut(breaks, target: int, lo: int, hi: int) -> int:
    """The line start in [lo, hi] nearest ``target`` (``target`` itself if there is none)."""
    inside = [b for b in breaks if lo <= b <= hi]
    return min(inside, key=lambda b: (abs(b - target), b)) if inside else target


def _filler(tok, text_ids, m: int, rng: random.Random, avoid: tuple[str, ...]):
    """``m`` tokens of the text from a random line start, not containing any string of ``avoid``."""
    for _ in range(100):
        start = rng.randrange(0, max(1, len(text_ids) - m))
        piece = text_ids[start:start + m]
        if len(piece) == m and not any(a in tok.decode(piece) for a in avoid):
            return piece
    raise ValueError(f"the text ({len(text_ids)} tokens) has no {m}-token stretch without {avoid}")


def _build(tok, text_ids, length, head, needles, question, rng, depths, avoid):
    """head + filler with each needle inserted at its depth + question, exactly ``length`` tokens."""
    head_ids = start_tokens(tok) + encode(tok, head)
    needle_ids = [encode(tok, s) for s in needles]
    q_ids = encode(tok, question)
    m = length - len(head_ids) - sum(map(len, needle_ids)) - len(q_ids)
    if m < 8 * len(needles):
        raise ValueError(f"a {length}-token prompt has no room for filler ({m} tokens left)")
    filler = _filler(tok, text_ids, m, rng, avoid)
    breaks = _newlines(tok, filler)
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    cuts, last = {}, 0
    for i in order:
        c = _cut(breaks, round(depths[i] * m), last, m)
        cuts[i], last = c, c
    ids, placed, prev = list(head_ids), {}, 0
    for i in order:
        ids += filler[prev:cuts[i]]
        placed[i] = (len(ids), len(needle_ids[i]), cuts[i] / m)
        ids += needle_ids[i]
        prev = cuts[i]
    ids += filler[prev:] + q_ids
    assert len(ids) == length
    return tuple(ids), tuple(placed[i] for i in range(len(needles)))


def passkey_prompt(tok, text_ids, length: int, depth: float, seed: int) -> Prompt:
    """A passkey prompt of exactly ``length`` tokens, the needle at ``depth`` (0..1) of the filler."""
    rng = random.Random(f"passkey/{seed}")
    key = str(rng.randint(10000, 99999))
    ids, needles = _build(tok, text_ids, length, PASSKEY_INTRO, [PASSKEY_NEEDLE.format(key=key)], PASSKEY_QUESTION,
                          rng, [depth], (key,))
    return Prompt(ids, key, needles, "passkey", depth)


def multikey_prompt(tok, text_ids, length: int, keys: int, seed: int, asked: int | None = None) -> Prompt:
    """A multi-key prompt: ``keys`` needles at random depths under distinct words; the question asks for one.

    ``asked`` picks the asked needle by depth rank (0 = shallowest); default: drawn from the seed.
    """
    rng = random.Random(f"multikey/{seed}")
    words = rng.sample(WORDS, keys)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in words)
    asked = rng.randrange(keys) if asked is None else asked
    ids, needles = _build(tok, text_ids, length, MULTIKEY_INTRO,
                          [MULTIKEY_NEEDLE.format(word=w, key=v) for w, v in zip(words, values)],
                          MULTIKEY_QUESTION.format(word=words[asked]), rng, depths, tuple(values))
    return Prompt(ids, values[asked], needles, "multikey", needles[asked][2])


def parse_number(text: str) -> str | None:
    """The first run of digits in a generated text, or None."""
    m = re.search(r"\d+", text)
    return m.group() if m else None


def score(prompt: Prompt, generated: str) -> bool:
    """Exact match: the first number the model generated is the answer."""
    return parse_number(generated) == prompt.answer

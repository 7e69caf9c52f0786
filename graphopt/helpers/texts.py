"""Real text without a download: prose from the Python standard library's docstrings.

The default calibration and evaluation text of graphopt. :func:`stdlib_texts` walks a fixed list
of standard-library modules, takes the docstrings of modules, classes, functions and methods,
keeps prose paragraphs (no code, tables or argument lists), cuts long ones at sentence ends,
and splits the pool into disjoint ``"calib"`` and ``"eval"`` sets by a hash of each text.
:func:`text_batches` tokenises texts into batches of model inputs.

Texts depend only on the Python version (docstrings change between releases), never on the
machine or the order of imports.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

#: Modules whose docstrings make the corpus: pure-Python, present on every platform, mostly prose.
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email.message", "email.parser", "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "importlib.abc", "importlib.metadata",
    "importlib.resources", "inspect", "io", "ipaddress", "json", "json.decoder", "json.encoder", "locale",
    "logging", "logging.handlers", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers",
    "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random", "re", "reprlib",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types", "typing",
    "unittest.case", "unittest.loader", "unittest.mock", "unittest.runner", "unittest.suite",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler", "zipfile", "zipimport",
)

Split = Literal["calib", "eval", "all"]
EVAL_FRACTION = 0.2  # share of texts held out for evaluation
MIN_WORDS, MAX_WORDS = 8, 96

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z])")
_CODE_HINT = re.compile(r">>>|\.\.\. |::|\$ |\{\}|==|!=|<=|>=|->|\w\(\w*\)\s*$|^\s*[-*+] |^\s*\w+\s*--\s|^\s*:\w+")


class CorpusError(ValueError):
    """A text source cannot be read, or asks for more texts than it has."""


def _docstrings(module_name: str) -> Iterator[str]:
    """Docstrings of the module and of what it defines (classes, functions, methods), in name order."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. ssl or sqlite3 built without their C library
        return
    if module.__doc__:
        yield module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__doc__:
            yield obj.__doc__
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and inspect.isfunction(member) and member.__doc__:
                    yield member.__doc__


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if any(_CODE_HINT.search(line) for line in lines):
        return False
    if any(line.startswith((" ", "\t")) for line in lines):  # indented: examples, tables, arg lists
        return False
    text = " ".join(lines)
    words = text.split()
    if len(words) < MIN_WORDS or not text[0].isupper() or text[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters < 0.9 * len(text):  # symbols, numbers, identifiers with underscores
        return False
    return sum("_" in w or "=" in w for w in words) <= 1


def _chunks(text: str) -> Iterator[str]:
    """Cut ``text`` at sentence ends into pieces of at most MAX_WORDS words (longer sentences are dropped)."""
    piece: list[str] = []
    count = 0
    for sentence in _SENTENCE_END.split(text):
        n = len(sentence.split())
        if n > MAX_WORDS:
            continue
        if piece and count + n > MAX_WORDS:
            yield " ".join(piece)
            piece, count = [], 0
        piece.append(sentence)
        count += n
    if piece:
        yield " ".join(piece)


def _clean_paragraphs(doc: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        paragraph = paragraph.strip("\n")
        if paragraph and _is_prose(paragraph):
            for chunk in _chunks(re.sub(r"\s+", " ", paragraph).strip()):
                if len(chunk.split()) >= MIN_WORDS:
                    yield chunk


def _split_of(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:4], "big") < EVAL_FRACTION * 2**32 else "calib"


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, tuple[str, ...]]:
    """Every text once (first occurrence wins), by split, in module-list order."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {"calib": [], "eval": []}
    for module_name in STDLIB_MODULES:
        for doc in _docstrings(module_name):
            for text in _clean_paragraphs(doc):
                key = text.lower()
                if key not in seen:
                    seen.add(key)
                    out[_split_of(key)].append(text)
    return {k: tuple(v) for k, v in out.items()}


def _pick(pool: Sequence[str], n: int | None, seed: int, source: str) -> list[str]:
    order = list(pool)
    random.Random(seed).shuffle(order)
    if n is None:
        return order
    if n < 1:
        raise CorpusError(f"asked for {n} texts; ask for at least 1")
    if n > len(order):
        raise CorpusError(f"{source} has {len(order)} texts, {n} were asked for; ask for at most {len(order)}")
    return order[:n]


def stdlib_texts(n: int | None = None, seed: int = 0, split: Split = "calib") -> list[str]:
    """``n`` prose texts from standard-library docstrings (all of the split when ``n`` is None).

    ``split="calib"`` and ``split="eval"`` never share a text; ``"all"`` is both. The result is the
    same for the same ``(n, seed, split)`` and Python version; different seeds give different samples.
    """
    corpus = _corpus()
    if split == "all":
        pool: Sequence[str] = corpus["calib"] + corpus["eval"]
    elif split in corpus:
        pool = corpus[split]
    else:
        raise CorpusError(f"split must be 'calib', 'eval' or 'all', got {split!r}")
    return _pick(pool, n, seed, f"the stdlib docstring corpus ({split} split)")


def file_texts(path: str | Path, n: int | None = None, seed: int = 0) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one text each (a random ``n`` of them when given)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"calibration file {path} does not exist (give a text file with one sample per line)")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path} as UTF-8 text: {e}") from None
    texts = [line for line in lines if line]
    if not texts:
        raise CorpusError(f"{path} has no non-empty lines; put one calibration text per line")
    if n is None:
        return texts
    return _pick(texts, n, seed, str(path))


def load_texts(source: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Texts from ``source``: ``"docstrings"`` (the calibration split of the stdlib corpus) or a text file."""
    if source == "docstrings":
        return stdlib_texts(n, seed, "calib")
    return file_texts(source, n, seed)


_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def text_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 8,
                 max_length: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` in order into batches: dicts of ``input_ids``, ``attention_mask`` (and
    ``token_type_ids`` when the tokenizer makes them), padded to the longest text of each batch
    and truncated to ``max_length`` tokens."""
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    if getattr(tokenizer, "pad_token", True) is None:
        raise ValueError("the tokenizer has no pad token, so texts of different lengths cannot be batched; "
                         "set tokenizer.pad_token (e.g. to tokenizer.eos_token) first")
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        yield {k: encoded[k] for k in _INPUT_KEYS if k in encoded}

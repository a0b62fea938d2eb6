"""From documents to the fixed windows a model runs on: truncation or packing, BOS, skipping, sampling.

Two ways to cut a corpus into `context_size` windows:

  truncation (default)  one window per document: its first `context_size` tokens (BOS included)
  packing               documents concatenated with the EOS token after each, cut into consecutive
                        windows of `context_size` tokens (BOS included), as SAE training pipelines do;
                        the last window of a run may be shorter

Documents shorter than `min_tokens` tokens are skipped, only every k-th document is read
(`every_k_documents`, by global index), and a window may keep only a seeded random sample of its
positions (`sample_tokens`). Every choice is recorded in the manifest (`WindowSpec.describe`) and is
part of the store's identity. A positions choice ("last", a slice) selects positions of each
*document*: under packing, where a window holds several documents and a document spans windows, each
token knows its place in its document (`Window.doc_pos`, `doc_len`; see `selected_positions`).

A document longer than `LONG_DOCUMENT` characters is tokenized in pieces of about `PIECE_CHARS`
characters, cut at a single space between two non-space characters, where a tokenizer whose
pre-tokenizer splits there (GPT-NeoX's byte-level BPE, whitespace word tokenizers; checked once per
run on a probe) gives exactly the tokens of the whole text; under truncation only the pieces the
window needs are tokenized. Memory then stays at the text itself plus 4 bytes per token, not the
tokenizer's ~1 KB per token. A tokenizer without that property gets the whole text at once.

The reading position is a cursor ``(doc, offset)``: the next document and how many of its tokens
(EOS included) are already in windows. Windows and samples depend only on the cursor, so a run resumed
at a cursor writes exactly what the killed run would have.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Texts handed to the tokenizer per call: large enough to amortise its call overhead (the first call of a
#: run takes fewer, to start the model sooner).
TOKENIZE_DOCS = 64
FIRST_TOKENIZE_DOCS = 8
#: Texts longer than this (characters) are tokenized in pieces of about PIECE_CHARS characters.
LONG_DOCUMENT = 1 << 17
PIECE_CHARS = 1 << 16
# A single space between two non-space characters: where the text is cut into pieces.
_CUT = re.compile(r"(?<=\S) (?=\S)")
_PROBE = ("The quick  brown fox,\tjumps over\n the lazy dog's 12 back. def f(x): return x*2  # done "
          "naïve café — 3.14e-2 x=[1, 2] {'a': b}\n\n  end")


@dataclass(frozen=True)
class WindowSpec:
    """How documents become windows; see the module docstring."""

    context_size: int
    packing: bool = False
    prepend_bos: bool = False
    min_tokens: int | None = None
    every_k_documents: int = 1
    sample_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        for label in ("context_size", "every_k_documents"):
            _positive(label, getattr(self, label))
        for label in ("min_tokens", "sample_tokens"):
            if getattr(self, label) is not None:
                _positive(label, getattr(self, label))
        if self.prepend_bos and self.context_size < 2:
            raise ValueError("prepend_bos needs context_size >= 2 (the BOS token takes one position)")
        if not self.packing and self.min_tokens is not None and self.min_tokens > self.body:
            raise ValueError(f"min_tokens={self.min_tokens} can never be met: a truncated window holds at most "
                             f"{self.body} document tokens (context_size {self.context_size}"
                             f"{', minus the BOS' if self.prepend_bos else ''})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def body(self) -> int:
        """Document tokens per window."""
        return self.context_size - int(self.prepend_bos)

    def describe(self) -> dict:
        """The manifest's settings.windows entry (max_length holds context_size)."""
        return {"packing": self.packing, "prepend_bos": self.prepend_bos, "min_tokens": self.min_tokens,
                "every_k_documents": self.every_k_documents, "sample_tokens": self.sample_tokens,
                "seed": self.seed}


def _positive(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")


@dataclass
class Window:
    """One model input row: token ids, each token's source document, and the cursors it spans.

    Packed windows also say, per token, its position in its document (`doc_pos`: -1 for the BOS, the
    document's length for the EOS after it) and the document's length in tokens (`doc_len`)."""

    tokens: list[int]
    doc_ids: list[int]
    start: tuple[int, int]
    end: tuple[int, int]
    doc_pos: list[int] | None = None
    doc_len: list[int] | None = None


def selected_positions(window: Window, positions: slice) -> np.ndarray:
    """The window positions a positions choice keeps: each document's positions[positions].

    A truncated window is its document, so that is the window's positions[positions] (BOS included, as
    the model saw it). In a packed window it is, for every document in it, the tokens whose place in
    their document is in range(len)[positions]: "last" (slice(-1, None)) is the last token of each
    document, wherever packing put it; BOS and EOS are kept only when every position is.
    """
    n = len(window.tokens)
    if window.doc_pos is None or positions == slice(None):
        return np.arange(n)[positions]
    pos, length = np.asarray(window.doc_pos), np.asarray(window.doc_len)
    keep = np.zeros(n, dtype=bool)
    for size in np.unique(length):
        wanted = np.arange(size)[positions]
        keep |= (length == size) & np.isin(pos, wanted)
    return np.flatnonzero(keep)


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The ids a tokenizer call adds before and after a text's own (BOS/EOS flags), or None if unclear."""
    empty = list(tokenizer([""])["input_ids"][0])
    full = list(tokenizer(["x"])["input_ids"][0])
    bare = list(tokenizer(["x"], add_special_tokens=False)["input_ids"][0])
    for k in range(len(empty) + 1):
        if full == empty[:k] + bare + empty[k:]:
            return empty[:k], empty[k:]
    return None


def _cuts_are_exact(tokenizer: Any) -> bool:
    """Whether tokenizing pieces cut at `_CUT` gives the whole text's tokens, on a probe text."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    whole = list(encode([_PROBE])[0])
    cuts = [m.start() for m in _CUT.finditer(_PROBE)]
    pieces = encode([_PROBE[:c] for c in cuts] + [_PROBE[c:] for c in cuts])
    return all(list(pieces[i]) + list(pieces[len(cuts) + i]) == whole for i in range(len(cuts)))


def _text_pieces(text: str) -> Iterator[str]:
    """`text` in consecutive pieces of at least PIECE_CHARS characters, cut where `_CUT` matches."""
    start = 0
    while start < len(text):
        cut = _CUT.search(text, start + PIECE_CHARS) if start + PIECE_CHARS < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end


class _Encoder:
    """Tokenizes texts the way the tokenizer's own call would, long ones in bounded pieces."""

    def __init__(self, tokenizer: Any, limit: int | None):
        self.tokenizer, self.limit = tokenizer, limit
        self.kwargs = {"truncation": True, "max_length": limit} if limit else {}
        self._pieces: tuple | None | bool = False  # (prefix, suffix) when piecewise is exact; None if not

    def batch(self, texts: list[str]) -> list[np.ndarray]:
        short = [t for t in texts if len(t) <= LONG_DOCUMENT]
        rows = iter(self.tokenizer(short, **self.kwargs)["input_ids"] if short else ())
        return [np.asarray(next(rows), dtype=np.int32) if len(t) <= LONG_DOCUMENT else self.long(t)
                for t in texts]

    def long(self, text: str) -> np.ndarray:
        if self._pieces is False:
            exact = getattr(self.tokenizer, "truncation_side", "right") == "right" and _cuts_are_exact(self.tokenizer)
            self._pieces = _special_affixes(self.tokenizer) if exact else None
        if self._pieces is None:
            return np.asarray(self.tokenizer([text], **self.kwargs)["input_ids"][0], dtype=np.int64)
        prefix, suffix = self._pieces
        room = None if self.limit is None else self.limit - len(prefix) - len(suffix)
        if room is not None and room < 0:
            raise ValueError(f"max_length={self.limit} leaves no room for the tokenizer's special tokens")
        parts, count = [], 0
        for piece in _text_pieces(text):
            if room is not None and count >= room:
                break  # truncation: the window needs no more
            ids = self.tokenizer([piece], add_special_tokens=False)["input_ids"][0]
            parts.append(np.asarray(ids, dtype=np.int32))  # 4 bytes a token while the document is held
            count += len(ids)
        body = np.concatenate([np.zeros(0, dtype=np.int32), *parts])[:room]
        return np.concatenate([np.asarray(prefix, dtype=np.int32), body, np.asarray(suffix, dtype=np.int32)])


@dataclass
class Batch:
    """Consecutive windows, and the cursor after them (where a resumed run starts)."""

    windows: list[Window] = field(default_factory=list)
    end: tuple[int, int] = (0, 0)
    n_docs: int = 0  # documents whose last token is in this batch (or that were skipped in it)


def _tokenized(docs, start: int, stop: int | None, spec: WindowSpec, tokenizer: Any,
               is_text: bool) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, token ids)`` of every k-th document in [start, stop), tokenized a few dozen at a time."""
    limit = None if spec.packing else spec.body  # packing needs the whole document
    encoder = _Encoder(tokenizer, limit) if is_text else None
    pending: list[tuple[int, Any]] = []

    def encode(chunk):
        if is_text:
            rows = encoder.batch([doc for _, doc in chunk])
        else:
            rows = [np.asarray(doc, dtype=np.int64).reshape(-1)[:limit] for _, doc in chunk]
        yield from zip((index for index, _ in chunk), rows)

    chunk = FIRST_TOKENIZE_DOCS  # a small first call, so the first forward need not wait for 64 documents
    for index, doc in docs.iter_docs(start, stop):
        if index % spec.every_k_documents:
            continue
        pending.append((index, doc))
        if len(pending) >= chunk:
            yield from encode(pending)
            pending, chunk = [], TOKENIZE_DOCS
    if pending:
        yield from encode(pending)


def iter_windows(docs, spec: WindowSpec, tokenizer: Any, cursor: tuple[int, int], stop: int | None,
                 *, bos_id: int | None, eos_id: int | None, counts: dict | None = None) -> Iterator[Window]:
    """The windows of documents [cursor, stop), starting `cursor[1]` tokens into document `cursor[0]`.

    `counts`, when given, gets the number of "empty" documents and of "short" ones (under `min_tokens`)."""
    counts = {"empty": 0, "short": 0} if counts is None else counts
    is_text = docs.is_text
    if spec.prepend_bos and bos_id is None:
        raise ValueError("prepend_bos needs a tokenizer with a bos_token")
    if spec.packing and eos_id is None:
        raise ValueError("packing needs a tokenizer with an eos_token (it separates the documents)")
    bos = [bos_id] if spec.prepend_bos else []
    first, offset = cursor
    tokens: list[int] = []
    owners: list[int] = []
    places: list[int] = []  # each token's position in its document
    lengths: list[int] = []  # its document's length
    start = cursor

    def window(end: tuple[int, int]) -> Window:
        return Window(bos + tokens, owners[:1] * len(bos) + owners, start, end, doc_pos=[-1] * len(bos) + places,
                      doc_len=lengths[:1] * len(bos) + lengths)

    for index, ids in _tokenized(docs, first, stop, spec, tokenizer, is_text):
        if len(ids) < (spec.min_tokens or 1):  # an empty document has nothing to store
            counts["empty" if not len(ids) else "short"] += 1
            continue
        if not spec.packing:
            yield Window(bos + ids.tolist(), [index] * (len(bos) + len(ids)), (index, 0), (index + 1, 0))
            continue
        size = len(ids)  # the EOS after the document is its token `size`
        pos = offset if index == first else 0
        if not tokens:
            start = (index, pos)
        while pos <= size:
            upto = min(pos + spec.body - len(tokens), size + 1)
            tokens += ids[pos:upto].tolist() + ([eos_id] if upto > size else [])
            owners += [index] * (upto - pos)
            places += range(pos, upto)
            lengths += [size] * (upto - pos)
            pos = upto
            if len(tokens) == spec.body:
                end = (index, pos) if pos <= size else (index + 1, 0)
                yield window(end)
                tokens, owners, places, lengths, start = [], [], [], [], end
    if tokens:
        yield window((stop if stop is not None else owners[-1] + 1, 0))


def sample_positions(allowed: np.ndarray, spec: WindowSpec, start: tuple[int, int]) -> np.ndarray:
    """`sample_tokens` of the `allowed` positions of a window, drawn without replacement (every subset
    equally likely, as a reservoir sample) by a generator seeded with (seed, the window's cursor), so the
    sample never depends on batching, ranks or resuming. All of them when there are no more than that."""
    if spec.sample_tokens is None or spec.sample_tokens >= len(allowed):
        return allowed
    rng = np.random.default_rng([spec.seed, *start])
    return np.sort(rng.choice(allowed, spec.sample_tokens, replace=False))


def iter_batches(windows: Iterator[Window], batch_size: int, cursor: tuple[int, int],
                 stop: int | Callable[[], int] | None) -> Iterator[Batch]:
    """Windows grouped `batch_size` at a time; each batch carries the cursor after it.

    The last batch ends at (stop, 0), so documents skipped after the last window still count as read
    (`stop` may be a function, asked once the windows are exhausted: a one-shot source's length).
    """
    held, current = None, []
    for window in windows:
        current.append(window)
        if len(current) == batch_size:
            if held is not None:
                yield held
            held, current = Batch(current, window.end), []
    if callable(stop):
        stop = stop()
    if current:
        if held is not None:
            yield held
        held = Batch(current, current[-1].end)
    if held is None:
        if stop is not None and stop > cursor[0]:
            yield Batch([], (stop, 0))  # nothing left but skipped documents
        return
    if stop is not None:
        held.end = (stop, 0)
    yield held


def count_docs(batches: Iterator[Batch], cursor: tuple[int, int]) -> Iterator[Batch]:
    """Fill in each batch's `n_docs`: documents finished between the previous cursor and its own."""
    for batch in batches:
        batch.n_docs = batch.end[0] - cursor[0]
        cursor = batch.end
        yield batch


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead, so the consumer never waits on it.

    Tokenizers (Rust) and file decompression release the GIL, so this overlaps with the model's forward.
    An exception in the thread is raised in the consumer; `close` stops the thread early.
    """

    _DONE = object()

    def __init__(self, iterator: Iterator, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True, name="neox-lab-tokenize")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(("item", item)):
                    return
        except BaseException as err:  # handed to the consumer, which raises it
            self._put(("error", err))
            return
        self._put(("done", None))

    def __iter__(self):
        while True:
            kind, value = self._queue.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

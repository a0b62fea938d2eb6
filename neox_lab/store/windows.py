"""From documents to the fixed windows a model runs on: truncation or packing, BOS, skipping, sampling.

Two ways to cut a corpus into `context_size` windows:

  truncation (default)  one window per document: its first `context_size` tokens (BOS included)
  packing               documents concatenated with the EOS token after each, cut into consecutive
                        windows of `context_size` tokens (BOS included), as SAE training pipelines do;
                        the last window of a run may be shorter

Documents shorter than `min_tokens` tokens are skipped, only every k-th document is read
(`every_k_documents`, by global index), and a window may keep only a seeded random sample of its
positions (`sample_tokens`). Every choice is recorded in the manifest (`WindowSpec.describe`) and is
part of the store's identity.

The reading position is a cursor ``(doc, offset)``: the next document and how many of its tokens
(EOS included) are already in windows. Windows and samples depend only on the cursor, so a run resumed
at a cursor writes exactly what the killed run would have.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Texts handed to the tokenizer per call: large enough to amortise its call overhead.
TOKENIZE_DOCS = 64


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
    """One model input row: token ids, each token's source document, and the cursors it spans."""

    tokens: list[int]
    doc_ids: list[int]
    start: tuple[int, int]
    end: tuple[int, int]


@dataclass
class Batch:
    """Consecutive windows, and the cursor after them (where a resumed run starts)."""

    windows: list[Window] = field(default_factory=list)
    end: tuple[int, int] = (0, 0)
    n_docs: int = 0  # documents whose last token is in this batch (or that were skipped in it)


def _tokenized(docs, start: int, stop: int | None, spec: WindowSpec, tokenizer: Any,
               is_text: bool) -> Iterator[tuple[int, list[int]]]:
    """``(index, token ids)`` of every k-th document in [start, stop), tokenized a few dozen at a time."""
    limit = None if spec.packing else spec.body  # packing needs the whole document
    pending: list[tuple[int, Any]] = []

    def encode(chunk):
        if is_text:
            texts = [doc for _, doc in chunk]
            kwargs = {"truncation": True, "max_length": limit} if limit else {}
            rows = tokenizer(texts, **kwargs)["input_ids"]
        else:
            rows = [np.asarray(doc).reshape(-1)[:limit] for _, doc in chunk]
        for (index, _), row in zip(chunk, rows):
            yield index, [int(t) for t in row]

    for index, doc in docs.iter_docs(start, stop):
        if index % spec.every_k_documents:
            continue
        pending.append((index, doc))
        if len(pending) >= TOKENIZE_DOCS:
            yield from encode(pending)
            pending = []
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
    start = cursor
    for index, ids in _tokenized(docs, first, stop, spec, tokenizer, is_text):
        if len(ids) < (spec.min_tokens or 1):  # an empty document has nothing to store
            counts["empty" if not ids else "short"] += 1
            continue
        if not spec.packing:
            yield Window(bos + ids, [index] * (len(bos) + len(ids)), (index, 0), (index + 1, 0))
            continue
        ids = ids + [eos_id]
        pos = offset if index == first else 0
        if not tokens:
            start = (index, pos)
        while pos < len(ids):
            piece = ids[pos : pos + spec.body - len(tokens)]
            tokens += piece
            owners += [index] * len(piece)
            pos += len(piece)
            if len(tokens) == spec.body:
                end = (index, pos) if pos < len(ids) else (index + 1, 0)
                yield Window(bos + tokens, owners[:1] * len(bos) + owners, start, end)
                tokens, owners, start = [], [], end
    if tokens:
        end = (stop if stop is not None else owners[-1] + 1, 0)
        yield Window(bos + tokens, owners[:1] * len(bos) + owners, start, end)


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

"""PG-19 data for the LM task: reading, tokenising (byte-level BPE or GPT-2 BPE), binarising.

Layout (PG-19's): ``DATA/{train,validation,test}/*.txt``, one book per file. The shipped sample
(``samples/pg19_mini``) has that layout; ``attnbench data fetch pg19`` downloads the full set.

Text is read as UTF-8 (a byte-order mark dropped), lines split on any line break. Each line is
tokenised on its own and fairseq appends its end-of-sentence symbol, which therefore stands for
the newline. Bits per byte divide by the UTF-8 bytes of exactly that text: every line plus one
``\\n``.

Prepared data (tokeniser and fairseq-binarised splits) is cached under a key made of the data's
content, the tokeniser and the vocabulary size, so every attention of a sweep shares it.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
from filelock import FileLock
from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from tasks.base import DataError

SPLITS = ("train", "validation", "test")
SAMPLE_DIR = Path(__file__).parent / "samples" / "pg19_mini"
GPT2_FILES = {
    "vocab.json": "https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json",
    "merges.txt": "https://huggingface.co/openai-community/gpt2/resolve/main/merges.txt",
}
PG19_URL = "https://storage.googleapis.com/deepmind-gutenberg"
PG19_LISTING = "https://storage.googleapis.com/storage/v1/b/deepmind-gutenberg/o"


def cache_root() -> Path:
    """``$ATTNBENCH_CACHE/lm`` or ``~/.cache/attnbench/lm``."""
    base = os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench")
    return Path(base) / "lm"


def split_files(data_dir: Path, split: str) -> list[Path]:
    """The books of ``split``, sorted; a missing or empty split is an error naming the layout."""
    folder = Path(data_dir) / split
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(
            f"no books in {folder}: expected PG-19's layout, {data_dir}/{{{','.join(SPLITS)}}}/*.txt"
        )
    empty = [path for path in files if path.stat().st_size == 0]
    if empty:
        raise DataError(f"{empty[0]}: an empty book ({len(empty)} of {len(files)} in {folder} are "
                        "empty); every book of a split needs text")
    return files


def book_lines(path: Path) -> list[str]:
    """The lines of one book, without line breaks (UTF-8, byte-order mark dropped); a
    :class:`DataError` names the file and the position of a byte that is not UTF-8, or a book
    without text."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text: byte {error.start} (line {line}) is "
                        f"{error.object[error.start:error.start + 1]!r} ({error.reason}); books are "
                        "read as UTF-8 (convert, e.g. `iconv -f latin1 -t utf-8`)") from None
    if not any(text.strip() for text in lines):
        raise DataError(f"{path}: a book without text (only blank lines); every book needs text")
    return lines


def text_bytes(lines: list[str]) -> int:
    """UTF-8 bytes of ``lines`` with one newline each: what bits per byte divides by."""
    return sum(len(line.encode("utf-8")) + 1 for line in lines)


def _digest(paths: list[Path], *extra: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def train_bytelevel_bpe(train_files: list[Path], vocab_size: int, cache: Path) -> Path:
    """Train (or reuse from ``cache``) a byte-level BPE on the training books; its JSON path."""
    key = _digest(train_files, f"bytelevel-{vocab_size}-{tokenizers.__version__}")
    path = cache / "tokenizers" / f"bytelevel-{vocab_size}-{key}.json"
    if path.exists():
        return path
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        _lines_of(train_files), vocab_size=vocab_size, min_frequency=2, show_progress=False
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    tokenizer.save(str(temporary))
    temporary.replace(path)
    return path


def gpt2_bpe(cache: Path) -> Path:
    """GPT-2's BPE (CAB's tokeniser) as a tokenizer JSON, from ``cache`` or downloaded once.

    Raises:
        RuntimeError: the files are not cached and cannot be downloaded; the message says where
            to put ``vocab.json`` and ``merges.txt`` by hand.
    """
    folder = cache / "gpt2"
    path = folder / "tokenizer.json"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    for name, url in GPT2_FILES.items():
        target = folder / name
        if not target.exists():
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    data = response.read()
            except OSError as error:
                raise RuntimeError(
                    f"GPT-2 BPE is not available offline: could not download {url} ({error}); "
                    f"put vocab.json and merges.txt in {folder}, or use tokenizer=bytelevel"
                ) from error
            target.write_bytes(data)
    tokenizer = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save(str(path))
    return path


def _lines_of(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield from book_lines(path)


@dataclass(frozen=True)
class PreparedData:
    """Binarised splits ready for fairseq.

    Attributes:
        data_bin: fairseq's data folder (``dict.txt``, ``{train,valid,test}.{bin,idx}``).
        tokenizer: the tokeniser JSON.
        vocab_size: tokeniser vocabulary (fairseq adds its 4 special symbols).
        tokens: tokens per split, end-of-line symbols included (what fairseq scores).
        bytes: UTF-8 bytes per split (bits per byte's denominator).
    """

    data_bin: Path
    tokenizer: Path
    vocab_size: int
    tokens: dict[str, int]
    bytes: dict[str, int]


def prepare(data_dir: Path, *, tokenizer: str, vocab_size: int, cache: Path) -> PreparedData:
    """:func:`_prepare_unlocked` under a lock on ``cache``: cells of a sweep that run at once
    (processes or SLURM jobs on a shared file system) prepare the same data once, never
    interleaved."""
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".prepare.lock"):
        return _prepare_unlocked(data_dir, tokenizer=tokenizer, vocab_size=vocab_size, cache=cache)


def _prepare_unlocked(data_dir: Path, *, tokenizer: str, vocab_size: int, cache: Path) -> PreparedData:
    """Tokenise and binarise a PG-19 folder with ``fairseq-preprocess`` (cached).

    Args:
        data_dir: PG-19 layout folder.
        tokenizer: ``"bytelevel"`` (a byte-level BPE of ``vocab_size`` trained on the training
            split) or ``"gpt2"`` (GPT-2's BPE; ``vocab_size`` is ignored).
        vocab_size: size of the trained byte-level BPE.
        cache: cache folder.
    """
    files = {split: split_files(data_dir, split) for split in SPLITS}
    if tokenizer == "bytelevel":
        tokenizer_path = train_bytelevel_bpe(files["train"], vocab_size, cache)
    elif tokenizer == "gpt2":
        tokenizer_path = gpt2_bpe(cache)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: bytelevel, gpt2")
    key = _digest([p for split in SPLITS for p in files[split]], tokenizer_path.name)
    folder = cache / "data-bin" / key
    manifest = folder / "prepared.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        return PreparedData(Path(saved["data_bin"]), Path(saved["tokenizer"]),
                            saved["vocab_size"], saved["tokens"], saved["bytes"])
    encoder = Tokenizer.from_file(str(tokenizer_path))
    work = folder / "tokenised"
    work.mkdir(parents=True, exist_ok=True)
    tokens, sizes = {}, {}
    for split in SPLITS:
        sizes[split] = tokens[split] = 0
        with open(work / f"{split}.ids", "w") as stream:
            for book in files[split]:  # one book at a time: full PG-19 is 11 GB
                lines = book_lines(book)
                encoded = encoder.encode_batch(lines)
                sizes[split] += text_bytes(lines)
                tokens[split] += sum(len(e.ids) + 1 for e in encoded)
                stream.writelines(" ".join(map(str, e.ids)) + "\n" for e in encoded)
    # Every tokeniser id in the dictionary, so that no valid/test token becomes <unk>.
    vocab = encoder.get_vocab_size()
    (work / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(vocab)))
    data_bin = folder / "data-bin"
    binarise(work, data_bin)
    prepared = PreparedData(data_bin, tokenizer_path, vocab, tokens, sizes)
    manifest.write_text(json.dumps({**asdict(prepared), "data_bin": str(data_bin),
                                    "tokenizer": str(tokenizer_path)}, indent=1))
    return prepared


def binarise(tokenised: Path, destination: Path) -> None:
    """``fairseq-preprocess --only-source`` on ``{train,validation,test}.ids`` with a fixed
    dictionary (through fairseq's own entry point)."""
    from fairseq import options

    from tasks.backends.fairseq_plugin.compat import import_fairseq_cli

    preprocess = import_fairseq_cli("preprocess")

    parser = options.get_preprocessing_parser()
    args = parser.parse_args([
        "--only-source", "--task", "language_modeling",
        "--srcdict", str(tokenised / "dict.txt"),
        "--trainpref", str(tokenised / "train.ids"),
        "--validpref", str(tokenised / "validation.ids"),
        "--testpref", str(tokenised / "test.ids"),
        "--destdir", str(destination), "--workers", str(min(8, os.cpu_count() or 1)),
    ])
    preprocess.main(args)


def fetch_pg19(destination: Path) -> Path:
    """Download PG-19 (28,602 books, about 11 GB) from DeepMind's public bucket into
    ``destination/{train,validation,test}``; files already there are kept (resumable)."""
    destination = Path(destination)
    for split in SPLITS:
        (destination / split).mkdir(parents=True, exist_ok=True)
        for name in _bucket_objects(f"{split}/"):
            target = destination / name
            if target.exists():
                continue
            temporary = target.with_suffix(".part")
            with urllib.request.urlopen(f"{PG19_URL}/{name}", timeout=120) as response:
                temporary.write_bytes(response.read())
            temporary.replace(target)
    return destination


def _bucket_objects(prefix: str) -> Iterator[str]:
    page_token = ""
    while True:
        query = f"?prefix={prefix}&fields=items(name),nextPageToken"
        if page_token:
            query += f"&pageToken={page_token}"
        with urllib.request.urlopen(PG19_LISTING + query, timeout=60) as response:
            listing = json.load(response)
        for item in listing.get("items", []):
            if item["name"].endswith(".txt"):
                yield item["name"]
        page_token = listing.get("nextPageToken", "")
        if not page_token:
            return

"""Summarization data: Wikipedia-lead generation from WikiText, Multi-News readers, binarising.

Layouts read by :func:`read_split`:

- ``.src/.tgt`` (Multi-News as released, and the shipped sample): ``DATA/{split}.src`` and
  ``DATA/{split}.tgt``, one example per line. Multi-News marks its article boundaries with
  ``story_separator_special_tag`` and its line breaks with ``NEWLINE_CHAR``.
- Hugging Face (``alexfabbri/multi_news``): ``DATA/{split}.jsonl``, one JSON object per line with
  ``document`` (the articles joined by ``|||||``) and ``summary``.

Splits are ``train``, ``valid`` and ``test`` (Hugging Face's ``validation`` is read for
``valid``). Articles of a multi-document source are joined by the separator token ``|||||``.

The shipped sample (``samples/wikilead``) is Wikipedia-lead generation, as in "Generating
Wikipedia by Summarizing Long Sequences" (Liu et al., 2018): from WikiText-2 articles, the
source is the article's sections and the reference its lead paragraph (:func:`wikitext_examples`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

SPLITS = ("train", "valid", "test")
SAMPLE_DIR = Path(__file__).parent / "samples" / "wikilead"
DOCUMENT_SEPARATOR = "|||||"
_MULTI_NEWS_STORY = "story_separator_special_tag"
_TOKEN = re.compile(r"<unk>|\|\|\|\|\||\w+|[^\w\s]")
_TITLE = re.compile(r"^= ([^=].*) =$")  # on stripped lines: "= Title =" (a section: "= = Name = =")


@dataclass(frozen=True)
class Example:
    """One summarization pair: a (long) source document and its reference summary."""

    source: str
    summary: str


@dataclass(frozen=True)
class Article:
    """A WikiText article: its title, lead paragraphs and section paragraphs (headings dropped)."""

    title: str
    lead: list[str]
    sections: list[str]


def tokenize(text: str) -> list[str]:
    """Word and punctuation tokens (WikiText is already tokenised this way; ``<unk>`` and the
    document separator stay whole)."""
    return _TOKEN.findall(text)


def wikitext_articles(text: str) -> list[Article]:
    """Split WikiText (``= Title =`` lines, ``= = Section = =`` headings) into articles."""
    articles: list[Article] = []
    title: str | None = None
    lead: list[str] = []
    sections: list[str] = []
    in_sections = False
    for line in text.splitlines():
        line = line.strip()
        match = _TITLE.match(line)
        if match:
            if title is not None:
                articles.append(Article(title, lead, sections))
            title, lead, sections, in_sections = match.group(1).strip(), [], [], False
        elif line.startswith("= =") and line.endswith("= ="):
            in_sections = True
        elif line and title is not None:
            (sections if in_sections else lead).append(line)
    if title is not None:
        articles.append(Article(title, lead, sections))
    return articles


def wikitext_examples(text: str, *, min_summary_words: int = 10) -> list[Example]:
    """Wikipedia-lead pairs: source = every paragraph of the article's sections (in order),
    summary = its first lead paragraph. Articles without sections or with a lead shorter than
    ``min_summary_words`` words are skipped."""
    return [
        Example(" ".join(article.sections), article.lead[0])
        for article in wikitext_articles(text)
        if article.sections and article.lead and len(article.lead[0].split()) >= min_summary_words
    ]


def _multi_news_source(text: str) -> str:
    text = text.replace("NEWLINE_CHAR", " ")
    articles = [" ".join(part.split()) for part in text.split(_MULTI_NEWS_STORY)]
    return f" {DOCUMENT_SEPARATOR} ".join(a for a in articles if a)


def _multi_news_summary(text: str) -> str:
    return " ".join(text.replace("NEWLINE_CHAR", " ").split()).removeprefix("– ")


def read_split(data_dir: Path, split: str) -> list[Example]:
    """The examples of ``split`` in either layout (see the module docstring).

    Raises:
        FileNotFoundError: neither layout is there; the message names both.
        ValueError: the .src and .tgt files differ in length, or a JSON line lacks a field.
    """
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    source, target = data_dir / f"{split}.src", data_dir / f"{split}.tgt"
    if source.exists() and target.exists():
        sources = source.read_text(encoding="utf-8").splitlines()
        summaries = target.read_text(encoding="utf-8").splitlines()
        if len(sources) != len(summaries):
            raise ValueError(f"{source} has {len(sources)} lines but {target} has {len(summaries)}")
        return [Example(_multi_news_source(s), _multi_news_summary(t)) for s, t in zip(sources, summaries)]
    names = [split] + (["validation"] if split == "valid" else [])
    for name in names:
        path = data_dir / f"{name}.jsonl"
        if path.exists():
            examples = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "document" not in row or "summary" not in row:
                    raise ValueError(f"{path}:{number}: expected fields 'document' and 'summary', "
                                     f"got {sorted(row)}")
                articles = [" ".join(a.split()) for a in row["document"].split(DOCUMENT_SEPARATOR)]
                examples.append(Example(f" {DOCUMENT_SEPARATOR} ".join(a for a in articles if a),
                                        _multi_news_summary(row["summary"])))
            return examples
    raise FileNotFoundError(
        f"no {split} split in {data_dir}: expected {split}.src + {split}.tgt (Multi-News as "
        f"released) or {' / '.join(n + '.jsonl' for n in names)} (Hugging Face: document, summary)"
    )


def write_sample(wikitext_files: list[Path], destination: Path, *, held_out: int = 8,
                 max_source_words: int = 400) -> dict[str, int]:
    """Build the shipped sample from WikiText files: Wikipedia-lead pairs with sources cut to
    ``max_source_words`` words; the last ``held_out`` pairs are ``test``, the ``held_out``
    before them ``valid``, the rest ``train``. Returns the examples per split."""
    examples = [e for path in wikitext_files for e in wikitext_examples(path.read_text(encoding="utf-8"))]
    examples = [Example(" ".join(e.source.split()[:max_source_words]), e.summary) for e in examples]
    splits = {"train": examples[: -2 * held_out], "valid": examples[-2 * held_out : -held_out],
              "test": examples[-held_out:]}
    destination.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (destination / f"{split}.src").write_text("".join(e.source + "\n" for e in rows), encoding="utf-8")
        (destination / f"{split}.tgt").write_text("".join(e.summary + "\n" for e in rows), encoding="utf-8")
    return {split: len(rows) for split, rows in splits.items()}


def cache_root() -> Path:
    """``$ATTNBENCH_CACHE/summarization`` or ``~/.cache/attnbench/summarization``."""
    base = os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench")
    return Path(base) / "summarization"


@dataclass(frozen=True)
class PreparedData:
    """Binarised pairs ready for fairseq's ``translation`` task (languages ``src`` -> ``tgt``).

    Attributes:
        data_bin: fairseq's data folder (joined dictionary, ``{split}.src-tgt.{src,tgt}.*``).
        references: the test split's full reference summaries, tokenised (one per example).
        source_tokens: mean source tokens per test example, before and after truncation.
    """

    data_bin: Path
    references: Path
    source_tokens: dict[str, float]


def prepare(data_dir: Path, *, vocab_size: int, max_source_tokens: int, max_target_tokens: int,
            cache: Path) -> PreparedData:
    """:func:`_prepare_unlocked` under a lock on ``cache``: cells of a sweep that run at once
    (processes or SLURM jobs on a shared file system) prepare the same data once, never
    interleaved."""
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".prepare.lock"):
        return _prepare_unlocked(data_dir, vocab_size=vocab_size, max_source_tokens=max_source_tokens,
                                 max_target_tokens=max_target_tokens, cache=cache)


def _prepare_unlocked(data_dir: Path, *, vocab_size: int, max_source_tokens: int, max_target_tokens: int,
            cache: Path) -> PreparedData:
    """Tokenise, truncate (sources to ``max_source_tokens``, training targets to
    ``max_target_tokens``) and binarise with ``fairseq-preprocess`` (joined dictionary of the
    ``vocab_size`` most frequent training words); cached by content and settings."""
    splits = {split: read_split(data_dir, split) for split in SPLITS}
    digest = hashlib.sha256(f"{vocab_size}-{max_source_tokens}-{max_target_tokens}".encode())
    for split in SPLITS:
        for example in splits[split]:
            digest.update(example.source.encode() + b"\0" + example.summary.encode() + b"\0")
    folder = cache / "data-bin" / digest.hexdigest()[:16]
    manifest = folder / "prepared.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        return PreparedData(Path(saved["data_bin"]), Path(saved["references"]), saved["source_tokens"])
    work = folder / "tokenised"
    work.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        sources = [tokenize(e.source) for e in examples]
        summaries = [tokenize(e.summary) for e in examples]
        (work / f"{split}.src").write_text(
            "".join(" ".join(s[:max_source_tokens]) + "\n" for s in sources), encoding="utf-8")
        (work / f"{split}.tgt").write_text(
            "".join(" ".join(s[:max_target_tokens]) + "\n" for s in summaries), encoding="utf-8")
        if split == "test":
            references = folder / "test.references"
            references.write_text("".join(" ".join(s) + "\n" for s in summaries), encoding="utf-8")
            lengths = [len(s) for s in sources]
            source_tokens = {"full": sum(lengths) / len(lengths),
                             "truncated": sum(min(n, max_source_tokens) for n in lengths) / len(lengths)}
    data_bin = folder / "data-bin"
    _binarise(work, data_bin, vocab_size)
    prepared = PreparedData(data_bin, references, source_tokens)
    manifest.write_text(json.dumps({**asdict(prepared), "data_bin": str(data_bin),
                                    "references": str(references)}, indent=1))
    return prepared


def _binarise(tokenised: Path, destination: Path, vocab_size: int) -> None:
    """``fairseq-preprocess`` (its own entry point) with a joined source/target dictionary."""
    from fairseq import options

    from tasks.backends.fairseq_plugin.compat import import_fairseq_cli

    preprocess = import_fairseq_cli("preprocess")

    parser = options.get_preprocessing_parser()
    args = parser.parse_args([
        "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
        "--nwordssrc", str(vocab_size), "--nwordstgt", str(vocab_size),
        "--trainpref", str(tokenised / "train"), "--validpref", str(tokenised / "valid"),
        "--testpref", str(tokenised / "test"), "--destdir", str(destination),
        "--workers", "1",
    ])
    preprocess.main(args)


def fetch_multi_news(destination: Path) -> Path:
    """Multi-News (44,972 / 5,622 / 5,622 pairs) from the Hugging Face hub
    (``alexfabbri/multi_news``, non-commercial research licence) into ``destination`` as
    ``{train,validation,test}.jsonl`` (the Hugging Face layout :func:`read_split` reads).
    Needs the ``datasets`` package and internet.

    Raises:
        DatasetUnavailable: ``datasets`` is not installed; the message says what to do.
    """
    from tasks.base import DatasetUnavailable

    try:
        import datasets
    except ImportError as error:
        raise DatasetUnavailable(
            "Multi-News is fetched with Hugging Face `datasets`: pip install datasets, then rerun "
            "`attnbench data fetch multi_news`; or put train/valid/test .src + .tgt files (Multi-News "
            f"as released) in {destination}"
        ) from error
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = datasets.load_dataset("alexfabbri/multi_news", split=split)
        temporary = destination / f"{split}.jsonl.part"
        with open(temporary, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps({"document": row["document"], "summary": row["summary"]}) + "\n")
        temporary.replace(destination / f"{split}.jsonl")
    return destination

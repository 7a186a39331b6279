"""Streaming parse of PubMed baseline/update XML into records, deletions and malformed entries."""

from __future__ import annotations

import dataclasses
import glob
import gzip
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.etree import ElementTree




class PubmedFileError(Exception):
    """A whole source file is unreadable: truncated gzip, not XML, not well-formed."""


def resolve_pubmed_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand directories (their *.xml and *.xml.gz), globs and file paths; sort by name.

    Sorted file-name order is the order updates are applied in: NLM numbers baseline and
    update files consecutively (pubmed25n0001 ... pubmed25n1274, then updates).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(path.glob("*.xml")) + sorted(path.glob("*.xml.gz"))
            if not matches:
                raise FileNotFoundError(f"Input directory {path} holds no *.xml or *.xml.gz files.")
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(match) for match in sorted(glob.glob(str(path))) if Path(match).is_file()]
            if not matches:
                raise FileNotFoundError(
                    f"Input {str(item)!r} is not a file, a directory or a glob that matches any file."
                )
        for match in matches:
            found[match.resolve()] = None
    if not found:
        raise FileNotFoundError("No PubMed input files given.")
    return sorted(found, key=lambda path: (path.name, str(path)))





@dataclasses.dataclass(frozen=True)
class PubmedRecord:
    pmid: int
    title: str
    abstract: str  # "" when the record has no abstract
    languages: tuple[str, ...]

    @property
    def text(self) -> str:
        """The pretraining document: title, blank line, abstract."""
        return f"{self.title}\n\n{self.abstract}" if self.title else self.abstract


@dataclasses.dataclass(frozen=True)
class DeletedCitation:
    pmid: int


@dataclasses.dataclass(frozen=True)
class MalformedRecord:
    file: str
    pmid: str | None
    reason: str


def _inner_text(element: ElementTree.Element | None) -> str:
    """All text under `element` (inline <sub>, <i>, ... included), whitespace collapsed."""
    if element is None:
        return ""
    return " ".join("".join(element.itertext()).split())


def _abstract_text(abstract: ElementTree.Element | None) -> str:
    # Only AbstractText children: CopyrightInformation is a sibling inside Abstract.
    if abstract is None:
        return ""
    sections = []
    for section in abstract.findall("AbstractText"):
        text = _inner_text(section)
        if not text:
            continue
        label = (section.get("Label") or "").strip()
        sections.append(f"{label}: {text}" if label else text)
    return "\n".join(sections)


def parse_pubmed_article(article: ElementTree.Element, file_name: str) -> PubmedRecord | MalformedRecord:
    """One `PubmedArticle` element to a record, or a MalformedRecord saying what is wrong."""
    citation = article.find("MedlineCitation")
    if citation is None:
        return MalformedRecord(file_name, None, "PubmedArticle without MedlineCitation")
    # Direct child only: CommentsCorrections and others nest PMIDs of *other* articles.
    pmid_element = citation.find("PMID")
    pmid_text = (pmid_element.text or "").strip() if pmid_element is not None else ""
    if not pmid_text:
        return MalformedRecord(file_name, None, "MedlineCitation without PMID")
    if not pmid_text.isdigit():
        return MalformedRecord(file_name, pmid_text, f"PMID {pmid_text!r} is not a number")
    article_element = citation.find("Article")
    if article_element is None:
        return MalformedRecord(file_name, pmid_text, "MedlineCitation without Article")
    return PubmedRecord(
        pmid=int(pmid_text),
        title=_inner_text(article_element.find("ArticleTitle")),
        abstract=_abstract_text(article_element.find("Abstract")),
        languages=tuple(
            (language.text or "").strip().lower() for language in article_element.findall("Language")
        ),
    )


def open_pubmed_file(path: str | Path):
    """Binary stream of the XML, gunzipping by magic number (not trusting the suffix)."""
    path = Path(path)
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_pubmed_file(path: str | Path) -> Iterator[PubmedRecord | DeletedCitation | MalformedRecord]:
    """Stream records, deletions and malformed records of one baseline/update file.

    Memory stays constant: each article is dropped from the tree once yielded. A file
    that is not (complete) XML raises PubmedFileError naming the file.
    """
    path = Path(path)
    try:
        with open_pubmed_file(path) as stream:
            root = None
            for event, element in ElementTree.iterparse(stream, events=("start", "end")):
                if root is None:
                    root = element
                    if root.tag != "PubmedArticleSet":
                        raise PubmedFileError(
                            f"{path}: root element is <{root.tag}>, expected <PubmedArticleSet>; "
                            "is this a PubMed baseline/update file?"
                        )
                    continue
                if event != "end":
                    continue
                if element.tag == "PubmedArticle":
                    yield parse_pubmed_article(element, path.name)
                elif element.tag == "DeleteCitation":
                    for pmid in element.findall("PMID"):
                        if (pmid.text or "").strip().isdigit():
                            yield DeletedCitation(int(pmid.text.strip()))
                        else:
                            yield MalformedRecord(path.name, pmid.text, "DeleteCitation PMID is not a number")
                else:
                    continue
                # Articles are direct children of the root; dropping them keeps memory flat.
                root.clear()
    except ElementTree.ParseError as error:
        raise PubmedFileError(f"{path}: not well-formed XML ({error}); the file is corrupt or not PubMed XML.") from error
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise PubmedFileError(f"{path}: truncated or corrupt gzip ({error}); download it again.") from error


"""A synthetic PubMed corpus for offline smoke runs and benchmarks.

`write_synthetic_pubmed` writes files in the PubMed baseline format whose abstracts come
from a small template grammar over biomedical word lists. The text is repetitive on
purpose: a tiny model trained for a few hundred steps should visibly lower its loss,
which is what the trainer's `--preset smoke` checks. The files then go through the same
`prepare_pubmed` + loader path as real PubMed.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from xml.sax.saxutils import escape

from biomamba_jax.files import atomic_output

DRUGS = ("budesonide", "metformin", "atorvastatin", "rituximab", "tamoxifen", "imatinib",
         "lisinopril", "warfarin", "cisplatin", "dexamethasone", "insulin glargine", "azithromycin")
DISEASES = ("asthma", "type 2 diabetes", "hypertension", "breast cancer", "chronic myeloid leukemia",
            "rheumatoid arthritis", "atrial fibrillation", "non-small cell lung cancer", "sepsis",
            "chronic kidney disease", "multiple sclerosis", "community-acquired pneumonia")
GENES = ("BRCA1", "TP53", "EGFR", "KRAS", "BCR-ABL1", "HER2", "APOE", "CFTR", "JAK2", "PD-L1")
OUTCOMES = ("overall survival", "hospital admission", "glycated hemoglobin", "blood pressure",
            "exacerbation rate", "tumour response", "all-cause mortality", "quality of life")
POPULATIONS = ("adults", "children", "older patients", "pregnant women", "outpatients", "veterans")
DESIGNS = ("randomized controlled trial", "cohort study", "case-control study", "meta-analysis",
           "cross-sectional survey")
DIRECTIONS = ("reduced", "increased", "did not change", "improved")
LANGUAGES = ("eng",) * 9 + ("fre",)


def _abstract_sections(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    drug, disease, outcome = rng.choice(DRUGS), rng.choice(DISEASES), rng.choice(OUTCOMES)
    gene, population, design = rng.choice(GENES), rng.choice(POPULATIONS), rng.choice(DESIGNS)
    direction = rng.choice(DIRECTIONS)
    n_patients = rng.randrange(40, 5000)
    ratio = rng.uniform(0.4, 1.6)
    low, high = ratio * rng.uniform(0.7, 0.95), ratio * rng.uniform(1.05, 1.4)
    title = f"{drug.capitalize()} and {outcome} in {population} with {disease}: a {design}."
    sections = [
        ("BACKGROUND", f"The effect of {drug} on {outcome} in {population} with {disease} is uncertain. "
                       f"Variants in {gene} may modify the response to {drug}."),
        ("METHODS", f"We conducted a {design} of {n_patients} {population} with {disease}. "
                    f"Patients received {drug} or placebo, and {gene} status was recorded."),
        ("RESULTS", f"Treatment with {drug} {direction} {outcome} (ratio, {ratio:.2f}; "
                    f"95% CI, {low:.2f} to {high:.2f}). The effect was larger in {gene}-positive patients."),
        ("CONCLUSIONS", f"In {population} with {disease}, {drug} {direction} {outcome}."),
    ]
    return title, sections


def _article_xml(pmid: int, rng: random.Random) -> str:
    title, sections = _abstract_sections(rng)
    language = rng.choice(LANGUAGES)
    abstract = "".join(
        f'<AbstractText Label="{label}" NlmCategory="{label}">{escape(text)}</AbstractText>'
        for label, text in sections
    )
    return (
        "<PubmedArticle><MedlineCitation Status=\"MEDLINE\" Owner=\"NLM\">"
        f"<PMID Version=\"1\">{pmid}</PMID><Article PubModel=\"Print\">"
        f"<ArticleTitle>{escape(title)}</ArticleTitle>"
        f"<Abstract>{abstract}<CopyrightInformation>Synthetic text, no rights reserved.</CopyrightInformation></Abstract>"
        f"<Language>{language}</Language></Article></MedlineCitation></PubmedArticle>\n"
    )


def write_synthetic_pubmed(
    out_dir: str | Path,
    n_files: int = 2,
    docs_per_file: int = 200,
    seed: int = 0,
    *,
    compress: bool = False,
    first_pmid: int = 90_000_001,
) -> list[Path]:
    """Write `n_files` PubMed-format files of `docs_per_file` articles each; return their paths.

    Deterministic for a seed. PMIDs are consecutive from `first_pmid` (outside the range of
    real PMIDs in use today). About one article in ten is in French (for `--language`).
    """
    if n_files <= 0 or docs_per_file <= 0:
        raise ValueError(f"n_files and docs_per_file must be positive (got {n_files}, {docs_per_file}).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for file_number in range(n_files):
        path = out_dir / f"synthetic{seed:02d}n{file_number + 1:04d}.xml{'.gz' if compress else ''}"
        start = first_pmid + file_number * docs_per_file
        body = "".join(_article_xml(pmid, rng) for pmid in range(start, start + docs_per_file))
        payload = f'<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n{body}</PubmedArticleSet>\n'.encode()
        with atomic_output(path) as partial:
            partial.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
        paths.append(path)
    return paths

"""NLM's PubMed baseline: download files with their published md5 checked."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path


from biomamba_jax.data.pubmed.shards import file_digests
from biomamba_jax.files import atomic_output
BASELINE_URL = "https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/"
BASELINE_PREFIX = "pubmed25n"

class DownloadError(Exception):
    """A download failed or did not match its published md5."""





def _read_md5_file(text: str, file_name: str) -> str:
    """NLM writes `MD5(pubmed25n0001.xml.gz)= <hex>`; md5sum writes `<hex>  name`."""
    for token in text.replace("=", " ").split():
        if len(token) == 32 and all(c in "0123456789abcdefABCDEF" for c in token):
            return token.lower()
    raise DownloadError(f"No md5 found in the .md5 file of {file_name}: {text[:200]!r}")


def _fetch(url: str, destination: Path, timeout: float) -> str:
    """Download url to destination (atomically); return the md5 of what arrived."""
    md5 = hashlib.md5()
    with atomic_output(destination) as partial:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as stream:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                stream.write(chunk)
    return md5.hexdigest()


def download_pubmed_baseline(
    n_files: int,
    dest_dir: str | Path,
    *,
    base_url: str = BASELINE_URL,
    prefix: str = BASELINE_PREFIX,
    first: int = 1,
    retries: int = 2,
    timeout: float = 120.0,
) -> list[Path]:
    """Fetch `{prefix}{NNNN}.xml.gz` for NNNN = first .. first+n_files-1, each checked against its `.md5`.

    Files already present with the right md5 are not fetched again. Works with any URL
    urllib opens, including `file://` (used by the tests and for local mirrors).
    Raises DownloadError naming the file on a network error or md5 mismatch.
    """
    if n_files <= 0:
        raise ValueError(f"n_files must be positive, got {n_files}.")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    paths = []
    for number in range(first, first + n_files):
        name = f"{prefix}{number:04d}.xml.gz"
        paths.append(_download_verified(base_url + name, dest_dir / name, retries=retries, timeout=timeout))
    return paths


def _download_verified(url: str, destination: Path, *, retries: int, timeout: float) -> Path:
    name = destination.name
    try:
        with urllib.request.urlopen(url + ".md5", timeout=timeout) as response:
            expected = _read_md5_file(response.read().decode("ascii", "replace"), name)
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"Could not fetch {url}.md5: {error}") from error
    if destination.is_file() and file_digests(destination)["md5"] == expected:
        return destination
    problem = ""
    for _ in range(retries + 1):
        try:
            actual = _fetch(url, destination, timeout)
        except (urllib.error.URLError, OSError) as error:
            problem = f"could not fetch {url}: {error}"
            continue
        if actual == expected:
            return destination
        destination.unlink(missing_ok=True)
        problem = f"md5 mismatch for {name}: expected {expected} (from {url}.md5), got {actual}"
    raise DownloadError(f"Download of {name} failed after {retries + 1} attempt(s): {problem}")


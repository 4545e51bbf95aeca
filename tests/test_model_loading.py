"""The one pipeline loader: tiny preset, saved directories dispatched on model_index.json, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model.loading import PIPELINE_CLASSES, load_pipeline, register_pipeline
from model.pipeline import TextToVideoPipeline


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "tiny"
    TextToVideoPipeline.from_preset("tiny", seed=3).save_pretrained(path)
    return path


def test_tiny_preset_is_seeded():
    first, again, other = load_pipeline("tiny", seed=1), load_pipeline(None, seed=1), load_pipeline("tiny", seed=2)
    weights = [next(p.unet.parameters()).detach() for p in (first, again, other)]
    assert isinstance(first, TextToVideoPipeline)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_saved_directory_loads_as_the_class_its_index_names_in_the_dtype(saved_tiny):
    pipe = load_pipeline(saved_tiny, dtype="bfloat16")
    assert type(pipe) is TextToVideoPipeline
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    reference = TextToVideoPipeline.from_preset("tiny", seed=3)
    loaded = load_pipeline(str(saved_tiny))
    for name, parameter in reference.unet.named_parameters():
        assert torch.equal(parameter, dict(loaded.unet.named_parameters())[name]), name


def test_bad_sources_and_settings_are_one_line_errors(saved_tiny, tmp_path):
    with pytest.raises(ValueError, match="not a pipeline directory"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_pipeline("tiny", dtype="float64")
    foreign = tmp_path / "sd"
    foreign.mkdir()
    (foreign / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="names 'StableDiffusionPipeline', not one of this project's pipelines"):
        load_pipeline(foreign)


def test_a_registered_class_name_dispatches_to_its_pipeline(saved_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("model.loading.PIPELINE_CLASSES", dict(PIPELINE_CLASSES))
    renamed = tmp_path / "renamed"
    shutil.copytree(saved_tiny, renamed)  # a copy: a folder's symlinks may not lead out of it
    index = json.loads((saved_tiny / "model_index.json").read_text())
    (renamed / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyVideoPipeline"}))
    with pytest.raises(ValueError, match="MyVideoPipeline"):
        load_pipeline(renamed)
    register_pipeline("MyVideoPipeline", "model.pipeline", "TextToVideoPipeline")
    assert type(load_pipeline(renamed)) is TextToVideoPipeline

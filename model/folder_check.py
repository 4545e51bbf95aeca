"""A pipeline folder checked before any of it is loaded: a refusal is one line naming the file and the reason.

`--init`, `--checkpoint` and `lvd generate --checkpoint` take folders from elsewhere (a download, a colleague's
export). Loaded as they are, a malformed folder fails deep inside diffusers with messages that point elsewhere
("Tensor on device meta", "no file named ...bin", an AttributeError), and an absurd config allocates until the
machine gives out. `check_pipeline_folder` reads only JSON and safetensors headers and refuses, naming the file:

* a `model_index.json` that is not a JSON object with a `_class_name`, or a component it lists without a folder;
* a model component without safetensors weights (pickle `.bin`/`.pt`/`.ckpt` files can run code and are never
  loaded), a weights file that is not a regular file (a symlink to /dev/zero) or leads out of the folder (but
  for a Hugging Face cache snapshot's links into its own `blobs/`);
* a safetensors file whose header is damaged or whose tensors do not fit the file;
* weights that do not fit the component's config (a missing or unexpected tensor, a shape mismatch), found by
  building the model from its config on the meta device (no memory) for the classes this project loads;
* a model whose parameters would not fit in this machine's memory (a `config.json` with 10^6 channels).

Classes are only imported from diffusers, transformers and this project's `model` package: a folder cannot make
the check import a module of its choosing.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.requests import RequestError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_LIBRARIES = ("diffusers", "transformers", "model")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class PipelineFolderError(RequestError):
    """A pipeline folder that cannot be loaded; the message is one line naming the file and the reason (a bad
    input: the `lvd` CLI prints it as one line, exit code 2)."""


@dataclass
class FolderSummary:
    """What a checked folder holds: its pipeline class and, per model component, the parameter count."""

    class_name: str
    parameters: dict[str, int] = field(default_factory=dict)

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())


# Folders that passed, keyed by path, settings and the state of their files (see `_folder_signature`).
_PASSED: dict[tuple, FolderSummary] = {}


def check_pipeline_folder(folder: str | Path, *, memory_bytes: int | None = None,
                          build_models: bool = True) -> FolderSummary:
    """Raise PipelineFolderError (one line) for the first problem found in `folder` (see the module docstring).

    `memory_bytes`: the memory the parameters must fit in (default: what this machine has available);
    `build_models`: also compare every model's weights with the model its config describes (meta device).
    A folder that passed is not checked again in this process while its files are unchanged: `lvd generate`
    checks before the job starts and `load_pipeline` checks again where it loads."""
    root = Path(folder)
    if not root.is_dir():
        raise PipelineFolderError(f"{folder}: not a directory")
    root = root.resolve()
    key = (root, memory_bytes, build_models, _folder_signature(root))
    if key not in _PASSED:
        _PASSED[key] = _check_folder(root, memory_bytes, build_models)
    return _PASSED[key]


def _folder_signature(root: Path) -> tuple:
    """Every entry under `root` with its kind, size, modification time and link target: a change to any file
    (or to what a link points at) makes a new signature."""
    entries = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        target = os.readlink(path) if path.is_symlink() else None
        followed = path.stat() if target is not None and path.exists() else info
        entries.append((str(path.relative_to(root)), info.st_mode, followed.st_size, followed.st_mtime_ns, target))
    return tuple(entries)


def _check_folder(root: Path, memory_bytes: int | None, build_models: bool) -> FolderSummary:
    index = _read_json_object(root / "model_index.json", root)
    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise PipelineFolderError(f"{root / 'model_index.json'}: no '_class_name' naming the pipeline class")
    summary = FolderSummary(class_name)
    for name, entry in index.items():
        if name.startswith("_") or entry is None or (isinstance(entry, list) and entry[:1] == [None]):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
            raise PipelineFolderError(f"{root / 'model_index.json'}: component {name!r} must be [library, class], "
                                      f"got {entry!r}")
        component = root / name
        _check_inside(component, root)
        if not component.is_dir():
            raise PipelineFolderError(f"{component}: component {name!r} listed in model_index.json has no folder")
        for path in sorted(component.rglob("*")):
            _check_inside(path, root)
        if (component / "config.json").exists():
            summary.parameters[name] = _check_model(component, root, tuple(entry), build_models)
    _check_memory(root, summary, memory_bytes)
    return summary


def _check_model(component: Path, root: Path, library_class: tuple[str, str], build_models: bool) -> int:
    """The component's parameter count, after its config, weights files and (optionally) shapes are checked."""
    config = _read_json_object(component / "config.json", root)
    files = sorted(component.glob("*.safetensors"))
    if not files:
        pickles = sorted(path.name for path in component.iterdir() if path.suffix in PICKLE_SUFFIXES)
        detail = (f"only pickle weights ({', '.join(pickles)}), which can run code and are never loaded; "
                  "convert them to safetensors") if pickles else "no .safetensors weights"
        raise PipelineFolderError(f"{component}: {detail}")
    variants = [path for path in files if len(path.name.split(".")) > 2]  # e.g. model.fp16.safetensors
    plain = [path for path in files if path not in variants] or files
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in plain:
        tensors.update(read_safetensors_header(path))
    if build_models:
        _compare_with_config(component, config, library_class, tensors)
    return sum(math.prod(shape) for _, shape in tensors.values())


def check_pipeline_source(source: str | Path | None) -> None:
    """`check_pipeline_folder` when `source` is a folder with a model_index.json; nothing for 'tiny', hub ids and
    plain SD checkpoints (they are checked where they are read)."""
    if source is not None and Path(source).is_dir() and (Path(source) / "model_index.json").exists():
        check_pipeline_folder(source)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header; PipelineFolderError when the file is not a
    regular file or its header is damaged or does not fit the file."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise PipelineFolderError(f"{path}: not a regular file (a device, FIFO or socket)")
    size = info.st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise PipelineFolderError(f"{path}: damaged safetensors file ({size} bytes, shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise PipelineFolderError(f"{path}: damaged safetensors header (claims {length:,} bytes in a "
                                      f"{size:,}-byte file)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise PipelineFolderError(f"{path}: damaged safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise PipelineFolderError(f"{path}: damaged safetensors header (not a JSON object)")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PipelineFolderError(f"{path}: damaged safetensors header (bad entry for {name!r})") from None
        if dtype not in _DTYPE_BYTES or any(d < 0 for d in shape):
            raise PipelineFolderError(f"{path}: tensor {name!r} has dtype {dtype!r} and shape {shape}")
        if not (0 <= begin <= end <= data_bytes) or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise PipelineFolderError(f"{path}: tensor {name!r} does not fit the file (truncated or damaged)")
        tensors[name] = (dtype, shape)
    return tensors


def _compare_with_config(component: Path, config: dict[str, Any], library_class: tuple[str, str],
                         tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Build the model its config describes on the meta device and compare names and shapes with the weights."""
    model_class = _safe_class(library_class)
    if model_class is None:
        return
    try:
        model = _meta_model(model_class, config)
    except PipelineFolderError:
        raise
    except Exception as error:  # noqa: BLE001 - any constructor error means the config is not usable
        message = " ".join(str(error).split())[:300] or type(error).__name__
        raise PipelineFolderError(f"{component / 'config.json'}: not a valid {library_class[1]} config "
                                  f"({message})") from None
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing and len(missing) < len(expected):
        raise PipelineFolderError(f"{component}: weights miss {len(missing)} tensor(s) of the model its config "
                                  f"describes, e.g. {missing[0]!r}")
    if missing:
        raise PipelineFolderError(f"{component}: no tensor of the weights belongs to the {library_class[1]} its "
                                  "config describes")
    for name, shape in expected.items():
        if tensors[name][1] != shape:
            raise PipelineFolderError(f"{component}: tensor {name!r} has shape {tensors[name][1]} in the weights "
                                      f"but {shape} in the model its config.json describes")
    if unexpected:
        raise PipelineFolderError(f"{component}: weights hold {len(unexpected)} tensor(s) the model has no place "
                                  f"for, e.g. {unexpected[0]!r}")


def _safe_class(library_class: tuple[str, str]) -> type | None:
    """The class model_index.json names, imported only from diffusers, transformers or this project's model
    package (None for another library: the folder is then loaded, and refused, by its pipeline's own rules)."""
    library, name = library_class
    if library.split(".")[0] not in SAFE_LIBRARIES or not name.isidentifier():
        return None
    model_class = getattr(importlib.import_module(library), name, None)
    return model_class if isinstance(model_class, type) else None


def _meta_model(model_class: type, config: dict[str, Any]) -> Any:
    """The model of `config` with every parameter on the meta device (no memory), checked for its size first."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True), torch.device("meta"):
        if hasattr(model_class, "from_config") and not hasattr(model_class, "config_class"):
            return model_class.from_config(config)  # diffusers
        config_class = getattr(model_class, "config_class", None)
        if config_class is None:
            raise PipelineFolderError(f"{model_class.__name__}: no config class to build it from")
        return model_class(config_class.from_dict(config))  # transformers


def check_finite_weights(components: dict[str, Any], source: str | Path) -> None:
    """PipelineFolderError naming the first component with a NaN or infinite parameter (it would sample a black
    video without a word)."""
    import torch

    for name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for parameter_name, parameter in module.named_parameters():
            if parameter.is_floating_point() and parameter.device.type != "meta" and \
                    not bool(torch.isfinite(parameter).all()):
                bad = int((~torch.isfinite(parameter)).sum())
                raise PipelineFolderError(f"{source}: {name}.{parameter_name} has {bad:,} NaN or infinite values; "
                                          "the weights are damaged")


def _check_memory(root: Path, summary: FolderSummary, memory_bytes: int | None) -> None:
    if memory_bytes is None:
        import psutil

        memory_bytes = psutil.virtual_memory().available
    needed = 4 * summary.total_parameters  # loaded as float32 first
    if needed > memory_bytes:
        parts = ", ".join(f"{name} {count / 1e9:.3g}B" for name, count in summary.parameters.items())
        raise PipelineFolderError(f"{root}: {summary.total_parameters / 1e9:.3g}B parameters ({parts}) need "
                                  f"{needed / 2**30:.1f} GiB as float32; {memory_bytes / 2**30:.1f} GiB is available")


def _read_json_object(path: Path, root: Path) -> dict[str, Any]:
    _check_inside(path, root)
    if not path.is_file():
        raise PipelineFolderError(f"{path}: missing" if not path.exists() else f"{path}: not a regular file")
    if path.stat().st_size > 16 * 1024 * 1024:
        raise PipelineFolderError(f"{path}: {path.stat().st_size:,} bytes is too large for a config file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PipelineFolderError(f"{path}: not valid JSON ({' '.join(str(error).split())[:200]})") from None
    if not isinstance(data, dict):
        raise PipelineFolderError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def _check_inside(path: Path, root: Path) -> None:
    """A symlink may point anywhere inside the folder, never out of it (a folder must not make us read other
    files), with one exception: a Hugging Face hub cache snapshot (`models--ORG--NAME/snapshots/REV`) is made of
    symlinks into its repository's `blobs/`, which is where the hub keeps the files."""
    if path.is_symlink() or path.exists():
        target = path.resolve()
        inside = [root]
        if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
            inside.append(root.parent.parent / "blobs")
        if not any(target == place or target.is_relative_to(place) for place in inside):
            raise PipelineFolderError(f"{path}: a symlink that leads out of the folder (to {target})")
        if path.is_symlink() and target.exists() and not (target.is_file() or target.is_dir()):
            raise PipelineFolderError(f"{path}: not a regular file (a device, FIFO or socket)")

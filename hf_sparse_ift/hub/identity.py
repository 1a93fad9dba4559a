"""Which model a result belongs to: a local `save_pretrained` folder (path, tensors sha256, training run) or a Hub
model (repo id and commit), resolved before anything is loaded so that a bad ``--model`` fails in one sentence."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import yaml

from ..errors import InputNotFoundError, UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(folder: Path) -> list[Path]:
    """The weights of a `save_pretrained` folder: the single file, or the shards its index names."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    return []


def _open_tensors(files: list[Path], stack: contextlib.ExitStack) -> dict:
    """Tensor name -> a zero-argument function returning the tensor, over every weights file (read lazily)."""
    import torch
    from safetensors import safe_open

    getters = {}
    for path in files:
        if path.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            getters.update({key: (lambda h=handle, k=key: h.get_tensor(k)) for key in handle.keys()})  # noqa: SIM118
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            getters.update({key: (lambda t=tensor: t) for key, tensor in state.items()})
    return getters


def tensors_sha256(folder: str | Path) -> str | None:
    """sha256 of the model's tensors as they load, not of the files' bytes: the same weights give the same digest
    in the plain and the compressed (``bitmask-values-v1``) layout, sharded or not.

    Each sparse layer is hashed in the compressed form (its mask bits, active values and shape; a plain layer is
    compressed on the fly, one layer at a time), every other tensor as stored; each tensor contributes its name,
    dtype, shape and bytes, in name order. None when the folder has no weights file."""
    import torch

    from ..models.sparse_wide_gpt.sparse_safetensors import (
        MASK_SUFFIX,
        SHAPE_SUFFIX,
        VALUES_SUFFIX,
        compress_weight,
    )

    files = weight_files(Path(folder))
    if not files:
        return None
    digest = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)

    with contextlib.ExitStack() as stack:
        tensors = _open_tensors(files, stack)
        masks = {key.removesuffix(".weight_mask") for key in tensors if key.endswith(".weight_mask")}
        plain_sparse = {p for p in masks if p + ".weight" in tensors}
        entries = []  # (name in the compressed layout, plain prefix or None, stored key)
        for key in tensors:
            prefix = key.removesuffix(".weight_mask").removesuffix(".weight")
            if prefix in plain_sparse and key in (prefix + ".weight", prefix + ".weight_mask"):
                if key.endswith(".weight"):
                    entries += [
                        (prefix + suffix, prefix, None) for suffix in (MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX)
                    ]
                continue
            entries.append((key, None, key))
        compressed = {}
        for name, prefix, key in sorted(entries):
            if prefix is None:
                add(name, tensors[key]())
                continue
            if prefix not in compressed:  # the first of the layer's three names compresses it, one layer held at a time
                weight, mask = tensors[prefix + ".weight"](), tensors[prefix + ".weight_mask"]()
                compressed = {
                    prefix: dict(zip((MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX), compress_weight(weight, mask)))
                }
            add(name, compressed[prefix][name[len(prefix) :]])
    return digest.hexdigest()


def weights_identity(folder: str | Path) -> dict:
    """``{"tensors_sha256": ..., "weight_files": [names]}`` of a `save_pretrained` folder."""
    return {"tensors_sha256": tensors_sha256(folder), "weight_files": [p.name for p in weight_files(Path(folder))]}


def training_run(folder: str | Path) -> tuple[str | None, int | None]:
    """(run name, step) of a trainer export: the run is the last component of ``train.output_dir`` in its
    ``training_config.yaml``; the step comes from a ``checkpoint-<N>`` folder on the path."""
    folder = Path(folder)
    run = None
    config = folder / "training_config.yaml"
    if config.is_file():
        out_dir = ((yaml.safe_load(config.read_text()) or {}).get("train") or {}).get("output_dir")
        run = Path(str(out_dir)).name if out_dir else None
    step = next(
        (
            int(m.group(1))
            for part in reversed(folder.resolve().parts)
            if (m := re.fullmatch(r"checkpoint-(\d+)", part))
        ),
        None,
    )
    return run, step


def model_name(folder: str | Path) -> str:
    """A name for a local model: its training run, else its folder (the parent when the folder is ``hf``)."""
    folder = Path(folder).resolve()
    run, _ = training_run(folder)
    if run:
        return run
    return folder.parent.name if folder.name == "hf" and folder.parent.name else folder.name


def local_identity(folder: str | Path) -> dict:
    folder = Path(folder)
    run, step = training_run(folder)
    name = model_name(folder)
    return {
        "source": "local",
        "path": str(folder.resolve()),
        "name": name,
        "run": run,
        "step": step,
        "slug": f"{name}-checkpoint-{step}" if step is not None else name,
        **weights_identity(folder),
    }


def resolve_model(model: str, revision: str | None = None) -> dict:
    """The identity of ``--model`` (a local folder or a Hub id), or a ValueError / FileNotFoundError that says what
    is wrong. Nothing is downloaded but the Hub's metadata."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputNotFoundError(
                f"--model {model}: the folder has no config.json; expected a save_pretrained folder "
                "such as outputs/<run>/checkpoint-<N>/hf"
            )
        if revision is not None:  # a folder has one version: the revision would be recorded, never used
            raise UsageError(
                f"--revision {revision} applies to Hub models; --model {model} is a local folder, which has one "
                "version: leave --revision out"
            )
        return local_identity(path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or not HUB_ID.match(model):
        raise InputNotFoundError(f"--model {model}: no such checkpoint folder (and not a Hub name like org/name)")
    return hub_identity(model, revision)


def hub_identity(repo_id: str, revision: str | None = None) -> dict:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    identity = {
        "source": "hub",
        "hub_id": repo_id,
        "name": repo_id,
        "run": None,
        "step": None,
        "slug": repo_id.replace("/", "--"),
        "tensors_sha256": None,
        "weight_files": [],
    }
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        return {**identity, "revision": info.sha}
    except GatedRepoError as err:
        raise UsageError(
            f"--model {repo_id}: the Hub model is gated and this account has no access; request it on "
            f"https://huggingface.co/{repo_id} and log in (`hf auth login`)"
        ) from err
    except RevisionNotFoundError as err:
        raise UsageError(f"--model {repo_id}: no revision {revision!r} on the Hub") from err
    except RepositoryNotFoundError as err:
        raise UsageError(
            f"--model {repo_id}: no such model on the Hub (or it is private); pass a local path or a correct Hub name"
        ) from err
    except OfflineModeIsEnabled:  # offline: fall back to the local cache
        reason = "offline mode is on: HF_HUB_OFFLINE"
    except Exception as err:  # no network: fall back to the local cache
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        raise UsageError(
            f"--model {repo_id}: cannot reach the Hub ({reason}) and the model is not in the local "
            "Hugging Face cache; pass a local path (a save_pretrained folder such as "
            "outputs/<run>/checkpoint-<N>/hf)"
        ) from None
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"--model {repo_id}: cannot reach the Hub ({reason}) and the cached copy has no config.json; "
            "pass a local path"
        )
    return {**identity, "revision": folder.name, "cached_path": str(folder), **weights_identity(folder)}


def same_model(a: dict, b: dict) -> bool:
    """Whether two identities name the same weights: the tensors' sha256 when both have one (so a lossless
    `compress` / `decompress` of a checkpoint is the same model), else Hub id and commit."""
    if a.get("tensors_sha256") and b.get("tensors_sha256"):
        return a["tensors_sha256"] == b["tensors_sha256"]
    return bool(a.get("hub_id")) and a.get("hub_id") == b.get("hub_id") and a.get("revision") == b.get("revision")


def describe(identity: dict) -> str:
    where = identity.get("path") or f"{identity.get('hub_id')}@{identity.get('revision')}"
    digest = identity.get("tensors_sha256")
    return f"{where} (tensors sha256 {digest[:12]}…)" if digest else where

"""Safetensors checkpoint shards: the shard plan shared by every writer, the index, and a writer that takes
one tensor at a time.

`plan_shards` (greedy split in file order, a tensor larger than the limit gets a shard of its own),
`shard_file_names` and `write_index` are the single definition used by `model/loader.write_gptoss`,
`export/nvfp4.write_nvfp4` and the streaming export, so all of them cut and name shards the same way.

`ShardWriter` is own code because safetensors' `save_file` needs every tensor of a file in memory at once:
a 5 GB shard of the 20B export would be held in host RAM on top of the layers being merged. The writer
knows every tensor's name, dtype and shape from the plan, so it writes the header first and then each
tensor's bytes at its offset as it arrives, in any order. The header is the one `save_file` writes, byte
for byte: its tensor order and JSON spelling are taken from safetensors itself (a one-element stand-in
of every tensor is serialised by `safetensors.torch.save`), and the writer refuses to run if re-spelling
that stand-in header does not give safetensors' bytes back. tests/test_export.py checks the files
against `save_file`'s.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
_HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


@dataclass(frozen=True)
class PlannedTensor:
    """One stored tensor as it will be written: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy split in file order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """model.safetensors.index.json; only written for checkpoints of more than one file."""
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# -------------------------------------------------------------------------------------- the header
def _split_serialised(data: bytes) -> tuple[bytes, list[tuple[str, dict]]]:
    """(header bytes incl. padding, [(key, value)] in header order) of a serialised safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length]
    return header, json.loads(header, object_pairs_hook=list)


def _spell_header(entries: list[tuple[str, object]]) -> bytes:
    """JSON as safetensors spells it (compact, entries in the given order), padded with spaces."""
    body = "{" + ",".join(f"{json.dumps(key)}:{json.dumps(_as_dict(value), separators=(',', ':'))}"
                          for key, value in entries) + "}"  # fmt: skip
    encoded = body.encode()
    return encoded + b" " * ((_HEADER_ALIGNMENT - len(encoded) % _HEADER_ALIGNMENT) % _HEADER_ALIGNMENT)


def _as_dict(value):
    """object_pairs_hook=list turns every JSON object into pairs; back to dicts (order kept)."""
    if isinstance(value, list) and value and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return {k: _as_dict(v) for k, v in value}
    return value


def file_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes, {name: (start, end) of its data}) of the file `save_file` writes for these tensors."""
    stand_in = save({t.name: torch.zeros(1, dtype=t.dtype) for t in tensors}, metadata=metadata)
    raw, entries = _split_serialised(stand_in)
    if _spell_header(entries) != raw:
        raise RuntimeError("ShardWriter: this safetensors version spells its header differently from ours; "
                           "the streaming export cannot reproduce save_file's files with it")  # fmt: skip
    planned = {t.name: t for t in tensors}
    offsets, position, spelled = {}, 0, []
    for key, value in entries:  # safetensors' order: the data lies in the header's order
        if key == "__metadata__":
            spelled.append((key, value))
            continue
        tensor = planned[key]
        offsets[key] = (position, position + tensor.nbytes)
        fields = dict(_as_dict(value))
        fields.update(shape=list(tensor.shape), data_offsets=list(offsets[key]))
        spelled.append((key, fields))
        position += tensor.nbytes
    return _spell_header(spelled), offsets


# -------------------------------------------------------------------------------------- the writer
class ShardWriter:
    """Writes a planned checkpoint into `directory` one tensor at a time (`put`, any order), then the index
    (`close`). Every tensor must match its plan entry; close refuses if any is missing."""

    def __init__(self, directory: Path, shards: list[list[PlannedTensor]], metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.metadata = {"format": "pt"} if metadata is None else metadata
        self.files = shard_file_names(len(shards))
        self.plan: dict[str, tuple[PlannedTensor, str]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._handles = {}
        for file, shard in zip(self.files, shards):
            header, offsets = file_header(shard, self.metadata)
            handle = open(self.directory / file, "wb")  # noqa: SIM115 (closed in close / abort)
            handle.write(struct.pack("<Q", len(header)) + header)
            data_start = 8 + len(header)
            for tensor in shard:
                self.plan[tensor.name] = (tensor, file)
                start, end = offsets[tensor.name]
                self._offsets[tensor.name] = (data_start + start, data_start + end)
            self._handles[file] = handle
        self.written: set[str] = set()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan:
            raise ValueError(f"ShardWriter: {name} is not part of the planned checkpoint")
        planned, file = self.plan[name]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"ShardWriter: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned {planned.dtype} {planned.shape}")  # fmt: skip
        if name in self.written:
            raise ValueError(f"ShardWriter: {name} written twice")
        start, _ = self._offsets[name]
        handle = self._handles[file]
        handle.seek(start)
        handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written.add(name)

    def close(self) -> dict[str, str]:
        """Check completeness, close the files, write the index; returns the weight map."""
        missing = [name for name in self.plan if name not in self.written]
        self.abort()
        if missing:
            raise ValueError(f"ShardWriter: {len(missing)} planned tensors were never written, e.g. {missing[0]}")
        weight_map = {name: file for name, (_, file) in self.plan.items()}
        write_index(self.directory, weight_map, sum(t.nbytes for t, _ in self.plan.values()))
        return weight_map

    def abort(self) -> None:
        for handle in self._handles.values():
            handle.close()

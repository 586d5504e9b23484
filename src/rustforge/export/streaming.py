"""Streaming export: merge, check and write a model one decoder layer at a time.

The in-memory flow of export/hf.py holds the base, the reference (base + adapter unmerged) and the merged
model in float32: ~170 GB for gpt-oss-20b, more than a normal host has. This path writes the same files
(same tensor names, dtypes, layouts, shards, index and config.json; tests/test_export.py compares them byte
for byte) and the same export_report.json, holding about two layers of float32 at a time:

  per decoder layer: read the layer's base parameters from the local gpt-oss directory (MXFP4 experts
  dequantised; loader.CheckpointReader) -> add the adapter's deltas for that layer in float32
  (lora.iter_peft_deltas with the layer's prefix + lora.add_deltas, merge_adapter's own code) -> encode
  it in the export format with the encoders of the in-memory writers (loader.encode_tensors,
  nvfp4.encode_tensors) and write it straight into its shard (model/shards.ShardWriter, which knows every
  offset from the plan and so never holds a shard) -> free it. Embeddings, final norm and lm_head once,
  before and after the layers.

The merge check is streamed alongside. The probe batch's hidden states ([rows, tokens, hidden] each) are
kept for base + adapter computed unmerged, for the same without any / without the expert LoRA deltas, for
the merged float32 model and for the export (the values the checkpoint holds). Each layer is run alone,
transformers' GptOssDecoderLayer with the masks and rotary tables GptOssModel.forward builds (sinks,
sliding window and the model's MoE included); the unmerged one is that layer with our grouped split-LoRA
experts and LoRA linears holding the adapter, as lora_reference builds the whole model. Final norm and
lm_head then give the logits, and hf.merge_verdict decides exactly as check_merge does (the same refusals
and report). Last, the written checkpoint is reread a layer at a time and every parameter must decode to
exactly the expected value (hf.expected_tensor; compared by SHA-256 of the float32 values recorded while
writing, because the values themselves are gone by then), as check_written does for the in-memory flow.

A refusal comes after the weights went into the staging directory (the check needs every layer); the
staging directory is removed, so nothing is written, as in the in-memory flow.

Peak host memory (measured in tests/test_export.py): one layer of float32 plus its largest delta (the merge
adds one delta at a time) or plus the stored copy being decoded; the export values of the experts overwrite
the merged ones once those are written; the embedding and lm_head are held in float32 twice (the value and
its bf16-rounded export value) at the two ends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from rustforge.export import nvfp4
from rustforge.export.hf import (
    ExportRefused,
    expected_tensor,
    expert_lora_disabled,
    export_target,
    finish_report,
    merge_verdict,
    next_token_kl,
    probe_batch,
    report_header,
    staged,
    write_tokenizer_files,
)
from rustforge.model.loader import (
    CheckpointReader,
    _check_mxfp4_divisible,
    checkpoint_plan,
    encode_tensors,
    expert_names,
    layer_specs,
    parameter_count,
    top_level_specs,
    write_config_json,
)
from rustforge.model.lora import (
    PEFT_PREFIX,
    adapter_lora_config,
    add_deltas,
    apply_lora_to_layer,
    iter_peft_deltas,
    load_lora_tensors,
    lora_disabled,
    peft_deltas,
    plain_layer,
    read_peft_adapter,
)
from rustforge.model.shards import ShardWriter, plan_shards

# In memory the export needs ~3 float32 copies + the reload (16+ bytes a parameter): 16 GB at 1B parameters.
AUTO_MIN_PARAMETERS = 1_000_000_000
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# hidden-state streams of the probe: the three of the merge check, then the merged model and the export
CHECK_STREAMS = ("base_plus_adapter", "base", "without_expert_deltas")


def should_stream(setting: str | bool, config) -> bool:
    """export.streaming: true / false, or auto = models of AUTO_MIN_PARAMETERS and more."""
    if setting == "auto":
        return parameter_count(config) >= AUTO_MIN_PARAMETERS
    return bool(setting)


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class StreamSource:
    """What is merged onto the base checkpoint, as export_run's in-memory flow does: `start_adapters` merged
    first and `expert_stacks` (a safetensors file of [E, in, out] stacks) replacing the experts make the
    start (a QAT result); `adapter` is then merged and checked against the start + adapter unmerged."""

    adapter: Path | None = None
    start_adapters: tuple[Path, ...] = ()
    expert_stacks: Path | None = None


def adapter_source(adapter: str | Path) -> tuple[StreamSource, dict]:
    """(source, report) of a stage adapter over the base."""
    return StreamSource(adapter=Path(adapter)), {"source": str(adapter)}


def qat_source(directory: str | Path) -> tuple[StreamSource, dict]:
    """(source, report) of a finished QAT result: train/qat.load_result's model (base + source adapter
    merged, experts from experts.safetensors, or the QAT expert LoRA to merge), read from qat.json."""
    from rustforge.train import qat

    directory = Path(directory)
    info = json.loads((directory / qat.INFO_NAME).read_text())
    start = (Path(info["source_adapter"]),)
    report = {"source": str(directory), **info}
    if info["trainable"] == "lora":
        return StreamSource(adapter=directory / "adapter", start_adapters=start), report
    return StreamSource(start_adapters=start, expert_stacks=directory / qat.EXPERTS_FILE), report


@dataclass(frozen=True)
class _Adapter:
    tensors: dict[str, torch.Tensor]
    config: dict
    where: str

    @classmethod
    def read(cls, directory: Path) -> _Adapter:
        tensors, config = read_peft_adapter(directory)
        return cls(tensors, config, str(directory))

    def merge(self, model_config, index: int, state: dict[str, torch.Tensor]) -> None:
        """W += delta for this layer's parameters in float32, as merge_adapter does for the whole model; one
        delta at a time (an expert stack's delta is as big as the stack)."""
        experts = model_config.num_local_experts
        for name, delta in iter_peft_deltas(self.tensors, self.config, experts, torch.float32, self.where,
                                            layer_prefix(index)):  # fmt: skip
            add_deltas(state, {name: delta}, self.where)
            del delta  # else it lives on while the generator computes the next one

    def check_outside_layers(self, model_config) -> None:
        """merge_adapter's errors for keys outside every decoder layer, which the per-layer merge never visits."""
        inside = tuple(f"{PEFT_PREFIX}{layer_prefix(i)}" for i in range(model_config.num_hidden_layers))
        outside = {k: v for k, v in self.tensors.items() if not k.startswith(inside)}
        deltas = peft_deltas(outside, self.config, model_config.num_local_experts, torch.float32, self.where)
        add_deltas({}, deltas, self.where)


class _Layers:
    """Each decoder layer's float32 parameters (model names) of the start, the merged model and the reference."""

    def __init__(self, reader: CheckpointReader, source: StreamSource):
        from transformers import GptOssForCausalLM

        self.reader, self.config = reader, reader.config
        with torch.device("meta"):  # settles the config as in the in-memory flow's models (experts implementation)
            keys = list(GptOssForCausalLM(self.config).state_dict())
        self._keys = [k.removeprefix(layer_prefix(0)) for k in keys if k.startswith(layer_prefix(0))]
        self.start = [_Adapter.read(path) for path in source.start_adapters]
        self.adapter = None if source.adapter is None else _Adapter.read(source.adapter)
        for adapter in self.start + ([self.adapter] if self.adapter is not None else []):
            adapter.check_outside_layers(self.config)
        self.expert_stacks = source.expert_stacks
        if self.expert_stacks is not None:
            self._check_expert_stacks()

    def _check_expert_stacks(self) -> None:
        with safe_open(self.expert_stacks, framework="pt") as handle:
            unknown = sorted(set(handle.keys()) - expert_names(self.config))
        if unknown:
            raise ValueError(f"{self.expert_stacks}: {unknown[0]} does not fit the base model")

    def names(self, index: int) -> list[str]:
        return [layer_prefix(index) + key for key in self._keys]

    def start_layer(self, index: int) -> dict[str, torch.Tensor]:
        """The base layer with the start adapters merged and the expert stacks in place."""
        state = self.reader.read(self.names(index), torch.float32)
        for adapter in self.start:
            adapter.merge(self.config, index, state)
        if self.expert_stacks is not None:
            with safe_open(self.expert_stacks, framework="pt") as handle:
                stored = handle.keys()
                for name in [n for n in stored if n in state]:
                    stack = handle.get_tensor(name)
                    if stack.shape != state[name].shape:
                        raise ValueError(f"{self.expert_stacks}: {name} does not fit the base model")
                    state[name].copy_(stack)
        return state

    def reference_layer(self, index: int, state: dict[str, torch.Tensor]):
        """Layer `index` of start + adapter computed UNMERGED, sharing `state`'s tensors: what lora_reference
        makes of every layer (install_experts' grouped experts with unquantised storage, apply_lora,
        load_adapter)."""
        from rustforge.model.moe import GroupedExperts

        layer = plain_layer(self.config, index, state)
        layer.mlp.experts = GroupedExperts.from_hf(layer.mlp.experts, "bf16")
        apply_lora_to_layer(layer, adapter_lora_config(self.adapter.config))
        load_lora_tensors(layer, self.adapter.tensors, self.adapter.config, self.adapter.where, layer_prefix(index))
        return layer.eval()

    def merge(self, index: int, state: dict[str, torch.Tensor]) -> None:
        self.adapter.merge(self.config, index, state)


# ------------------------------------------------------------------------------------------- probe
class _Probe:
    """The probe batch through the model a piece at a time, as GptOssForCausalLM.forward runs it: the
    embedding, every decoder layer with the mask of its layer type and the shared rotary tables, the final
    norm and lm_head."""

    def __init__(self, config, ids: torch.Tensor):
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

        self.config, self.ids = config, ids
        like = torch.zeros(*ids.shape, config.hidden_size)  # masks and rotary tables use its shape and dtype only
        self.position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
        kwargs = {"config": config, "inputs_embeds": like, "attention_mask": None, "cache": None}
        self.masks = {
            "full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs),
        }
        self.position_embeddings = GptOssRotaryEmbedding(config=config)(like, self.position_ids)

    @torch.no_grad()
    def embed(self, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.ids, weight)

    @torch.no_grad()
    def layer(self, module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.masks[self.config.layer_types[index]]
        return module(hidden, attention_mask=mask, position_ids=self.position_ids,
                      position_embeddings=self.position_embeddings)  # fmt: skip

    @torch.no_grad()
    def logits(self, norm_weight: torch.Tensor, head_weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

        norm = GptOssRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(norm_weight, requires_grad=False)
        return F.linear(norm(hidden), head_weight).float()


# ------------------------------------------------------------------------------------------ the pass
_DIGEST_CHUNK = 1 << 22  # elements hashed at a time: the scratch copy stays 16 MB


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the float32 values; + 0.0 makes -0.0 and 0.0 one value, as torch.equal has them."""
    flat, digest = tensor.detach().reshape(-1), hashlib.sha256()
    for start in range(0, flat.numel(), _DIGEST_CHUNK):
        digest.update((flat[start : start + _DIGEST_CHUNK].float() + 0.0).numpy())
    return digest.hexdigest()


def _plan(config, fmt: str):
    if fmt == "nvfp4":
        return nvfp4.stored_layout(config)
    return checkpoint_plan(config, fmt == "mxfp4", torch.bfloat16)


class _Pass:
    """One streamed export: writes every tensor, runs the probe streams, records the expected digests."""

    def __init__(self, layers: _Layers, writer: ShardWriter, fmt: str, mxfp4_rule: str, probe: _Probe):
        self.layers, self.config, self.writer = layers, layers.config, writer
        self.fmt, self.mxfp4_rule, self.probe = fmt, mxfp4_rule, probe
        self.experts = expert_names(self.config)
        self.float_streams = (CHECK_STREAMS if layers.adapter is not None else ()) + ("merged",)
        self.hidden: dict[str, torch.Tensor] = {}
        self.digests: list[dict[str, str]] = []  # a group per read: the embedding, each layer, the tail

    def _write(self, state: dict[str, torch.Tensor], specs) -> None:
        if self.fmt == "nvfp4":
            stream = nvfp4.encode_tensors(state, self.config)
        else:
            stream = encode_tensors(state, specs, torch.bfloat16, self.mxfp4_rule)
        for name, tensor in stream:
            self.writer.put(name, tensor)
            del tensor  # else it lives on while the next one is encoded

    def _expected(self, state: dict[str, torch.Tensor], in_place: bool = False) -> dict[str, torch.Tensor]:
        """The values the checkpoint holds (expert stacks over `state`'s with `in_place`), digests recorded."""
        expected, digests = {}, {}
        for name, tensor in state.items():
            expected[name] = expected_tensor(name, tensor, self.experts, self.fmt, self.mxfp4_rule, in_place)
            if not (name == LM_HEAD and self.config.tie_word_embeddings):  # not stored: tied to the embedding
                digests[name] = _digest(expected[name])
        self.digests.append(digests)
        return expected

    def _specs(self, index: int | None, where: str = "layer"):
        if self.fmt == "nvfp4":
            return None
        if where != "layer":
            head, tail = top_level_specs(self.config)
            return head if where == "head" else tail
        return layer_specs(self.config, index, self.experts if self.fmt == "mxfp4" else set())

    def head(self) -> None:
        state = self.layers.reader.read([EMBED], torch.float32)
        self._write(state, self._specs(None, "head"))
        expected = self._expected(state)
        for stream in self.float_streams:
            self.hidden[stream] = self.probe.embed(state[EMBED])
        self.hidden["export"] = self.probe.embed(expected[EMBED])

    def layer(self, index: int) -> None:
        state = self.layers.start_layer(index)
        if self.layers.adapter is not None:
            self._check_streams(index, state)
            self.layers.merge(index, state)
        self._run("merged", plain_layer(self.config, index, state), index)
        self._write(state, self._specs(index))
        expected = self._expected(state, in_place=True)  # the merged experts are written: overwrite them
        del state
        self._run("export", plain_layer(self.config, index, expected), index)

    def _check_streams(self, index: int, state: dict[str, torch.Tensor]) -> None:
        reference = self.layers.reference_layer(index, state)
        self._run("base_plus_adapter", reference, index)
        with lora_disabled(reference):
            self._run("base", reference, index)
        with expert_lora_disabled(reference):
            self._run("without_expert_deltas", reference, index)

    def _run(self, stream: str, module, index: int) -> None:
        self.hidden[stream] = self.probe.layer(module, index, self.hidden[stream])

    def tail(self) -> dict[str, torch.Tensor]:
        """Writes the final norm and lm_head; returns every stream's logits."""
        tied = self.config.tie_word_embeddings
        state = self.layers.reader.read([NORM] + ([EMBED] if tied else [LM_HEAD]), torch.float32)
        if tied:
            state[LM_HEAD] = state.pop(EMBED)
        self._write(state, self._specs(None, "tail"))
        expected = self._expected(state)
        logits = {s: self.probe.logits(state[NORM], state[LM_HEAD], self.hidden[s]) for s in self.float_streams}
        logits["export"] = self.probe.logits(expected[NORM], expected[LM_HEAD], self.hidden["export"])
        return logits


def _write_streamed(layers: _Layers, staging: Path, fmt: str, mxfp4_rule: str, max_shard_bytes: int,
                    probe: _Probe) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:  # fmt: skip
    """Weights and config.json into `staging`; returns (logits of every probe stream, expected digests)."""
    config = layers.config
    writer = ShardWriter(staging, plan_shards(_plan(config, fmt), max_shard_bytes))
    try:
        run = _Pass(layers, writer, fmt, mxfp4_rule, probe)
        run.head()
        for index in range(config.num_hidden_layers):
            run.layer(index)
        logits = run.tail()
    finally:
        writer.abort()
    writer.close()
    if fmt == "nvfp4":
        nvfp4.write_config_json(staging, config)
    else:
        write_config_json(staging, config, fmt == "mxfp4")
    return logits, run.digests


def _check_written(directory: Path, fmt: str, digests: list[dict[str, str]]) -> None:
    """check_written, a layer at a time: every parameter of the written checkpoint decodes to exactly the
    value recorded while writing."""
    try:
        reader = nvfp4.reader(directory) if fmt == "nvfp4" else CheckpointReader(directory)
        for group in digests:
            for name, digest in group.items():  # a parameter at a time: one float32 stack in memory
                if _digest(reader.read([name], torch.float32)[name]) != digest:
                    raise ExportRefused(f"{directory}: {name} as written differs from the merged model")
    except ValueError as error:  # the loader's errors name the missing or malformed tensor
        raise ExportRefused(f"{directory}: the written checkpoint does not read back ({error})") from error


# -------------------------------------------------------------------------------------------- entry
def export_streaming(
    base: str | Path,
    source: StreamSource,
    out: str | Path,
    fmt: str,
    tokenizer,
    *,
    probe: torch.Tensor | None = None,
    kl_threshold: float = 1e-4,
    mxfp4_rule: str = "gpt-oss",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    report: dict | None = None,
) -> Path:
    """hf.export_model for the base checkpoint directory `base` + `source`, a layer at a time: the same
    files, merge check (refuses with ExportRefused, nothing written) and export_report.json (plus
    "streaming": true). Atomic: a staging directory renamed into place."""
    out = export_target(out, fmt, overwrite)
    reader = CheckpointReader(base)
    if fmt == "mxfp4":
        _check_mxfp4_divisible(reader.config, "export")
    layers = _Layers(reader, source)  # before _Probe: it settles the config
    probe = probe_batch(tokenizer) if probe is None else probe
    record = report_header(fmt, mxfp4_rule)
    with staged(out, overwrite) as staging:
        staging.mkdir()
        probe_run = _Probe(reader.config, probe)
        logits, digests = _write_streamed(layers, staging, fmt, mxfp4_rule, max_shard_bytes, probe_run)
        if layers.adapter is not None:
            streams = (logits[s] for s in ("base_plus_adapter", "merged", "base", "without_expert_deltas"))
            record["merge_check"] = merge_verdict(*streams, kl_threshold)
        write_tokenizer_files(staging, tokenizer, reader.config.max_position_embeddings)
        _check_written(staging, fmt, digests)
        record["kl_export_vs_merged_float32"] = next_token_kl(logits["merged"], logits["export"])
        if layers.adapter is not None:
            record["kl_export_vs_base_plus_adapter"] = next_token_kl(logits["base_plus_adapter"], logits["export"])
        record["streaming"] = True
        finish_report(staging, record, report)
    return out

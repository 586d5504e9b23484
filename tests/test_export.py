"""Export: LoRA merge (against PEFT's merge_and_unload), the merge check that refuses lost expert deltas,
MXFP4 / bf16 / NVFP4 directories loaded back by transformers with our logits, generation_config, the
Harmony chat template against our codec, adapter-only output, `rustforge export` on a run directory, and
the streaming export (layer by layer): the same files byte for byte, the same check and refusals, its
peak host memory."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GptOssForCausalLM,
)

from rustforge.config import LoraConfig
from rustforge.data.harmony import render_conversation, render_prompt
from rustforge.data.tokenizer import train_tiny_tokenizer
from rustforge.export import nvfp4
from rustforge.export.hf import (
    ExportRefused,
    export_adapter,
    export_model,
    generation_config,
    load_export,
    lora_reference,
    next_token_kl,
    next_token_logits,
    probe_batch,
    write_tokenizer_files,
)
from rustforge.export.streaming import adapter_source, export_streaming
from rustforge.model.loader import (
    MXFP4_MODULES_TO_NOT_CONVERT,
    load_gptoss,
    write_gptoss,
)
from rustforge.model.lora import (
    apply_lora,
    merge_adapter,
    merge_lora,
    read_peft_adapter,
    save_adapter,
)
from rustforge.model.presets import get_preset, hf_config
from rustforge.model.quant import mxfp4_fake_quantize_values
from rustforge.rust.tools import tool_definitions
from rustforge.rust.trajectories import openai_to_conversation

RUST = [
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "use std::collections::HashMap;\npub struct Cache { map: HashMap<String, usize> }\n",
    "impl Cache {\n    pub fn get(&self, k: &str) -> Option<&usize> { self.map.get(k) }\n}\n",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, plain base, adapter dir) on a 2-layer tiny gpt-oss with a random LoRA on every target."""
    tokenizer = train_tiny_tokenizer(RUST * 4, 320)
    cfg = hf_config(get_preset("tiny"), vocab_size=tokenizer.vocab_size)
    cfg.num_hidden_layers, cfg.layer_types = 2, cfg.layer_types[:2]
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    base = GptOssForCausalLM(cfg).float().eval()
    with_lora = copy.deepcopy(base)
    lora_cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(with_lora, lora_cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in with_lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = save_adapter(with_lora, lora_cfg, tmp_path_factory.mktemp("adapter") / "adapter")
    return tokenizer, base, adapter


@pytest.fixture(scope="module")
def merged(setup):
    _, base, adapter = setup
    model = copy.deepcopy(base)
    merge_adapter(model, adapter)
    return model


@pytest.fixture(scope="module")
def reference(setup):
    _, base, adapter = setup
    return lora_reference(base, adapter)


@pytest.fixture(scope="module")
def exports(setup, merged, reference, tmp_path_factory):
    tokenizer = setup[0]
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export_model(merged, root / fmt, fmt, tokenizer, reference=reference) for fmt in ("mxfp4", "bf16", "nvfp4")}


def _probe(setup):
    return probe_batch(setup[0], tokens=96)


# ------------------------------------------------------------------------------------------- merge
def test_merge_adapter_equals_peft_merge_and_unload(setup, merged):
    _, base, adapter = setup
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload()
    ours = merged.state_dict()
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    expert = "model.layers.1.mlp.experts.down_proj"
    assert not torch.allclose(ours[expert], base.state_dict()[expert])  # the expert deltas are in


def test_merged_model_computes_base_plus_adapter(setup, merged, reference):
    probe = _probe(setup)
    assert next_token_kl(next_token_logits(reference, probe), next_token_logits(merged, probe)) < 1e-9
    # and merging our in-memory LoRA modules (the QAT path) gives the same model
    _, base, adapter = setup
    in_memory = lora_reference(base, adapter)
    torch.testing.assert_close(next_token_logits(merge_lora(in_memory), probe), next_token_logits(merged, probe))


def test_merge_rejects_an_adapter_for_another_model(setup, tmp_path):
    tensors, config = read_peft_adapter(setup[2])
    key = next(k for k in tensors if k.endswith("experts.lora_B.weight"))
    tensors[key] = tensors[key][:-1]
    with pytest.raises(ValueError, match="delta for model.layers.*down_proj has shape"):
        merge_adapter(copy.deepcopy(setup[1]), (tensors, config))


# ------------------------------------------------------------------------------ the merge check
def _without_expert_deltas(setup) -> GptOssForCausalLM:
    _, base, adapter = setup
    tensors, config = read_peft_adapter(adapter)
    attention_only = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    model = copy.deepcopy(base)
    merge_adapter(model, (attention_only, config))
    return model


def test_export_refuses_a_merge_that_lost_the_expert_deltas(setup, reference, tmp_path):
    tokenizer = setup[0]
    with pytest.raises(ExportRefused, match=r"expert \(MoE\) LoRA deltas were lost.*Nothing was written"):
        export_model(_without_expert_deltas(setup), tmp_path / "out", "mxfp4", tokenizer, reference=reference)
    with pytest.raises(ExportRefused, match="every LoRA delta was lost"):
        export_model(copy.deepcopy(setup[1]), tmp_path / "out", "bf16", tokenizer, reference=reference)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory left behind


def test_merge_check_report_and_its_margin(exports):
    report = json.loads((exports["mxfp4"] / "export_report.json").read_text())
    check = report["merge_check"]
    assert check["kl_merged_vs_base_plus_adapter"] < 1e-9
    # the check can see what it guards: losing the expert deltas costs far more than the threshold
    assert check["kl_expert_deltas_effect"] > 100 * check["kl_threshold"]
    assert report["mxfp4_rounding"] == "gpt-oss" and report["versions"]["transformers"]
    assert 0 < report["kl_export_vs_base_plus_adapter"] < 1.0


# ------------------------------------------------------------------------------------- formats
def test_mxfp4_export_layout_and_transformers_logits(setup, merged, exports):
    directory = exports["mxfp4"]
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"] == {
        "modules_to_not_convert": MXFP4_MODULES_TO_NOT_CONVERT,
        "quant_method": "mxfp4",
    }
    with safe_open(directory / "model.safetensors", "pt") as f:
        blocks = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")
        scales = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_scales")
        stored = f.keys()
        assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert blocks.dtype == scales.dtype == torch.uint8 and blocks.shape == (8, 512, 8, 16)
    # the stored experts are the merged float32 weights under the gpt-oss rounding rule, [E, out, in]
    weight = merged.model.layers[0].mlp.experts.gate_up_proj.detach()
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)  # dequantised on CPU
    assert type(theirs.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    expected = mxfp4_fake_quantize_values(weight.transpose(1, 2), scale_rounding="gpt-oss").transpose(1, 2)
    assert torch.equal(theirs.model.layers[0].mlp.experts.gate_up_proj.detach(), expected)
    probe = _probe(setup)
    assert torch.equal(next_token_logits(theirs, probe), next_token_logits(load_export(directory), probe))


def test_bf16_export_is_a_plain_gpt_oss_checkpoint(setup, merged, exports):
    directory = exports["bf16"]
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    theirs = GptOssForCausalLM.from_pretrained(directory, dtype=torch.float32)
    rounded = copy.deepcopy(merged)
    for p in rounded.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    probe = _probe(setup)
    torch.testing.assert_close(next_token_logits(theirs, probe), next_token_logits(rounded, probe), rtol=1e-4, atol=1e-4)


def test_nvfp4_export_round_trip(setup, merged, exports):
    directory = exports["nvfp4"]
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["quant_method"] == "rustforge_nvfp4"
    name = "model.layers.1.mlp.experts.down_proj"
    with safe_open(directory / "model.safetensors", "pt") as f:
        blocks, scales, global_scale = (f.get_tensor(name + s) for s in nvfp4.SUFFIXES)
    assert blocks.dtype == torch.uint8 and blocks.shape == (8, 256, 16, 8)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (8, 256, 16) and global_scale.shape == (8,)
    weight = merged.state_dict()[name]
    # per-expert tensor scale: amax_e / (6 * 448)
    torch.testing.assert_close(global_scale, weight.abs().amax(dim=(1, 2)) / 2688)
    loaded = load_export(directory)
    assert torch.equal(loaded.state_dict()[name], nvfp4.fake_quantized_experts(weight))
    err = (loaded.state_dict()[name] - weight).square().mean() / weight.square().mean()
    assert err < 0.02


def test_quantised_exports_cost_more_kl_than_bf16(exports):
    kl = {fmt: json.loads((d / "export_report.json").read_text())["kl_export_vs_merged_float32"] for fmt, d in exports.items()}
    assert 5 * kl["bf16"] < min(kl["mxfp4"], kl["nvfp4"]), kl


# --------------------------------------------------------------- tokenizer, template, generation
def test_generation_config_stops_at_return_call_and_endoftext(setup, exports):
    tokenizer = setup[0]
    loaded = GenerationConfig.from_pretrained(exports["mxfp4"])
    assert loaded.eos_token_id == [tokenizer.return_id, tokenizer.endoftext_id, tokenizer.call_id]
    assert loaded.pad_token_id == tokenizer.endoftext_id and loaded.bos_token_id == tokenizer.startoftext_id
    assert generation_config(tokenizer)["eos_token_id"][0] == tokenizer.token_to_id("<|return|>")


AGENT_CHAT = {
    "messages": [
        {"role": "system", "content": "Fix the failing test."},
        {"role": "user", "content": "cargo test fails in src/lib.rs"},
        {"role": "assistant", "reasoning_content": "Read the file first.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": {"path": "src/lib.rs"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "pub fn add(a: i32, b: i32) -> i32 { a - b }"},
        {"role": "assistant", "content": "I will patch it.", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "cargo_test", "arguments": {"test_name": "add"}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "test result: ok. 1 passed"},
        {"role": "assistant", "reasoning_content": "Tests pass.", "content": "Fixed: `a + b`."},
    ],
    "tools": [{"type": "function", "function": t} for t in tool_definitions()],
}

SCHEMA_TOOL = {"name": "search", "description": "Search.\nSecond line", "parameters": {
    "type": "object", "description": "options", "required": ["mode", "nested"], "properties": {
        "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast", "description": "how"},
        "limit": {"type": "integer", "default": 10},
        "tags": {"type": "array", "items": {"type": "string"}, "title": "Tags", "examples": ["a", "b"]},
        "when": {"type": ["string", "integer", "null"]},
        "opt": {"type": "string", "nullable": True, "default": "x"},
        "nested": {"type": "object", "properties": {"deep": {"type": "boolean"}}, "required": ["deep"]},
        "choice": {"description": "either", "oneOf": [{"type": "string", "description": "a name"},
                                                       {"type": "number", "default": 3}]},
        "anything": {},
    }}}  # fmt: skip


@pytest.fixture(scope="module")
def hf_tokenizer(setup, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(directory, setup[0], 4096)
    return AutoTokenizer.from_pretrained(directory)


def test_chat_template_renders_training_conversations_as_our_harmony_codec(setup, hf_tokenizer):
    tokenizer = setup[0]
    ours = render_conversation(openai_to_conversation(AGENT_CHAT), tokenizer)
    theirs = hf_tokenizer.apply_chat_template(AGENT_CHAT["messages"], tools=AGENT_CHAT["tools"], tokenize=False)
    assert theirs == ours.text and theirs.endswith("<|return|>")
    assert hf_tokenizer(theirs, add_special_tokens=False).input_ids == ours.ids  # token for token, too
    tools = [{"type": "function", "function": SCHEMA_TOOL}]
    chat = [{"role": "user", "content": [{"type": "text", "text": "find it"}]}, {"role": "assistant", "content": "ok"}]
    ours = render_conversation(openai_to_conversation({"messages": chat, "tools": tools}, reasoning_effort="high"), tokenizer)
    assert hf_tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, reasoning_effort="high") == ours.text


def test_chat_template_generation_prompt_drops_finished_reasoning(setup, hf_tokenizer):
    tokenizer = setup[0]
    messages = AGENT_CHAT["messages"] + [{"role": "user", "content": "Now add a test."}]
    conv = openai_to_conversation({"messages": messages + [{"role": "assistant", "content": "-"}], "tools": AGENT_CHAT["tools"]})
    conv.messages.pop()
    expected = tokenizer.decode(render_prompt(conv, tokenizer))
    theirs = hf_tokenizer.apply_chat_template(messages, tools=AGENT_CHAT["tools"], tokenize=False, add_generation_prompt=True)
    assert theirs == expected and theirs.endswith("<|start|>assistant")
    assert "Read the file first." not in theirs and "Tests pass." not in theirs


# -------------------------------------------------------------------------------- adapter output
def test_adapter_export_serves_base_plus_lora_in_peft(setup, reference, tmp_path):
    tokenizer, base, adapter = setup
    out = export_adapter(adapter, tmp_path / "adapter", tokenizer, base, base_model_name="openai/gpt-oss-20b")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "openai/gpt-oss-20b"
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    probe = _probe(setup)
    torch.testing.assert_close(next_token_logits(served, probe), next_token_logits(reference, probe), rtol=1e-4, atol=1e-4)


def test_export_does_not_overwrite_unless_asked(setup, merged, tmp_path):
    tokenizer = setup[0]
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        export_model(merged, out, "bf16", tokenizer)
    export_model(merged, out, "bf16", tokenizer, overwrite=True)
    assert not (out / "keep").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------------------- a whole run
def test_rustforge_export_on_a_run_directory(setup, tmp_path):
    from rustforge.cli import main

    tokenizer, base, adapter = setup
    run = tmp_path / "run"
    write_gptoss(base, run / "base", "bf16", dtype=torch.float32)
    tokenizer.save(run / "base")
    (run / "lang_rust").mkdir()
    import shutil

    shutil.copytree(adapter, run / "lang_rust" / "adapter")
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {run}\nexport:\n  probe_tokens: 64\n")
    assert main(["export", "--config", str(config), "--format", "mxfp4"]) == 0
    report = json.loads((run / "export" / "mxfp4" / "export_report.json").read_text())
    assert report["source"] == str(run / "lang_rust" / "adapter") and report["merge_check"]["kl_merged_vs_base_plus_adapter"] < 1e-9
    assert main(["export", "--config", str(config), "--format", "adapter", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------- streaming export
SMALL_SHARDS = 300_000  # bytes: several shards and an index even for the tiny model


@pytest.fixture(scope="module")
def streamed(setup, tmp_path_factory):
    """{fmt: (in-memory export, streamed export)} of the tiny model over an MXFP4 base checkpoint, with a probe
    whose rows are longer than the sliding window (80 tokens > 64)."""
    tokenizer, base, adapter = setup
    root = tmp_path_factory.mktemp("streamed")
    write_gptoss(base, root / "base", "mxfp4")
    probe = probe_batch(tokenizer, tokens=160)
    loaded = load_gptoss(root / "base")
    reference = lora_reference(loaded, adapter)
    merged = copy.deepcopy(loaded)
    merge_adapter(merged, adapter)
    out = {}
    for fmt in ("mxfp4", "bf16", "nvfp4"):
        in_memory = export_model(merged, root / f"memory-{fmt}", fmt, tokenizer, reference=reference, probe=probe,
                                 max_shard_bytes=SMALL_SHARDS)  # fmt: skip
        stream = export_streaming(root / "base", adapter_source(adapter)[0], root / f"stream-{fmt}", fmt, tokenizer,
                                  probe=probe, max_shard_bytes=SMALL_SHARDS)  # fmt: skip
        out[fmt] = (in_memory, stream)
    return out


def _stored(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            names = f.keys()
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors


@pytest.mark.parametrize("fmt", ["mxfp4", "bf16", "nvfp4"])
def test_streaming_export_writes_the_same_files(streamed, fmt):
    in_memory, stream = streamed[fmt]
    ours, theirs = _stored(stream), _stored(in_memory)
    assert list(ours) and sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():  # tensor by tensor, bit for bit
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].view(torch.uint8), tensor.view(torch.uint8)), name
    files = sorted(p.name for p in in_memory.iterdir())
    assert files == sorted(p.name for p in stream.iterdir()) and "model.safetensors.index.json" in files
    for file in files:  # shards, index, config.json, tokenizer files: byte for byte
        if file != "export_report.json":
            assert (stream / file).read_bytes() == (in_memory / file).read_bytes(), file


def test_streamed_merge_check_and_report_equal_the_in_memory_ones(streamed):
    for fmt, (in_memory, stream) in streamed.items():
        theirs = json.loads((in_memory / "export_report.json").read_text())
        ours = json.loads((stream / "export_report.json").read_text())
        assert ours.pop("streaming") is True and ours.keys() == theirs.keys()
        assert ours["merge_check"].keys() == theirs["merge_check"].keys()
        for key, value in theirs["merge_check"].items():
            assert ours["merge_check"][key] == pytest.approx(value, abs=1e-6), (fmt, key)
        assert ours["merge_check"]["kl_expert_deltas_effect"] > 100 * ours["merge_check"]["kl_threshold"]
        for key in ("kl_export_vs_merged_float32", "kl_export_vs_base_plus_adapter"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (fmt, key)


def test_streaming_refuses_a_merge_that_lost_the_expert_deltas(setup, streamed, tmp_path, monkeypatch):
    from rustforge.export import streaming

    tokenizer, _, adapter = setup
    base = streamed["bf16"][1].parent / "base"
    real = streaming.iter_peft_deltas

    def without_experts(*args, **kwargs):  # the classic bug: a merge that ignores target_parameters
        return ((n, d) for n, d in real(*args, **kwargs) if ".mlp.experts." not in n)

    monkeypatch.setattr(streaming, "iter_peft_deltas", without_experts)
    with pytest.raises(ExportRefused, match=r"expert \(MoE\) LoRA deltas were lost.*Nothing was written"):
        export_streaming(base, adapter_source(adapter)[0], tmp_path / "out", "mxfp4", tokenizer)
    monkeypatch.setattr(streaming, "iter_peft_deltas", lambda *args, **kwargs: iter(()))
    with pytest.raises(ExportRefused, match="every LoRA delta was lost"):
        export_streaming(base, adapter_source(adapter)[0], tmp_path / "out", "bf16", tokenizer)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory left behind


def test_streaming_is_chosen_from_one_billion_parameters():
    from rustforge.export.streaming import should_stream
    from rustforge.model.loader import parameter_count

    big, tiny = hf_config(get_preset("gpt-oss-20b")), hf_config(get_preset("tiny"))
    assert 20.5e9 < parameter_count(big) < 21.5e9  # gpt-oss-20b: 20.9B parameters
    assert should_stream("auto", big) and not should_stream("auto", tiny)
    assert should_stream(True, tiny) and not should_stream(False, big)


def test_shard_writer_refuses_what_the_plan_does_not_hold(tmp_path):
    from rustforge.model.shards import PlannedTensor, ShardWriter

    plan = [[PlannedTensor("a", torch.bfloat16, (2, 3)), PlannedTensor("b", torch.uint8, (4,))]]
    writer = ShardWriter(tmp_path, plan)
    with pytest.raises(ValueError, match="a is torch.float32"):
        writer.put("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not part of the planned"):
        writer.put("c", torch.zeros(4, dtype=torch.uint8))
    writer.put("a", torch.ones(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="never written, e.g. b"):
        writer.close()


@pytest.mark.parametrize("source", ["stage", "qat-lora", "qat-experts"])
def test_rustforge_export_streams_a_run_to_the_same_files(setup, tmp_path, source):
    """export_run with export.streaming true and false: a stage adapter, and a QAT result of either kind."""
    import shutil

    from safetensors.torch import save_file

    from rustforge.config import load_config
    from rustforge.export.hf import export_run
    from rustforge.model.loader import expert_names
    from rustforge.train import qat

    tokenizer, base, adapter = setup
    run = tmp_path / "run"
    write_gptoss(base, run / "base", "bf16", dtype=torch.float32)
    tokenizer.save(run / "base")
    shutil.copytree(adapter, run / "lang_rust" / "adapter")
    final = run / qat.STAGE / qat.FINAL_DIR
    if source != "stage":
        trainable = source.removeprefix("qat-")
        final.mkdir(parents=True)
        info = {"source_adapter": str(run / "lang_rust" / "adapter"), "trainable": trainable, "format": "mxfp4"}
        (final / qat.INFO_NAME).write_text(json.dumps(info))
        if trainable == "lora":  # any PEFT adapter over the start exercises the path
            shutil.copytree(adapter, final / "adapter")
        else:
            gen = torch.Generator().manual_seed(2)
            state = base.state_dict()
            noise = {n: 0.01 * torch.randn(state[n].shape, generator=gen) for n in expert_names(base.config)}
            stacks = {n: state[n] + delta for n, delta in noise.items()}
            save_file(stacks, str(final / qat.EXPERTS_FILE))
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {run}\nexport:\n  probe_tokens: 64\n")
    in_memory = export_run(load_config(config, ["export.streaming=false"]), "bf16", tmp_path / "memory")
    stream = export_run(load_config(config, ["export.streaming=true"]), "bf16", tmp_path / "stream")
    files = sorted(p.name for p in in_memory.iterdir())
    assert files == sorted(p.name for p in stream.iterdir())
    for file in files:
        if file != "export_report.json":
            assert (stream / file).read_bytes() == (in_memory / file).read_bytes(), file
    theirs = json.loads((in_memory / "export_report.json").read_text())
    ours = json.loads((stream / "export_report.json").read_text())
    assert ours["streaming"] is True and "streaming" not in theirs and ours["source"] == theirs["source"]
    assert ("merge_check" in ours) == (source != "qat-experts") == ("merge_check" in theirs)
    assert ours["kl_export_vs_merged_float32"] == pytest.approx(theirs["kl_export_vs_merged_float32"], abs=1e-6)


# The child process of the memory test: the streamed export alone, its peak RSS growth as JSON. glibc is told
# to mmap every allocation from 1 MB up, so that freed tensors leave the process and the peak measures the
# tensors alive at once, not whatever heap glibc keeps for reuse.
_MEASURE_CHILD = """
import json, sys
from pathlib import Path
from rustforge.data.tokenizer import load_tokenizer
from rustforge.export.hf import probe_batch
from rustforge.export.streaming import adapter_source, export_streaming

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

root = Path(sys.argv[1])
tokenizer = load_tokenizer(root / "base")
growth = {}
for run in ("first", "second"):  # the first also pays the process's one-time costs (lazy imports, workspaces)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    start = status("VmRSS")
    export_streaming(root / "base", adapter_source(root / "adapter")[0], root / run, "bf16", tokenizer,
                     probe=probe_batch(tokenizer, tokens=128), max_shard_bytes=30_000_000)
    growth[run] = status("VmHWM") - start
print(json.dumps(growth))
"""


def test_streaming_holds_under_two_layers_of_float32(setup, tmp_path):
    """Peak RSS growth of a streamed export of a 4-layer model with ~100 MB float32 layers (16 experts of
    hidden 512, intermediate 1024), in a child process: between one and two layers, where the in-memory
    flow holds three float32 copies of the whole model (4 layers each)."""
    import os
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no resettable peak RSS (/proc/self/clear_refs) here")
    tokenizer = setup[0]
    cfg = hf_config(get_preset("tiny"), vocab_size=tokenizer.vocab_size)
    cfg.num_hidden_layers, cfg.layer_types = 4, cfg.layer_types[:4]
    cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts = 512, 1024, 16
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    write_gptoss(model, tmp_path / "base", "bf16")
    tokenizer.save(tmp_path / "base")
    lora_cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(model, lora_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.02)
    save_adapter(model, lora_cfg, tmp_path / "adapter")
    layer_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and "lora_" not in n)
    model_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    del model
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    child = subprocess.run([sys.executable, "-c", _MEASURE_CHILD, str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=120, check=False)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    report = json.loads((tmp_path / "second" / "export_report.json").read_text())
    assert report["merge_check"]["kl_merged_vs_base_plus_adapter"] < 1e-9
    print(f"streamed export: peak RSS growth {measured['second'] / 2**20:.0f} MiB = "
          f"{measured['second'] / layer_bytes:.2f} float32 layers of {layer_bytes / 2**20:.0f} MiB (first run in the "
          f"process {measured['first'] / 2**20:.0f} MiB; model {model_bytes / 2**20:.0f} MiB)")  # fmt: skip
    assert model_bytes > 3.5 * layer_bytes  # so the bound below tells the two flows apart
    assert layer_bytes < measured["second"] < 2 * layer_bytes, measured
    assert measured["first"] < 2.5 * layer_bytes, measured

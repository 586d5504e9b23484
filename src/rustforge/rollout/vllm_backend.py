"""vLLM as an optional rollout backend with RolloutEngine's interface (`generate(prompts, params, on_stop,
streams)` -> list[Completion]).

vLLM is imported only when a VllmEngine is built, and a clear error says so when it is not installed
(`rollout.backend: rustforge` needs nothing extra). It serves the base checkpoint directory with the
current LoRA adapter as a LoRARequest (`load_adapter(dir)` after each save: vLLM reads PEFT adapters,
which is the format rustforge saves). Multi-turn: vLLM has no pause/continue, so after each round the
sequences that stopped are handed to `on_stop`, continued ones are resubmitted as prompt + output +
extension (vLLM's prefix caching keeps the re-prefill cheap), until none continues.
Sampling streams map to vLLM's per-request seed (seed + stream), so results are reproducible per
request but are not the same tokens as RolloutEngine's counter-based sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from rustforge.rollout.engine import Completion, SequenceState
from rustforge.rollout.sampling import SamplingParams

INSTALL_HINT = "vllm is not installed: `pip install vllm` on the GPU machine, or set rollout.backend: rustforge"


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    return vllm


class VllmEngine:
    def __init__(
        self,
        model_dir: str,
        *,
        max_batch: int = 64,
        max_len: int = 4096,
        stop_ids: Sequence[int] = (),
        gpu_memory_utilization: float = 0.5,
        max_lora_rank: int = 64,
        **llm_kwargs,
    ):
        vllm = _import_vllm()
        self.vllm = vllm
        self.max_len, self.stop_ids = max_len, tuple(stop_ids)
        self.llm = vllm.LLM(
            model=str(model_dir),
            max_num_seqs=max_batch,
            max_model_len=max_len,
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            enable_prefix_caching=True,
            gpu_memory_utilization=gpu_memory_utilization,
            **llm_kwargs,
        )
        self.lora_request = None
        self._adapter_version = 0

    def load_adapter(self, adapter_dir: str | None) -> None:
        """Serve `adapter_dir` (a PEFT adapter) from now on; None = the base model."""
        if adapter_dir is None:
            self.lora_request = None
            return
        from vllm.lora.request import LoRARequest

        self._adapter_version += 1  # a new id: vLLM caches adapters by id
        self.lora_request = LoRARequest(f"rustforge-{self._adapter_version}", self._adapter_version, str(adapter_dir))

    def release(self) -> None:
        pass  # vLLM keeps its memory; its gpu_memory_utilization bounds it

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        on_stop=None,
        streams: Sequence[int] | None = None,
        stop_ids: Sequence[int] | None = None,
    ) -> list[Completion]:
        streams = list(range(len(prompts))) if streams is None else list(streams)
        stops = list(self.stop_ids if stop_ids is None else stop_ids)
        states = [
            SequenceState(i, streams[i], list(p), len(p), params.max_new_tokens, self.max_len) for i, p in enumerate(prompts)
        ]
        pending = list(states)
        while pending:
            outputs = self.llm.generate(
                [{"prompt_token_ids": s.ids} for s in pending],
                [self._sampling(params, s, stops) for s in pending],
                lora_request=self.lora_request,
                use_tqdm=False,
            )
            waiting = []
            for state, out in zip(pending, outputs):
                result = out.outputs[0]
                lps = result.logprobs or [None] * len(result.token_ids)
                for token, lp in zip(result.token_ids, lps):
                    state.ids.append(int(token))
                    state.sampled_mask.append(1)
                    state.logprobs.append(float(lp[token].logprob) if lp else 0.0)
                    state.new_tokens += 1
                if state.ids[-1] in stops and on_stop is not None:
                    waiting.append((state, on_stop(state)))
                else:
                    state.finish_reason = "stop" if state.ids[-1] in stops else self._limit_reason(state)
            pending = []
            for state, extension in waiting:
                extension = extension.result() if isinstance(extension, Future) else extension
                if extension is None:
                    state.finish_reason = "stop"
                    continue
                room = self.max_len - len(state.ids)
                state.ids += list(extension)[:room]
                state.sampled_mask += [0] * min(room, len(extension))
                state.logprobs += [0.0] * min(room, len(extension))
                state.turns += 1
                if len(extension) >= room:
                    state.finish_reason = "max_len"
                elif state.new_tokens >= state.max_new_tokens:
                    state.finish_reason = "length"
                else:
                    pending.append(state)
        return [
            Completion(s.ids[: s.prompt_len], s.ids[s.prompt_len :], s.sampled_mask, s.logprobs, s.finish_reason, s.turns)
            for s in states
        ]

    def _sampling(self, params: SamplingParams, state: SequenceState, stops: list[int]):
        return self.vllm.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=max(1, state.budget_left),
            stop_token_ids=stops,
            seed=params.seed * 1_000_003 + state.stream + 7919 * state.turns,
            logprobs=0,
        )

    @staticmethod
    def _limit_reason(state: SequenceState) -> str:
        return "length" if state.new_tokens >= state.max_new_tokens else "max_len"


__all__ = ["INSTALL_HINT", "VllmEngine"]

"""Stage 4, grpo: Group Relative Policy Optimization on agent episodes with real tools and rewards.

Each step (one generation round): `prompts_per_step` prompts from the environment (rollout/environments.py:
mined Rust tasks with tools and cargo rewards, or the format-only reward), `num_generations` (G) episodes
each from the rollout engine (rollout/engine.py, sharing the training weights: no weight sync; multi-turn
tool calls run in the sandbox through rollout/multiturn.py), scores from the reward pool, then
`num_iterations` optimizer updates on the round. The math is TRL's GRPOTrainer (same names):

    A_i      = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     scale_rewards: group | batch | none
    ratio_t  = exp(log pi(t) - log pi_old(t))                      pi_old = the policy that sampled the round
    loss_t   = -min(ratio_t * A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * KL_t
    KL_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          ref = the LoRA-disabled model (k3)
    grpo:    mean over sequences of each sequence's token mean
    dr_grpo: sum over tokens / (sequences * max_completion_length)
    dapo:    sum over tokens / tokens in the round

Every formula is a weighted token sum (`token_weights`), so micro-batching is exact: the round's episodes
are packed as documents (first-fit decreasing, doc ids keep them apart) into rows of at most the phase's
seq_len, rows are grouped into micro-batches of ~micro_batch_tokens (halved and retried on CUDA OOM),
and log-probs come from RustforgeModel.token_logprobs (the chunked path: no [tokens x vocab] logits),
at the sampling temperature as TRL does. With num_iterations = 1 pi_old is the current policy (ratio 1,
its gradient the policy gradient); above 1, pi_old's log-probs are computed once per round.

Loss masks: only tokens the model sampled are trained -- the prompt, the tool outputs the environment
appended and the `<|start|>assistant` after them are context (rollout's sampled_mask). With
mask_truncated_completions, episodes cut by a budget get no loss (DAPO).

Under torchrun (FSDP2, train/distributed.py): rollouts are data-parallel -- each rank generates whole groups
(its block of the step's prompts) on the gathered full weights, sampling streams = the episodes' global
indices, and scores them in its own environment (reward pool of grpo.reward_workers / world size workers,
tool threads likewise: the configured counts are the host's); the episodes are then exchanged, so every
rank holds the single-process round, its advantages and token weights. Each rank trains on a round-robin
share of the round's micro-batches; the ranks' gradient sum is the single-process gradient.

Metrics per step: reward mean/std and per reward part, pass rate, Harmony compliance, endless-reasoning
rate, completion lengths, tool calls, groups with zero reward std, KL to the reference, clip fractions
(low/high/region as TRL), rollout and train tokens/s, peak memory, micro-batch tokens. Held-out episodes
(greedy by default) at step 0 and every eval_every give the before/after row (`summary`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rustforge.config import GrpoConfig, RolloutConfig, RunConfig
from rustforge.data.packing import IGNORE_INDEX
from rustforge.model.lora import lora_disabled
from rustforge.data.harmony import assistant_stop_ids
from rustforge.rollout.engine import EngineStats, RolloutEngine
from rustforge.rollout.environments import Prompt, Score
from rustforge.rollout.multiturn import EpisodeResult, run_episodes
from rustforge.rollout.sampling import SamplingParams
from rustforge.train import distributed
from rustforge.train.sft import BatchSource, SFTTrainer, StageData, finish_stage, lr_at, start_stage

log = logging.getLogger(__name__)

STAGE = "grpo"
PREVIOUS_STAGE = "ipo"
ADVANTAGE_EPS = 1e-4  # TRL's
MAX_OOM_RETRIES = 6


# ---------------------------------------------------------------------------------------- the loss
def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """Advantages of rewards laid out group after group ([P * G]): reward minus its group's mean, divided
    by the group's std (TRL: torch.std, unbiased), the whole batch's std, or nothing."""
    if rewards.numel() % group_size:
        raise ValueError(f"grpo: {rewards.numel()} rewards are not groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        return advantages / (grouped.std(dim=1).repeat_interleave(group_size) + ADVANTAGE_EPS)
    if scale_rewards == "batch":
        return advantages / (rewards.std() + ADVANTAGE_EPS)
    if scale_rewards == "none":
        return advantages
    raise ValueError(f"grpo.scale_rewards: unknown {scale_rewards!r}")


def token_weights(trained_tokens: Tensor, loss_type: str, max_completion_length: int) -> Tensor:
    """The weight of each trained token of sequence i ([N]), such that loss = sum_t weight * loss_t."""
    n = trained_tokens.numel()
    counts = trained_tokens.to(torch.float64)
    if loss_type == "grpo":
        return 1.0 / (n * counts.clamp(min=1))
    if loss_type == "dr_grpo":
        return torch.full_like(counts, 1.0 / (n * max_completion_length))
    if loss_type == "dapo":
        return torch.full_like(counts, 1.0 / float(counts.sum().clamp(min=1)))
    raise ValueError(f"grpo.loss_type: unknown {loss_type!r}")


@dataclass
class TokenObjective:
    loss: Tensor  # per token, to be weighted and summed
    low_clipped: Tensor  # ratio < 1 - epsilon where the advantage is negative (TRL's clip_ratio/low)
    high_clipped: Tensor  # ratio > 1 + epsilon_high where the advantage is positive
    kl: Tensor | None


def clipped_objective(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
) -> TokenObjective:
    """TRL's per-token GRPO loss (see the module docstring); inputs broadcast elementwise."""
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        if beta:
            loss = loss + beta * kl
    return TokenObjective(loss, (ratio < 1 - epsilon) & (advantages < 0), (ratio > 1 + high) & (advantages > 0), kl)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    loss_type: str,
    epsilon: float,
    epsilon_high: float | None,
    max_completion_length: int,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
) -> Tensor:
    """The loss of one round from per-sequence tensors [N, T] (mask: trained tokens) and advantages [N];
    the trainer computes the same sum over packed micro-batches."""
    objective = clipped_objective(logp, old_logp, advantages[:, None], epsilon, epsilon_high, beta, ref_logp)
    weights = token_weights(mask.sum(dim=1), loss_type, max_completion_length).to(logp.dtype)
    return (objective.loss * mask * weights[:, None]).sum()


# ------------------------------------------------------------------------------------ the episodes
@dataclass
class Episode:
    """One scored episode as the trainer sees it. Arrays are over ids; position t is about token t + 1."""

    ids: np.ndarray  # prompt + output, int64
    trained: np.ndarray  # int8 [len(ids)]: 1 where the model sampled the token
    advantage: float
    weight: float  # token weight of this episode (token_weights)
    old_logp: np.ndarray | None = None  # float32 [len(ids)]: log pi_old(ids[t+1] | ids[:t+1])
    ref_logp: np.ndarray | None = None

    @property
    def trained_tokens(self) -> int:
        return int(self.trained[1:].sum())


def episode_arrays(result: EpisodeResult, seq_len: int, mask_truncated: bool) -> tuple[np.ndarray, np.ndarray]:
    completion = result.completion
    ids = np.asarray(completion.prompt_ids + completion.output_ids, dtype=np.int64)[:seq_len]
    trained = np.zeros(len(ids), dtype=np.int8)
    trained[len(completion.prompt_ids) :] = np.asarray(completion.sampled_mask, dtype=np.int8)[: seq_len - len(completion.prompt_ids)]
    if mask_truncated and completion.finish_reason != "stop":
        trained[:] = 0
    return ids, trained


@dataclass
class Placement:
    episode: int
    row: int
    start: int
    length: int


def _bucket(n: int, seq_len: int, pow2: bool, floor: int = 64) -> int:
    """Padded row width: a power of two (few shapes: compiled flex attention keeps one graph per shape) or
    the next multiple of 64 (CPU: eager attention pays for every padded token squared)."""
    width = 1 << (n - 1).bit_length() if pow2 else -(-n // floor) * floor
    return min(seq_len, max(floor, width))


def pack_episodes(episodes: Sequence[Episode], seq_len: int, micro_batch_tokens: int, pow2: bool = True) -> list[dict]:
    """Episodes as documents in rows of <= seq_len tokens (first-fit decreasing), rows grouped into
    micro-batches of <= micro_batch_tokens padded tokens (at least one row each; `pow2`: row widths padded
    to powers of two). Each micro-batch is a dict of tensors [B, L] (input_ids, position_ids, doc_ids,
    labels = the trained next token or -100, advantages, weights, old_logp, ref_logp) and its `placements`."""
    order = sorted(range(len(episodes)), key=lambda i: -len(episodes[i].ids))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = len(episodes[i].ids)
        if n > seq_len:
            raise ValueError(f"grpo: an episode of {n} tokens does not fit seq_len {seq_len}")
        for r in range(len(rows)):
            if used[r] + n <= seq_len:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    by_length = sorted(range(len(rows)), key=lambda r: used[r])
    batches, current = [], []
    for r in by_length:
        width = _bucket(used[r], seq_len, pow2)
        if current and (len(current) + 1) * width > micro_batch_tokens:
            batches.append(current)
            current = []
        current.append(r)
    if current:
        batches.append(current)
    return [_micro_batch([rows[r] for r in group], episodes, seq_len, pow2) for group in batches]


def _micro_batch(rows: list[list[int]], episodes: Sequence[Episode], seq_len: int, pow2: bool) -> dict:
    width = _bucket(max(sum(len(episodes[i].ids) for i in row) for row in rows), seq_len, pow2)
    shape = (len(rows), width)
    out = {
        "input_ids": np.zeros(shape, np.int64),
        "position_ids": np.zeros(shape, np.int64),
        "doc_ids": np.full(shape, -1, np.int64),
        "labels": np.full(shape, IGNORE_INDEX, np.int64),
        "advantages": np.zeros(shape, np.float32),
        "weights": np.zeros(shape, np.float64),
        "old_logp": np.zeros(shape, np.float32),
        "ref_logp": np.zeros(shape, np.float32),
    }
    placements = []
    for r, row in enumerate(rows):
        start = 0
        for doc, i in enumerate(row):
            ep, n = episodes[i], len(episodes[i].ids)
            span = slice(start, start + n)
            out["input_ids"][r, span] = ep.ids
            out["position_ids"][r, span] = np.arange(n)
            out["doc_ids"][r, span] = doc
            labels = np.where(ep.trained[1:] == 1, ep.ids[1:], IGNORE_INDEX)
            out["labels"][r, start : start + n - 1] = labels
            out["advantages"][r, span] = ep.advantage
            out["weights"][r, span] = ep.weight
            for key in ("old_logp", "ref_logp"):
                values = getattr(ep, key)
                if values is not None:
                    out[key][r, span] = values
            placements.append(Placement(i, r, start, n))
            start += n
    batch = {k: torch.from_numpy(v) for k, v in out.items()}
    batch["placements"] = placements
    return batch


# -------------------------------------------------------------------------------------- the prompts
class PromptSource(BatchSource):
    """The environment's train prompts that fit, `per_step` at a time, reshuffled each epoch by seed."""

    def __init__(self, prompts: Sequence[Prompt], per_step: int, seed: int):
        if not prompts:
            raise ValueError("grpo: no training prompts fit (check the tasks, max_prompt_length and the phase's seq_len)")
        self.prompts, self.per_step, self.seed = list(prompts), per_step, seed
        self.epoch, self.cursor = 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        picked = []
        while len(picked) < self.per_step:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order()
            picked.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return picked

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order()


def fitting_prompts(prompts: Sequence[Prompt], max_prompt_length: int, seq_len: int) -> list[Prompt]:
    """Prompts that leave room to answer: at most max_prompt_length tokens and 16 short of seq_len."""
    return [p for p in prompts if len(p.ids) <= min(max_prompt_length, seq_len - 16)]


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class Round:
    """A generation round: prompts (one per episode), episode results and their scores."""

    prompts: list[Prompt]
    results: list[EpisodeResult]
    scores: list[Score]
    rollout_s: float
    reward_s: float
    sampled_tokens: int


class GrpoTrainer(SFTTrainer):
    """SFTTrainer's loop (checkpoints, exact resume, curriculum, expert monitor, logging) with GRPO steps."""

    stage_name = "grpo"
    graphable = False  # its own train_step (not SFT's)

    def __init__(self, *args, grpo_cfg: GrpoConfig, rollout_cfg: RolloutConfig, environment, tokenizer,
                 val_prompts: Sequence[Prompt], model_dir: str | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.dist.enabled and rollout_cfg.backend == "vllm":
            raise ValueError(
                "rollout.backend = vllm does not run under torchrun (one vLLM server per rank would each need the "
                "gathered adapter and a GPU share); use rollout.backend: rustforge for distributed grpo"
            )
        self.grpo, self.rollout_cfg, self.env, self.tokenizer = grpo_cfg, rollout_cfg, environment, tokenizer
        self.val_prompts = list(val_prompts)
        self.model_dir = model_dir
        self.micro_tokens = grpo_cfg.micro_batch_tokens
        self.engine = None
        # the configured number is for the host: under torchrun each rank runs its share of the tool calls
        workers = max(1, rollout_cfg.tool_workers // self.dist.world_size)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tool")
        self.stop_ids = assistant_stop_ids(tokenizer) + ([tokenizer.end_id] if rollout_cfg.stop_on_end else [])

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.engine is not None:
            self.engine.release()

    # ------------------------------------------------------------------------------ rollouts
    def seq_len(self) -> int:
        return self.cfg.phases[max(self.phase, 0)].seq_len

    def _engine(self, max_len: int):
        if self.engine is None or self.engine.max_len != max_len:
            if self.engine is not None:
                self.engine.release()
            self.engine = make_engine(self.model, self.rollout_cfg, max_len, self.stop_ids, self.model_dir)
        if hasattr(self.engine, "load_adapter"):  # vLLM serves the adapter from disk
            from rustforge.model.lora import save_adapter

            adapter = self.stage_dir / "rollout_adapter"
            save_adapter(self.model.hf, self.lora_cfg, adapter)
            self.engine.load_adapter(str(adapter))
        return self.engine

    def rollout(self, prompts: Sequence[Prompt], generations: int, params: SamplingParams, seq_len: int) -> Round:
        """generations episodes per prompt (context seq_len), laid out group after group, scored by the
        environment.

        Under torchrun, data-parallel: each rank runs whole groups (its block of the prompts, so no group is
        split) on the gathered full weights, with the episodes' global indices as sampling streams (each
        samples the tokens it would in one process), and scores them with its own environment (its share of
        the reward workers); then the ranks exchange their episodes, so every rank holds the whole round,
        in the single-process order, and computes the same advantages."""
        block = self.dist.share(len(prompts))
        local = [prompts[i] for i in block for _ in range(generations)]
        streams = list(range(block.start * generations, block.stop * generations))
        t0 = time.perf_counter()
        sessions = [self.env.open(p) for p in local]
        try:
            with distributed.full_weights(self.model):  # a collective: entered by every rank, even an idle one
                results = self._run_episodes(local, sessions, params, seq_len, streams)
            t1 = time.perf_counter()
            scores = self.env.score(local, results, sessions) if local else []
        finally:
            for session in sessions:
                session.close()
        parts = self.dist.all_gather_object((results, scores, t1 - t0, time.perf_counter() - t1))
        results = [r for part in parts for r in part[0]]
        scores = [sc for part in parts for sc in part[1]]
        per_episode = [p for p in prompts for _ in range(generations)]
        sampled = sum(r.completion.num_sampled for r in results)
        # the slowest rank's times: the round's wall time, so rollout_tok_s is the throughput of all ranks
        return Round(per_episode, results, scores, max(p[2] for p in parts), max(p[3] for p in parts), sampled)

    def _run_episodes(self, prompts: list[Prompt], sessions, params: SamplingParams, seq_len: int, streams):
        if not prompts:
            return []
        engine = self._engine(seq_len)
        if isinstance(engine, RolloutEngine):
            engine.stats = EngineStats()  # this round's decode rate
        results = run_episodes(
            engine, [p.ids for p in prompts], [s.tools for s in sessions], self.tokenizer, params,
            max_turns=self.rollout_cfg.max_turns, executor=self.executor, streams=streams,
        )  # fmt: skip
        if self.rollout_cfg.release_between_steps:
            engine.release()
        return results

    def _params(self, temperature: float, seed: int) -> SamplingParams:
        return SamplingParams(temperature=temperature, top_p=self.grpo.top_p if temperature > 0 else 1.0,
                              max_new_tokens=self.grpo.max_completion_length, seed=seed)  # fmt: skip

    # ---------------------------------------------------------------------------------- step
    def train_step(self) -> dict[str, float]:
        self.model.train()
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        G = self.grpo.num_generations
        params = self._params(self.grpo.temperature, self.cfg.seed * 1_000_003 + self.step)
        rnd = self.rollout(self.source.next_batch(), G, params, self.seq_len())
        rewards = torch.tensor([s.total for s in rnd.scores], dtype=torch.float64)
        advantages = group_advantages(rewards, G, self.grpo.scale_rewards)
        episodes = self._episodes(rnd, advantages)
        t_train = time.perf_counter()
        totals = self.optimize(episodes)
        train_s = time.perf_counter() - t_train
        train_tokens = sum(len(e.ids) for e in episodes) * self.grpo.num_iterations
        metrics = {
            **round_metrics(rnd, G),
            **totals,
            "lr": lr,
            "advantage_abs_mean": float(advantages.abs().mean()),
            "rollout_s": rnd.rollout_s,
            "reward_s": rnd.reward_s,
            "train_s": train_s,
            "rollout_tok_s": rnd.sampled_tokens / max(rnd.rollout_s, 1e-9),
            "train_tok_s": train_tokens / max(train_s, 1e-9),
            "step_s": time.perf_counter() - t0,
            "seq_len": self.seq_len(),
            "phase": self.phase,
            "micro_batch_tokens": self.micro_tokens,
            "memory_gb": _peak_memory_gb(self.device),
        }
        if isinstance(self.engine, RolloutEngine):
            metrics["decode_tok_s"] = self.engine.stats.decode_tok_s
        return metrics

    def optimize(self, episodes: list[Episode]) -> dict[str, float]:
        """The training half of a step: reference / pi_old log-probs as configured, then num_iterations
        optimizer updates on the episodes. Returns the last update's metrics."""
        need_ref = self.grpo.beta > 0 or self.grpo.log_kl
        if need_ref:
            self._fill_logprobs(episodes, "ref_logp", reference=True)
        if self.grpo.num_iterations > 1:
            self._fill_logprobs(episodes, "old_logp", reference=False)
        totals = {}
        for _ in range(self.grpo.num_iterations):
            totals = self._update(episodes, need_ref)
        return totals

    def _episodes(self, rnd: Round, advantages: Tensor) -> list[Episode]:
        arrays = [episode_arrays(r, self.seq_len(), self.grpo.mask_truncated_completions) for r in rnd.results]
        trained = torch.tensor([int(t[1:].sum()) for _, t in arrays])
        weights = token_weights(trained, self.grpo.loss_type, self.grpo.max_completion_length)
        return [
            Episode(ids, mask, float(a), float(w)) for (ids, mask), a, w in zip(arrays, advantages.tolist(), weights.tolist())
        ]

    def _micro_batches(self, episodes: list[Episode]) -> list[dict]:
        return pack_episodes(episodes, self.seq_len(), self.micro_tokens, pow2=self.device.type == "cuda")

    def _rank_micro_batches(self, micro_batches: list[dict]) -> list[tuple[dict, bool]]:
        """(micro-batch, counts) this rank runs: all of them in one process; under torchrun a round-robin
        share of the round's micro-batches (the single-process packing, so even the per-micro-batch router
        aux loss is the same), padded with an uncounted repeat so that every rank runs as many forwards
        and backwards (FSDP's collectives)."""
        return [(micro_batches[i], counts) for i, counts in self.dist.padded_share(len(micro_batches))]

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    def _logprobs(self, batch: dict) -> Tensor:
        return self.model.token_logprobs(
            batch["input_ids"], batch["position_ids"], batch["doc_ids"], batch["labels"], temperature=self.grpo.temperature
        )

    def _retry_on_oom(self, work):
        """work() with micro-batches of micro_tokens; on CUDA OOM the budget halves and work() reruns.
        Not under torchrun: the other ranks are inside a collective, which a retry on one rank would never
        join (a hang); there an OOM ends the run (set grpo.micro_batch_tokens lower)."""
        for attempt in range(MAX_OOM_RETRIES + 1):
            try:
                return work()
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if attempt == MAX_OOM_RETRIES or self.micro_tokens <= 1 or self.dist.enabled:
                    raise
                self.micro_tokens = max(1, self.micro_tokens // 2)
                log.warning("grpo: out of memory; micro_batch_tokens -> %d", self.micro_tokens)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _fill_logprobs(self, episodes: list[Episode], key: str, reference: bool) -> None:
        """Per-episode log-probs of the current policy (pi_old) or of the LoRA-disabled reference."""

        @torch.no_grad()
        def work():  # under torchrun each rank fills the episodes of the micro-batches it will train on
            for batch, counts in self._rank_micro_batches(self._micro_batches(episodes)):
                batch = self._to_device(batch)
                with (lora_disabled(self.model) if reference else contextlib.nullcontext()), self._autocast():
                    lp = self._logprobs(batch).float().cpu().numpy()
                for place in batch["placements"] if counts else []:
                    setattr(episodes[place.episode], key, lp[place.row, place.start : place.start + place.length].copy())

        was_training = self.model.training
        self.model.eval()
        try:
            self._retry_on_oom(work)
        finally:
            self.model.train(was_training)

    def _update(self, episodes: list[Episode], have_ref: bool) -> dict[str, float]:
        """One optimizer update on the round (micro-batches halve on CUDA OOM and the update restarts)."""
        totals = self._retry_on_oom(lambda: self._accumulate(self._micro_batches(episodes), have_ref))
        return {**totals, "grad_norm": self.clip_and_step()}

    def _accumulate(self, micro_batches: list[dict], have_ref: bool) -> dict[str, float]:
        """Backward of the round's loss over this rank's micro-batches (every token weight is already over
        the whole round, so the ranks' sums add up to the single-process loss); metrics over all ranks."""
        g = self.grpo
        sums = dict.fromkeys(("loss", "kl", "clip_low", "clip_high", "aux_loss", "trained"), 0.0)
        total = sum(int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        for mb, counts in self._rank_micro_batches(micro_batches):
            batch = self._to_device(mb)
            mask = (batch["labels"] != IGNORE_INDEX).to(torch.float32)
            with self._autocast():
                logp = self._logprobs(batch).float()
            old = logp.detach() if g.num_iterations == 1 else batch["old_logp"]
            ref = batch["ref_logp"] if have_ref else None
            objective = clipped_objective(logp, old, batch["advantages"], g.epsilon, g.epsilon_high, g.beta, ref)
            loss = (objective.loss * mask * batch["weights"].to(logp.dtype)).sum()
            n_mb = int(mask.sum()) if counts else 0
            aux = self.model.aux_loss(batch["doc_ids"])
            if self.monitor and counts:
                self.monitor.update(self.model.router_logits, batch["doc_ids"] >= 0)
            aux_term = self.model.config.router_aux_loss_coef * aux * n_mb / max(total, 1)
            objective_total = (loss if counts else loss * 0.0) + aux_term
            if self.dist.enabled:
                objective_total = objective_total * self.dist.world_size  # FSDP averages over ranks; we want the sum
            objective_total.backward()  # also for the uncounted padding: FSDP's reduce-scatter needs every rank
            if not counts:
                continue
            sums["loss"] += float(loss.detach())
            sums["aux_loss"] += float(aux.detach()) * n_mb / max(total, 1)
            sums["clip_low"] += float((objective.low_clipped * mask).sum())
            sums["clip_high"] += float((objective.high_clipped * mask).sum())
            if objective.kl is not None:
                sums["kl"] += float((objective.kl.detach() * mask).sum())
            sums["trained"] += n_mb
        sums = dict(zip(sums, self.dist.all_reduce_sum(list(sums.values()))))
        trained = int(sums["trained"])
        out = {
            "loss": sums["loss"],
            "aux_loss": sums["aux_loss"],
            "clip_ratio_low": sums["clip_low"] / max(trained, 1),
            "clip_ratio_high": sums["clip_high"] / max(trained, 1),
            "clip_ratio_region": (sums["clip_low"] + sums["clip_high"]) / max(trained, 1),
            "trained_tokens": trained,
            "micro_batches": len(micro_batches),
        }
        if have_ref:
            out["kl"] = sums["kl"] / max(trained, 1)
        return out

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, logger=None) -> dict[str, float]:
        """One episode per held-out prompt (greedy unless val_temperature > 0), scored as in training."""
        if not self.val_prompts:
            return {}
        seq_len = self.cfg.eval_seq_len or self.cfg.phases[0].seq_len
        prompts = fitting_prompts(self.val_prompts, self.grpo.max_prompt_length, seq_len)
        if not prompts:
            return {}
        rnd = self.rollout(prompts, 1, self._params(self.grpo.val_temperature, self.cfg.seed), seq_len)
        metrics = round_metrics(rnd, None)
        if logger is not None:
            logger.log(self.step, metrics, split="val")
        return metrics


def round_metrics(rnd: Round, group_size: int | None) -> dict[str, float]:
    scores, results = rnd.scores, rnd.results
    totals = np.array([s.total for s in scores], dtype=np.float64)
    lengths = np.array([r.completion.num_sampled for r in results], dtype=np.float64)
    out = {
        "reward": float(totals.mean()),
        "reward_std": float(totals.std()),
        "pass_rate": float(np.mean([s.passed for s in scores])),
        "compliance_rate": float(np.mean([s.compliant for s in scores])),
        "endless_reasoning_rate": float(np.mean([s.endless_reasoning for s in scores])),
        "completion_length": float(lengths.mean()),
        "completion_length_min": float(lengths.min()),
        "completion_length_max": float(lengths.max()),
        "truncated_rate": float(np.mean([r.completion.finish_reason != "stop" for r in results])),
        "tool_calls": float(np.mean([len(r.log.tool_calls) for r in results])),
        "tool_errors": float(np.mean([r.log.tool_errors for r in results])),
        "episodes": len(scores),
    }
    for part in sorted({k for s in scores for k in s.parts}):
        values = np.array([s.parts.get(part, 0.0) for s in scores], dtype=np.float64)
        out[f"reward/{part}"] = float(values.mean())
        out[f"reward/{part}_std"] = float(values.std())
    if group_size:
        grouped = totals.reshape(-1, group_size)
        out["frac_reward_zero_std"] = float(np.mean(grouped.std(axis=1) == 0))
    return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------------------- building
def make_engine(model, rollout_cfg: RolloutConfig, max_len: int, stop_ids: Sequence[int], model_dir: str | None = None):
    """The rollout backend of the config: RolloutEngine on the training model, or vLLM on model_dir."""
    if rollout_cfg.backend == "vllm":
        from rustforge.rollout.vllm_backend import VllmEngine

        if model_dir is None:
            raise ValueError("rollout.backend = vllm needs the base model directory (model.path)")
        return VllmEngine(model_dir, max_batch=rollout_cfg.max_batch, max_len=max_len, stop_ids=stop_ids)
    return RolloutEngine(
        model, max_batch=rollout_cfg.max_batch, max_len=max_len, stop_ids=stop_ids, weights=rollout_cfg.weights,
        cuda_graphs=rollout_cfg.cuda_graphs, prefill_chunk=rollout_cfg.prefill_chunk,
    )  # fmt: skip


def build_environment(cfg: RunConfig, stage_cfg: GrpoConfig, tokenizer):
    """The configured environment on the mined tasks (grpo.tasks_dir, default tasks.out_dir)."""
    from rustforge.rollout.environments import HarmonyFormatEnvironment, RustTaskEnvironment, task_prompts, task_splits

    splits = task_splits(stage_cfg.tasks_dir or cfg.tasks.out_dir)
    if stage_cfg.environment == "rust_tasks":
        from rustforge.rust.sandbox import Sandbox

        # under torchrun each rank scores its own episodes in its own reward pool: the configured workers
        # (sized for the host's cores) split over the ranks, and a work dir per rank
        dist = distributed.current()
        workers = max(1, stage_cfg.reward_workers // dist.world_size)
        work_root = Path(cfg.run_dir) / STAGE / "work"
        return RustTaskEnvironment(
            splits, tokenizer, Sandbox(cfg.sandbox), cfg.rewards, workers, cfg.rollout.tool_output_chars,
            work_root=work_root / f"rank{dist.rank}" if dist.enabled else work_root,
        )  # fmt: skip
    from rustforge.rust.tools import tool_definitions

    definitions = tool_definitions(include_clippy=False)  # shown to the model; a call ends the episode
    prompts = {split: task_prompts(tasks, tokenizer, definitions) for split, tasks in splits.items()}
    return HarmonyFormatEnvironment(prompts, tokenizer, cfg.rewards)


def stage_data(environment, stage_cfg: GrpoConfig) -> tuple[StageData, list[Prompt]]:
    train_prompts = environment.prompts("train")
    val_prompts = environment.prompts("val")[: stage_cfg.val_prompts]
    if not val_prompts:
        log.warning("grpo: no held-out prompts; the before/after row uses the first train prompts")
        val_prompts = train_prompts[: stage_cfg.val_prompts]

    def train(phase: int, seq_len: int) -> BatchSource:
        fitting = fitting_prompts(train_prompts, stage_cfg.max_prompt_length, seq_len)
        if not fitting:
            shortest = min((len(p.ids) for p in train_prompts), default=0)
            raise ValueError(
                f"grpo: none of the {len(train_prompts)} train prompts fits (shortest: {shortest} tokens; "
                f"grpo.max_prompt_length = {stage_cfg.max_prompt_length}, phase {phase} seq_len = {seq_len})"
            )
        return PromptSource(fitting, stage_cfg.prompts_per_step, stage_cfg.seed + phase)

    def validation(seq_len: int) -> list[dict]:
        """Held-out prompts as packed token batches, for the expert monitor's routing probe."""
        fitting = fitting_prompts(val_prompts, stage_cfg.max_prompt_length, seq_len)[:8]
        if not fitting:
            return []
        episodes = [Episode(np.asarray(p.ids, np.int64), np.zeros(len(p.ids), np.int8), 0.0, 0.0) for p in fitting]
        keys = ("input_ids", "position_ids", "doc_ids", "labels")
        return [{k: mb[k] for k in keys} for mb in pack_episodes(episodes, seq_len, seq_len)]

    return StageData(train=train, validation=validation), val_prompts


def run(
    cfg: RunConfig,
    stage_cfg: GrpoConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    environment=None,
) -> dict:
    """Train the stage (cfg.grpo unless stage_cfg is given) from the ipo adapter; `environment` replaces the
    configured one (an object with prompts/open/score). Returns `summary`."""
    stage_cfg = stage_cfg or cfg.grpo
    start = start_stage(cfg, STAGE, stage_cfg.init_from, PREVIOUS_STAGE, progress)
    own_environment = environment is None
    environment = environment or build_environment(cfg, stage_cfg, start.tokenizer)
    try:
        data, val_prompts = stage_data(environment, stage_cfg)
        from rustforge.model.base import base_dir

        trainer = GrpoTrainer(
            start.model, cfg.lora, stage_cfg, data, start.stage_dir, start.device, progress, cfg.expert_monitor,
            grpo_cfg=stage_cfg, rollout_cfg=cfg.rollout, environment=environment, tokenizer=start.tokenizer,
            val_prompts=val_prompts, model_dir=str(base_dir(cfg)),
        )  # fmt: skip
        try:
            finish_stage(trainer, resume, stop_after)
        finally:
            trainer.close()
    finally:
        if own_environment:
            environment.close()
    return summary(start.stage_dir)


SUMMARY_KEYS = ("reward", "pass_rate", "compliance_rate", "endless_reasoning_rate", "completion_length")


def summary(stage_dir: Path) -> dict:
    """Held-out episodes before (step 0) and after: reward, pass rate, Harmony compliance, endless-reasoning
    rate, completion length -- the stage's row of the pipeline table."""
    from rustforge.train.metrics import before_after

    return before_after(stage_dir, SUMMARY_KEYS, "held-out prompts")


__all__ = [
    "Episode",
    "GrpoTrainer",
    "PromptSource",
    "Round",
    "build_environment",
    "clipped_objective",
    "group_advantages",
    "grpo_loss",
    "make_engine",
    "pack_episodes",
    "round_metrics",
    "run",
    "stage_data",
    "summary",
    "token_weights",
]

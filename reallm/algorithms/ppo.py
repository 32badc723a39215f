"""The ``ppo`` experiment: actor_gen → (rew_inf, ref_inf, critic_inf) → actor_train, critic_train.

Keys between calls (one ``SeqBatch`` row layout: per-token keys have one row per token of the
sequence, "row t is about token t+1" for log-probs, 0 on each sequence's last row):
``packed_input_ids`` [T], ``prompt_mask`` [T], ``packed_logprobs`` [T], ``packed_logits_mask`` [T, V]
(True = removed by top-k/top-p/EOS ban when token t+1 was sampled), ``seq_no_eos_mask`` [1 per seq],
``rewards`` [1 per seq] (raw reward-model output or rule-based reward), ``packed_ref_logprobs`` [T],
``values`` [T] (critic output for the state ending at each token).

Both train calls derive the same targets (``functional.ppo_targets``: reward shaping with the KL
penalty, GAE, value and advantage normalisation over the global batch) from the same rollout; their
KL controllers and value normalisers receive the same global numbers and stay identical. The step's
batch is cut into ``ppo_n_minibatches`` minibatches by global sequence id *before* the dp split, so the
updates do not depend on the layout.

Models: the actor's and critic's weights of record live in their train placements; actor_gen and
critic_inf get replicas reallocated from them right before the call (``executor.realloc``) and dropped
right after, unless the placements are the same (then no copy at all).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import time
from collections.abc import Callable
from typing import Optional

import torch

from executor import comm
from executor.data import SeqBatch, split_balanced
from executor.realloc import run_realloc
from executor.runtime import CallContext
from reallm.algorithms import functional as F
from reallm.algorithms.base import ExperimentRuntime, ModelHandle, has_devices_to_itself
from reallm.algorithms.data import epoch_batches, load_tokenizer, tokenize_prompts
from reallm.dataflow import ppo_logits_mask_needed
from reallm.datasets import read_records
from reallm.errors import UserError
from reallm.parallel.optim import release_library_workspaces
from reallm.plan import Plan

ROLE_FIELD = {"actor": "actor", "critic": "critic", "ref": "ref", "rew": "rew"}


def load_reward_fn(path: str) -> Callable[[str, str], float]:
    """``module:function`` (or ``module.function``) → the callable."""
    mod, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"ppo.reward_fn={path}: cannot import it ({e})") from None
    if not callable(fn):
        raise UserError(f"ppo.reward_fn={path} is not callable")
    return fn


def cu_of(lens) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if len(lens):
        cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    return cu


class PPORuntime(ExperimentRuntime):
    experiment = "ppo"
    supports_recovery = True

    def __init__(self, plan: Plan, rank: int, device: torch.device, plan_path: Optional[str] = None):
        super().__init__(plan, rank, device, plan_path)
        cfg = self.cfg
        self.hp = cfg.ppo
        self.tok = load_tokenizer(cfg.actor.path)
        self.records = read_records(cfg.dataset.path, "prompt", "dataset.path")
        self.samples = tokenize_prompts(self.records, self.tok, cfg.dataset.max_prompt_len)
        self.steps = [b for e in range(cfg.total_train_epochs)
                      for b in epoch_batches(len(self.samples), cfg.dataset.train_bs_n_seqs, cfg.seed, e,
                                             drop_last=True)]
        self.reward_fn = load_reward_fn(self.hp.reward_fn) if self.hp.reward_fn else None
        self.models: dict[str, ModelHandle] = {}  # call name → model handle on this rank
        self.kl = {r: F.make_kl_controller(self.hp.kl_ctl, self.hp.use_adaptive_kl_ctl, self.hp.adaptive_kl_target,
                                           self.hp.adaptive_kl_horizon) for r in ("actor", "critic")}
        self.vnorm = {r: F.ValueNormalizer(self.hp.value_norm_beta, self.hp.value_norm_eps)
                      for r in ("actor", "critic")} if self.hp.value_norm else None
        self.realloc_s: dict[str, float] = {}  # call → seconds its replica took to arrive on this rank

    # -- dataset ------------------------------------------------------------------------------------
    def num_steps(self) -> int:
        return len(self.steps)

    def step_sequences(self, step: int):
        ids = self.steps[step]
        return ids, [len(self.samples[i].tokens) for i in ids]

    def load(self, ids, keys, ctx):
        return SeqBatch.from_lists(ids, {"packed_prompts": [torch.tensor(self.samples[i].tokens) for i in ids]})

    # -- models -------------------------------------------------------------------------------------
    def _record_call(self, role: str) -> str:
        calls = [c for c in self.plan.calls if c.role == role]
        train = [c for c in calls if c.is_train]
        return (train or calls)[0].name

    def _model(self, ctx: CallContext) -> ModelHandle:
        """The model handle a call uses on this rank: the weights of record, or the call's replica."""
        name, role = ctx.call.name, ctx.call.role
        record = self._record_call(role)
        if self.plan.placements[name].same_layout(self.plan.placements[record]):
            name = record
        if name not in self.models:
            trainable = name == record and self.plan.call(record).is_train
            # A frozen model's weights of record stay put between calls unless offloaded: graphs pay off there.
            graphs = name == record and not trainable and self.keeps_frozen_resident(role)
            handle = ModelHandle.build(ctx, getattr(self.cfg, ROLE_FIELD[role]), self.cfg.seed, trainable=trainable,
                                       total_steps=self.num_steps() * self.hp.ppo_n_minibatches,
                                       inference_graphs=graphs,
                                       train_resident=trainable and self.keeps_train_resident(record))
            self.models[name] = self.track(role, handle) if trainable else handle
        handle = self.models[name]
        train = ctx.call.kind == "train"
        if handle.pm.offloaded:
            handle.pm.reload(params_only=not train)
        if not train and handle.pm.optimizer is not None and self.cfg.memory.offload_train_state:
            handle.pm.offload(state_only=True)  # a call on the training weights: grads and Adam wait in host memory
        if self.cfg.memory.offload_idle_train_states:
            for other in self.models.values():
                if other is not handle and other.pm.optimizer is not None and not other.pm.params_offloaded:
                    other.pm.offload()  # another model's training state, idle during this call
        return handle

    def realloc(self, src: Optional[CallContext], dst: Optional[CallContext], group, op) -> None:
        from reallm.layout import plan_realloc

        role = self.plan.call(op.call).role
        a, b = self.plan.placements[op.producer], self.plan.placements[op.call]
        rplan = plan_realloc(self.plan.models[role], a, b, devices_per_node=self.plan.cluster.n_devices_per_node)
        src_flat = self._model(src).flat() if src is not None else None
        dst_handle = None
        if dst is not None:
            dst_handle = ModelHandle.build(dst, getattr(self.cfg, ROLE_FIELD[role]), self.cfg.seed, trainable=False,
                                           load_weights=False)
        t0 = time.perf_counter()
        run_realloc(rplan, self.rank, src_flat, dst_handle.flat() if dst_handle is not None else None)
        self.realloc_s[op.call] = time.perf_counter() - t0
        if dst_handle is not None:
            self.models[op.call] = dst_handle
            # The replica's call runs next on this device: the training state waits in host memory (issue:
            # keeping weights + grads + Adam resident during generation is ReaL's out-of-memory failure).
            record = self.models.get(self._record_call(role))
            if record is not None and record.pm.optimizer is not None and self.cfg.memory.offload_train_state:
                record.pm.offload()

    def _drop_replica(self, ctx: CallContext) -> None:
        if ctx.call.name != self._record_call(ctx.call.role):
            self.models.pop(ctx.call.name, None)  # a replica lives only for its call

    # -- calls --------------------------------------------------------------------------------------
    def run_call(self, ctx: CallContext, batch: SeqBatch):
        fn = {"actor_gen": self._actor_gen, "rew_inf": self._rew_inf, "ref_inf": self._ref_inf,
              "critic_inf": self._critic_inf, "actor_train": self._actor_train,
              "critic_train": self._critic_train}[ctx.call.name]
        # Everything a call reads lives on this rank's device (NCCL moves device tensors only).
        batch = SeqBatch(batch.ids, {k: v.to(self.device) for k, v in batch.data.items()}, batch.lens)
        try:
            out, stats = fn(ctx, batch)
        finally:
            self._drop_replica(ctx)
        role = ctx.call.role
        handle = self.models.get(ctx.call.name)
        if (handle is not None and handle.pm.optimizer is None and self.cfg.memory.offload_frozen_models
                and self.shares_devices(role)):
            handle.pm.offload()  # a frozen model waits in host memory until its next call
        elif (handle is not None and ctx.call.kind == "train" and self.cfg.memory.offload_idle_train_states
              and self.shares_devices(role)):
            handle.pm.offload()  # the trained model waits in host memory until its next call (weights reload then)
        if self.cfg.memory.offload_idle_train_states:
            release_library_workspaces(self.device)  # the least resident memory between calls
        if ctx.call.name in self.realloc_s:
            stats = dict(stats, realloc_s=self.realloc_s.pop(ctx.call.name))
        return out, stats

    @torch.no_grad()
    def _actor_gen(self, ctx: CallContext, batch: SeqBatch):
        from reallm.model.generate import GenerationConfig, special_token_ids

        keys = ["packed_input_ids", "prompt_mask", "packed_logprobs", "seq_no_eos_mask"]
        with_mask = ppo_logits_mask_needed(self.hp)
        if with_mask:
            keys.append("packed_logits_mask")
        if self.reward_fn is not None:
            keys.append("rewards")
        if not len(batch):
            return _empty(keys, self.plan.models["actor"].vocab_size), {"num_seqs": 0}
        model = self._model(ctx)
        if model.pm.decode_pool is None and has_devices_to_itself(self.plan, self.rank, ctx.call.name):
            model.pm.keep_decode_graphs()  # no other call here: keep the caches and captured steps
        eos, pad = special_token_ids(self.tok)
        prompts = [batch.seq("packed_prompts", i).tolist() for i in range(len(batch))]
        gcfg = dataclasses.replace(GenerationConfig.from_config(self.hp), return_logits_mask=with_mask,
                                   lean_memory=self.cfg.memory.offload_idle_train_states)
        out = model.pm.generate(prompts, gcfg, eos_token_id=eos, pad_token_id=pad, seed=self.cfg.seed,
                                step=ctx.step, seq_ids=batch.ids)
        if out is None:  # not the last pipeline stage
            return None, {}
        packed = out.with_prompts(prompts)
        gen = out.sequences()
        lens = [len(p) + len(g) for p, g in zip(prompts, gen)]
        data = {"packed_input_ids": packed["tokens"], "prompt_mask": packed["prompt_mask"],
                "packed_logprobs": packed["logprobs"], "seq_no_eos_mask": packed["no_eos"].to(torch.bool)}
        if with_mask:
            data["packed_logits_mask"] = packed["logits_mask"]
        if self.reward_fn is not None:
            data["rewards"] = torch.tensor([float(self.reward_fn(self.records[i].data["prompt"],
                                                                 self.tok.decode(g, skip_special_tokens=True)))
                                            for i, g in zip(batch.ids, gen)], device=self.device)
        lens_by_key = {k: ([1] * len(lens) if k in ("seq_no_eos_mask", "rewards") else lens) for k in data}
        return SeqBatch(batch.ids, data, lens_by_key), {"num_seqs": len(gen), "gen_tokens": sum(map(len, gen))}

    def _packed(self, batch: SeqBatch):
        lens = batch.lens["packed_input_ids"]
        return batch.data["packed_input_ids"], cu_of(lens).to(self.device), lens

    @torch.no_grad()
    def _rew_inf(self, ctx: CallContext, batch: SeqBatch):
        if not len(batch):
            return _empty(["rewards"], 0), {}
        tokens, cu, lens = self._packed(batch)
        out = self._model(ctx).forward([{"tokens": tokens, "cu_seqlens": cu}])
        if out is None:
            return None, {}
        scores = F.last_token_values(out[0].float(), cu)
        return SeqBatch(batch.ids, {"rewards": scores}, {"rewards": [1] * len(lens)}), {}

    @torch.no_grad()
    def _ref_inf(self, ctx: CallContext, batch: SeqBatch):
        if not len(batch):
            return _empty(["packed_ref_logprobs"], 0), {}
        tokens, cu, lens = self._packed(batch)
        mb = {"tokens": tokens, "cu_seqlens": cu}
        if "packed_logits_mask" in batch.data:
            mb["logits_mask"] = batch.data["packed_logits_mask"]
        out = self._model(ctx).pm.logprobs([mb], temperature=self.hp.temperature,
                                           logits_mask_key="logits_mask" if "logits_mask" in mb else None)
        if out is None:
            return None, {}
        rows = F.shifted_to_rows(out[0].float(), cu)
        return SeqBatch(batch.ids, {"packed_ref_logprobs": rows}, {"packed_ref_logprobs": lens}), {}

    @torch.no_grad()
    def _critic_inf(self, ctx: CallContext, batch: SeqBatch):
        if not len(batch):
            return _empty(["values"], 0), {}
        tokens, cu, lens = self._packed(batch)
        out = self._model(ctx).forward([{"tokens": tokens, "cu_seqlens": cu}])
        if out is None:
            return None, {}
        return SeqBatch(batch.ids, {"values": out[0].float()}, {"values": lens}), {}

    def _targets(self, ctx: CallContext, batch: SeqBatch, role: str) -> dict:
        tokens, cu, lens = self._packed(batch)
        dp_sum = (lambda t: comm.all_reduce(t, ctx.dp)) if ctx.dp.size > 1 else None
        logp = F.drop_last_per_seq(batch.data["packed_logprobs"], cu)
        ref = F.drop_last_per_seq(batch.data["packed_ref_logprobs"], cu)
        mask = F.action_mask(batch.data["prompt_mask"], cu)
        kl_now, n_seqs = F.mean_sequence_kl(logp, ref, mask, cu, dp_sum)
        t = F.ppo_targets(cu_seqlens=cu, prompt_mask_T=batch.data["prompt_mask"], logprobs_N=logp,
                          ref_logprobs_N=ref, values_T=batch.data["values"], raw_rewards_B=batch.data["rewards"],
                          seq_no_eos_mask_B=batch.data["seq_no_eos_mask"], kl_ctl=self.kl[role].value,
                          discount=self.hp.discount, gae_lambda=self.hp.gae_lambda,
                          max_reward_clip=self.hp.max_reward_clip,
                          reward_output_scaling=self.hp.reward_output_scaling,
                          reward_output_bias=self.hp.reward_output_bias, adv_norm=self.hp.adv_norm,
                          value_normalizer=self.vnorm[role] if self.vnorm else None, all_reduce=dp_sum,
                          gae_backend="torch" if self.device.type == "cpu" else "auto")
        self.kl[role].update(kl_now, n_seqs)
        sums = torch.tensor([float(batch.data["rewards"].double().sum()), float(len(batch)),
                             float(t["kl_rewards"].double().sum()), float(sum(lens))], dtype=torch.float64,
                            device=self.device)
        if dp_sum:
            sums = dp_sum(sums)
        t["summary"] = {"reward": sums[0].item() / max(sums[1].item(), 1), "kl": kl_now,
                        "kl_reward": sums[2].item() / max(sums[1].item(), 1), "kl_ctl": self.kl[role].value,
                        "seq_len": sums[3].item() / max(sums[1].item(), 1)}
        t["cu"], t["lens"], t["tokens"], t["logp"] = cu, lens, tokens, logp
        return t

    def _minibatches(self, ctx: CallContext, batch: SeqBatch) -> list[list[int]]:
        """Positions (in this rank's batch) of each global minibatch: global ids cut by count first."""
        ids = sorted(self.steps[ctx.step])
        k = self.hp.ppo_n_minibatches
        pos = {s: i for i, s in enumerate(batch.ids)}
        bounds = [round(i * len(ids) / k) for i in range(k + 1)]
        return [[pos[s] for s in ids[bounds[j]:bounds[j + 1]] if s in pos] for j in range(k)]

    def _micro(self, t: dict, batch: SeqBatch, positions: list[int], n_mbs: int, extra: Callable) -> list[dict]:
        """Micro-batches over ``positions``: packed tokens plus shifted [N] slices of the targets."""
        out = []
        lens = t["lens"]
        if not positions:
            return out
        parts = split_balanced(positions, [lens[p] for p in positions], max(1, min(n_mbs, len(positions))))
        short = F.shifted_cu_seqlens(t["cu"]).tolist()
        cu = t["cu"].tolist()
        for part in parts:
            if not part:
                continue
            tok = torch.cat([t["tokens"][cu[p]:cu[p + 1]] for p in part])
            mb = {"tokens": tok, "cu_seqlens": cu_of([lens[p] for p in part]).to(self.device)}
            for key in ("advantages", "action_mask", "critic_targets", "old_values", "logp"):
                mb[key] = torch.cat([t[key][short[p]:short[p + 1]] for p in part])
            mb.update(extra(part))
            out.append(mb)
        return out

    def _train(self, ctx: CallContext, batch: SeqBatch, role: str, loss_of: Callable, extra: Callable):
        t = self._targets(ctx, batch, role)
        model = self._model(ctx)
        dp_sum = (lambda x: comm.all_reduce(x, ctx.dp)) if ctx.dp.size > 1 else None
        totals: dict[str, float] = {}
        for positions in self._minibatches(ctx, batch):
            mbs = self._micro(t, batch, positions, ctx.placement.num_micro_batches, extra)
            n_local = sum(int(mb["action_mask"].sum()) for mb in mbs)
            n_global = (float(dp_sum(torch.tensor(float(n_local), dtype=torch.float64, device=self.device))) if dp_sum
                        else float(n_local))
            pm = model.pm
            pm.optimizer.zero_grad()
            local = pm.forward_backward(mbs, functools.partial(_float_stats, loss_of, n_global)) if mbs else {}
            red = pm.gather_stats(local or {k: 0.0 for k in _zero_stats(role)})  # global, the same on every rank
            skip = role == "actor" and F.ppo_early_stop(red, self.hp.early_stop_imp_ratio)
            if skip:
                pm.optimizer.zero_grad()
                red["skipped"] = 1.0
            else:
                pm.reduce_gradients()
                red.update(pm.optimizer_step())
            for k2, v in red.items():
                totals[k2] = totals.get(k2, 0.0) + float(v)
        summary = dict(t["summary"])
        n = max(totals.get("num_tokens", 0.0), 1.0)
        summary.update({f"{role}_loss": totals.get("loss_sum", 0.0) / n,
                        f"{role}_clip_frac": totals.get("clip_count", 0.0) / n,
                        f"{role}_grad_norm": totals.get("grad_norm", 0.0) / self.hp.ppo_n_minibatches,
                        f"{role}_lr": totals.get("lr", 0.0) / self.hp.ppo_n_minibatches})
        if role == "actor":
            summary["importance_ratio"] = totals.get("importance_ratio_sum", 0.0) / n
            summary["approx_kl"] = totals.get("approx_kl_sum", 0.0) / n
            summary["skipped_updates"] = totals.get("skipped", 0.0)
        self._maybe_save(ctx, role, model)
        return None, summary

    def _actor_train(self, ctx: CallContext, batch: SeqBatch):
        temp = self.hp.temperature
        with_mask = "packed_logits_mask" in batch.data

        def extra(part):
            if not with_mask:
                return {}
            cu = cu_of(batch.lens["packed_input_ids"]).tolist()
            return {"logits_mask": torch.cat([batch.data["packed_logits_mask"][cu[p]:cu[p + 1]] for p in part])}

        def loss_of(out, mb, n_global):  # out: this tp rank's vocabulary shard of the logits
            lp = out.logprobs(mb["tokens"], mb["cu_seqlens"], temperature=temp, logits_mask=mb.get("logits_mask"))
            return F.ppo_actor_loss(lp, mb["logp"], mb["advantages"], mb["action_mask"],
                                    eps_clip=self.hp.eps_clip, num_tokens=n_global)

        return self._train(ctx, batch, "actor", loss_of, extra)

    def _critic_train(self, ctx: CallContext, batch: SeqBatch):
        def loss_of(values, mb, n_global):
            v = F.drop_last_per_seq(values, mb["cu_seqlens"])
            return F.ppo_critic_loss(v, mb["old_values"], mb["critic_targets"], mb["action_mask"],
                                     value_eps_clip=self.hp.value_eps_clip, num_tokens=n_global)

        return self._train(ctx, batch, "critic", loss_of, lambda part: {})

    # -- checkpoints and metrics --------------------------------------------------------------------
    def _maybe_save(self, ctx: CallContext, role: str, model: ModelHandle) -> None:
        if self.checkpoint_due(ctx.step):  # every rank of the placement takes part; one writes
            model.save_hf(self.checkpoint_path(role, ctx.step + 1))

    def runtime_state(self) -> dict:
        return {"kl": {r: k.state_dict() for r, k in self.kl.items()},
                "vnorm": {r: v.state_dict() for r, v in self.vnorm.items()} if self.vnorm else None}

    def load_runtime_state(self, state: dict) -> None:
        for r, k in state["kl"].items():
            self.kl[r].load_state_dict(k)
        if self.vnorm and state.get("vnorm"):
            for r, v in state["vnorm"].items():
                self.vnorm[r].load_state_dict(v)

    def on_results(self, step: int, call: str, by_head: list) -> None:
        stats = by_head[0][1] if by_head else {}
        fig = {f"time_{call}_s": max(s["time_s"] for _, s in by_head)} if by_head else {}
        if call in ("actor_train", "critic_train"):
            fig.update({k: v for k, v in stats.items() if k not in ("time_s", "start_s", "end_s")})
        if call == "actor_gen":
            fig["gen_tokens"] = sum(s.get("gen_tokens", 0) for _, s in by_head)
            fig["num_tokens"] = float(sum(self.step_sequences(step)[1]) + fig["gen_tokens"])  # prompts + answers
        if by_head and any("realloc_s" in s for _, s in by_head):
            from reallm.layout import realloc_traffic

            role = self.plan.call(call).role
            a, b = self.plan.placements[self._record_call(role)], self.plan.placements[call]
            traffic = realloc_traffic(self.plan.models[role], a, b, devices_per_node=self.plan.cluster.n_devices_per_node)
            fig[f"realloc_{call}_s"] = max(s.get("realloc_s", 0.0) for _, s in by_head)
            fig[f"realloc_{call}_bytes"] = traffic.moved_bytes(dtype_bytes=4)
        self.record(step, fig)


def _shards(spec, placement, device):
    from reallm.layout import shards_of

    return shards_of(spec, placement, device).shards


def _empty(keys, vocab: int) -> SeqBatch:
    dtypes = {"packed_input_ids": torch.int64, "prompt_mask": torch.bool, "seq_no_eos_mask": torch.bool,
              "packed_logits_mask": torch.bool}
    data = {k: torch.empty((0, vocab) if k == "packed_logits_mask" else (0,), dtype=dtypes.get(k, torch.float32))
            for k in keys}
    return SeqBatch([], data, {k: [] for k in keys})


def _float_stats(loss_of: Callable, n_global: float, out, mb):
    loss, stats = loss_of(out, mb, n_global)
    return loss, {k: float(v) for k, v in stats.items()}


def _zero_stats(role: str) -> dict:
    keys = ["num_tokens", "loss_sum", "clip_count"] + (["importance_ratio_sum", "approx_kl_sum"] if role == "actor"
                                                       else [])
    return {k: torch.zeros((), dtype=torch.float64) for k in keys}


RUNTIME = PPORuntime

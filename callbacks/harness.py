"""``HarnessLM``: the lm-evaluation-harness model interface for a hybrid student or a teacher.

Log-likelihoods of requests that share their context (the choices of a multiple-choice item) run
the context once and score every continuation from the state after it (the student's
``DecodeState``, the teacher's KV cache); other requests come from one batched forward per group
(right padding, which the student handles exactly). Generation goes through ``models.generate``
(the student's recurrent decoding, the teacher's own ``generate``) with left padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from models import StudentLM, generate, prefill


class HarnessLM(LM):
    """An ``lm_eval.api.model.LM`` over any causal LM of this project (student or teacher).

    ``batch_size`` rows go through one full forward (log-likelihoods of long contexts);
    ``short_batch_size`` (default 4x) contexts share one batch where the work per row is small: the
    prompts of multiple-choice items (run once for all their choices) and of generations. The
    student prefills rows of equal length together, so a larger batch of length-sorted prompts
    means fewer, fuller forwards."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 short_batch_size: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.short_batch_size = short_batch_size or 4 * batch_size
        if self.batch_size < 1 or self.short_batch_size < 1:
            raise ValueError(f"HarnessLM batch sizes must be >= 1; got batch_size={batch_size}, "
                             f"short_batch_size={short_batch_size}")
        self.prefix_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ---- log-likelihood -------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces of the context belong to the continuation (as lm-eval's HF model does),
        # and the continuation tokens are read off the joint encoding so merges across the
        # boundary are tokenised as the model would see them
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if not context:
            return [self.prefix_token], whole
        return ctx, whole[len(ctx):]

    @staticmethod
    def _span_score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation), continuation is the greedy one) from the logits [n, V] that
        predict its n tokens."""
        logprobs = F.log_softmax(logits.float(), -1)
        target = torch.tensor(continuation, dtype=torch.long, device=logits.device)
        return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str = "log-likelihoods") -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per token pair."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch", disable=len(order) <= self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                ctx, cont = pairs[i]
                tokens = (ctx + cont)[-(self.max_length + 1):]
                rows.append(tokens[:-1])
                conts.append(cont[-len(tokens) + 1:] if len(cont) >= len(tokens) else cont)
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            # only the positions from the earliest continuation on need the vocabulary head (rows
            # are right-padded, so those are the last ``keep`` of every row, teacher and student)
            keep = width - min(len(r) - len(c) for r, c in zip(rows, conts))
            logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device), logits_to_keep=keep).logits
            offset = width - logits.shape[1]
            for r, i in enumerate(chunk):
                end = len(rows[r]) - offset
                results[i] = self._span_score(logits[r, end - len(conts[r]): end], conts[r])
        return results

    def _continuation_logits(self, contexts: list[list[int]], continuations: list[list[int]],
                             owner: torch.Tensor) -> torch.Tensor:
        """Logits [M, L, V] whose row m, position j predicts ``continuations[m][j]`` given
        ``contexts[owner[m]]`` (L: the longest continuation), from one run of each context and one
        of all continuations after it."""
        longest = max(len(c) for c in continuations)
        # a continuation's last token predicts nothing; right padding after a row's real tokens
        # cannot change its earlier logits (causal), and the state it leaves is discarded
        follow = torch.full((len(continuations), max(longest - 1, 0)), self.pad_id, dtype=torch.long)
        follow_mask = torch.zeros_like(follow)
        for m, cont in enumerate(continuations):
            follow[m, : len(cont[:-1])] = torch.tensor(cont[:-1], dtype=torch.long)
            follow_mask[m, : len(cont[:-1])] = 1
        follow, follow_mask = follow.to(self.device), follow_mask.to(self.device)
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        if isinstance(self.model, StudentLM):
            for r, ctx in enumerate(contexts):  # right padding: prefill runs every row unpadded
                ids[r, : len(ctx)] = torch.tensor(ctx)
                mask[r, : len(ctx)] = 1
            first, state = prefill(self.model, ids.to(self.device), mask.to(self.device))
            if longest <= 1:
                return first[owner, None]
            rest = self.model(follow, decode_state=state.index_select(owner)).logits
        else:
            for r, ctx in enumerate(contexts):  # left padding: every context ends where the cache goes on
                ids[r, width - len(ctx):] = torch.tensor(ctx)
                mask[r, width - len(ctx):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = self.model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1]
            if longest <= 1:
                return first[owner, None]
            # transformers 5 names the cache ``cache`` (``past_key_values`` is deprecated);
            # batch_select_indices works in place: one copy of its context's cache per continuation
            out.cache.batch_select_indices(owner)
            rest = self.model(follow, attention_mask=torch.cat([mask[owner], follow_mask], 1), cache=out.cache).logits
        return torch.cat([first[owner, None], rest], 1)

    @torch.no_grad()
    def _score_shared(self, contexts: list[list[int]], continuations: list[list[list[int]]],
                      desc: str = "shared-context log-likelihoods") -> list[list[tuple[float, bool]]]:
        """``_score``'s results for every continuation of every context, running each context once."""
        order = sorted(range(len(contexts)), key=lambda g: -len(contexts[g]))
        results: list = [None] * len(contexts)
        step = self.short_batch_size
        for start in tqdm(range(0, len(order), step), desc=desc, unit="batch", disable=len(order) <= step):
            chunk = order[start:start + step]
            conts = [cont for g in chunk for cont in continuations[g]]
            owner = torch.tensor([r for r, g in enumerate(chunk) for _ in continuations[g]], device=self.device)
            logits = self._continuation_logits([contexts[g] for g in chunk], conts, owner)
            scores = iter([self._span_score(logits[m, : len(cont)], cont) for m, cont in enumerate(conts)])
            for g in chunk:
                results[g] = [next(scores) for _ in continuations[g]]
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        by_context: dict[tuple[int, ...], list[int]] = {}
        alone = []
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) + len(cont) > self.max_length + 1:
                alone.append(i)  # truncated from the left: the context kept depends on the continuation
            else:
                by_context.setdefault(tuple(ctx), []).append(i)
        shared = [members for members in by_context.values() if len(members) > 1]
        alone += [members[0] for members in by_context.values() if len(members) == 1]
        results: list = [None] * len(pairs)
        for i, result in zip(alone, self._score([pairs[i] for i in alone])):
            results[i] = result
        scores = self._score_shared([pairs[members[0]][0] for members in shared],
                                    [[pairs[i][1] for i in members] for members in shared])
        for members, group_scores in zip(shared, scores):
            for i, result in zip(members, group_scores):
                results[i] = result
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self._encode(req.args[0]), self.prefix_token, self.max_length, context_len=1)]
            out.append(sum(score for score, _ in self._score(windows)))
        return out

    # ---- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        progress = tqdm(total=len(requests), desc="generations", unit="request", disable=len(requests) <= self.short_batch_size)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0) or 1.0)
            # longest prompts first, so each batch holds prompts of similar length (little padding)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.short_batch_size):
                chunk = indices[start:start + self.short_batch_size]
                prompts = [self._encode(requests[i].args[0])[-(self.max_length - max_new):] for i in chunk]
                width = max(len(p) for p in prompts)
                ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, p in enumerate(prompts):  # left padding
                    ids[r, width - len(p):] = torch.tensor(p)
                    mask[r, width - len(p):] = 1
                out = generate(self.model, ids.to(self.device), max_new, do_sample=do_sample and temperature > 0,
                               temperature=temperature, eos_token_id=self.tokenizer.eos_token_id,
                               attention_mask=mask.to(self.device), pad_token_id=self.pad_id)
                for r, i in enumerate(chunk):
                    text = self.tokenizer.decode(out[r, width:], skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[i] = text
                progress.update(len(chunk))
        progress.close()
        return results

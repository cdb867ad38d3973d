"""``HarnessLM``: the lm-evaluation-harness model interface for a hybrid student or a teacher.

Log-likelihoods come from one batched forward per group of requests (right padding, which the
student handles exactly); generation goes through ``models.generate`` (the student's recurrent
decoding, the teacher's own ``generate``) with left padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from models import generate


class HarnessLM(LM):
    """An ``lm_eval.api.model.LM`` over any causal LM of this project (student or teacher)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
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
            logprobs = F.log_softmax(self.model(ids.to(self.device), attention_mask=mask.to(self.device)).logits.float(), -1)
            for r, i in enumerate(chunk):
                n, cont = len(rows[r]), conts[r]
                span = logprobs[r, n - len(cont): n]
                target = torch.tensor(cont, device=span.device)
                total = span.gather(-1, target[:, None]).sum().item()
                greedy = bool((span.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*req.args) for req in requests])

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
        progress = tqdm(total=len(requests), desc="generations", unit="request", disable=len(requests) <= self.batch_size)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0) or 1.0)
            # longest prompts first, so each batch holds prompts of similar length (little padding)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
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

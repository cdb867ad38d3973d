"""Held-out scoring shared by the pipeline and the layer study: the same number of held-out blocks
from every domain, each model's token-summed CE, KL(teacher || student) and top-1 agreement per
block, and means per domain and overall with bootstrap intervals over blocks (paired across models).
"""

from __future__ import annotations

import math

import torch

METRICS = ("student_ce", "kl_teacher_student", "top1_agreement")


def select_blocks(blocks_by_source: dict[str, dict[str, torch.Tensor]], per_domain: int, spread: bool = True
                  ) -> dict[str, torch.Tensor]:
    """{domain: input ids [per_domain, seq_len]} from each source's held-out blocks
    (``TextDataModule.validation_blocks_by_source``). ``spread`` takes blocks evenly spaced through the
    domain's held-out text, so they come from as many documents as possible (the first blocks of a
    domain are often one long document); a clear error when a domain has too few."""
    chosen = {}
    for domain, split in blocks_by_source.items():
        ids = split["input_ids"]
        if len(ids) < per_domain:
            raise ValueError(f"domain {domain!r} has {len(ids)} held-out blocks of {ids.shape[-1] if ids.ndim == 2 else '?'} "
                             f"tokens, fewer than the {per_domain} asked for per domain: raise val_fraction or the "
                             "corpus size (its stem_prompts / chat_prompts), or lower the blocks per domain")
        index = torch.linspace(0, len(ids) - 1, per_domain).round().long() if spread else torch.arange(per_domain)
        chosen[domain] = ids[index]
    return chosen


@torch.no_grad()
def block_scores(teacher, students: dict, blocks: dict[str, torch.Tensor]) -> dict:
    """Per student, per domain, per block: token-summed CE, KL(teacher || student), top-1 agreements,
    and the token count, so means and bootstrap intervals over blocks can be formed afterwards."""
    out = {name: {} for name in ("teacher", *students)}
    for domain, ids in blocks.items():
        for name in out:
            out[name][domain] = []
        for row in ids:
            x = row[None]
            targets = x[:, 1:]
            t_logp = torch.log_softmax(teacher(x).logits[:, :-1].float(), -1)
            t_top = t_logp.argmax(-1)
            n = targets.numel()
            out["teacher"][domain].append({"student_ce": -t_logp.gather(-1, targets[..., None]).sum().item(), "n": n})
            for name, model in students.items():
                s_logp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
                out[name][domain].append({
                    "student_ce": -s_logp.gather(-1, targets[..., None]).sum().item(),
                    "kl_teacher_student": (t_logp.exp() * (t_logp - s_logp)).sum().item(),
                    "top1_agreement": (s_logp.argmax(-1) == t_top).sum().item(),
                    "n": n,
                })
    return out


def _ratio(rows: list[dict], metric: str, index) -> float:
    return sum(rows[i][metric] for i in index) / sum(rows[i]["n"] for i in index)


def summarise(scores: dict, baseline: str | None, iterations: int, seed: int,
              pairs: list[tuple[str, str]] = ()) -> dict:
    """Means per domain and overall with 90 % bootstrap intervals (blocks resampled within each domain,
    the same resample for every model, so differences are paired). ``pairs`` (a, b): also a's CE and
    KL minus b's on the same blocks, under ``summary["pairs"]["a - b"][domain]``."""
    g = torch.Generator().manual_seed(seed)
    domains = list(next(iter(scores.values())))
    counts = {d: len(scores["teacher"][d]) for d in domains}
    resamples = [{d: torch.randint(0, counts[d], (counts[d],), generator=g).tolist() for d in domains}
                 for _ in range(iterations)]
    full = {d: list(range(counts[d])) for d in domains}

    def stat(name, metric, domain, index):
        if domain != "all":
            return _ratio(scores[name][domain], metric, index[domain])
        rows = [r for d in domains for r in (scores[name][d][i] for i in index[d])]
        return sum(r[metric] for r in rows) / sum(r["n"] for r in rows)

    def interval(values):
        ordered = sorted(values)
        return [ordered[int(0.05 * (len(ordered) - 1))], ordered[int(math.ceil(0.95 * (len(ordered) - 1)))]]

    summary = {}
    for name, per_domain in scores.items():
        metrics = ("student_ce",) if name == "teacher" else METRICS
        summary[name] = {}
        for domain in [*domains, "all"]:
            entry = {}
            for metric in metrics:
                entry[metric] = stat(name, metric, domain, full)
                entry[f"{metric}_90"] = interval([stat(name, metric, domain, r) for r in resamples])
            if baseline and name not in ("teacher", baseline):
                diff = lambda index: (stat(name, "student_ce", domain, index)  # noqa: E731
                                      - stat(baseline, "student_ce", domain, index))
                entry["ce_minus_baseline"] = diff(full)
                entry["ce_minus_baseline_90"] = interval([diff(r) for r in resamples])
            summary[name][domain] = entry
    if pairs:
        summary["pairs"] = {}
    for a, b in pairs:
        entry = summary["pairs"][f"{a} - {b}"] = {}
        for domain in [*domains, "all"]:
            entry[domain] = {}
            for metric in ("student_ce", "kl_teacher_student"):
                diff = lambda index, m=metric: stat(a, m, domain, index) - stat(b, m, domain, index)  # noqa: E731
                entry[domain][metric] = diff(full)
                entry[domain][f"{metric}_90"] = interval([diff(r) for r in resamples])
    return summary


def paired_between_runs(rows_a: dict, rows_b: dict, iterations: int = 2000, seed: int = 0) -> dict | None:
    """A's CE and KL minus B's over the same held-out blocks scored in two runs (``heldout.json``'s
    ``per_block`` of one model each), with 90 % intervals; None when the blocks are not the same
    (other domains or counts), since then the two are not paired."""
    if sorted(rows_a) != sorted(rows_b) or any(len(rows_a[d]) != len(rows_b[d]) for d in rows_a):
        return None
    if any(x["n"] != y["n"] for d in rows_a for x, y in zip(rows_a[d], rows_b[d])):
        return None
    pair = summarise({"teacher": rows_a, "a": rows_a, "b": rows_b}, None, iterations, seed, [("a", "b")])
    return pair["pairs"]["a - b"]["all"]

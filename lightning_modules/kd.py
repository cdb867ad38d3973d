"""Stage 2 (sparse KD) and stage 3 (domain experts): end-to-end distillation against the
teacher's top-k distribution, mixed with cross-entropy, optionally with the Frobenius hidden-state
term and LoRA adapters (DESIGN §4)."""

from __future__ import annotations

import copy

import torch

from models import DistilXLSTMConfig, DistilXLSTMStudent, HybridConfig
from models.head_loss import DEFAULT_CHUNK_TOKENS

from .base import DistillationModule
from .losses import (
    IGNORE, KD_TAILS, cross_entropy, dense_kd_loss, frobenius_alignment_loss, next_token_targets, sparse_kd_and_ce_with_gradient,
    sparse_kd_loss, teacher_topk,
)
from .schedules import Schedule


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into their base weights and put the plain modules back (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model


# Stage II recipes. ``paper``: the seed paper's Eq. 13 (0.9 CE + 0.1 forward KL on the teacher's
# top-256, each side renormalised on that support, T = 1) with a constant learning rate after the
# warm-up. ``distil_xlstm``: Distil-xLSTM's Δ-distillation of the temperature (2 -> 1) and the KD
# weight (0.8 -> 0.5), the KD tail as one bucket, cosine learning rate.
KD_PRESETS = {
    "paper": {"top_k": 256, "temperature": Schedule("constant", 1.0), "alpha": Schedule("constant", 0.1),
              "kd_tail": "renormalised", "lr_schedule": "constant"},
    "distil_xlstm": {"temperature": Schedule("delta", 2.0, 1.0, delta=0.05),
                     "alpha": Schedule("delta", 0.8, 0.5, delta=0.05), "kd_tail": "bucket", "lr_schedule": "cosine"},
}


def _as_schedule(value):
    return value if isinstance(value, Schedule) else Schedule(**dict(value))


def apply_kd_preset(preset: str | None, given: dict, defaults: dict) -> dict:
    """``given`` with the preset's settings filled in. A setting given with a value other than its
    default and other than the preset's is refused, naming both: a preset is a recipe, not a default."""
    if preset is None:
        return dict(given)
    if preset not in KD_PRESETS:
        raise ValueError(f"preset={preset!r} is not supported; allowed values: {', '.join(KD_PRESETS)}, or null "
                         "(the settings as given)")
    out = dict(given)
    for key, value in KD_PRESETS[preset].items():
        mine, default = given[key], defaults[key]
        if isinstance(value, Schedule):
            mine, default = _as_schedule(mine), _as_schedule(default)
        if mine != default and mine != value:
            raise ValueError(f"model.preset={preset!r} sets {key}={value}, but {key}={mine} was given; drop one of "
                             f"them (preset null trains with the settings as given)")
        out[key] = value
    return out


def kd_top_k(top_k: int | None, preset: str | None, vocab: int) -> int | None:
    """The number of teacher tokens KD keeps per position: a preset's k (the paper's 256) is clamped to a
    smaller vocabulary, since its top-256 of 97 tokens is all of them; an explicit k larger than the
    vocabulary is refused."""
    if top_k is not None and preset is not None and "top_k" in KD_PRESETS.get(preset, {}):
        top_k = min(top_k, vocab)
    if top_k is not None and top_k > vocab:
        raise ValueError(f"model.init_args.top_k={top_k} is larger than the teacher's vocabulary ({vocab}); "
                         f"allowed values: 1..{vocab}, or null for the dense KL")
    return top_k


class SparseKDModule(DistillationModule):
    """loss = alpha * T^2 * KL_topk(teacher^T || student^T) + (1 - alpha - beta) * CE + beta * Frobenius.

    The teacher's top-k comes from the batch (a top-k cache, ``data.topk_cache``) or from an online
    teacher forward; ``top_k: null`` uses the dense KL. Temperature, alpha and beta follow schedules
    that are pure functions of the optimizer step. ``preset`` picks a published recipe (``paper``,
    ``distil_xlstm``; see ``KD_PRESETS``).
    """

    def __init__(self, teacher: str = "smollm2-135m-instruct", student_ckpt: str | None = None,
                 hybrid: HybridConfig = HybridConfig(),
                 trainable: str = "all", lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 10,
                 min_lr_ratio: float = 0.1, teacher_dtype: str = "float32", trust_remote_code: bool = False,
                 top_k: int | None = 64, temperature: Schedule = Schedule("constant", 2.0),
                 alpha: Schedule = Schedule("constant", 0.5), beta: Schedule = Schedule("constant", 0.0),
                 lora_rank: int = 0, lora_alpha: float = 16.0,
                 lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"],
                 fsdp_param_dtype: str | None = None, activation_checkpointing: bool = False,
                 student_family: str = "hybrid", distil_xlstm: DistilXLSTMConfig = DistilXLSTMConfig(),
                 lr_schedule: str = "cosine", max_warmup_fraction: float = 0.1, kd_tail: str = "bucket",
                 preset: str | None = None, loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
                 recompute_activations: bool = True):
        """
        Args:
            top_k: teacher tokens kept per position (None: dense KL over the vocabulary).
            temperature: KD temperature T schedule.
            alpha: weight of the KD term schedule.
            beta: weight of the Frobenius hidden-state term schedule (0: off).
            lora_rank: > 0 adds LoRA adapters of this rank on ``lora_targets`` (their base weights
                freeze); merged into the weights when the student is saved.
            fsdp_param_dtype: under FSDP, the dtype parameters are gathered in (e.g. bfloat16).
            activation_checkpointing: recompute decoder layers in backward to save memory.
            student_family: ``hybrid`` (convert the teacher with ``hybrid``) or ``distil_xlstm`` (a pure
                xLSTM student built with ``distil_xlstm``); ignored with ``student_ckpt``.
            distil_xlstm: the Distil-xLSTM student's configuration.
            kd_tail: the tokens outside the top-k: ``renormalised`` (both sides restricted to the top-k,
                as the paper) or ``bucket`` (one extra class; see ``losses.sparse_kd_loss``).
            preset: ``paper`` or ``distil_xlstm`` sets top_k / temperature / alpha / kd_tail /
                lr_schedule as that recipe does (``KD_PRESETS``); null: as given.
            loss_chunk_tokens: the loss runs over the vocabulary-sized logits this many positions at a
                time, with its gradient (``models.head_loss``): the [B, T, V] logits never exist at
                once. null: the whole logits at once (more memory, same numbers).
            recompute_activations: the backward recomputes the hybrid op, the gated MLP's SiLU and
                product and the RMS norms instead of keeping them (``DistillationModule``).
        """
        import inspect

        defaults = {k: v.default for k, v in inspect.signature(SparseKDModule.__init__).parameters.items()
                    if k != "self"}
        given = apply_kd_preset(preset, {"top_k": top_k, "temperature": temperature, "alpha": alpha,
                                         "kd_tail": kd_tail, "lr_schedule": lr_schedule}, defaults)
        top_k, temperature, alpha, kd_tail, lr_schedule = (given[k] for k in
                                                           ("top_k", "temperature", "alpha", "kd_tail", "lr_schedule"))
        super().__init__(teacher=teacher, student_ckpt=student_ckpt, hybrid=hybrid, trainable=trainable, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                         teacher_dtype=teacher_dtype, trust_remote_code=trust_remote_code,
                         fsdp_param_dtype=fsdp_param_dtype, activation_checkpointing=activation_checkpointing,
                         student_family=student_family, distil_xlstm=distil_xlstm, lr_schedule=lr_schedule,
                         max_warmup_fraction=max_warmup_fraction, recompute_activations=recompute_activations)
        if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} is invalid; allowed values: an integer >= 1 "
                             "(positions per chunk of the loss), or null for the whole logits at once")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} is invalid; allowed values: an integer >= 1, or null for dense KL")
        if kd_tail not in KD_TAILS:
            raise ValueError(f"kd_tail={kd_tail!r} is not supported; allowed values: {', '.join(KD_TAILS)}")
        self.save_hyperparameters()
        # the resolved recipe is what hparams (checkpoints, TensorBoard) record
        self.hparams.update(top_k=top_k, temperature=temperature, alpha=alpha, kd_tail=kd_tail, lr_schedule=lr_schedule)
        self.top_k = top_k  # clamped to the teacher's vocabulary in configure_model (kd_top_k)
        self.schedules = {name: _as_schedule(value)
                          for name, value in (("temperature", temperature), ("alpha", alpha), ("beta", beta))}
        self.plain_hparams()
        # what the loggers record (hparams.yaml, TensorBoard) is the recipe that trains, not the arguments
        self._hparams_initial = copy.deepcopy(self._hparams)

    def configure_model(self) -> None:
        if self.student is not None:
            return
        super().configure_model()
        hp = self.hparams
        # hparams keep the preset's k, so that a checkpoint's hparams rebuild this module on resume
        self.top_k = kd_top_k(hp.top_k, hp.preset, self.teacher.config.vocab_size)
        if hp.lora_rank > 0 and isinstance(self.student, DistilXLSTMStudent):
            raise ValueError("lora_rank > 0 adapts the teacher's attention projections of a hybrid student; a "
                             "Distil-xLSTM student has none: set model.lora_rank to 0")
        if hp.lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, target_modules=list(hp.lora_targets))
            inject_adapter_in_model(config, self.student.lm)
            self.select_trainable()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        cache = getattr(self.trainer.datamodule, "topk_cache", None) if self.trainer.datamodule else None
        if cache:
            from datamodules.topk_cache import check_fingerprint

            manifest = check_fingerprint(cache, teacher=self.teacher)
            k = manifest["fingerprint"]["k"]
            # a cache of the top k serves any smaller k: its entries are sorted, the top k' are its first k'
            if self.top_k is None or self.top_k > k:
                raise ValueError(f"model.top_k={self.top_k} but the top-k cache {cache} holds k={k}; "
                                 f"set model.top_k to at most {k}, or rebuild the cache with k >= the top_k you "
                                 "want (dense KL, top_k null, needs the teacher online: drop data.topk_cache)")

    def on_train_start(self) -> None:
        # (the epoch length is known once the training data is set up, after on_fit_start)
        ctx = self.schedule_context()
        for schedule in self.schedules.values():  # a schedule this run cannot follow fails before step 0
            schedule(self.global_step, **ctx)

    def select_trainable(self) -> None:
        super().select_trainable()
        if self.hparams.lora_rank > 0:  # adapters train; the weights they wrap stay frozen
            for name, p in self.student.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
                elif ".base_layer." in name:
                    p.requires_grad_(False)

    def export_student(self):
        if self.hparams.lora_rank == 0:
            return super().export_student()
        if self.sharded:
            raise ValueError("LoRA adapters under FSDP are not supported: use lora_rank 0 or a single device")
        return merge_lora(copy.deepcopy(self.student))

    def teacher_targets(self, batch, output_hidden_states: bool):
        """(top-k ids, top-k log-probs) or None with dense KD, the teacher's dense logits or None, and
        its hidden states or None. An online teacher's logits are reduced to its top-k here, so that
        the vocabulary-sized tensor is gone before the student's forward starts."""
        t_out = None
        if output_hidden_states or "topk_ids" not in batch:
            with torch.no_grad():
                t_out = self.teacher(batch["input_ids"], output_hidden_states=output_hidden_states)
        hidden = t_out.hidden_states if output_hidden_states else None
        if "topk_ids" in batch:
            k = self.top_k or batch["topk_ids"].shape[-1]
            return (batch["topk_ids"][..., :k], batch["topk_logprobs"][..., :k]), None, hidden
        if self.top_k is None:
            return None, t_out.logits, hidden
        return teacher_topk(t_out.logits, self.top_k), None, hidden

    def kd_and_ce(self, logits, targets, topk, dense, T: float):
        """(KD term, cross-entropy), each a mean over the positions with a target."""
        mask = targets != IGNORE
        if topk is not None:
            kd = sparse_kd_loss(logits, *topk, T, mask, tail=self.hparams.kd_tail)
        else:
            kd = dense_kd_loss(logits, dense, T, mask)
        return kd, cross_entropy(logits, targets)

    def chunked_kd_and_ce(self, targets, topk, dense, T: float, alpha: float, ce_weight: float):
        """The same loss as ``kd_and_ce`` as a ``models.head_loss`` chunk function: each chunk's
        masked means weighted by its share of the positions with a target (sparse KD: with its
        gradient in closed form, ``losses.sparse_kd_and_ce_with_gradient``; dense KD: autograd's)."""
        flat_targets = targets.flatten()
        flat_topk = None if topk is None else [t.flatten(0, 1) for t in topk]
        flat_dense = None if dense is None else dense.flatten(0, 1)
        total = (flat_targets != IGNORE).sum().clamp_min(1)

        if flat_topk is not None:  # sparse KD: the loss writes its own gradient (no graph over [n, V])
            def chunk_with_gradient(logits, rows):
                loss, kd, ce, grad = sparse_kd_and_ce_with_gradient(
                    logits, flat_targets[rows], *(x[rows] for x in flat_topk), T, alpha, ce_weight, total,
                    tail=self.hparams.kd_tail)
                return loss, {"kd": kd, "ce": ce}, grad
            return chunk_with_gradient

        def chunk(logits, rows):
            t = flat_targets[rows]
            share = (t != IGNORE).sum() / total
            kd, ce = self.kd_and_ce(logits[None], t[None], None if flat_topk is None else [x[rows][None] for x in flat_topk],
                                    None if flat_dense is None else flat_dense[rows][None], T)
            kd, ce = kd * share, ce * share
            return alpha * kd + ce_weight * ce, {"kd": kd, "ce": ce}
        return chunk

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        targets = next_token_targets(batch["labels"])
        ctx = self.schedule_context()
        step = self.global_step
        T, alpha, beta = (float(self.schedules[n](step, **ctx)) for n in ("temperature", "alpha", "beta"))
        topk, dense, teacher_hidden = self.teacher_targets(batch, output_hidden_states=beta > 0)
        ce_weight = 1.0 - alpha - beta
        if hp.loss_chunk_tokens:
            out = self.student(batch["input_ids"], output_hidden_states=beta > 0, chunk_tokens=hp.loss_chunk_tokens,
                               chunk_loss=self.chunked_kd_and_ce(targets, topk, dense, T, alpha, ce_weight))
            loss, kd, ce = out.loss, out.loss_components["kd"], out.loss_components["ce"]
        else:
            out = self.student(batch["input_ids"], output_hidden_states=beta > 0)
            kd, ce = self.kd_and_ce(out.logits, targets, topk, dense, T)
            loss = alpha * kd + ce_weight * ce
        components = {"kd": kd, "ce": ce}
        if beta > 0:
            teacher_mean = torch.stack(teacher_hidden[1:]).mean(0)
            frob = frobenius_alignment_loss(out.hidden_states[-1], teacher_mean)
            loss = loss + beta * frob
            components["frobenius"] = frob
            self.log("train/frobenius", frob, on_step=True)
        self.check_finite(**components)
        self.log_dict({"train/kd": kd, "train/ce": ce, "train/loss": loss, "train/kd_temperature": T,
                       "train/kd_alpha": alpha, "train/kd_beta": beta}, on_step=True)
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, logger=False)
        return loss


class ExpertFinetuneModule(SparseKDModule):
    """Stage 3: the stage-2 objective on one domain's data, starting from a stage-2 student."""

    def __init__(self, domain: str, student_ckpt: str, **kwargs):
        """
        Args:
            domain: name of the expert's domain (math, code, stem, chat, ...), for logs and outputs.
            student_ckpt: the stage-2 student folder this expert starts from.
        """
        if not student_ckpt:
            raise ValueError("ExpertFinetuneModule needs model.student_ckpt: the stage-2 student folder")
        # SparseKDModule's save_hyperparameters already records ``domain`` (Lightning collects the
        # arguments of every __init__ up the call chain) and then the recipe a preset resolved; saving
        # again here would put back the unresolved arguments LightningCLI passes (every default)
        super().__init__(student_ckpt=student_ckpt, **kwargs)

"""The training loss without whole-vocabulary logits: next-token cross-entropy over the model's last
hidden state, through its output projection, a chunk of positions at a time.

The model's own loss (`model(input_ids, labels=...)`) materialises the logits of the whole
micro-batch over the whole vocabulary, an fp32 copy of them, and their gradient: at 8 x 1,024
tokens, about 4.6 GiB for GPT-2's 50k vocabulary and 14 GiB for Qwen2.5's 152k. Here each chunk's
logits live only while the chunk's loss and gradients are computed, in the forward pass (as the
fused kernels of Liger and cut-cross-entropy do): the backward pass only scales the stored
gradients, so no logit is ever recomputed and the FLOPs are the model's own. The result is the
same loss and the same gradients (tests: within 1e-5 relative in fp32, for every family).

`CausalLMLoss` wraps a causal LM (or a PEFT model) into a module whose forward returns the mean
loss, so Accelerate (DDP) and torch.compile see one module, loss included. Whether body + head
gives the model's own logits is checked on one batch (`check_fast_path`) before training and
before scoring: a forward that does more (a final scaling, soft-capping) is caught there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Positions per chunk: about 2^25 logits (128 MiB in fp32) whatever the vocabulary.
CHUNK_LOGITS = 2**25


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), chunk by chunk, with the
    gradients computed in the same pass and stored (a few rows of logits at a time)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(sum of losses)/d(logits) = softmax - one-hot, computed in place over the logits.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype), None, None)


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM itself: under a PEFT wrapper, its base model (LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(causal_lm) -> str | None:
    """Why computing the loss from the hidden state would differ from the model's own, or None."""
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(causal_lm.config, key, None) not in (None, 1, 1.0):
            return f"its config sets {key}, which the chunked loss does not apply"
    if not isinstance(causal_lm.get_output_embeddings(), torch.nn.Linear):  # (an FSDP-sharded Linear is one)
        return "its output projection is not a plain Linear layer (lora.target_modules wraps it, say)"
    return None


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer without its head (base_model_prefix: transformer, model, gpt_neox, ...) and
    the output projection, of a causal LM or a PEFT model over one."""
    causal_lm = causal_lm_of(model)
    return getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings()


def _chunk(head: torch.nn.Module) -> int:
    return max(1, CHUNK_LOGITS // head.weight.shape[0])


@torch.no_grad()
def position_nll(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, own_forward: bool = False,
                 fp32_head: bool = True, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The NLL of each next token input_ids[:, 1:][mask], in fp32: from the last hidden state
    through the output projection, a chunk of positions at a time, the projection and the
    log-softmax in fp32 whatever the autocast (`fp32_head`), so CPU and GPU score the same weights
    alike; or through the model's own forward and whole logits (`own_forward`, or where the chunked
    path is known to differ). `attention_mask` marks padding (instruction batches)."""
    targets = input_ids[:, 1:][mask]
    if own_forward or unsupported(causal_lm_of(model)) is not None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(logits[:, :-1][mask].float(), targets, reduction="none")
    body, head = body_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1][mask]
    step = _chunk(head)
    if not fp32_head:  # the head as the model's forward runs it, under any autocast
        return torch.cat([F.cross_entropy(head(hidden[i:i + step]).float(), targets[i:i + step], reduction="none")
                          for i in range(0, len(targets), step)])
    weight, bias = head.weight.float(), None if head.bias is None else head.bias.float()
    with torch.autocast(input_ids.device.type, enabled=False):
        return torch.cat([F.cross_entropy(F.linear(hidden[i:i + step].float(), weight, bias), targets[i:i + step],
                                          reduction="none") for i in range(0, len(targets), step)])


# The largest per-token NLL difference (nats) between body + head and the model's own forward that
# check_fast_path accepts: both run the same operations in the same precision, so a plain causal
# LM differs by rounding alone (under 1e-5 in the family tests).
FAST_PATH_TOLERANCE = 1e-3


@torch.no_grad()
def check_fast_path(model: torch.nn.Module, input_ids: torch.Tensor,
                    root: torch.nn.Module | None = None) -> tuple[str | None, float | None]:
    """(why the body + head path would score `model` unlike its own forward, or None; the largest
    per-token NLL difference found on the batch `input_ids`). Both paths run in the model's own
    precision and in eval mode (no dropout), so only what the forward does between the body and
    the head (a final scaling, soft-capping, a bias added outside the head) can part them. With
    `root` (the prepared loss module over `model`), both score through its forward."""
    if (why := unsupported(causal_lm_of(model))) is not None:
        return why, None
    owner = root if root is not None else model
    modes = {m: m.training for m in owner.modules()}
    owner.eval()
    try:
        mask = torch.ones((input_ids.shape[0], input_ids.shape[1] - 1), dtype=torch.bool, device=input_ids.device)
        if root is not None:
            fast, own = root(input_ids, nll="body_head"), root(input_ids, nll="model")
        else:
            fast = position_nll(model, input_ids, mask, fp32_head=False)
            own = position_nll(model, input_ids, mask, own_forward=True)
    finally:
        for m, training in modes.items():  # each module as it was (a frozen part may be in eval mode)
            m.training = training
    diff = (fast - own).abs().max().item()
    if not diff <= FAST_PATH_TOLERANCE:  # NaN too
        return (f"on one batch its per-token NLL through body + head differs from its own forward by up to "
                f"{diff:.3g} nats (tolerance {FAST_PATH_TOLERANCE:g}): the forward does more than body + head"), diff
    return None, diff


class _WithLoss(torch.nn.Module):
    """A causal LM with its loss, as the module Accelerate prepares (DDP, FSDP's root, compile).

    forward(input_ids, attention_mask, target_mask) -> the loss summed over the targets
    target_mask marks (every next token when None; the loop divides by the step's target count).
    forward(..., nll=path) -> instead, each target's NLL in fp32 without gradients, scored along
    `path` (position_nll: "body_head" in the model's precision, "body_head_fp32", or "model", its
    own forward): validation and the checks score through here, so that under FSDP every weight is
    gathered by the root's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the module to train and save (a PEFT model saves its adapter)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, nll: str | None = None) -> torch.Tensor:
        if nll is None:
            return self.loss(input_ids, attention_mask, target_mask)
        mask = torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if target_mask is None else target_mask
        return position_nll(self.model, input_ids, mask, own_forward=nll == "model", fp32_head=nll == "body_head_fp32",
                            attention_mask=attention_mask)


class CausalLMLoss(_WithLoss):
    """The chunked loss: only the targets' positions get logits, a chunk at a time."""

    def loss(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        body, head = body_and_head(self.model)  # looked up, not registered: each weight keeps one name
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
        if target_mask is None:
            hidden, targets = hidden.reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1)
        else:  # prompt and padding positions never reach the head: no logits, no gradient
            hidden, targets = hidden[target_mask], input_ids[:, 1:][target_mask]
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, _chunk(head))


class ModelOwnLoss(_WithLoss):
    """The model's own loss, whole logits and all, summed over the targets (labels -100 elsewhere)."""

    def loss(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        labels = input_ids.clone()
        if target_mask is not None:
            labels[:, 1:] = torch.where(target_mask, input_ids[:, 1:], -100)
        count = labels[:, 1:].ne(-100).sum()
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss * count


def with_loss(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The module training runs: `model` with its loss (train.loss: chunked or model)."""
    return CausalLMLoss(model) if kind == "chunked" else ModelOwnLoss(model)

"""Keys, values and target vectors of the locate-then-edit editors, on a model run with edited weights (through
``torch.func.functional_call``: the model itself is never written to).

* :func:`reprs_at` / :func:`keys_at_subject`: a module's input (the key) and output at the subject's last token
  (the originals' ``get_reprs_at_word_tokens`` / ``get_module_input_output_at_words``);
* :func:`optimise_targets` / :func:`optimise_target`: the vector that, written at the subject's last token in a
  module's output, makes the model predict the target (ROME's ``compute_v`` loop, MEMIT's and AlphaEdit's
  ``compute_z``): Adam on a delta, the target's NLL over the context templates + ``kl_factor`` * KL on
  "<subject> is a" + ``v_weight_decay`` * |delta| / |v_init|^2, delta clamped to ``clamp_norm_factor`` *
  |v_init|; several requests at once, each as alone. Its passes (passes.py) compute the logits only where the loss
  reads them, replay the blocks below the delta and run the prompts' tokens before the subject's last once (the
  same numbers to float rounding);
* :func:`sample_context_templates`: the short prefixes the originals generate once from the model.

Every hook is registered for one forward pass and removed in a ``finally``; nothing is left on the model.
"""

from __future__ import annotations

import unicodedata
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from editable_model import logits_of, output_with_weights

from .passes import Rows, TargetPasses, hidden_of, hooked
from .text import encode_batch, subject_last_index

Weights = Dict[str, torch.Tensor]
STOP_LOSS = 5e-2  # a target vector whose loss is below it is done (the originals' early stop)


class _Reached(Exception):
    """Raised by :func:`reprs_at`'s hook once the module ran: the rest of the pass is not needed."""


def run(model, weights: Weights, ids: torch.Tensor, mask: torch.Tensor):
    return output_with_weights(model, weights, {"input_ids": ids, "attention_mask": mask})


@torch.no_grad()
def reprs_at(
    model, weights: Weights, tokenizer, texts: Sequence[str], idxs: Sequence[int], module: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of ``module`` at position ``idxs[i]`` of text i: two (n, d) tensors. The pass stops at
    ``module``: nothing after it is computed."""
    device = next(model.parameters()).device
    ids, mask = encode_batch(tokenizer, texts, device)
    seen: Dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        seen["in"], seen["out"] = inputs[0], hidden_of(output)
        raise _Reached

    try:
        with hooked(model, module, hook):
            run(model, weights, ids, mask)
    except _Reached:
        pass
    rows = torch.arange(len(texts), device=device)
    at = torch.tensor(list(idxs), device=device)
    return seen["in"][rows, at].detach(), seen["out"][rows, at].detach()


def keys_at_subject(
    model, weights: Weights, tokenizer, templates: Sequence[str], subjects: Sequence[str], module: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of ``module`` at the last token of subject i in ``templates[i].format(subjects[i])``."""
    texts = [t.format(s) for t, s in zip(templates, subjects)]
    idxs = [subject_last_index(tokenizer, t, s) for t, s in zip(templates, subjects)]
    return reprs_at(model, weights, tokenizer, texts, idxs, module)


def optimise_target(
    model,
    weights: Weights,
    tokenizer,
    request,
    contexts: Sequence[str],
    module: str,
    settings,
) -> torch.Tensor:
    """The target vector v* = v_init + delta of ``module``'s output at the subject's last token of one request (the
    originals' compute_v / compute_z): :func:`optimise_targets` of that request alone."""
    vectors, _ = optimise_targets(model, weights, tokenizer, [request], contexts, module, settings)
    return vectors[0]


def optimise_targets(
    model,
    weights: Weights,
    tokenizer,
    requests: Sequence,
    contexts: Sequence[str],
    module: str,
    settings,
    prefix: bool = True,
) -> Tuple[torch.Tensor, List[int]]:
    """The target vectors v*_r = v_init_r + delta_r of ``module``'s output at the subject's last token, one per
    request (the originals' compute_v / compute_z, which take one request at a time), and the Adam steps each took:
    ``requests`` :class:`text.LocateRequest`s, ``contexts`` the context templates ("{}" and the generated
    "<prefix>. {}"), ``settings`` the editor's group (v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor,
    kl_factor). ``prefix=False``: every step runs its prompts whole (passes.py).

    Several requests run as one batch, and each is optimised exactly as alone: its own delta (a row of one Adam
    parameter: Adam is elementwise, and no row's loss reads another's delta), its own loss, its own stop (loss
    under 0.05, after which its rows leave the batch) and its own clamp. The loss is read from the model's
    logits, as ROME's is; MEMIT's reads ln_f(h_L) W_lm of the loss layer, the same numbers where the loss layer
    is the last (every published configuration)."""
    device = next(model.parameters()).device
    rows = Rows.encode(tokenizer, requests, contexts, device)
    n = len(requests)
    passes = TargetPasses(model, weights, rows, module, n, prefix=prefix)
    init = passes.init
    delta = torch.zeros(n, model.config.hidden_size, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=float(settings.v_lr))
    kl_init: Dict[int, torch.Tensor] = {}
    steps = int(settings.v_num_grad_steps)
    final = torch.zeros_like(init)
    taken = [0] * n
    active = list(range(n))
    n_ctx = rows.n_rows - 1
    with torch.enable_grad():
        for it in range(steps):
            opt.zero_grad()
            logits, spans = passes.logits(active, delta, first=it == 0)
            going, losses = [], []
            for r in active:
                start, n_tgt = spans[r]
                kl_at = start + n_ctx * n_tgt
                kl_log_probs = F.log_softmax(logits[kl_at : kl_at + 1], dim=1)
                if r not in kl_init:
                    kl_init[r] = kl_log_probs.detach().clone()
                log_probs = torch.log_softmax(logits[start:kl_at].view(n_ctx, n_tgt, -1), dim=2)
                tgt = torch.tensor(rows.targets[r], device=device).expand(n_ctx, n_tgt)
                picked = torch.gather(log_probs, 2, tgt.unsqueeze(2)).squeeze(2)
                nll = (-picked.sum(1) / n_tgt).mean()
                kl = F.kl_div(kl_init[r], kl_log_probs, log_target=True, reduction="batchmean")
                kl = float(settings.kl_factor) * kl
                decay = float(settings.v_weight_decay) * (torch.norm(delta[r]) / torch.norm(init[r]) ** 2)
                loss = nll + kl + decay
                if loss < STOP_LOSS or it == steps - 1:
                    final[r] = delta[r].detach()
                    taken[r] = it
                else:
                    going.append(r)
                    losses.append(loss)
            if not going:
                break
            torch.stack(losses).sum().backward()
            opt.step()
            with torch.no_grad():
                for r in going:
                    max_norm = float(settings.clamp_norm_factor) * init[r].norm()
                    if delta[r].norm() > max_norm:
                        delta[r] = delta[r] * max_norm / delta[r].norm()
            active = going
    return (init + final).detach(), taken


@torch.no_grad()
def sample_context_templates(
    model, tokenizer, starts: Sequence[str], length_params: Sequence[Tuple[int, int]], per_start: bool, seed: int = 0
) -> List[List[str]]:
    """The context templates: for each (length, n) of ``length_params``, n texts of ``length`` tokens sampled from
    the unedited model (top-5, as the originals' ``generate_fast``) after ``starts`` (n per start with
    ``per_start=False``, ROME's one start; n / len(starts) each with ``per_start=True``, MEMIT's five), each
    made "<text>. {}". Seeded: the same templates for the same model."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    groups = []
    for length, n in length_params:
        count = n // len(starts) if per_start else n
        texts = []
        for start in starts:
            prompt = list(tokenizer(start)["input_ids"])
            rows = [list(prompt) for _ in range(count)]
            for _ in range(max(0, length - len(prompt))):
                ids = torch.tensor(rows, device=device)
                logits = logits_of(model(input_ids=ids))[:, -1].float().cpu()
                top, where = logits.topk(5, dim=-1)
                choice = torch.multinomial(torch.softmax(top, -1), 1, generator=generator)
                for r, token in zip(rows, where.gather(1, choice).squeeze(1).tolist()):
                    r.append(token)
            for r in rows:
                text = tokenizer.decode(r, skip_special_tokens=True)
                text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("\n", " ")
                texts.append(text.replace("{", " ").replace("}", " ") + ". {}")
        groups.append(texts)
    return groups

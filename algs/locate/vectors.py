"""Keys, values and target vectors of the locate-then-edit editors, on a model run with edited weights (through
``torch.func.functional_call``: the model itself is never written to).

* :func:`reprs_at` / :func:`keys_at_subject`: a module's input (the key) and output at the subject's last token
  (the originals' ``get_reprs_at_word_tokens`` / ``get_module_input_output_at_words``);
* :func:`optimise_target`: the vector that, written at the subject's last token in a module's output, makes the
  model predict the target (ROME's ``compute_v`` loop, MEMIT's and AlphaEdit's ``compute_z``): Adam on a delta, the
  target's NLL over the context templates + ``kl_factor`` * KL on "<subject> is a" + ``v_weight_decay`` *
  |delta| / |v_init|^2, delta clamped to ``clamp_norm_factor`` * |v_init|; the logits computed only where the
  loss reads them and the blocks below the delta replayed after the first pass (the same numbers, 1.5x faster on
  SmolLM2);
* :func:`sample_context_templates`: the short prefixes the originals generate once from the model.

Every hook is registered for one forward pass and removed in a ``finally``; nothing is left on the model.
"""

from __future__ import annotations

import unicodedata
from contextlib import ExitStack, contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from editable_model import logits_of, output_with_weights
from models.replay import capture_block_output, first_edited_block, output_layer_at, replaying

from .text import encode_batch, subject_last_index, target_ids

Weights = Dict[str, torch.Tensor]


@contextmanager
def hooked(model: torch.nn.Module, module_name: str, hook: Callable) -> Iterator[None]:
    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hidden(output) -> torch.Tensor:
    """A block's output as a tensor (older transformers return a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def run(model, weights: Weights, ids: torch.Tensor, mask: torch.Tensor):
    return output_with_weights(model, weights, {"input_ids": ids, "attention_mask": mask})


@torch.no_grad()
def reprs_at(
    model, weights: Weights, tokenizer, texts: Sequence[str], idxs: Sequence[int], module: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of ``module`` at position ``idxs[i]`` of text i: two (n, d) tensors."""
    device = next(model.parameters()).device
    ids, mask = encode_batch(tokenizer, texts, device)
    seen: Dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        seen["in"], seen["out"] = inputs[0], _hidden(output)

    with hooked(model, module, hook):
        run(model, weights, ids, mask)
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
    """The target vector v* = v_init + delta of ``module``'s output at the subject's last token (the originals'
    compute_v / compute_z): ``request`` a :class:`text.LocateRequest`, ``contexts`` the context templates ("{}" and
    the generated "<prefix>. {}"), ``settings`` the editor's group (v_num_grad_steps, v_lr, v_weight_decay,
    clamp_norm_factor, kl_factor). The loss is read from the model's logits, as ROME's is; MEMIT's reads
    ln_f(h_L) W_lm of the loss layer, the same numbers where the loss layer is the last (every published
    configuration)."""
    device = next(model.parameters()).device
    tgt = target_ids(tokenizer, request.target)
    rewriting = [c.format(request.prompt) + tokenizer.decode(tgt[:-1]) for c in contexts]
    kl_prompts = ["{} is a"]
    prompts = rewriting + kl_prompts
    ids, mask = encode_batch(tokenizer, [p.format(request.subject) for p in prompts], device)
    lookup = [subject_last_index(tokenizer, p, request.subject) for p in prompts]
    # The logits the loss reads: rewriting row i at the len(tgt) positions that predict the target's tokens (the
    # last len(tgt) of the row), the KL row at its subject's last token. Only those are computed (the output layer
    # runs on them alone): the numbers the originals read from their full logits.
    n_rows, n_tgt = len(rewriting), len(tgt)
    ends = mask.sum(1).tolist()
    rows = [i for i in range(n_rows) for _ in range(n_tgt)] + [n_rows]
    cols = [ends[i] - n_tgt + j for i in range(n_rows) for j in range(n_tgt)] + [lookup[-1]]
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    tgt_t = torch.tensor(tgt, device=device).expand(n_rows, n_tgt)
    # The blocks before the one the delta is written in compute the same thing at every step: after the first
    # pass they replay its output (models/replay.py) instead of computing it again.
    located = first_edited_block(model, [module + ".weight"])

    delta = torch.zeros(model.config.hidden_size, device=device, requires_grad=True)
    state: Dict[str, Optional[torch.Tensor]] = {"init": None, "lower": None}

    def add_delta(_module, _inputs, output):
        hidden = _hidden(output)
        if state["init"] is None:  # v_init: the clean output at the first prompt's subject token
            state["init"] = hidden[0, lookup[0]].detach().clone()
        hidden = hidden.clone()
        for i, idx in enumerate(lookup):
            hidden[i, idx, :] = hidden[i, idx, :] + delta
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def picked_logits(first: bool) -> torch.Tensor:
        """(n_rows * n_tgt + 1, vocab): the logits at (rows, cols)."""
        records = None
        with ExitStack() as stack:
            stack.enter_context(hooked(model, module, add_delta))
            cut = stack.enter_context(output_layer_at(model, rows_t, cols_t))
            if located is not None and first:
                records = stack.enter_context(capture_block_output(*located))
            elif state["lower"] is not None:
                stack.enter_context(replaying(*located, lambda: state["lower"], state["as_tuple"]))
            logits = logits_of(run(model, weights, ids, mask))
        if records and records[0] is not None:
            state["lower"], state["as_tuple"] = records[0]
        return logits[0] if cut else logits[rows_t, cols_t]

    opt = torch.optim.Adam([delta], lr=float(settings.v_lr))
    kl_init = None
    steps = int(settings.v_num_grad_steps)
    with torch.enable_grad():
        for it in range(steps):
            opt.zero_grad()
            logits = picked_logits(first=it == 0)
            kl_log_probs = F.log_softmax(logits[-1:], dim=1)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            log_probs = torch.log_softmax(logits[:-1].view(n_rows, n_tgt, -1), dim=2)
            picked = torch.gather(log_probs, 2, tgt_t.unsqueeze(2)).squeeze(2)
            nll = (-picked.sum(1) / n_tgt).mean()
            kl = float(settings.kl_factor) * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
            decay = float(settings.v_weight_decay) * (torch.norm(delta) / torch.norm(state["init"]) ** 2)
            loss = nll + kl + decay
            if loss < 5e-2 or it == steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = float(settings.clamp_norm_factor) * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    return (state["init"] + delta).detach()


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

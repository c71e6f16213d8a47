"""Sampling continuations from the model itself: the targets of the embedded gen set (the new facts an edit teaches
are the model's own sampled continuations of a passage, as in the paper's Wikitext setup)."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from transformers import GenerationConfig

from utils import pad_rows

from . import DataError

SAMPLE_BATCH_SIZE = 32  # prompts per generate() call


@torch.no_grad()
def sample_continuations(
    model,
    tokenizer,
    prompts: List[List[int]],
    n_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = SAMPLE_BATCH_SIZE,
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[List[int]]:
    """Sample exactly ``n_tokens`` new token ids after each prompt (pure sampling: no top-k, no top-p).

    Prompts are batched by length with left padding and an attention mask. The global torch RNG
    is seeded with ``seed`` inside a forked RNG state, so the caller's random state is untouched
    and the result is reproducible on the same device. ``temperature <= 0`` decodes greedily. ``progress(done,
    total)``, if given, is called after each batch with the number of prompts done.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id
    sampling = temperature > 0
    gen_cfg = GenerationConfig(
        do_sample=sampling,
        temperature=float(temperature) if sampling else None,
        top_k=0 if sampling else None,
        top_p=1.0 if sampling else None,
        min_new_tokens=n_tokens,
        max_new_tokens=n_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    device = next(model.parameters()).device
    # generate() fills unset options from the checkpoint's own generation config (top_k, min_p,
    # repetition_penalty, ...); swap in a neutral one so that this is pure sampling for every model.
    saved_gen_cfg = getattr(model, "generation_config", None)
    if saved_gen_cfg is not None:
        model.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=eos_id)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: List[Optional[List[int]]] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                ids, mask = pad_rows([prompts[i] for i in idx], pad_id, left=True)
                gen = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
                )
                new = gen[:, ids.shape[1] :].cpu()
                if new.shape[1] != n_tokens:
                    raise RuntimeError(f"generate returned {new.shape[1]} new tokens instead of {n_tokens}.")
                for r, i in enumerate(idx):
                    out[i] = new[r].tolist()
                if progress is not None:
                    progress(b + len(idx), len(order))
    finally:
        model.train(was_training)
        if saved_gen_cfg is not None:
            model.generation_config = saved_gen_cfg
    return out  # type: ignore[return-value]

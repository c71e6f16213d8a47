"""Teacher-forced scores of a fixed set of rows on the unedited model and on many edited versions of it, fast.

A row is (prompt ids, target ids); its score is a :class:`losses.SequenceScore` (log p(target | prompt), the mean
NLL per token, whether every target token is the argmax, the fraction that are, the argmax tokens), the figures
:meth:`editing.Editor.score` gives for the row alone. Evaluating thousands of edits scores hundreds of thousands of
rows, so :class:`RowScorer` does the same work with less computation, none of it approximate:

- **Repeated rows** (a neighbourhood prompt shared by several cases, with the same target) are scored once.
- **Rows that share a forward pass**: rows (P, T) and (P, T') with T[:-1] == T'[:-1] (most often: one-token targets
  after the same prompt, CounterFact's new and true object) read their logits from one pass over P + T[:-1].
- **Batches by length**: the passes are sorted by length and cut into batches of about ``batch_tokens`` tokens,
  so that little of a batch is padding.
- **Logits where they are read**: the output layer runs on the positions that predict target tokens alone
  (:func:`models.replay.output_layer_at`); on SmolLM2 it costs per position as much as 8 of the 30 blocks.
- **Replay of the unedited blocks** (:mod:`models.replay`): the pass on the unedited model records the output of the
  block before the first edited one; the passes on an edited model start from it and run only the edited blocks and
  those after them. The first replayed batch is checked against a full pass; a model whose forward does not allow it
  is scored with full passes (logged once).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from editable_model import cache_argument, forward_takes, logits_of, output_with_weights
from losses import SequenceScore
from models.replay import capture_block_output, first_edited_block, output_layer_at, replaying
from utils import pad_rows

LOG = logging.getLogger(__name__)
Row = Tuple[Sequence[int], Sequence[int]]


class RowScorer:
    """Scores of ``rows`` on ``editor``'s unedited model (:meth:`score_base`, once, first) and on edited models
    (:meth:`score`, any number of times, any subset of the rows). ``replay=False`` always runs full passes."""

    def __init__(self, editor, rows: Sequence[Row], batch_tokens: int = 2048, max_rows: int = 256, replay: bool = True):
        self.editor = editor
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        unique: Dict[Tuple[tuple, tuple], int] = {}
        self.row_of: List[int] = []  # row -> unique row
        for n, (prompt, target) in enumerate(rows):
            if not target or not prompt:
                raise ValueError(f"row {n}: a row needs a prompt and at least one target token.")
            self.row_of.append(unique.setdefault((tuple(prompt), tuple(target)), len(unique)))
        self.unique = list(unique)
        passes: Dict[Tuple[tuple, tuple], int] = {}
        self.pass_of = [passes.setdefault((p, t[:-1]), len(passes)) for p, t in self.unique]  # unique row -> pass
        self.passes = [(list(p) + list(x), len(p)) for p, x in passes]  # (ids, prompt length)
        self.rows_of_pass: List[List[int]] = [[] for _ in self.passes]
        for u, s in enumerate(self.pass_of):
            self.rows_of_pass[s].append(u)
        prompts: Dict[tuple, int] = {}
        self.prompt_of = [prompts.setdefault(p, len(prompts)) for p, _ in passes]  # pass -> distinct prompt
        self.prompts = [list(p) for p in prompts]
        self.passes_of_prompt: List[List[int]] = [[] for _ in self.prompts]
        for s, q in enumerate(self.prompt_of):
            self.passes_of_prompt[q].append(s)
        model = editor.model
        self.shared_prompts = forward_takes(model, "position_ids") and forward_takes(model, "use_cache")
        located = first_edited_block(editor.model, editor.inner_params) if replay else None
        self.blocks, self.k = located if located else (None, 0)
        self.hidden: Dict[int, torch.Tensor] = {}  # pass -> output of block k-1 on the unedited model
        self.as_tuple = False
        self.checked = False
        self.replayed = 0  # passes computed by replay (for the report)

    @property
    def n_rows(self) -> int:
        return len(self.row_of)

    @property
    def n_passes(self) -> int:
        return len(self.passes)

    def _batches(self, pass_ids: Sequence[int], sequences: Optional[List[List[int]]] = None) -> List[List[int]]:
        """``pass_ids`` (indices into ``sequences``, default the passes' ids) sorted by decreasing length and cut into
        batches of at most ``max_rows`` rows and ``batch_tokens`` tokens, padding included."""
        sequences = sequences if sequences is not None else [ids for ids, _ in self.passes]
        order = sorted(set(pass_ids), key=lambda s: (-len(sequences[s]), s))
        batches: List[List[int]] = []
        for s in order:
            if batches:
                last = batches[-1]
                width = len(sequences[last[0]])  # the longest: sorted by decreasing length
                if len(last) < self.max_rows and (len(last) + 1) * width <= self.batch_tokens:
                    last.append(s)
                    continue
            batches.append([s])
        return batches

    def _inputs(self, batch: List[int]):
        """(input_ids, attention_mask) of a batch of passes (right-padded), and the (row, position) of every
        position whose logits are read, in the order :meth:`_scores` reads them."""
        ids, mask = pad_rows([self.passes[s][0] for s in batch], self.editor.pad_id)
        rows, cols = [], []
        for b, s in enumerate(batch):
            ids_s, p = self.passes[s]
            cols += range(p - 1, len(ids_s))  # positions p-1 .. len-1 predict the target tokens
            rows += [b] * (len(ids_s) - p + 1)
        device = self.editor.device
        return ids.to(device), mask.to(device), (torch.tensor(rows, device=device), torch.tensor(cols, device=device))

    def _forward(self, model, ids, mask, where) -> torch.Tensor:
        """The logits (M, V) of the positions ``where`` on ``model``."""
        with output_layer_at(self.editor.model, *where) as picked:
            logits = model(ids, mask)
        return logits[0] if picked else logits[where]

    def _scores(self, picked: torch.Tensor, batch: List[int], out: Dict[int, SequenceScore]) -> None:
        """The scores of every unique row of the passes ``batch`` from the logits (M, V) of their target-predicting
        positions (:meth:`_inputs`'s order)."""
        starts, total = [], 0
        for s in batch:
            ids, p = self.passes[s]
            starts.append(total)
            total += len(ids) - p + 1
        log_probs = torch.log_softmax(picked.float() if picked.dtype != torch.float64 else picked, dim=-1)
        argmax = picked.argmax(-1).tolist()
        index, tokens, owners = [], [], []
        for s, start in zip(batch, starts):
            for u in self.rows_of_pass[s]:
                target = self.unique[u][1]
                index += range(start, start + len(target))
                tokens += target
                owners.append((u, start, len(target)))
        lp = log_probs[torch.tensor(index), torch.tensor(tokens)].tolist()
        k = 0
        for u, start, n in owners:
            values, target = lp[k : k + n], self.unique[u][1]
            k += n
            pred = argmax[start : start + n]
            hits = [a == t for a, t in zip(pred, target)]
            out[u] = SequenceScore(sum(values), -sum(values) / n, all(hits), sum(hits) / n, pred)

    def _collect(self, rows: Optional[Sequence[int]], scores: Dict[int, SequenceScore]) -> List[SequenceScore]:
        rows = range(self.n_rows) if rows is None else rows
        return [scores[self.row_of[r]] for r in rows]

    @torch.no_grad()
    def score_base(self, progress: Optional[Callable[[int], None]] = None) -> List[SequenceScore]:
        """Every row's score on the unedited model, recording what the edited models' passes replay. ``progress(n)``
        is called after each batch with its number of rows. Each distinct prompt runs once, its continuations on its
        key/value cache, where the model's forward takes position ids and a cache; else every pass runs whole."""
        if self.shared_prompts:
            return self._score_base_shared(progress)
        base = self.editor.base()
        scores: Dict[int, SequenceScore] = {}
        for batch in self._batches(range(self.n_passes)):
            ids, mask, where = self._inputs(batch)
            if self.k:
                with capture_block_output(self.blocks, self.k) as records:
                    logits = self._forward(base, ids, mask, where)
                if len(records) != 1 or records[0] is None:
                    LOG.info("%s: block outputs cannot be replayed; full forward passes.", type(self.editor.model))
                    self.k, self.hidden = 0, {}
                else:
                    hidden, self.as_tuple = records[0]
                    for b, s in enumerate(batch):
                        self.hidden[s] = hidden[b, : len(self.passes[s][0])].clone()
            else:
                logits = self._forward(base, ids, mask, where)
            self._scores(logits, batch, scores)
            if progress is not None:
                progress(sum(len(self.rows_of_pass[s]) for s in batch))
        return self._collect(None, scores)

    def _score_base_shared(self, progress) -> List[SequenceScore]:
        """:meth:`score_base` with one pass per distinct prompt (right-padded, the cache kept) and one pass for the
        continuations x = target[:-1] of its rows, on the prompts' cache: x's positions follow each prompt's last token
        (position ids) and the prompt's padding is masked."""
        model, cache_name = self.editor.model, cache_argument(self.editor.model)
        scores: Dict[int, SequenceScore] = {}
        for batch in self._batches(range(len(self.prompts)), self.prompts):
            ids, mask = pad_rows([self.prompts[q] for q in batch], self.editor.pad_id)
            ids, mask = ids.to(self.editor.device), mask.to(self.editor.device)
            lengths = [len(self.prompts[q]) for q in batch]
            rows = torch.arange(len(batch), device=ids.device)
            cols = torch.tensor([n - 1 for n in lengths], device=ids.device)
            out, first, hidden = self._cached_forward(
                model, {"input_ids": ids, "attention_mask": mask, "use_cache": True}, rows, cols
            )
            passes = [s for q in batch for s in self.passes_of_prompt[q]]
            conts = [s for s in passes if len(self.passes[s][0]) > self.passes[s][1]]
            where_of = {}  # pass -> its rows in the stacked logits
            logits = first
            hidden_x = None
            if conts:
                slot = {q: b for b, q in enumerate(batch)}
                parent = torch.tensor([slot[self.prompt_of[s]] for s in conts], device=ids.device)
                xs = [self.passes[s][0][self.passes[s][1] :] for s in conts]
                x_ids, x_mask = (t.to(ids.device) for t in pad_rows(xs, self.editor.pad_id))
                cache = getattr(out, cache_name)
                cache.reorder_cache(parent)  # one row per continuation, a copy of its prompt's
                start = torch.tensor([lengths[slot[self.prompt_of[s]]] for s in conts], device=ids.device)
                positions = start[:, None] + torch.arange(x_ids.shape[1], device=ids.device)[None]
                x_rows = torch.tensor([c for c, x in enumerate(xs) for _ in x], device=ids.device)
                x_cols = torch.tensor([j for x in xs for j in range(len(x))], device=ids.device)
                kwargs = {
                    "input_ids": x_ids,
                    "attention_mask": torch.cat([mask[parent], x_mask], 1),
                    "position_ids": positions,
                    "use_cache": True,
                    cache_name: cache,
                }
                _, more, hidden_x = self._cached_forward(model, kwargs, x_rows, x_cols)
                logits = torch.cat([first, more])
                offset = len(batch)
                for c, (s, x) in enumerate(zip(conts, xs)):
                    where_of[s] = [slot[self.prompt_of[s]]] + list(range(offset, offset + len(x)))
                    if hidden is not None and hidden_x is not None:
                        q = slot[self.prompt_of[s]]
                        self.hidden[s] = torch.cat([hidden[q, : lengths[q]], hidden_x[c, : len(x)]]).clone()
                    offset += len(x)
            for s in passes:
                if s not in where_of:
                    q = batch.index(self.prompt_of[s])
                    where_of[s] = [q]
                    if hidden is not None:
                        self.hidden[s] = hidden[q, : lengths[q]].clone()
            if self.k and (hidden is None or (conts and hidden_x is None)):
                LOG.info("%s: block outputs cannot be replayed; full forward passes.", type(model).__name__)
                self.k, self.hidden = 0, {}
            order = torch.tensor([i for s in passes for i in where_of[s]], device=ids.device)
            self._scores(logits[order], passes, scores)
            if progress is not None:
                progress(sum(len(self.rows_of_pass[s]) for s in passes))
        return self._collect(None, scores)

    def _cached_forward(self, model, kwargs: dict, rows: torch.Tensor, cols: torch.Tensor):
        """(the model's output, the logits (M, V) at positions (rows, cols), the output of block k-1 or None)."""
        with output_layer_at(model, rows, cols) as picked:
            if self.k:
                with capture_block_output(self.blocks, self.k) as records:
                    out = output_with_weights(model, {}, kwargs)
                record = records[0] if len(records) == 1 else None
                if record is not None:
                    self.as_tuple = record[1]
                hidden = None if record is None else record[0]
            else:
                out, hidden = output_with_weights(model, {}, kwargs), None
        logits = logits_of(out)
        return out, (logits[0] if picked else logits[rows, cols]), hidden

    @torch.no_grad()
    def score(self, model, rows: Optional[Sequence[int]] = None) -> List[SequenceScore]:
        """The scores of the rows ``rows`` (indices into the rows given; default all) on ``model`` (an
        :class:`patches.EditedModel` of the same base model), in that order."""
        rows = list(range(self.n_rows)) if rows is None else list(rows)
        needed = {self.pass_of[self.row_of[r]] for r in rows}
        scores: Dict[int, SequenceScore] = {}
        for batch in self._batches(needed):
            ids, mask, where = self._inputs(batch)
            logits = self._replayed(model, batch, ids, mask, where) if self.k and self.hidden else None
            if logits is None:
                logits = self._forward(model, ids, mask, where)
            self._scores(logits, batch, scores)
        return self._collect(rows, scores)

    def _replayed(self, model, batch: List[int], ids, mask, where) -> Optional[torch.Tensor]:
        """The logits of ``batch`` on ``model`` with blocks 0..k-1 replayed; the first time also computed in full
        and compared (None, and no more replay, if they differ)."""
        first = self.hidden[batch[0]]
        hidden = first.new_zeros((len(batch), ids.shape[1], first.shape[-1]))
        for b, s in enumerate(batch):
            h = self.hidden[s]
            hidden[b, : h.shape[0]] = h
        with replaying(self.blocks, self.k, lambda: hidden, self.as_tuple):
            logits = self._forward(model, ids, mask, where)
        if not self.checked:
            full = model(ids, mask)[where]  # every block and position, no shortcut: the reference
            same = torch.allclose(logits, full, 1e-3, 1e-3)
            self.checked = True
            if not same:
                LOG.warning(
                    "%s: replaying the unedited blocks changed the logits; scoring with full forward passes.",
                    type(self.editor.model).__name__,
                )
                self.k, self.hidden = 0, {}
                return full
        self.replayed += len(batch)
        return logits

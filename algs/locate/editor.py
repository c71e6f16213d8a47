"""The base class of the locate-then-edit editors (ROME, MEMIT, AlphaEdit): what they share besides the vectors of
``vectors.py``.

* Text: they build their own prompts (context templates, "<subject> is a"), so they need the tokenizer and the
  requests as text: ``attach_text(tokenizer, second_moments)`` (called by ``editing.Editor``) and the batch's
  ``requests`` (prompt, subject, target per row, put there by ``Editor.edit_patch``). A request without a subject
  raises :class:`errors.EditRequestError` naming the field ``subject``.
* Layers: each weight of ``model.inner_params`` is the output projection of an MLP; its module's input is the key,
  the MLP the module ROME writes its target to, the block (the module named up to the layer number) the one MEMIT
  writes to.
* State shared by every editor that ``with_weights`` returns (:class:`Shared`): the tokenizer, the key statistics,
  the context templates (sampled once from the unedited model), per-layer matrices derived from the statistics, and
  what an editor carries across a sequential run (AlphaEdit's keys so far).
* The update of each weight as low-rank factors (u: n x d_in, v: n x d_out; W~ = W + v^T u for nn.Linear,
  W + u^T v for Conv1D), for compact patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from editable_model import EditableModel
from errors import ConfigError, EditRequestError
from models import edited_module_name
from models.inner_params import weight_layout

from .text import LocateRequest
from .vectors import sample_context_templates


@dataclass
class Layer:
    """The modules of one edited weight: ``weight`` (its parameter name), ``rewrite`` (the projection whose input is
    the key), ``mlp`` (its parent) and ``block`` (the transformer block)."""

    weight: str
    rewrite: str
    mlp: str
    block: str

    @classmethod
    def of(cls, weight: str) -> Layer:
        rewrite = edited_module_name(weight)
        parts = rewrite.split(".")
        numbered = [i for i, p in enumerate(parts) if p.isdigit()]
        if not numbered:
            raise ConfigError(f"model.inner_params entry {weight!r} names no numbered block (e.g. model.layers.12.).")
        return cls(weight, rewrite, edited_module_name(rewrite), ".".join(parts[: numbered[-1] + 1]))


@dataclass
class Shared:
    tokenizer: object = None
    second_moments: object = None  # key_stats.SecondMoments: (module name, n_samples) -> (d_in, d_in)
    templates: Optional[List[List[str]]] = None  # context templates, grouped as MEMIT groups them
    derived: Dict[Tuple[str, str, float], torch.Tensor] = field(default_factory=dict)  # inverses, projections
    lifelong: Dict[str, torch.Tensor] = field(default_factory=dict)


def apply_factors(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``w`` plus the update with factors u (n x d_in) and v (n x d_out), in ``w``'s layout and dtype."""
    upd = u.T @ v if fan_in_fan_out else v.T @ u
    return w + upd.to(w.dtype)


class LocateEditor(EditableModel):
    needs_training = False  # closed form: keys from the model, targets optimised per request
    group = ""  # the settings group (``rome``, ``memit``, ``alphaedit``)
    # The context templates: (start texts, [(length, count)], one count over all starts (False) or per start).
    template_starts: Tuple[str, ...] = ()
    template_lengths: Tuple[Tuple[int, int], ...] = ()
    per_start = False

    causal_lm_only = True

    def __init__(self, model: nn.Module, config, weights=None, shared: Optional[Shared] = None):
        super().__init__(model, config, weights)
        self.layers = [Layer.of(n) for n in self.inner_params]
        self.layout = {
            n: weight_layout(model.get_submodule(edited_module_name(n)), n, type(self).__name__)
            for n in self.inner_params
        }
        self.shared = shared if shared is not None else Shared(lifelong=self.initial_lifelong())
        # Set on the editor that edit() returns: weight name -> (u, v), its update as low-rank factors.
        self.last_factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.eval.final_eval:
            raise ConfigError(
                f"eval.final_eval=true: python -m run has no requests with text and subject to evaluate alg={cfg.alg} "
                f"on (its held-out batches are token ids); leave it false (config/alg/{cfg.alg}.yaml) and evaluate the "
                f"archive with python -m edit eval --archive <run>."
            )

    @property
    def settings(self):
        return getattr(self.config, self.group)

    def initial_lifelong(self) -> Dict[str, torch.Tensor]:
        """The state a sequential run starts from (none; AlphaEdit: zero key products)."""
        return {}

    # -- the contract ---------------------------------------------------------------------------------------------
    def attach_text(self, tokenizer, second_moments) -> None:
        self.shared.tokenizer = tokenizer
        self.shared.second_moments = second_moments

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> LocateEditor:
        edited = type(self)(self.model, self.config, weights=weights, shared=self.shared)
        edited.train(self.training)
        return edited

    def outer_parameters(self) -> List[nn.Parameter]:
        return []

    def lifelong_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shared.lifelong.items()}

    @torch.no_grad()
    def load_lifelong_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key, value in self.shared.lifelong.items():
            value.copy_(state[key])

    def low_rank_update(self, name: str):
        if name not in self.last_factors:
            return None
        u, v = self.last_factors[name]
        return u, v, torch.tensor(-1.0, device=u.device), self.layout[name][0]

    # -- shared pieces --------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self.shared.tokenizer is None:
            raise ConfigError(
                f"alg={self.config.alg} builds its prompts from text and needs the tokenizer: edit through python -m "
                f"edit or editing.Editor (python -m run +alg={self.config.alg} evaluates nothing: it writes the "
                f"archive python -m edit reads)."
            )
        return self.shared.tokenizer

    def requests(self, batch: dict) -> List[LocateRequest]:
        """The batch's requests as the originals hold them; a request without a subject: EditRequestError."""
        rows = batch.get("requests")
        if rows is None:
            raise EditRequestError(
                f"alg={self.config.alg} needs each request's text and 'subject' (the words the fact is about); this "
                f"batch has token ids only. Edit through python -m edit / Editor with requests that give 'subject' "
                f"(python -m run +alg={self.config.alg} writes the archive for it)."
            )
        out = []
        for i, r in enumerate(rows):
            if not r.get("subject"):
                raise EditRequestError(
                    f"request {i} ({r['prompt']!r}) has no 'subject': alg={self.config.alg} writes the fact at the "
                    f'subject\'s last token; add "subject": "<the words of the prompt the fact is about>".'
                )
            out.append(LocateRequest.of(r["prompt"], r["subject"], r["target"]))
        return out

    def context_templates(self) -> List[List[str]]:
        """["{}"] and the generated templates, sampled once from the unedited model and kept."""
        if self.shared.templates is None:
            starts = [s if s else (self.tokenizer.bos_token or self.tokenizer.eos_token) for s in self.template_starts]
            sampled = sample_context_templates(
                self.model, self.tokenizer, starts, self.template_lengths, self.per_start
            )
            self.shared.templates = [["{}"]] + sampled
        return self.shared.templates

    def second_moment(self, layer: Layer) -> torch.Tensor:
        if self.shared.second_moments is None:
            self.tokenizer  # noqa: B018  (the same message: no text tools attached)
        n = int(self.settings.mom2_n_samples)
        prefetch = getattr(self.shared.second_moments, "prefetch", None)
        if prefetch is not None:  # every edited layer's statistics in one pass over the corpus
            prefetch([each.rewrite for each in self.layers], n)
        return self.shared.second_moments(layer.rewrite, n).to(self.current_weight(layer.weight).device)

    def derived(self, layer: Layer, kind: str, make) -> torch.Tensor:
        """A matrix derived from a layer's key statistics (ROME's inverse, AlphaEdit's projection), made once."""
        key = (layer.rewrite, kind, float(self.settings.mom2_n_samples))
        if key not in self.shared.derived:
            self.shared.derived[key] = make(self.second_moment(layer))
        return self.shared.derived[key]

    def edited_with(self, new_weights: Dict[str, torch.Tensor], factors, info: dict):
        edited = self.with_weights(new_weights)
        edited.last_factors = factors
        return edited, info

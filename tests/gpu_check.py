"""`make gpu-check`: the CUDA paths of laps in one command of a few minutes, for whenever a GPU machine is at hand.

1. `laps bench --device cuda --bf16`: fast engine against the per-caption reference on the GPU (their largest
   difference), evaluation and training rates in fp32 and under bf16 autocast;
2. `laps bench --train --device cuda --preset paper --batches 32 128`: seconds per training step and peak memory
   (max_memory_allocated) of ViT-B/16 + BERT-base for fp32, bf16 and fp16, with and without gradient
   checkpointing, and the largest batch estimated for 24 and 80 GiB (a combination that does not fit is an OOM row);
3. a small synthetic benchmark (or --data_path), the `cpu` preset with a global head trained on the GPU, in fp32 and
   again with `--precision bf16` (same seed: the effect of bf16 training on test recall, and its step time);
4. recall on the test split in fp32 and under bf16 autocast (the effect of bf16 on rsum, with intervals);
5. two-stage retrieval (`laps eval --rerank_topk`) on the GPU against exhaustive scoring.

Everything lands in --out (default runs/gpu-check): summary.json, and the run. Nothing else depends on it.
"""
import argparse, json, subprocess, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]


def laps(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, '-m', 'laps', *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0: raise SystemExit(f"gpu-check: `laps {' '.join(map(str, args))}` failed:\n{r.stderr[-3000:]}")
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='gpu_check', description=__doc__.splitlines()[0])
    p.add_argument('--out', default='runs/gpu-check'); p.add_argument('--data_path', default=None)
    p.add_argument('--device', default='cuda'); p.add_argument('--rerank_topk', type=int, default=50)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check", file=sys.stderr)
        return 1
    out = (ROOT / a.out).resolve(); out.mkdir(parents=True, exist_ok=True)
    summary, t0 = dict(device=torch.cuda.get_device_name(), torch=torch.__version__), time.time()
    def step(name):
        print(f"[gpu-check {time.time() - t0:6.1f} s] {name}", flush=True)

    step('laps bench --device cuda --bf16 (fast vs reference, fp32 and bf16 rates)')
    bench = json.loads(laps('bench', '--device', a.device, '--bf16', '--json').stdout)
    summary['bench'] = bench

    step('laps bench --train --device cuda --preset paper --batches 32 128 (precision x checkpointing, peak memory)')
    train_bench = json.loads(laps('bench', '--train', '--device', a.device, '--preset', 'paper', '--batches', 32, 128,
                                  '--precisions', 'fp32', 'bf16', 'fp16', '--json').stdout)
    summary['train_bench'] = train_bench

    data = Path(a.data_path) if a.data_path else out / 'data'
    if not a.data_path and not (data / 'synthetic' / 'meta.json').is_file():
        step('synthetic data (1500 train / 200 dev / 1000 test images)')
        laps('data', 'synthetic', '--out', data / 'synthetic', '--n_train', 1500, '--n_dev', 200, '--n_test', 1000,
             '--dev_probe_pairs', 20, '--test_probe_pairs', 50)
    run = out / 'run'
    if not (run / 'checkpoint_best').is_dir():
        step('train the cpu preset with a global head on the GPU')
        laps('train', '--preset', 'cpu', '--device', a.device, '--data_path', data, '--glob_loss_weight', 1.0,
             '--logger_name', run, '--no_progress')
    run16 = out / 'run-bf16'
    if not (run16 / 'checkpoint_best').is_dir():
        step('train the same in bf16 (--precision bf16)')
        t = time.time()
        laps('train', '--preset', 'cpu', '--device', a.device, '--data_path', data, '--glob_loss_weight', 1.0,
             '--precision', 'bf16', '--logger_name', run16, '--no_progress')
        summary['train_bf16_seconds'] = time.time() - t

    from laps.checkpoint.run import load_any_checkpoint
    from laps.eval.evaluate import evaluate_split
    from laps.eval.two_stage import evaluate_split_two_stage, format_two_stage
    model, cfg, _ = load_any_checkpoint(run)
    cfg = cfg.replace(data_path=str(data), device=a.device)
    model.to(a.device).eval()
    step('recall on test: fp32, then bf16 autocast')
    fp32, _ = evaluate_split(model, cfg, 'test', progress=False)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        bf16, _ = evaluate_split(model, cfg, 'test', progress=False)
    keep = ('rsum', 'rsum_ci95', 'i2t_r1', 't2i_r1')
    summary['recall'] = dict(fp32={k: fp32[k] for k in keep}, bf16={k: bf16[k] for k in keep},
                             rsum_bf16_minus_fp32=bf16['rsum'] - fp32['rsum'])
    model16, cfg16, _ = load_any_checkpoint(run16)
    trained16, _ = evaluate_split(model16.to(a.device).eval(), cfg16.replace(data_path=str(data), device=a.device,
                                                                             precision='fp32'), 'test', progress=False)
    summary['recall']['trained_bf16'] = {k: trained16[k] for k in keep}
    step(f'two-stage retrieval on {a.device}, K={a.rerank_topk}')
    ts = evaluate_split_two_stage(model, cfg, 'test', a.rerank_topk, progress=False)
    summary['two_stage'] = ts
    summary['seconds'] = time.time() - t0
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in bench.items() if 'diff' in k or 'per_s' in k or 'speedup' in k}, indent=1, default=str))
    from laps.training.bench import format_train_bench
    print(format_train_bench(train_bench))
    print(f"recall on test: fp32 rsum {fp32['rsum']:.1f} {fp32['rsum_ci95']}, bf16 rsum {bf16['rsum']:.1f} "
          f"{bf16['rsum_ci95']} (bf16 - fp32: {summary['recall']['rsum_bf16_minus_fp32']:+.2f}); trained in bf16: "
          f"rsum {trained16['rsum']:.1f} {trained16['rsum_ci95']}")
    print(format_two_stage(ts))
    print(f"gpu-check: {summary['seconds']:.0f} s; {out / 'summary.json'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())

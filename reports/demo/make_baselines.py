"""Write reports/demo/baselines.md (and .json): the `dense` and `global` baselines trained with the demo's budget.

Usage (from the repository root, after `make demo`'s data exists):
    python reports/demo/make_baselines.py RUN_DIR...
Each RUN_DIR was trained with `laps train --preset cpu --data_path DATA --similarity_calc_method M` and
evaluated as `make demo` evaluates, `laps eval RUN_DIR --split test --precision bf16` (which writes
RUN_DIR/metrics_test.json with its command). The table records, per run, the training command and commit (from
RUN_DIR/commands.jsonl), the evaluation command and commit, test rsum with its 95% interval and the probe means per kind.
`make demo` prints the Markdown file beside its own tables.
"""
import json, sys
from pathlib import Path

def run_row(run: Path) -> dict:
    m = json.loads((run / 'metrics_test.json').read_text())
    cmds = [json.loads(l) for l in (run / 'commands.jsonl').read_text().splitlines() if l.strip()]
    train = next(c for c in cmds if 'train' in c['argv'][:3])
    cfg = json.loads((run / 'config.json').read_text())
    mp = m['minimal_pairs']
    return dict(run=str(run), method=cfg['similarity_calc_method'], cls=cfg['use_cls_as_glob_embd'],
                command='laps ' + ' '.join(train['argv'][1:]), commit=train['commit'], seed=cfg['seed'],
                eval_command='laps ' + ' '.join(m['command']['argv'][1:]), eval_commit=m['command']['commit'],
                rsum=m['rsum'], rsum_ci95=m['rsum_ci95'], mean=mp['overall']['mean'], mean_ci95=mp['overall']['mean_ci95'],
                kinds={k: v['mean'] for k, v in mp['kinds'].items()})

def main(argv):
    rows = [run_row(Path(r)) for r in argv[1:]]
    kinds = list(rows[0]['kinds'])
    out = Path(__file__).parent
    (out / 'baselines.json').write_text(json.dumps(rows, indent=1) + '\n')
    lines = ['Baselines with the demo\'s budget (the `cpu` preset, one flag changed; same data, seed 0; run once, recorded):', '',
             '| run | test rsum [95% CI] | probe mean [95% CI] | ' + ' | '.join(k.replace('_', ' ') for k in kinds) + ' |',
             '|---|---|---|' + '---|' * len(kinds)]
    for r in rows:
        name = r['method'] + (' ([CLS] tokens)' if r['method'] == 'global' and r['cls'] else ' (mean-pooled)' if r['method'] == 'global' else '')
        lines.append(f"| `{name}` | {r['rsum']:.1f} [{r['rsum_ci95'][0]:.1f}, {r['rsum_ci95'][1]:.1f}] | {r['mean']:.1f} "
                     f"[{r['mean_ci95'][0]:.1f}, {r['mean_ci95'][1]:.1f}] | " + ' | '.join(f"{r['kinds'][k]:.1f}" for k in kinds) + ' |')
    lines += [''] + [f"- `{r['method']}`: `{r['command']}` (commit {r['commit']}), then `{r['eval_command']}` "
                     f"(commit {r['eval_commit']})" for r in rows]
    (out / 'baselines.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

if __name__ == '__main__':
    if len(sys.argv) < 2: sys.exit(__doc__)
    main(sys.argv)

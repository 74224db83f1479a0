"""Generate README.md from nbs/index.ipynb (markdown cells verbatim, code cells as fenced blocks).

nbdev 2.4's `nbdev_readme` needs Quarto, which the project's machines do not have; this small
generator keeps the same contract: the README is never edited by hand.
"""
import json, pathlib, sys

root = pathlib.Path(__file__).resolve().parent.parent
nb = json.loads((root / 'nbs' / 'index.ipynb').read_text())
parts = ['<!-- generated from nbs/index.ipynb by `make readme`: do not edit -->']
for cell in nb['cells']:
    src = ''.join(cell['source']).strip('\n')
    if not src: continue
    if cell['cell_type'] == 'markdown': parts.append(src)
    elif cell['cell_type'] == 'code':
        parts.append(f"```python\n{src}\n```")
        for out in cell.get('outputs', []):
            text = ''.join(out.get('text', '') or out.get('data', {}).get('text/plain', ''))
            if text.strip(): parts.append(f"```\n{text.rstrip()}\n```")
out = '\n\n'.join(parts) + '\n'
target = root / 'README.md'
if not target.exists() or target.read_text() != out:
    target.write_text(out)
    print('wrote README.md', file=sys.stderr)

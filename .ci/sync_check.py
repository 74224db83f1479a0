"""Fail when `nbdev_export`, `nbdev_clean` or the README generator would change any file.

Hashes laps/, nbs/ and README.md, runs the three generators, hashes again. The generators leave
the regenerated files in place, so after a failure `git diff` shows what was out of sync.
"""
import hashlib, pathlib, subprocess, sys

root = pathlib.Path(__file__).resolve().parent.parent
bindir = pathlib.Path(sys.executable).parent

def snapshot():
    files = [p for d in ('laps', 'nbs') for p in (root / d).rglob('*')
             if p.is_file() and '__pycache__' not in p.parts and '.ipynb_checkpoints' not in p.parts]
    files.append(root / 'README.md')
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
            for p in files}

before = snapshot()
for cmd in ([str(bindir / 'nbdev_export')], [str(bindir / 'nbdev_clean')],
            [sys.executable, str(root / '.ci' / 'make_readme.py')]):
    subprocess.run(cmd, cwd=root, check=True)
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
if changed:
    print('Out of sync (run `make export clean-nbs readme` and commit):', *changed, sep='\n  ')
    sys.exit(1)
print(f'sync-check: {len(after)} files in laps/, nbs/ and README.md are what the notebooks generate')

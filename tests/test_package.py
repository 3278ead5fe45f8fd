"""Package-level promises: a light import, registration on import."""
import subprocess
import sys

# What our optional features need; `import fewshot_lkca` must not pay for any of them.
HEAVY = ('learn2learn', 'albumentations', 'cv2', 'onnx', 'onnxruntime', 'onnxscript', 'matplotlib', 'gym',
         'executorch')


def _imported_modules(statement: str) -> set[str]:
    code = f'import sys\n{statement}\nprint("\\n".join(sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_is_light_and_registers_models():
    timm_alone = _imported_modules('import timm')
    ours = _imported_modules("import fewshot_lkca, timm\nassert timm.is_model('lkca_mobilenet')")
    extra_top_level = {m.split('.')[0] for m in ours - timm_alone}
    assert extra_top_level <= {'fewshot_lkca'}, f'import fewshot_lkca pulled in: {sorted(extra_top_level)}'
    assert not {m for m in HEAVY if m in timm_alone}, 'timm itself now imports one of HEAVY: recheck this test'


def test_models_register_whatever_the_import_order():
    # The package import loads no torch (the predictor runs without it), so registration rides on timm's import;
    # importing our layers first imports timm from inside them, which must not leave the models unregistered.
    orders = ['import fewshot_lkca, timm', 'import timm, fewshot_lkca',
              'from fewshot_lkca.layers import LKCA; import timm',
              'from fewshot_lkca.layers.lkca import LKCA; import timm',
              'from fewshot_lkca.data import eval_transform; import timm']
    for statement in orders:
        _imported_modules(f"{statement}\nassert timm.is_model('lkca_mobilenet'), {statement!r}")
    assert 'torch' not in _imported_modules('import fewshot_lkca')


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, imports inside functions included (from the source, by ast)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / 'fewshot_lkca'
    names = {}
    for path in root.rglob('*.py'):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        names['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    graph = {}
    for name, path in names.items():
        package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split('.')[:len(package.split('.')) - node.level + 1] if node.level else []
                module = '.'.join(base + ([node.module] if node.module else []))
                found = [module] + [f'{module}.{a.name}' for a in node.names]
            else:
                continue
            for item in found:  # the deepest module of ours that the import names
                parts = item.split('.')
                hit = next(('.'.join(parts[:k]) for k in range(len(parts), 0, -1) if '.'.join(parts[:k]) in names),
                           None)
                if hit and hit != name and names[hit].name != '__init__.py':  # a package's __init__ re-exports
                    targets.add(hit)
        graph[name] = targets
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _package_imports()
    state, path = {}, []

    def visit(node):  # depth-first search; meeting a module still on the path closes a cycle
        state[node] = 'open'
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 'done'

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert 'fewshot_lkca.config' in graph and graph['fewshot_lkca.finetune'], 'the import graph was not read'


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    # The check reads source: an import inside a function counts as much as one at the top.
    graph = _package_imports()
    assert 'fewshot_lkca.export.formats' in graph['fewshot_lkca.config']  # imported inside FinetuneConfig.validate
